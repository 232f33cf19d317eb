"""``procube bench fmax``: out-of-context fmax and resources of a registered design.

A design of :mod:`hw.designs` is placed alone on a board's FPGA, without the UART link,
inside :class:`OOCTop`:

* every input port is driven by its own flip-flop of a shift chain fed by a 32-bit
  LFSR, so no input is constant and none is shared: synthesis can prune nothing from
  what the inputs reach, and every input path starts at a register;
* every output port is registered and folded into a multiple-input signature register
  (MISR: each bit takes its rotated neighbour XOR one output bit), whose bit 0 drives
  one LED pin; every output bit is observable, so nothing is optimized away, and every
  output path ends at a register one LUT away.

The wrapper adds about one flip-flop per port bit and one LUT per output bit. The
flow is :func:`fpga.build.run_plan`, the same YoWASP (or ``$YOSYS`` ...) synthesis and
place and route as ``procube build``, with the clock constrained to the board's target
(100 MHz on the ULX3S-85F, 30 MHz on the iCEBreaker); fmax and utilization come from
nextpnr's ``--report``. Results are cached by the build plan's hash, like bitstreams.

Large designs: ``router="router2"`` selects nextpnr's second router (often much faster on
congested ECP5 designs); ``place_only=True`` stops after placement (nextpnr
``--no-route``) and reports the placer's estimate of fmax from nextpnr's log, with the
resources and the estimated critical path: nextpnr prints none before routing, so it
writes an SDF of its predicted delays (``--sdf top.sdf``) and :mod:`fpga.sdf_sta` finds
the worst path in it (the path behind the placer's estimate). ``nextpnr_args`` passes
placer and router options that fight congestion through to nextpnr, from a fixed list
(:data:`NEXTPNR_ARGS`: e.g. ``--placer static``, ``--placer-heap-beta 0.7``,
``--tmg-ripup``); they are part of the build plan, so each set is cached apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
from pathlib import Path

from amaranth.hdl import Cat, Elaboratable, Module, Signal, Value
from amaranth.lib import io, wiring

__all__ = ["HELP", "NEXTPNR_ARGS", "OOCTop", "ROUTERS", "add_arguments", "critical_path",
           "estimated_critical_path", "measure", "placed_fmax", "run"]

HELP = "out-of-context fmax and resources of one design on a board's FPGA (nextpnr)"

DESCRIPTION = (
    "Place and route one design of hw.designs alone on a board's FPGA (no UART link) and "
    "print nextpnr's fmax, resources and critical path. Every input port is driven by its "
    "own flip-flop of an LFSR-fed shift chain and every output port is registered into a "
    "signature register (MISR) that drives one LED pin, so nothing is optimized away and "
    "every path starts and ends at a register. Same tools as 'procube build' (YoWASP "
    "unless $YOSYS, $NEXTPNR_ECP5 ... are set); the clock is constrained to the board's "
    "target (ULX3S-85F 100 MHz, iCEBreaker 30 MHz); parameters are the design's defaults "
    "with the board's overrides (as 'procube build'), then --param; results are cached "
    "under --out by the build plan's hash.")

LFSR_TAPS = (32, 22, 2, 1)  # x^32 + x^22 + x^2 + x + 1, maximal length
ROUTERS = ("router1", "router2")  # nextpnr's --router choices (router1 is its default)
# nextpnr options that may be passed through (--nextpnr-arg): name -> the allowed values
# (None: a flag without a value; a tuple: one of those words; a (lo, hi) pair of numbers:
# a number in that range). Only placer and router options: the ones this module sets
# itself (--seed, --router, --no-route, --report, the device) are not in the list.
NEXTPNR_ARGS = {
    "--placer": ("heap", "sa", "static"),
    "--placer-heap-alpha": (0.0, 1.0),
    "--placer-heap-beta": (0.1, 1.0),
    "--placer-heap-critexp": (1, 8),
    "--placer-heap-timingweight": (0, 100),
    "--placer-heap-cell-placement-timeout": (1, 1000),
    "--placer-heap-no-ctrl-set": None,
    "--tmg-ripup": None,
    "--router2-alt-weights": None,
    "--no-tmdriv": None,
}
_MAX_FREQ = re.compile(r"Max frequency for clock '[^']*': ([0-9.]+) MHz")


class OOCTop(Elaboratable):
    """``dut`` (a ``wiring.Component``) with LFSR-driven registered inputs and its
    outputs registered into a MISR; the MISR's bit 0 leaves on ``led`` 0 (or, without a
    platform, on :attr:`observe`)."""

    def __init__(self, dut):
        if not isinstance(dut, wiring.Component):
            raise ValueError(f"dut must be an amaranth wiring.Component, not "
                             f"{type(dut).__name__}")
        self.dut = dut
        ins, outs = [], []
        for _path, member, value in dut.signature.flatten(dut):
            (ins if member.flow == wiring.In else outs).append(Value.cast(value))
        if not outs:
            raise ValueError("dut must have at least one output port")
        self.in_bits = sum(len(v) for v in ins)
        self.out_bits = sum(len(v) for v in outs)
        self._ins, self._outs = ins, outs
        self.observe = Signal()

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = self.dut
        lfsr = Signal(32, init=1)
        fb = lfsr[LFSR_TAPS[0] - 1]
        for t in LFSR_TAPS[1:]:
            fb = fb ^ lfsr[t - 1]
        m.d.sync += lfsr.eq(Cat(fb, lfsr[:-1]))
        if self.in_bits:
            chain = Signal(self.in_bits)
            m.d.sync += chain.eq(Cat(lfsr[-1], chain[:-1]))
            m.d.comb += Cat(*self._ins).eq(chain)
        outs = Signal(self.out_bits)
        misr = Signal(self.out_bits)
        m.d.sync += [outs.eq(Cat(*self._outs)),
                     misr.eq(Cat(misr[-1], misr[:-1]) ^ outs)]
        m.d.comb += self.observe.eq(misr[0])
        if platform is not None:
            led = platform.request("led", 0, dir="-")
            m.submodules.led_buf = buf = io.Buffer("o", led)
            m.d.comb += buf.o.eq(self.observe)
        return m


def critical_path(report: dict) -> dict | None:
    """The worst path of nextpnr's report: start and end cells, delay, logic levels."""
    paths = report.get("critical_paths") or []
    if not paths:
        return None
    steps = paths[0]["path"]
    return {"from": steps[0]["from"]["cell"], "to": steps[-1]["to"]["cell"],
            "delay_ns": round(sum(s["delay"] for s in steps), 2),
            "logic_levels": sum(1 for s in steps if s["type"] == "logic"),
            "nets": [s["net"] for s in steps if s.get("net")]}


