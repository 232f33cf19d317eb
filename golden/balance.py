"""Procrustes load balancing: the half-tile pairing scheduler (golden model).

Mapping (the RTL uses the same one)
-----------------------------------
A GEMM phase has output rows ``m = 0 .. M-1``: the rows of ``W`` in the
forward pass, or the columns of ``W`` (rows of ``W.T``) in the backward pass.
It runs on ``R`` PE rows. A PE row handles one non-zero weight per cycle and
broadcasts it across the PE columns, so a PE row's *work* is the number of
non-zeros in the output rows it owns.

Unbalanced. Let ``T = ceil(M / R)``. PE row ``r`` owns the tile
``[r*T, (r+1)*T)``, clipped to ``M``; the last tiles may be short or empty.

Balanced.
1. Split each nominal tile at ``r*T + ceil(T/2)``. Half-tile ``2r`` is
   ``[r*T, r*T + ceil(T/2))`` and half-tile ``2r+1`` is
   ``[r*T + ceil(T/2), (r+1)*T)``, both clipped to ``[0, M)``. That gives
   ``2R`` half-tiles, and some may be empty.
2. Sort the half-tiles by non-zero count, ascending and stable, so ties keep
   half-tile index order. Call the result ``asc``.
3. PE row ``i`` gets the pair ``(asc[2R-1-i], asc[i])``: the i-th densest
   half-tile first, then the i-th sparsest. Inside a half-tile, rows run in
   increasing order.

Jobs (``nt`` > 1). The array computes one output row for one tile of
``cols`` minibatch columns at a time (a *job*); with ``nt`` tiles there are
``M·nt`` jobs, job ``j`` being output row ``j // nt``, tile ``j % nt``, with
the work of its row. ``schedule(..., nt=nt)`` applies the rules above to the
jobs instead of the rows (``T = ceil(M·nt / R)`` jobs per tile), so a GEMM
whose ``M`` is not a multiple of ``R`` still gives every PE row an equal
share: with ``M = 10`` rows, ``nt = 4`` tiles and ``R = 4``, each PE row gets
10 jobs (by rows it would get 3, 3, 3 and 1 rows). ``nt = 1`` is the
row-granular schedule.

A schedule is stored as ``ranges[R, 2, 2]``: the two ``(start, stop)``
row (job) ranges of each PE row, in processing order. An unbalanced schedule uses
the same form with the tile's own two halves in order, which are contiguous.
``makespan = max(work)`` is that phase's cycle lower bound.
``imbalance = makespan / mean(work)``.

Pairing sorted values ``i`` with ``2R-1-i`` minimises the largest pair sum
over all ways of pairing the half-tiles. The unbalanced tiles are one such
pairing, so a balanced makespan is never above the unbalanced one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from golden.blockfmt import BlockSparse

__all__ = [
    "Schedule",
    "backward_schedule",
    "balance_report",
    "forward_schedule",
    "half_tile_ranges",
    "schedule",
]


@dataclass(frozen=True)
class Schedule:
    """Assignment of output rows to PE rows for one GEMM phase."""

    R: int
    balanced: bool
    ranges: np.ndarray  # int64 [R, 2, 2]: per PE row, two (start, stop) ranges in order
    work: np.ndarray  # int64 [R]: non-zeros each PE row processes (per job, summed)
    nt: int = 1  # tiles per output row: ranges are over jobs o·nt + t

    @property
    def jobs(self) -> list[np.ndarray]:
        """Per PE row: the jobs (``row·nt + tile``) it computes, in order."""
        return [np.concatenate([np.arange(a, b) for a, b in pe]) for pe in self.ranges.tolist()]

    @property
    def rows(self) -> list[np.ndarray]:
        """Per PE row: the output row of each job it computes, in order (with ``nt = 1``,
        the output rows it computes)."""
        return [j // self.nt for j in self.jobs]

    def table(self) -> np.ndarray:
        """``[R, 2, 3]``: per PE row and range, ``(row, tile, jobs)`` of the range's first
        job and its length: the form the array's schedule table holds."""
        a, b = self.ranges[..., 0], self.ranges[..., 1]
        return np.stack([a // self.nt, a % self.nt, b - a], axis=-1)

    @property
    def makespan(self) -> int:
        """Largest PE-row work: the cycle lower bound of the phase."""
        return int(self.work.max())

    @property
    def total(self) -> int:
        return int(self.work.sum())

    @property
    def imbalance(self) -> float:
        """max work / mean work (1.0 is perfect; 1.0 also when there is no work)."""
        mean = self.work.mean()
        return float(self.work.max() / mean) if mean > 0 else 1.0


def _check_R(R) -> int:
    if isinstance(R, bool) or not isinstance(R, (int, np.integer)) or R < 1:
        raise ValueError(f"R (PE rows) must be a positive integer, got {R!r}")
    return int(R)


def half_tile_ranges(M: int, R: int) -> np.ndarray:
    """``[2R, 2]`` ``(start, stop)`` of half-tiles ``2r`` and ``2r+1`` (clipped to ``M``)."""
    R = _check_R(R)
    if M < 0:
        raise ValueError(f"M must be >= 0, got {M}")
    T = -(-M // R)
    start = np.arange(R, dtype=np.int64) * T
    bounds = np.stack([start, start + -(-T // 2), start + T], axis=1)
    bounds = np.minimum(bounds, M)
    return np.stack([bounds[:, :2], bounds[:, 1:]], axis=1).reshape(2 * R, 2)


def schedule(row_nnz, R: int, balanced: bool = True, nt: int = 1) -> Schedule:
    """Assign output rows with the given non-zero counts to ``R`` PE rows (``nt`` > 1:
    their ``len(row_nnz)·nt`` jobs, see the module docstring)."""
    R = _check_R(R)
    if isinstance(nt, bool) or not isinstance(nt, (int, np.integer)) or nt < 1:
        raise ValueError(f"nt (tiles per row) must be a positive integer, got {nt!r}")
    nt = int(nt)
    row_nnz = np.asarray(row_nnz)
    if row_nnz.ndim != 1 or (row_nnz.size and not np.issubdtype(row_nnz.dtype, np.integer)):
        raise ValueError(f"row_nnz must be a 1-D array of integers, got {row_nnz.dtype}"
                         f" of shape {row_nnz.shape}")
    if np.any(row_nnz < 0):
        raise ValueError("row_nnz must be >= 0 everywhere")
    row_nnz = np.repeat(row_nnz.astype(np.int64), nt)
    halves = half_tile_ranges(len(row_nnz), R)
    prefix = np.concatenate([[0], np.cumsum(row_nnz)])
    hwork = prefix[halves[:, 1]] - prefix[halves[:, 0]]
    if balanced:
        asc = np.argsort(hwork, kind="stable")
        order = np.stack([asc[::-1][:R], asc[:R]], axis=1)  # (i-th densest, i-th sparsest)
    else:
        order = np.arange(2 * R).reshape(R, 2)
    return Schedule(R=R, balanced=balanced, ranges=halves[order],
                    work=hwork[order].sum(axis=1), nt=nt)


def forward_schedule(bs: BlockSparse, R: int, balanced: bool = True, nt: int = 1) -> Schedule:
    """Forward pass ``Y = W @ X``: output rows are rows of ``W``."""
    return schedule(bs.row_counts(), R, balanced, nt)


def backward_schedule(bs: BlockSparse, R: int, balanced: bool = True, nt: int = 1) -> Schedule:
    """Backward pass ``dX = W.T @ dY``: output rows are columns of ``W``."""
    return schedule(bs.col_counts(), R, balanced, nt)


def balance_report(bs: BlockSparse, R: int = 16) -> str:
    """A small text table: makespan and imbalance per phase, with and without balancing."""
    lines = [
        f"{bs!r}, R={R}",
        f"{'phase':<9}{'mode':<11}{'makespan':>10}{'ideal':>9}{'imbalance':>11}{'gain':>7}",
    ]
    for phase, fn in (("forward", forward_schedule), ("backward", backward_schedule)):
        plain, bal = fn(bs, R, balanced=False), fn(bs, R, balanced=True)
        ideal = -(-bs.nnz // R)
        for mode, s in (("unbalanced", plain), ("balanced", bal)):
            gain = plain.makespan / s.makespan if s.makespan else 1.0
            lines.append(
                f"{phase:<9}{mode:<11}{s.makespan:>10}{ideal:>9}{s.imbalance:>11.3f}{gain:>7.2f}"
            )
    return "\n".join(lines)
