"""Compile every golden numba kernel once, into numba's disk cache (``python -m golden.warm``).

A cold process spends minutes compiling the Dropback, quantile, PRNG and fixed-point
kernels (:mod:`golden.jitcache` keeps them on disk afterwards). ``make test`` runs this
first, so that the parallel test workers load the kernels instead of each compiling
them inside some test's time limit. Each call below is a tiny input through a public
entry point, with the argument types the library itself passes (the cache holds one
entry per type signature); anything it misses is compiled where it is first used,
as before. The fused quantile step (nearly all of the time) compiles in a process of its
own beside the kernels that share nothing with it (:data:`LANES`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from golden import procrustes_cycles as pc
from golden import procrustes_ref as ref
from golden.dropback import Dropback
from golden.prng import CounterInit, prng_u32, uniform
from golden.quantile import StreamingQuantile, quantile_pass


def _params(gen):
    return [torch.randn(40, 30, generator=gen).requires_grad_(),
            torch.randn(40, generator=gen).requires_grad_()]


def _dropback_steps(kinds, counters=(False, True)):
    gen = torch.Generator().manual_seed(0)
    for counter in counters:
        for kw in kinds:
            ps = _params(gen)
            init = CounterInit(1) if counter else None
            if init is not None:
                init.apply_(ps)
            opt = Dropback(ps, 0.1, 100, init_decay=0.9, init=init, **kw)
            for step in range(4):  # the first top-k step is the radix path, then the hint
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen) * (0.1 if step != 2 else 10)
                opt.step()
            opt.use_hint = False
            opt.step()


_TOPK_KINDS = [dict(), dict(momentum=0.9, weight_decay=1e-3)]


def _topk_stored():
    _dropback_steps(_TOPK_KINDS, counters=(False,))


def _topk_counter():
    _dropback_steps(_TOPK_KINDS, counters=(True,))


def _quantile():
    _dropback_steps([dict(quantile=0.9, q_step=1e-3),
                     dict(quantile=0.9, q_step=1e-3, momentum=0.5)])


def _quantile_pass():
    s = np.random.default_rng(0).random(5000).astype(np.float32)
    quantile_pass(s, 0.5, 0.9, 1e-3, stats=np.zeros(3, dtype=np.int64))
    quantile_pass(s, 0.5, 0.9, 1e-3, bulk=False)
    StreamingQuantile(0.9, 0.5, 1e-3)(s)


def _prng():
    prng_u32(1, np.arange(10))
    uniform(1, np.arange(10))
    CounterInit(3).w0(0, (4, 5), 0.5)


def _procrustes():
    rng = np.random.default_rng(0)
    cfg = ref.FixedConfig()
    w = rng.integers(-300, 300, (6, 5)) * (rng.random((6, 5)) < 0.5)
    x = rng.integers(-300, 300, (5, 4))
    dy = rng.integers(-300, 300, (6, 4))
    for path in ("auto", "loop"):
        ref.forward(w, x, cfg, path=path)
        ref.backward(w, dy, cfg, path=path)
        ref.weight_grad(dy, x, cfg, path=path)
    sp = ref.step_constants(0.1, 0.9, 0.9, 1e-3, 0.5, cfg, seed=7)
    ref.update(w, rng.integers(-300, 300, w.shape), ref.theta_from_float(0.01, cfg), sp, cfg)
    ap = pc.ArrayParams()
    mask = rng.random((32, 32)) < 0.3
    pc.predict_forward(mask, 8, ap)
    pc.predict_backward(mask, 8, ap)


# The fused quantile step is the long compile (several minutes on a cold cache: one
# kernel holding four variants). With two jobs each lane runs in its own process, the
# quantile step beside kernels that share nothing with it: numba's cache must not be
# written for one kernel by two processes at once (:func:`lane_kernels`; the test in
# tests/test_jitcache.py checks that the lanes are disjoint).
# CounterInit's PRNG kernels are compiled in the quantile lane, so top-k with CounterInit
# and the fixed-point model (which regenerates w0 through the PRNG) come after both.
LANES = ((("quantile", _quantile),),
         (("dropback top-k (stored w0)", _topk_stored), ("quantile pass", _quantile_pass)))
AFTER = (("dropback top-k (CounterInit)", _topk_counter), ("prng", _prng),
         ("procrustes_ref", _procrustes))


def _timed(parts):
    took = {}
    for name, fn in parts:
        t0 = time.perf_counter()
        fn()
        took[name] = round(time.perf_counter() - t0, 1)
    return took


def lane_kernels(lane: int) -> set[str]:
    """Run lane ``lane`` of :data:`LANES` and return the golden numba kernels it
    compiled or loaded (``module.name``). Meant for a fresh process."""
    from numba.core.dispatcher import Dispatcher

    _timed(LANES[lane])
    return {f"{mod}.{name}" for mod, module in list(sys.modules.items())
            if mod.startswith("golden.")
            for name, obj in vars(module).items()
            if isinstance(obj, Dispatcher) and obj.signatures}


def warm(jobs: int = 1) -> dict[str, float]:
    """Run every part once, the two lanes of :data:`LANES` in ``jobs`` processes
    (1: all in this one), then :data:`AFTER`; returns the seconds each part took."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, not {jobs}")
    took = {}
    if jobs == 1:
        for lane in LANES:
            took.update(_timed(lane))
    else:
        ctx = multiprocessing.get_context("spawn")  # (torch's threads do not survive fork)
        with ProcessPoolExecutor(min(jobs, len(LANES)), mp_context=ctx) as pool:
            for lane_took in pool.map(_timed, LANES):
                took.update(lane_took)
    took.update(_timed(AFTER))
    return took


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m golden.warm",
        description="Compile every golden numba kernel once into numba's disk cache "
                    "(minutes on a cold cache, seconds when it is filled).")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes for the two lanes of kernels (the fused quantile "
                         "step, the long compile, in one; default: 2, or 1 on a "
                         "one-core machine)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, not {args.jobs}")
    t0 = time.perf_counter()
    took = warm(args.jobs)
    print("golden kernels ready: " + ", ".join(f"{k} {v} s" for k, v in took.items())
          + f" ({round(time.perf_counter() - t0, 1)} s in all, jobs {args.jobs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
