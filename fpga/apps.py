"""What ``procube run`` runs on a board: stream a workload, check it against the golden
model, report cycles and wall time.

Each app takes a connected :class:`fpga.host.Board` and returns a :class:`RunReport`.
``cycles`` are board clock cycles from the first beat the accelerator accepted to the
last beat it produced (the board's own counters, read with STATUS); on a board they are
bounded by the UART, not by the accelerator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .host import Board

__all__ = ["APPS", "RunReport", "linktest_golden", "run_cubist", "run_linktest",
           "run_procrustes"]


@dataclass
class RunReport:
    design: str
    items: int  # frames or packets checked
    beats_in: int
    beats_out: int
    mismatches: int
    cycles: int
    wall_s: float
    link: dict = field(default_factory=dict)
    first_error: str | None = None

    @property
    def passed(self) -> bool:
        return self.mismatches == 0

    def lines(self) -> list[str]:
        state = "PASS" if self.passed else "FAIL"
        out = [f"{self.design}: {state}: {self.items} checked against the golden model, "
               f"{self.mismatches} mismatches",
               f"  beats in/out: {self.beats_in}/{self.beats_out}",
               f"  board cycles (first in -> last out): {self.cycles}",
               f"  wall time: {self.wall_s * 1e3:.3f} ms",
               f"  link: {self.link}"]
        if self.first_error:
            out.append(f"  first mismatch: {self.first_error}")
        return out


def _check_design(board: Board, name: str) -> None:
    if board.design != name:
        raise ValueError(f"design must match the board's ({board.design!r}), not {name!r}")


def _finish(board: Board, design, items, beats_in, beats_out, mismatches, t0, first) -> RunReport:
    wall = board.link.clock() - t0
    st = board.status()
    stats = board.link.stats
    link = {"requests": stats.requests, "retries": stats.retries, "naks": dict(stats.naks),
            "crc_errors": st["crc_errors"], "timeouts": st["timeouts"]}
    return RunReport(design, items, beats_in, beats_out, mismatches,
                     (st["last_out"] - st["first_in"]) & 0xFFFFFFFF, wall, link, first)


def linktest_golden(words: list[dict]) -> tuple[list[dict], list[dict]]:
    """What the linktest design returns for ``words`` (dicts with ``data`` and ``last``):
    each word inverted, and per packet the 16-bit sum and the count of its words."""
    out, sums, acc, count = [], [], 0, 0
    for w in words:
        out.append({"data": w["data"] ^ 0xFFFF, "last": w["last"]})
        acc, count = (acc + w["data"]) & 0xFFFF, count + 1
        if w["last"]:
            sums.append({"sum": acc, "count": count & 0xFFFF})
            acc, count = 0, 0
    return out, sums


def run_linktest(board: Board, *, packets: int = 8, max_len: int = 64,
                 seed: int = 1) -> RunReport:
    """Random packets of 16-bit words; checks the echo and each packet's sum and count."""
    _check_design(board, "linktest")
    if not 1 <= packets <= 100000:
        raise ValueError(f"packets must be in 1..100000, not {packets}")
    if not 1 <= max_len <= 65535:
        raise ValueError(f"max_len must be in 1..65535, not {max_len}")
    rng = random.Random(seed)
    words = []
    for _ in range(packets):
        n = rng.randint(1, max_len)
        words += [{"data": rng.getrandbits(16), "last": int(k == n - 1)} for k in range(n)]
    want_o, want_sum = linktest_golden(words)
    ci, co, cs = board.codecs["i"], board.codecs["o"], board.codecs["sum"]
    t0 = board.link.clock()
    board.clear()
    got = board.transfer({"i": ci.encode_all(words)},
                         {"o": len(want_o) * co.nbytes, "sum": len(want_sum) * cs.nbytes})
    got_o, got_sum = co.decode_all(got["o"]), cs.decode_all(got["sum"])
    bad = [n for n, (a, b) in enumerate(zip(got_o, want_o)) if a != b]
    bad_sum = [n for n, (a, b) in enumerate(zip(got_sum, want_sum)) if a != b]
    first = None
    if bad:
        first = f"word {bad[0]}: got {got_o[bad[0]]}, want {want_o[bad[0]]}"
    elif bad_sum:
        first = f"packet {bad_sum[0]}: got {got_sum[bad_sum[0]]}, want {want_sum[bad_sum[0]]}"
    return _finish(board, "linktest", packets, len(words), len(got_o) + len(got_sum),
                   len(bad) + len(bad_sum), t0, first)


def run_cubist(board: Board, *, frames: int = 2, r_h: int = 1, r_w: int = 1,
               prefix: int = 0, seed: int = 1) -> RunReport:
    """Random token frames through the merge unit, checked against ``merge_2d_fixed``."""
    from .cubist_app import cubist_frames

    _check_design(board, "cubist")
    return cubist_frames(board, frames=frames, r_h=r_h, r_w=r_w, prefix=prefix, seed=seed,
                         finish=_finish)


def run_procrustes(board: Board, *, steps: int = 2, sizes: tuple = (64, 12, 10),
                   batch: int = 12, lr: float = 0.3, seed: int = 1) -> RunReport:
    """Fixed-point training steps of a digits MLP with every GEMM and update on the array,
    each tensor checked against ``golden.procrustes_ref`` (see :mod:`fpga.procrustes_app`)."""
    from .procrustes_app import procrustes_steps

    _check_design(board, "procrustes")
    return procrustes_steps(board, steps=steps, sizes=tuple(sizes), batch=batch, lr=lr,
                            seed=seed, finish=_finish)


APPS = {"linktest": run_linktest, "cubist": run_cubist, "procrustes": run_procrustes}