def estimated_critical_path(sdf: Path) -> dict | None:
    """The worst path of a placed design's SDF (nextpnr's predicted net delays), in the
    form of :func:`critical_path` (``nets``: the sink pins, ``estimated``: True)."""
    from .sdf_sta import analyze, worst_paths

    paths = worst_paths(analyze(sdf), 1)
    if not paths:
        return None
    wp = paths[0]
    return {"from": wp["from"], "to": wp["to"], "delay_ns": wp["delay_ns"],
            "logic_levels": wp["logic_levels"], "estimated": True,
            "nets": [f"{cell}.{port}" for (cell, port), kind, _, _ in wp["steps"]
                     if kind == "net"]}


def placed_fmax(log: str) -> float:
    """The placer's fmax estimate: the last "Max frequency for clock" of nextpnr's log
    (the worst clock of that report)."""
    from .build import BuildError

    found = _MAX_FREQ.findall(log)
    if not found:
        raise BuildError("nextpnr's log has no 'Max frequency for clock' line")
    return round(float(found[-1]), 2)


def nextpnr_arg_words(args) -> list[str]:
    """Check ``args`` (``"--name"`` or ``"--name=value"`` strings) against
    :data:`NEXTPNR_ARGS` and return them as nextpnr's command-line words."""
    words = []
    for a in args:
        name, eq, value = str(a).partition("=")
        if name not in NEXTPNR_ARGS:
            raise ValueError(f"nextpnr_args must be among {', '.join(NEXTPNR_ARGS)}, "
                             f"not {name!r}")
        allowed = NEXTPNR_ARGS[name]
        if allowed is None:
            if eq:
                raise ValueError(f"nextpnr_args: {name} takes no value, not {value!r}")
            words.append(name)
            continue
        if isinstance(allowed[0], str):
            if value not in allowed:
                raise ValueError(f"nextpnr_args: {name} must be one of "
                                 f"{', '.join(allowed)}, not {value!r}")
        else:
            lo, hi = allowed
            try:
                num = (int if isinstance(lo, int) else float)(value)
            except ValueError:
                num = None
            if num is None or not lo <= num <= hi:
                raise ValueError(f"nextpnr_args: {name} must be in {lo}..{hi}, "
                                 f"not {value!r}")
            value = str(num)
        words += [name, value]
    return words


