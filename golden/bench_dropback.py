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

Where the time goes (11.7M elements, one core; kernels timed alone, each
figure against torch's ``add_`` on the same arrays, ~2.0 ms, under a load of
5-8 on 2 cores):

* top-k, stored w0: one fused pass (SGD step, score, counts, tracked/reset/
  pending decision) reads w, g and w0 and writes w and the mask: ~3.7 ms, about
  1.8x the SGD update alone. Then the elements left pending are decided: in
  this benchmark ~10k in the prediction band and ~120-150k below it (weights
  tracked on the previous step that drop out: fresh random gradients churn the
  tracked set), reset after the pass (~1 ms). A hint miss (first steps, jumps)
  costs ~5 passes; after the warm-up the band has adapted and every step hits.
* top-k, CounterInit: the same pass with w0 regenerated per element; the PRNG
  (three xorshift rounds on 32-bit lanes, int32 -> float64 -> float32) costs
  ~3.2 ms per 11.7M values by itself, 1.6x an SGD step.
* quantile: in this benchmark, with stored w0, theta settles ON an edge of the
  estimator's integer regions (float32 rounding of the factors; the fraction
  tracked, 9.3%, sits between the fractions that the step sizes on either
  side balance), so ~90% of the blocks straddle two step sizes. Those blocks
  are now decided in bulk too (golden.quantile._edge_run: the decisions are
  known, and theta's end bits follow from a closed form per run of untracked
  elements, O(tracked elements) per block): on 11.7M such scores the
  estimator went from ~17 ms (serial chain) to ~12 ms, its per-up walk being
  latency-bound (~8 ns per tracked element). The update/score/write-back
  loops walk each parameter from its last element down (descending chunks
  with ascending loops defeated the hardware prefetchers: 2x slower), on
  unsigned indices (numba's negative-index test on ``m-1-i`` stopped
  vectorization) and in chunks of 512 (buffers in L1): ~4.8 ms alone.
  Session 4 (load ~6): quantile 10.50x -> 5.58x SGD, quantile with
  CounterInit 6.52x -> 4.31x (the same tracked counts: same semantics).
  Session 6 (load ~2): at the benchmark's edge only the down step changes, so
  the walk over the tracked elements is a shift-only chain (~5 cycles per
  tracked element instead of ~25), and the tracked positions come from a
  64-wide compress-store (golden.quantile._walk_up/_walk_down): the
  estimator alone 10.4 -> 7.9 ms, the step 5.37x -> 4.47x SGD. With the walk
  and the positions removed (a timing experiment, wrong theta) the step was
  2.97x.
  Session 7 (load 3-5): the estimator's pieces timed on 65,536 of the
  benchmark's keys held in L2, 178 times over (11.7M keys): band count 0.76
  ms, mask loop 0.81, tracked positions 0.74, the walk 1.14, and the whole
  _blocks 6.05 ms: ~2.6 ms were per-block set-up (region cache and edge-piece
  look-ups, the walk's divisor and shifts) and its branches. Straddling blocks
  now go in runs (golden.quantile._edge_run: the set-up once per run of blocks
  at one edge) -> 4.20 ms, and one 64-key pass gives the band count, the mask
  and the positions (_band_gt64: one load, two compares, a mask store, a
  compress-store) -> 3.1 ms; the fused step calls _blocks per 512-element
  chunk, so it goes straight into the run while theta is at the cached edge
  (run constants cached with the pieces). Benchmark, per-round median:
  quantile 4.44x (load 4.1) -> 3.92x with the runs and the 64-key pass (load
  4.2) -> 3.58x with the cached run (load 2.2); tracked counts unchanged.
  quantile with CounterInit 4.33x -> 4.25x -> 4.76x: its theta sits inside a
  region (95% plain bulk blocks) that the cached edge pieces also cover, and
  the cached run was entered and left at once for each such block; with the
  cache check skipping the run where the plain step applies, a diagnostic of
  that mode alone went 4.62x -> 4.09x (stored w0 unchanged, 3.37x vs 3.38x).
  The final bench (load 1.0): 2.41, 3.83, 3.93, 4.59; quantile's 3.58 above
  and 3.93 here are the same code, so the spread between runs is wide. In the
  fused step (a synthetic settled state
  from the saved stream, one chunk loop, stored w0): the streams alone
  (estimator replaced by a fixed threshold) 1.66x SGD. Tried and dropped:
  software prefetch (llvm.prefetch, one or two chunks ahead, of w, g, w0 and
  the mask) made the step slower (4.67x -> 6.0-6.2x; the streams alone
  1.66x -> 3.36x); transfer tables for the walk: the entry bits of the
  benchmark's blocks are not confined to a small window (from ~700 ulps below
  the edge to ~120k above; 16 consecutive values hold 15% of the entries),
  and walks started at the two ends of a +-16 window end on the same bits for
  only 47% of the blocks, so tables (or bracketing) would cover too few.
  Session 8 (load ~5, the benchmark's settled state after 12 steps, stored
  w0, medians of 15 rounds, each piece against the SGD step of its round):
  the step 3.51x; the 62 kernel calls alone 3.20x, so ~0.3x is Python around
  them (_work 0.14x; the 62 numba dispatches with empty arrays 0.04-0.05x).
  With warm caches (a do-nothing kernel in its place) the Python part is only
  ~170 us per step (0.065x): the step's own streams evict the interpreter's
  objects, so it runs cold. Inside the kernel: update + key alone 1.62x,
  + the estimator 2.78x (the estimator ~1.16x), update + key + a fixed-
  threshold write-back 2.04x (the streams), all of it 3.37x. On 11.7M
  synthetic elements against torch's add_: the update loop is vectorized
  (16-lane zmm, two shuffles per vector for the descending order) and
  memory-bound (0.54x when its data sit in L2, 1.53x from memory); a single
  fused pass without buffers (read w, g, w0; write w and the mask) is 1.86-
  1.99x, 1.40x without the mask store, so the 1.42x byte floor is not reached
  by 5 descending streams (numba's descending SGD alone is 1.02x, the fused
  pass ascending 1.80x); the chunk buffers add little (1.86x with the buffers
  and no mask store). Tried and dropped: chunks of 2048-16384 (1.48x -> 2.07-
  2.38x for the update), ascending chunks (3.05x), software prefetch of the
  next chunks again (1.81x -> 2.29-2.61x), the next chunk's update fused into
  this chunk's write-back loop (1.80x -> 2.50x). Kept: one kernel call for all
  parameters (golden.dropback._quantile_all, a table of addresses cached
  between steps; the chunk buffers and region cache kept too): in one process
  on the same kernels, 25 rounds alternating the two Python paths (load 4.0),
  3.46x -> 3.26x SGD (median per-round difference 0.20x); tracked counts
  unchanged. Benchmark runs (per-round median, the spread between runs is
  wide): quantile 3.47x before (load 5.7), 3.43x after (load 3.0).
  Session 9, on an AVX2 machine (AMD EPYC without AVX-512; SGD step ~5.7 ms):
  LLVM scalarizes the 64-lane compress-store of golden.quantile._band_gt64
  into one data-dependent branch per key (the scan of 11.7M L2-resident keys:
  18.4 ms; compares and mask alone 1.8 ms); the positions from a byte table
  instead (golden.quantile._POS_LUT): 4.6 ms, and quantile 7.15x -> 4.46x SGD
  in back-to-back bench runs (top-k 3.43x/3.45x on this machine, against
  2.41x on the AVX-512 one).
  Session 10, same machine: the top-k pass's per-chunk counts were int64
  (numba widens int32 + int32), which held its loop to 4 lanes on AVX2; in
  int32 it runs 8-wide (top-k 4.0-4.25x -> 2.8-3.4x at load 2), and the mask
  bytes go straight into the mask without AVX-512 (Dropback.direct_mask);
  bench at load 1.2: top-k 2.62x, quantile 3.94x, CounterInit 4.85x/6.62x.
  Session 13, same machine, the old and new code paired in one process (40
  rounds, median new/old per round): with a fixed-threshold compare in place
  of the estimator the step took 0.71 of the time, without the mask store
  0.956; chunks of 1024 instead of 512 took 0.92-0.99 (kept where there is no
  AVX-512); walking the compare words instead of the position table and
  prefetching gained nothing (README, Speed).
  Session 14, on an AMD Zen 4 EPYC with AVX-512 (SGD step ~3.8 ms): Zen 4
  runs the memory form of vpcompressd (LLVM's lowering of the compress-store
  in _band_gt64) as microcode: the scan of 11.7M L2-resident keys took 17.2
  ms with it, 1.70 ms with the register form and a full 16-lane store (now
  used), 1.72 ms with the byte table. Paired, the stored-w0 quantile step went
  6.31x/6.07x -> 2.79x/2.89x SGD. The top-k hint pass writes its mask
  directly on Zen with AVX-512 too (paired: 0.91-0.97 of the buffered step's
  time), and the CounterInit loops add the chunk start to the index in 32
  bits (w0 regeneration 6.46 -> 5.64 ms per 11.7M values; paired steps
  0.93-0.96 for top-k, 0.81-0.98 for quantile).
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
