"""Cycle model of the Procrustes RTL (``hw/procrustes``): cycles per command from the array
size, the weight mask and the schedule.

It follows the RTL's pipeline (``hw/procrustes/README.md``) cycle by cycle where the cycle
count depends on the data, and adds the fixed latencies of the command decoder:

* forward / backward: a *job* is one output row and one tile of ``cols`` minibatch
  columns; the schedule (``golden.balance`` with ``nt`` = tiles) gives each PE row two
  ranges of jobs. Per PE row, the walker issues one *group* (``lanes`` blocks along the
  walk) per cycle; a group with ``b`` set bits in the walked slice is pushed into a FIFO
  of ``fifo_depth`` entries three cycles later and costs the emitter ``b`` cycles; empty
  groups are dropped, and a job without any non-zero pushes nothing (its results are
  read back as zero: they are never written). When the walk is one group long, a row's
  group is scanned once for all of its tiles in the range and replayed by the emitter
  (``bits·reps`` cycles). Issue is credit-based: at most ``fifo_depth`` groups are out
  (issued and not yet popped or dropped); a range's bases are formed before the run, so
  the first range issues in the cycle after the start and the second right after the
  first. The phase ends when the slowest PE row has flushed its last result, so
  balancing shortens it.
* weight gradient: dense, ``ceil(M/rows)·ceil(K/cols)·N`` cycles plus latency; or
  (``WGRADX``) the forward walk with the activations as the sparse operand.
* update: one element every three cycles (``3·M·K``: the quantile step's serial
  dependence is pipelined over three cycles) in the update pipeline, then one element per
  cycle of the padded block grid (``GM·GK·bm·bk``) in the encoder, plus latency. In the
  area configuration (``area=1``, the iCE40) the update runs one element at a time on one
  shared multiplier, 15 cycles each (``15·M·K``); its last element is done 14 cycles after
  its issue instead of 10, which leaves the fixed part 8 cycles shorter (``+ 20``).

``predict_*`` take a boolean mask (or a ``BlockSparse``) and a ``golden.balance``
schedule. :func:`projection` uses the same model on large layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from golden.balance import Schedule, schedule
from golden.blockfmt import BlockSparse

__all__ = [
    "ArrayParams",
    "group_counts",
    "predict_backward",
    "predict_forward",
    "predict_gemm",
    "predict_update",
    "predict_weight_grad",
    "predict_weight_grad_sparse",
    "row_cycles",
]

# fixed latencies of the command decoder and pipelines (see the module docstring)
_GEMM_FIXED = 8 + 1  # accept..CHECK (8, schedule checked there too); RUNSTART..RESP (1)
_WALK_TAIL = 2  # end marker popped -> done flag visible (raised while G holds it)
_PUSH_LAT = 3  # issue (S0) -> push or drop (S3): bank words in S1, slice in S2
_WGRAD_FIXED = 16
# the default configuration (area=0) registers the PE rows' ANDed done flags before the
# command decoder sees them: FWD, BWD, WGRADX and WGRAD end a cycle later
_DONE_REG = 1
_UPDATE_FIXED = 28
_UPDATE_II = 3  # cycles per element in the update pipeline (the quantile step's loop)
# area configuration: 15 cycles per element (7 products on one multiplier: 3 for the
# element, then the quantile step's 4 partial products after the compare). The last
# element is done 14 cycles after its issue (10 in the pipeline), and the element slot is
# 15 cycles instead of 3, so the fixed part is 28 - (15 - 3) + (14 - 10) = 20
_UPDATE_FIXED_AREA = 20
_UPDATE_II_AREA = 15


@dataclass(frozen=True)
class ArrayParams:
    """What the cycle count depends on: array size, block size, mask lanes, FIFO depth
    and the area configuration (``area``: 0 or 1, the update's serial datapath)."""

    rows: int = 4
    cols: int = 4
    bm: int = 4
    bk: int = 4
    lanes: int = 4
    fifo_depth: int = 16
    area: int = 0

    def __post_init__(self):
        for name in ("rows", "cols", "bm", "bk", "lanes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 \
                    or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {v!r}")
        if not 2 <= self.fifo_depth <= 16:
            raise ValueError(f"fifo_depth must be in [2, 16], got {self.fifo_depth}")
        if self.area not in (0, 1) or isinstance(self.area, bool):
            raise ValueError(f"area must be 0 or 1, got {self.area!r}")

    @classmethod
    def of(cls, cfg) -> ArrayParams:
        """From an ``hw.procrustes.Config`` (or anything with these attributes)."""
        return cls(cfg.rows, cfg.cols, cfg.bm, cfg.bk, cfg.lanes, cfg.fifo_depth,
                   getattr(cfg, "area", 0))


def _mask_of(w) -> np.ndarray:
    if isinstance(w, BlockSparse):
        return w.decode() != 0
    w = np.asarray(w)
    return w if w.dtype == bool else w != 0


def group_counts(mask, p: ArrayParams, transpose: bool) -> np.ndarray:
    """``[out_rows, groups]``: set bits of each walker group of each output row."""
    mask = _mask_of(mask)
    if transpose:
        mask = mask.T
        span = p.lanes * p.bm
    else:
        span = p.lanes * p.bk
    rows, red = mask.shape
    ng = max(1, -(-red // span))
    padded = np.zeros((rows, ng * span), dtype=bool)  # bool: large activation masks
    padded[:, :red] = mask
    return padded.reshape(rows, ng, span).sum(axis=2, dtype=np.int64)


@numba.njit(cache=False)
def _walk(counts, ranges, nt, depth):
    """Cycle (relative to RUNSTART) at which one PE row's done flag rises; ``ranges``
    are (start, stop) job ranges, job ``j`` = output row ``j // nt``, tile ``j % nt``.

    The walker issues a group only while it holds a credit (``depth`` of them): a pushed
    group returns its credit in the cycle the emitter pops it, a dropped one (an empty
    group, or a null job) in its S3 cycle (issue + 3); a credit returned in cycle c can
    be used from c + 1.
    """
    pops = np.zeros(depth, dtype=np.int64)  # pop cycles of the last `depth` pushes
    npush = 0
    last_pop = -1
    last_cost = 0
    # S3 cycles of the most recent dropped groups (at most _PUSH_LAT are still out)
    drops = np.full(_PUSH_LAT, -1, dtype=np.int64)
    ndrop = 0
    # IDLE sees start at 0, the first issue (or the end marker) at 1: the ranges' bases
    # are formed before the run, and the second range issues right after the first
    nxt = 1
    ng = counts.shape[1]
    for h in range(3):
        if h < 2:
            a, b = ranges[h, 0], ranges[h, 1]
            if a == b:
                continue
        else:
            a, b = 0, 1  # the end marker
        j = a
        while j < b:
            o = j // nt
            # one group per job: one scan for the row's tiles in the range, replayed
            reps = min(nt - j % nt, b - j) if (ng == 1 and h < 2) else 1
            for g in range(ng if h < 2 else 1):
                # earliest cycle >= nxt with fewer than `depth` credits out
                i = nxt
                while True:
                    out = 0
                    lo = -1
                    for q in range(_PUSH_LAT):
                        dq = drops[q]
                        if dq >= i:
                            out += 1
                            if lo < 0 or dq < lo:
                                lo = dq
                    for q in range(min(npush, depth)):
                        pq = pops[q]
                        if pq >= i:
                            out += 1
                            if lo < 0 or pq < lo:
                                lo = pq
                    if out < depth:
                        break
                    nl = i + 1
                    if lo >= 0:
                        nl = lo + 1
                    i = max(i + 1, nl)
                if h == 2:
                    bits = 0
                    push = True
                else:
                    bits = counts[o, g]
                    push = bits > 0  # a null job is dropped (its results never written)
                s3 = i + _PUSH_LAT
                if push:
                    pop = s3 + 1 if npush == 0 else max(last_pop + last_cost, s3 + 1)
                    pops[npush % depth] = pop
                    npush += 1
                    last_pop = pop
                    last_cost = bits * reps
                else:
                    drops[ndrop % _PUSH_LAT] = s3
                    ndrop += 1
                nxt = i + 1
            j += reps
    return last_pop + _WALK_TAIL


def row_cycles(counts: np.ndarray, sched: Schedule, nt: int, p: ArrayParams) -> np.ndarray:
    """Per PE row: the cycle its done flag rises (relative to the start of the run)."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    return np.array([_walk(counts, np.ascontiguousarray(sched.ranges[r], dtype=np.int64),
                           int(nt), p.fifo_depth) for r in range(sched.R)], dtype=np.int64)


def predict_gemm(mask, N: int, p: ArrayParams, *, transpose: bool, balanced: bool = True,
                 sched: Schedule | None = None) -> int:
    """Cycles of a FWD (``transpose=False``) or BWD command, as the ``resp`` reports them."""
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"N must be a positive integer, got {N!r}")
    counts = group_counts(mask, p, transpose)
    nt = -(-int(N) // p.cols)
    if sched is None:
        sched = schedule(counts.sum(axis=1), p.rows, balanced, nt)
    if sched.nt != nt:
        raise ValueError(f"sched.nt must be the number of tiles {nt}, got {sched.nt}")
    return _GEMM_FIXED + (0 if p.area else _DONE_REG) + int(row_cycles(counts, sched, nt, p).max())


def predict_forward(mask, N: int, p: ArrayParams, balanced: bool = True) -> int:
    return predict_gemm(mask, N, p, transpose=False, balanced=balanced)


def predict_backward(mask, N: int, p: ArrayParams, balanced: bool = True) -> int:
    return predict_gemm(mask, N, p, transpose=True, balanced=balanced)


def predict_weight_grad(M: int, K: int, N: int, p: ArrayParams) -> int:
    return -(-M // p.rows) * -(-K // p.cols) * N + _WGRAD_FIXED + (0 if p.area else _DONE_REG)


def predict_weight_grad_sparse(x_mask, M: int, p: ArrayParams, balanced: bool = True) -> int:
    """``WGRADX``: ``dWᵀ = X·dYᵀ`` with the activations ``X`` [K, N] (non-zeros
    ``x_mask``) as the sparse operand and the ``M`` columns of ``dYᵀ`` as the tiled
    operand: the forward pass's cycles with X in place of W."""
    return predict_gemm(x_mask, M, p, transpose=False, balanced=balanced)


def predict_update(M: int, K: int, p: ArrayParams) -> int:
    gm, gk = -(-M // p.bm), -(-K // p.bk)
    if p.area:
        return _UPDATE_II_AREA * M * K + gm * gk * p.bm * p.bk + _UPDATE_FIXED_AREA
    return _UPDATE_II * M * K + gm * gk * p.bm * p.bk + _UPDATE_FIXED


# On-disk cache of the kernels above, stamped with all golden sources (golden/jitcache.py).
from golden import jitcache as _jitcache  # noqa: E402

_jitcache.enable(globals())
