"""Benchmark: one Dropback/Procrustes optimizer step vs one ``torch.optim.SGD`` step.

Parameter set: the 62 tensors of torchvision's ResNet-18 (11,689,512 elements),
built as plain float32 tensors; ``track_size = N/10``. Measured as in training:
every optimizer takes consecutive steps on its own weights with FRESH random
gradients each step (the same gradients for every mode, copied into each
optimizer's ``.grad`` right before its step), so the top-k threshold hint sees
the real step-to-step drift and the quantile estimator the real stream. After
``warmup`` untimed steps (numba compilation, then the top-k hint band and
the quantile estimator settle), the modes run interleaved in rounds (rotating
order); each round gives each mode a ratio to the SGD step of the SAME round
(the pair is measured within milliseconds, so a change of machine load between
rounds mostly cancels), and the table reports the median of those per-round
ratios with their interquartile range, in thread CPU time
(``time.thread_time``: the cores are shared with other jobs); wall-clock
ratios are reported beside them. The CounterInit modes start from the weights
CounterInit regenerates (``apply_``), as in training. Target: ratio <= 3.0.
The JSON and the table give the fast-path rates: top-k steps decided on the
threshold hint, quantile blocks of 256 decided in bulk.

Torch runs with one thread by default (the numba kernels are single-threaded;
``--threads`` changes it).

What each mode costs (11.7M elements, one core; the figures per machine, and
what was tried, are in the README's Dropback "Speed" paragraph):

* top-k, stored w0: one fused pass (SGD step, score, counts, tracked/reset/
  pending decision) reads w, g and w0 and writes w and the mask. Then the
  elements left pending are decided: in this benchmark ~10k in the prediction
  band and ~120-150k below it (weights tracked on the previous step that drop
  out: fresh random gradients churn the tracked set). A hint miss (first
  steps, jumps) costs ~5 passes; after the warm-up every step hits.
* CounterInit modes: the same passes with w0 regenerated per element; the
  PRNG (three xorshift rounds on 32-bit lanes, int32 -> float64 -> float32)
  costs 1.0-1.7x an SGD step by itself, depending on the machine, which is
  why these modes stay above 3x.
* quantile: with stored w0, theta settles ON an edge of the estimator's
  integer regions (float32 rounding of the factors), so most blocks straddle
  two step sizes; they are decided in bulk in runs at one edge
  (golden.quantile._edge_run: the decisions are known, and theta's end bits
  follow from a closed form per run of untracked elements). One 64-key scan
  (golden.quantile._band_gt64) gives each block's band count, mask and
  tracked positions. The rest is the streams: update, score and write-back,
  walking each parameter from its last element down in chunks held in L1
  (512 elements with AVX-512, 1024 without), in one kernel call for all
  parameters (golden.dropback._quantile_all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from golden.dropback import Dropback
from golden.prng import CounterInit
from golden.threads import torch_threads

HELP = "optimizer step time of Dropback/Procrustes vs torch SGD on ResNet-18-sized parameters"
TARGET_RATIO = 3.0
RESNET18_NUMEL = 11_689_512


def resnet18_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of ResNet-18 (ImageNet head), in ``model.parameters()`` order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = cin if block == 0 else cout
            shapes += [(cout, first_in, 3, 3), (cout,), (cout,)]
            shapes += [(cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
        cin = cout
    shapes += [(1000, 512), (1000,)]
    return shapes


def make_params(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in resnet18_shapes():
        p = (torch.rand(shape, generator=gen) * 2 - 1) * 0.05
        p.requires_grad_(True)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def _clone(params):
    out = []
    for p in params:
        c = p.detach().clone().requires_grad_(True)
        c.grad = torch.zeros_like(p)
        out.append(c)
    return out


def run_bench(repeats: int = 15, lr: float = 0.01, ratio: int = 10, threads: int = 1,
              warmup: int = 10) -> dict:
    """Medians and ratios vs SGD. ``threads``: torch threads during the run (the
    numba kernels are single-threaded, so 1 compares like with like; on shared
    cores a multi-threaded SGD step is also very noisy). ``warmup``: untimed
    steps first (numba compilation, first-step buffers, the first steps'
    threshold travel)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, not {repeats}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1, not {warmup}")
    with torch_threads(threads):
        return _run(repeats, lr, ratio, warmup)


def _stats(opt) -> tuple[int, int]:
    """(fast, slow) counters of a Dropback: top-k steps that used the threshold
    hint / the full radix select, or quantile blocks in bulk / chained."""
    if opt.quantile is None:
        return opt.hint_hits, opt.hint_misses
    return opt.bulk_blocks, opt.chained_blocks


