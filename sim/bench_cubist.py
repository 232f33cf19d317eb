"""`procube bench cubist`: merge-unit cycles per frame against the input bound H*W*C/P.

Each configuration is built once for Verilator and runs the testbench's
``test_throughput``: frames back to back, no input gaps, no output stalls, every frame
checked bit-exact against ``golden.cubist_fixed``. ``cycles_per_frame`` is the steady
state (interval between the last output beats of consecutive frames, the first frame
excluded); ``latency`` is from the first input beat to the first output beat of the
first frame. Target: ``cycles_ratio`` <= 1.10 for the default configuration.

``--icebreaker`` adds the iCEBreaker's area-optimized configuration at 14x14x64, P=4
(``fpga.designs.BOARD_DEFAULTS``: shared key path, one frame-buffer bank, serial
products), which runs at half the input rate by design; its ratio is reported with no
target.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HELP = "merge unit cycles per frame vs the input bound H*W*C/P (Verilator)"
TARGET = 1.10

# (h, w, c, lanes): the elaboration configuration, run at its full size.
FULL = [(14, 14, 64, 4), (32, 32, 64, 8)]
QUICK = [(14, 14, 64, 4)]
RS = [(1, 1), (2, 2), (0, 0)]


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="only 14x14x64, P=4 (default: also 32x32x64, P=8)")
    parser.add_argument("--icebreaker", action="store_true",
                        help="also the iCEBreaker's area-optimized configuration (no target)")
    parser.add_argument("--frames", type=int, default=4,
                        help="frames per measurement, 3..20 (default: 4)")
    parser.add_argument("--out", type=Path, default=Path("out/bench/cubist.md"),
                        help="markdown table (default: out/bench/cubist.md)")


def icebreaker_params() -> dict:
    """The merge unit's parameters on the iCEBreaker (beyond h, w, c, lanes)."""
    from fpga.designs import board_params

    return {k: v for k, v in board_params("icebreaker", "cubist").items()
            if k not in ("h", "w", "c", "lanes", "unmerge")}


def measure(configs, frames: int, extra: dict | None = None) -> list[dict]:
    from hw.cubist import design_from_params
    from sim.runner import simulate

    rows = []
    variant = " (iCEBreaker)" if extra else ""
    for h, w, c, lanes in configs:
        design = dict(h=h, w=w, c=c, lanes=lanes, width=8, frac_bits=16, max_prefix=0,
                      unmerge=0, **(extra or {}))
        t0 = time.monotonic()
        r = simulate(design_from_params(**design), test_module="sim.tb.tb_cubist",
                     simulator="verilator", name="cubist", testcase="test_throughput",
                     params={**design, "bench": [[h, w, *rr] for rr in RS],
                             "bench_frames": frames})
        if not r.passed:
            raise RuntimeError(f"{h}x{w}x{c} P={lanes}: the testbench failed, see {r.log}")
        for run in r.metrics["throughput"]:
            hh, ww, r_h, r_w = run["config"]
            rows.append({
                "config": f"{hh}x{ww}x{c} P={lanes} r=({r_h},{r_w}){variant}",
                "h": hh, "w": ww, "c": c, "lanes": lanes, "r_h": r_h, "r_w": r_w,
                "cycles_per_frame": run["cycles_per_frame"],
                "input_bound_cycles": run["input_bound_cycles"],
                "cycles_ratio": round(run["cycles_ratio"], 4),
                "latency": run["latency"],
                "target": None if extra else TARGET,
                "pass": True if extra else run["cycles_ratio"] <= TARGET,
                "sim_seconds": round(time.monotonic() - t0, 1),
            })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| config | cycles/frame | input bound H·W·C/P | ratio | latency (cycles) | "
             f"≤ {TARGET} |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['cycles_per_frame']:.1f} | "
                     f"{r['input_bound_cycles']} | {r['cycles_ratio']:.3f} | {r['latency']} | "
                     f"{'n/a' if r['target'] is None else 'pass' if r['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if not 3 <= args.frames <= 20:
        raise ValueError(f"frames must be in 3..20, not {args.frames}")
    rows = measure(QUICK if args.quick else FULL, args.frames)
    if args.icebreaker:
        rows += measure(QUICK, args.frames, icebreaker_params())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# procube bench cubist\n\nFrames back to back, no stalls, "
                        "Verilator; r=(0,0) is reported, the target applies to r>0.\n\n"
                        + markdown(rows))
    if args.json:
        print(json.dumps({"target": TARGET, "results": rows}, indent=1))
    else:
        print(markdown(rows), end="")
        print(f"written to {args.out}")
    return 0 if all(r["pass"] for r in rows if (r["r_h"], r["r_w"]) != (0, 0)) else 1
