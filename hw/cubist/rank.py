"""Serial top-r ranker of one 1-D CubistMerge pass (the ``area`` configuration).

:class:`SerialRanker` does what H-RANK / V-RANK do with parallel comparators, one
comparison a cycle. The keys ``s[0..N-2]`` of a line (a row, or a column of the merged
grid) arrive in order, keyed by a context (``ctx``: the column for V-RANK, nothing for
H-RANK), lines of different contexts interleaved. Candidate ``k`` (position ``2k+1``)
has ``L = s[2k]`` and ``R = s[2k+1]`` (none for the last candidate of an even line);
its score is ``max(L, R)`` and it points right iff ``R > L``. The ranks are the
incremental ranks of the parallel rankers: a new candidate counts the earlier ones with
a score at least its own; each earlier one with a lower score moves one place back.
Removed iff ``rank < r``.

Per context the memory holds, at entry ``j < K``, candidate j's ``{score, rank, dir}``
and, at entry ``K``, the pending ``L``. A key that completes candidate ``kv`` reads the
pending L (one cycle), then candidates ``0..kv-1`` one a cycle (each compared and its
rank rewritten, the count of the higher-or-equal ones kept), then writes candidate
``kv``; at the line's last key the removed/direction bits of all candidates are
collected on the way and leave on ``dec_*`` for one cycle. Each earlier candidate is
compared as its entry leaves the memory (stage A) and rewritten a cycle later (stage B).
A key keeps the ranker busy ``kv + 4 <= K + 3`` cycles, so keys must come at least
``K + 3`` cycles apart (the unit checks ``C/P >= K + 3``: keys come at most one per token
time). Every memory access
reads one entry while writing another, so the memory needs no read-during-write logic.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, Signal, signed
from amaranth.lib.memory import Memory

from .keys import clog2

__all__ = ["SerialRanker"]


class SerialRanker(Elaboratable):
    """Ports: ``valid``, ``key`` (signed ``key_bits``), ``n`` (the key's position in its
    line), ``last`` (the line's last key), ``thr`` (r), ``ctx`` (``ctx_bits``), ``tag``
    (``tag_bits``, returned with the decision). Out: ``dec_valid`` (one cycle),
    ``dec_removed``, ``dec_dirs`` (``k`` bits each, candidate j in bit j), ``dec_ctx``,
    ``dec_tag``; ``busy``."""

    def __init__(self, *, k: int, key_bits: int, ctx_bits: int = 0, tag_bits: int = 1,
                 attrs: dict | None = None):
        self.k, self.kw, self.ctx_bits, self.tag_bits = k, key_bits, ctx_bits, tag_bits
        self.rb = max(1, clog2(k + 1))
        self.jb = max(1, clog2(k + 1))
        self.attrs = attrs
        self.valid = Signal()
        self.key = Signal(signed(key_bits))
        self.n = Signal(8)
        self.last = Signal()
        self.thr = Signal(8)
        self.ctx = Signal(max(ctx_bits, 1))
        self.tag = Signal(max(tag_bits, 1))
        self.busy = Signal()
        self.dec_valid = Signal()
        self.dec_removed = Signal(k)
        self.dec_dirs = Signal(k)
        self.dec_ctx = Signal(max(ctx_bits, 1))
        self.dec_tag = Signal(max(tag_bits, 1))

    def elaborate(self, platform):
        m = Module()
        k, kw, rb, jb, cb = self.k, self.kw, self.rb, self.jb, self.ctx_bits
        m.submodules.mem = mem = Memory(shape=kw + rb + 1, depth=1 << (jb + cb), init=[],
                                        attrs=self.attrs)
        wp, rp = mem.write_port(), mem.read_port()

        def addr(j, ctx):
            return Cat(j[:jb] if not isinstance(j, int) else Const(j, jb), ctx[:cb])

        def entry(score, rank, d):
            return Cat(score[:kw], rank[:rb], d)

        rd = rp.data
        r_score, r_rank, r_dir = rd[:kw].as_signed(), rd[kw:kw + rb], rd[kw + rb]
        key, odd, kv, last = Signal(signed(kw)), Signal(), Signal(jb), Signal()
        ctx, tag, thr = Signal.like(self.ctx), Signal.like(self.tag), Signal(rb)
        score, right, cnt = Signal(signed(kw)), Signal(), Signal(rb)
        j = Signal(jb)
        one = Signal(k + 1)  # one-hot j (the decision bit's place)
        a_v = Signal()  # stage A: candidate j's entry is on the read port
        rem, dirs = Signal(k), Signal(k)
        m.d.sync += self.dec_valid.eq(0)
        m.d.comb += [self.dec_removed.eq(rem), self.dec_dirs.eq(dirs),
                     self.dec_ctx.eq(ctx), self.dec_tag.eq(tag)]
        with m.FSM(name="rank") as fsm:
            with m.State("IDLE"):
                # read the pending L of the key's context (used only when it is odd)
                m.d.comb += rp.addr.eq(addr(k, self.ctx))
                with m.If(self.valid):
                    n_odd = self.n[0]
                    m.d.sync += [key.eq(self.key), odd.eq(n_odd), kv.eq(self.n >> 1),
                                 last.eq(self.last), ctx.eq(self.ctx), tag.eq(self.tag),
                                 thr.eq(self.thr), j.eq(0), one.eq(1), cnt.eq(0), rem.eq(0),
                                 dirs.eq(0)]
                    with m.If(n_odd | self.last):
                        m.next = "PEND"
                    with m.Else():  # L of the next candidate: keep it
                        m.d.comb += [wp.addr.eq(addr(k, self.ctx)),
                                     wp.data.eq(entry(self.key, Const(0, rb), Const(0, 1))),
                                     wp.en.eq(1)]
            with m.State("PEND"):
                r = odd & (key > r_score)
                m.d.sync += [right.eq(r), score.eq(Mux(r | ~odd, key, r_score))]
                m.d.comb += rp.addr.eq(addr(0, ctx))
                m.next = "LOOP"
                with m.If(kv == 0):
                    m.next = "LAST"
            with m.State("LOOP"):  # candidate j < kv: compare (stage A), read the next
                m.d.comb += [rp.addr.eq(addr(j + 1, ctx)), a_v.eq(1)]
                m.d.sync += [j.eq(j + 1), one.eq(one << 1)]
                with m.If(j + 1 == kv):
                    m.next = "WAIT"
            with m.State("WAIT"):  # stage B of the last earlier candidate
                m.next = "LAST"
            with m.State("LAST"):  # candidate kv itself
                m.d.comb += [wp.addr.eq(addr(kv, ctx)), wp.data.eq(entry(score, cnt, right)),
                             wp.en.eq(1)]
                with m.If(last):
                    m.d.sync += [rem.eq(rem | Mux(cnt < thr, one[:k], 0)),
                                 dirs.eq(dirs | Mux(right, one[:k], 0)), self.dec_valid.eq(1)]
                m.next = "IDLE"
        # stage B, a cycle after A: the earlier candidate moves back if lower, written back
        b_v, b_gt, b_j, b_one = Signal(), Signal(), Signal(jb), Signal(k + 1)
        b_score, b_rank, b_dir = Signal(signed(kw)), Signal(rb), Signal()
        m.d.sync += [b_v.eq(a_v), b_gt.eq(score > r_score), b_j.eq(j), b_one.eq(one),
                     b_score.eq(r_score), b_rank.eq(r_rank), b_dir.eq(r_dir)]
        new_rank = (b_rank + b_gt)[:rb]
        with m.If(b_v):
            m.d.comb += [wp.addr.eq(addr(b_j, ctx)), wp.data.eq(entry(b_score, new_rank, b_dir)),
                         wp.en.eq(1)]
            m.d.sync += [cnt.eq(cnt + ~b_gt),
                         rem.eq(rem | Mux(new_rank < thr, b_one[:k], 0)),
                         dirs.eq(dirs | Mux(b_dir, b_one[:k], 0))]
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