def _counter(ps):
    """``ps`` set to CounterInit(1)'s w0 (training starts from the regenerated weights)."""
    CounterInit(1).apply_(ps)
    return ps


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def _run(repeats: int, lr: float, ratio: int, warmup: int) -> dict:
    base = make_params()
    n = sum(p.numel() for p in base)
    k = n // ratio
    q = 1.0 - k / n
    makers = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.0),
        "dropback_topk": lambda ps: Dropback(ps, lr, k),
        "dropback_topk_counter": lambda ps: Dropback(_counter(ps), lr, k, init=CounterInit(1)),
        "procrustes_quantile": lambda ps: Dropback(ps, lr, k, quantile=q, init_decay=0.9),
        "procrustes_quantile_counter": lambda ps: Dropback(
            _counter(ps), lr, k, quantile=q, init_decay=0.9, init=CounterInit(1)),
    }
    opts = {name: make(_clone(base)) for name, make in makers.items()}
    names = list(makers)
    grads = [torch.empty_like(p) for p in base]
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name in makers}  # thread CPU time
    walls: dict[str, list[float]] = {name: [] for name in makers}
    tracked: dict[str, int] = {}
    before: dict[str, tuple[int, int]] = {}
    for step in range(warmup + repeats):
        if step == warmup:
            before = {name: _stats(opt) for name, opt in opts.items() if name != "sgd"}
        for gr in grads:  # fresh gradients every step, the same for every mode
            gr.normal_(0.0, 1e-3, generator=gen)
        order = names[step % len(names):] + names[:step % len(names)]  # rotate: no
        for name in order:                                              # fixed position
            opt = opts[name]
            for p, gr in zip(opt.param_groups[0]["params"], grads):
                p.grad.copy_(gr)
            c0, t0 = time.thread_time(), time.perf_counter()
            opt.step()
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            if step >= warmup:
                times[name].append(dc)
                walls[name].append(dt)
            if isinstance(opt, Dropback):
                tracked[name] = opt.tracked_count
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_wall = {name: statistics.median(ts) for name, ts in walls.items()}
    rows = []
    for name in makers:
        if name == "sgd":
            continue
        per_round = [a / b for a, b in zip(times[name], times["sgd"])]
        q1, r, q3 = _quartiles(per_round)
        wall = statistics.median(a / b for a, b in zip(walls[name], walls["sgd"]))
        fast, slow = (a - b for a, b in zip(_stats(opts[name]), before[name]))
        kind = "hint_hit_rate" if opts[name].quantile is None else "bulk_block_rate"
        rows.append(dict(mode=name, ratio_vs_sgd=round(r, 2),
                         ratio_iqr=[round(q1, 2), round(q3, 2)], met=bool(r <= TARGET_RATIO),
                         wall_ratio_vs_sgd=round(wall, 2),
                         tracked=tracked[name], target_tracked=k, fast_path=kind,
                         fast_rate=round(fast / max(1, fast + slow), 4)))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return dict(numel=n, track_size=k, repeats=repeats, warmup=warmup,
                threads=torch.get_num_threads(), load_1min=round(load, 2),
                median_cpu_ms={name: round(t * 1e3, 2) for name, t in med.items()},
                median_wall_ms={name: round(t * 1e3, 2) for name, t in med_wall.items()},
                target_ratio=TARGET_RATIO, rows=rows)


def to_markdown(res: dict) -> str:
    lines = [f"Optimizer step, ResNet-18 parameter set: N = {res['numel']:,}, "
             f"track_size = {res['track_size']:,}; consecutive steps with fresh random "
             f"gradients, {res['repeats']} interleaved rounds after {res['warmup']} warm-up "
             f"steps, median per-round ratio [interquartile range]; {res['threads']} torch "
             f"threads; median SGD step "
             f"{res['median_cpu_ms']['sgd']} ms thread CPU time "
             f"({res['median_wall_ms']['sgd']} ms wall); 1-min load {res['load_1min']} "
             f"on {os.cpu_count()} CPUs",
             "",
             "| mode | step / SGD step (CPU time) | IQR | (wall) | target <= 3.0 | tracked | "
             "fast path |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        what = "hint hits" if r["fast_path"] == "hint_hit_rate" else "bulk blocks"
        lo, hi = r["ratio_iqr"]
        lines.append(f"| {r['mode']} | {r['ratio_vs_sgd']:.2f} | {lo:.2f}-{hi:.2f} | "
                     f"{r['wall_ratio_vs_sgd']:.2f} | "
                     f"{'met' if r['met'] else 'NOT met'} | {r['tracked']:,} | "
                     f"{100 * r['fast_rate']:.1f}% {what} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=15,
                        help="interleaved rounds (median of per-round ratios)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")


def run(args) -> int:
    res = run_bench(repeats=args.repeats, threads=args.threads, warmup=args.warmup)
    print(json.dumps(res, indent=2) if args.json else to_markdown(res))
    return 0