def measure(design: str, params: dict | None = None, *, board: str = "ulx3s",
            seeds=(1,), out: Path | str = "build/fpga", target_mhz: float | None = None,
            cache: bool = True, router: str | None = None, place_only: bool = False,
            nextpnr_args=()) -> dict:
    """Place and route ``design`` alone on ``board``'s FPGA once per seed.

    Parameters are the design's defaults, then the board's (as ``procube build``), then
    ``params``. ``router`` is nextpnr's router (``router1``, its default, or
    ``router2``); ``place_only`` stops after placement and reports the placer's fmax
    estimate (no critical path). ``nextpnr_args``: more nextpnr options, each
    ``"--name"`` or ``"--name=value"`` from :data:`NEXTPNR_ARGS` (ECP5 only). Returns
    ``{"design", "board", "device", "params", "wrapper", "runs": [per seed: fmax,
    resources, critical path], "fmax_mhz": {min, median, max}, "router", "place_only",
    "nextpnr_args"}``.
    """
    from hw import designs as hw_designs

    from .boards import BOARDS, get_board, make_platform, synth_overrides
    from .build import _tool_versions, parse_nextpnr_report, run_plan
    from .designs import board_params

    if board not in BOARDS:
        raise ValueError(f"board must be one of {', '.join(BOARDS)}, not {board!r}")
    spec = get_board(board)
    d = hw_designs.get(design)
    seeds = list(seeds)
    if not 1 <= len(seeds) <= 8:
        raise ValueError(f"number of seeds must be in 1..8, not {len(seeds)}")
    for s in seeds:
        if not 1 <= s <= 2**31 - 1:
            raise ValueError(f"seed must be in 1..2147483647, not {s}")
    target = spec.target_mhz if target_mhz is None else target_mhz
    if not 1 <= target <= 500:
        raise ValueError(f"target_mhz must be in 1..500, not {target}")
    if router is not None and router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}, not {router!r}")
    extra = nextpnr_arg_words(nextpnr_args)
    if extra and spec.family != "ecp5":
        raise ValueError(f"nextpnr_args are for the ECP5 (ulx3s), not {board}")
    full = {**d.defaults(), **board_params(board, design, params)}
    versions = _tool_versions(spec.family)
    runs, wrapper = [], None
    for seed in seeds:
        try:  # the constructor validates the parameters before any tool runs
            top = OOCTop(d.build(**full))
        except hw_designs.DesignUnavailable as e:
            raise ValueError(str(e)) from None
        wrapper = {"input_bits": top.in_bits, "output_bits": top.out_bits}
        platform = make_platform(spec, target)
        np_opts = f"--seed {seed} --report top.report.json --timing-allow-fail"
        if router is not None:
            np_opts += f" --router {router}"
        if place_only:
            np_opts += " --no-route --sdf top.sdf"
        if extra:
            np_opts += " " + " ".join(extra)
        opts = {"nextpnr_opts": np_opts, **synth_overrides(spec)}
        plan = platform.build(top, name="top", do_build=False, **opts)
        key = hashlib.sha256((plan.digest().hex() + json.dumps(versions, sort_keys=True))
                             .encode()).hexdigest()[:16]
        bdir = Path(out) / f"ooc-{board}-{design}-{key}"
        path = bdir / "ooc.json"
        if cache and path.exists():
            res = json.loads(path.read_text())
            res["cached"] = True
        else:
            np_report, seconds = run_plan(plan, bdir, spec.family)
            cp = critical_path(np_report)
            if place_only:  # no timing in the report before routing: the placer's estimate
                np_report = {**np_report, "fmax": {"placed": {
                    "achieved": placed_fmax((bdir / "top.tim").read_text()),
                    "constraint": target}}}
                cp = estimated_critical_path(bdir / "top.sdf")
            parsed = parse_nextpnr_report(np_report, spec.family)
            res = {"seed": seed, "fmax_mhz": parsed["fmax_mhz"],
                   "resources": parsed["resources"], "critical_path": cp,
                   "placed_only": place_only, "seconds": round(seconds, 1), "dir": str(bdir)}
            path.write_text(json.dumps(res, indent=2) + "\n")
            res["cached"] = False
        runs.append(res)
    fm = [r["fmax_mhz"] for r in runs]
    return {"design": design, "board": board, "device": spec.device, "params": full,
            "target_mhz": target, "wrapper": wrapper, "tools": versions, "runs": runs,
            "fmax_mhz": {"min": min(fm), "median": statistics.median(fm), "max": max(fm)},
            "router": router or "router1", "place_only": place_only,
            "nextpnr_args": extra}


