"""Procrustes' streaming quantile estimator (replaces the sort of Dropback).

One pass over the scores, from the LAST element to the FIRST, all in float32::

    up   = float32(1 + q_step * q)          # computed in float64, rounded once
    down = float32(1 - q_step * (1 - q))
    for s in reversed(scores):
        tracked = theta < s
        theta   = theta * up if tracked else theta * down     # float32 multiply

``q`` is the quantile of the *untracked* scores (``q = 1 - k/N`` for a budget
of ``k`` of ``N`` weights). At equilibrium ``q * P(tracked) = (1 - q) *
P(untracked)``, i.e. a fraction ``1 - q`` is tracked. The estimate moves by at
most ``N * q_step * max(q, 1 - q)`` in ``log(theta)`` per pass, so ``theta``
must carry over from one pass (optimizer step) to the next: with the published
``q_step = 1e-6`` one pass over a small layer could not move it far enough from
``q_init``. :class:`StreamingQuantile` keeps ``theta`` between passes.

float32 caveat (measured, see tests/test_quantile.py): the factors are rounded
to float32, whose spacing just below 1 is 2**-24 (6e-8). With the published
``q_step = 1e-6`` and ``q = 0.9``, ``down = 1 - 1e-7`` becomes ``1 - 2**-24``
and ``theta * down`` often rounds back to ``theta``; the estimator then settles
on about 1.33 k tracked weights instead of k (1M-element stream). Keep
``q_step * min(q, 1 - q)`` well above 1e-6 (e.g. ``q_step = 1e-4``: within 1%),
or keep theta in a wider format in hardware.
"""

from __future__ import annotations

import numba
import numpy as np


def check_quantile_args(q: float, q_init: float, q_step: float) -> None:
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), not {q}")
    if not (q_init > 0.0 and np.isfinite(q_init)):
        raise ValueError(f"q_init must be a finite number > 0, not {q_init}")
    if not 0.0 < q_step < 1.0:
        raise ValueError(f"q_step must be in (0, 1), not {q_step}")


def factors(q: float, q_step: float) -> tuple[np.float32, np.float32]:
    """The float32 ``(up, down)`` multipliers."""
    return np.float32(1.0 + q_step * q), np.float32(1.0 - q_step * (1.0 - q))


def quantile_pass_reference(scores, theta: float, q: float, q_step: float):
    """Plain-Python reference pass. Returns ``(mask, theta)``."""
    up, down = factors(q, q_step)
    theta = np.float32(theta)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    mask = np.zeros(s.shape[0], dtype=bool)
    for i in range(s.shape[0] - 1, -1, -1):
        if theta < s[i]:
            mask[i] = True
            theta = np.float32(theta * up)
        else:
            theta = np.float32(theta * down)
    return mask, theta


@numba.njit(cache=False)
def _pass(s, theta, up, down, mask):
    for i in range(s.shape[0] - 1, -1, -1):
        # Both products are formed while the compare resolves; up >= down and
        # theta >= 0, so max/min pick theta*up / theta*down exactly. Written as
        # theta * (up if t else down) LLVM keeps the multiply after the compare
        # on the loop-carried chain (measured 51 ms vs 38 ms for 11.7M scores).
        a = theta * up
        b = theta * down
        t = theta < s[i]
        mask[i] = t
        theta = max(a, b) if t else min(a, b)
    return theta


def quantile_pass(scores, theta: float, q: float, q_step: float):
    """Compiled pass, bit-identical to :func:`quantile_pass_reference`."""
    up, down = factors(q, q_step)
    s = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
    mask = np.empty(s.shape[0], dtype=bool)
    theta = _pass(s, np.float32(theta), up, down, mask)
    return mask, np.float32(theta)


class StreamingQuantile:
    """The estimator with its state: ``theta`` carries over between passes."""

    def __init__(self, q: float, q_init: float = 1e-2, q_step: float = 1e-6):
        check_quantile_args(q, q_init, q_step)
        self.q = float(q)
        self.q_step = float(q_step)
        self.theta = np.float32(q_init)

    def __call__(self, scores) -> np.ndarray:
        """One pass; returns the tracked mask and updates ``theta``."""
        mask, self.theta = quantile_pass(scores, self.theta, self.q, self.q_step)
        return mask
