"""Compile every golden numba kernel once, into numba's disk cache (``python -m golden.warm``).

A cold process spends minutes compiling the Dropback, quantile, PRNG and fixed-point
kernels (:mod:`golden.jitcache` keeps them on disk afterwards). ``make test`` runs this
first, so that the parallel test workers load the kernels instead of each compiling
them inside some test's time limit. Each call below is a tiny input through a public
entry point, with the argument types the library itself passes (the cache holds one
entry per type signature); anything it misses is compiled where it is first used,
as before.
"""

from __future__ import annotations

import argparse
import time

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


def _dropback_steps(kinds):
    gen = torch.Generator().manual_seed(0)
    for counter in (False, True):
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


def _topk():
    _dropback_steps([dict(), dict(momentum=0.9, weight_decay=1e-3)])


def _quantile():
    _dropback_steps([dict(quantile=0.9, q_step=1e-3),
                     dict(quantile=0.9, q_step=1e-3, momentum=0.5)])
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


PARTS = (("dropback top-k", _topk), ("quantile", _quantile), ("prng", _prng),
         ("procrustes_ref", _procrustes))


def warm() -> dict[str, float]:
    """Run every part once; returns the seconds each took. (With an empty cache the
    quantile part is nearly all of it: the fused quantile step is one large kernel.)"""
    took = {}
    for name, fn in PARTS:
        t0 = time.perf_counter()
        fn()
        took[name] = round(time.perf_counter() - t0, 1)
    return took


def main(argv=None) -> int:
    argparse.ArgumentParser(
        prog="python -m golden.warm",
        description="Compile every golden numba kernel once into numba's disk cache "
                    "(about 10 minutes of one core on a cold cache, seconds when it is "
                    "filled).").parse_args(argv)
    took = warm()
    print("golden kernels ready: " + ", ".join(f"{k} {v} s" for k, v in took.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