def summary_lines(result: dict) -> list[str]:
    lines = [f"{result['design']} out of context on {result['device']} ({result['board']}), "
             f"params {result['params']}"
             + (f", nextpnr {' '.join(result['nextpnr_args'])}"
                if result.get("nextpnr_args") else ""),
             f"  wrapper: {result['wrapper']['input_bits']} input bits from an LFSR chain, "
             f"{result['wrapper']['output_bits']} output bits into a MISR"]
    for r in result["runs"]:
        res = r["resources"]
        cells = "  ".join(f"{k} {v['used']}" for k, v in res.items() if k != "IO")
        when = "cached" if r.get("cached") else f"{r['seconds']} s"
        kind = "placement estimate of fmax" if r.get("placed_only") else "fmax"
        lines.append(f"  seed {r['seed']}: {kind} {r['fmax_mhz']:.2f} MHz  {cells}  ({when})")
        cp = r.get("critical_path")
        if cp:
            lines.append(f"    {'estimated ' if cp.get('estimated') else ''}critical path "
                         f"{cp['delay_ns']} ns, logic cells "
                         f"{cp['logic_levels']}: {cp['from']} -> {cp['to']}")
    f = result["fmax_mhz"]
    verdict = "met" if result["runs"][0]["fmax_mhz"] >= result["target_mhz"] else "MISSED"
    lines.append(f"  fmax min/median/max {f['min']:.2f}/{f['median']:.2f}/{f['max']:.2f} MHz; "
                 f"target {result['target_mhz']:g} MHz {verdict} at seed "
                 f"{result['runs'][0]['seed']}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hw import designs as hw_designs

    from .boards import BOARDS
    from .build import _kv

    parser.description = DESCRIPTION
    parser.add_argument("--design", required=True, choices=list(hw_designs.DESIGNS),
                        help="a design of the registry (hw.designs)")
    parser.add_argument("--board", choices=list(BOARDS), default="ulx3s",
                        help="whose FPGA, clock target and default parameters (default: ulx3s)")
    parser.add_argument("--param", action="append", type=_kv, default=[], metavar="NAME=INT",
                        help="override a design parameter (repeatable), e.g. --param h=8")
    parser.add_argument("--seed", action="append", type=int, default=[],
                        help="nextpnr seed, repeatable to see the placement spread "
                             "(default: 1; the first one decides met/missed)")
    parser.add_argument("--target-mhz", type=float, default=None,
                        help="clock constraint for place and route (default: the board's)")
    parser.add_argument("--out", type=Path, default=Path("build/fpga"),
                        help="build root (default: build/fpga)")
    parser.add_argument("--router", choices=list(ROUTERS), default=None,
                        help="nextpnr's router (default: nextpnr's, router1; router2 is "
                             "often much faster on large, congested designs)")
    parser.add_argument("--place-only", action="store_true",
                        help="stop after placement and report nextpnr's placement estimate "
                             "of fmax and the estimated critical path (no routing)")
    parser.add_argument("--nextpnr-arg", action="append", default=[], metavar="--NAME[=V]",
                        help="pass a placer/router option to nextpnr (ECP5; repeatable; "
                             "write it with '=', e.g. --nextpnr-arg=--placer=static): "
                             + ", ".join(NEXTPNR_ARGS))
    parser.add_argument("--no-cache", action="store_true", help="run the tools even if cached")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    import sys

    from .build import BuildError
    from .toolchain import ToolchainError

    try:
        result = measure(args.design, dict(args.param), board=args.board,
                         seeds=args.seed or [1], out=args.out, target_mhz=args.target_mhz,
                         cache=not args.no_cache, router=args.router,
                         place_only=args.place_only, nextpnr_args=args.nextpnr_arg)
    except (BuildError, ToolchainError) as e:
        print(f"procube bench fmax: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in summary_lines(result):
            print(line)
    return 0
