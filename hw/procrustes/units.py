"""Small arithmetic units of the weight update: the counter PRNG and the quantile step.

Both are combinational ``wiring.Component``s; the update pipeline in ``top.py`` registers
around them.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["MULT", "ZERO_SUBST", "Prng", "QuantileStep"]

# golden/prng.py's constants (hw/ must not import golden/, which imports torch).
MULT = 0x9E3779B9
ZERO_SUBST = 0x6D2B79F5
_M32 = 0xFFFFFFFF


class Prng(wiring.Component):
    """``prng_u32(seed, index)`` of ``golden/prng.py``, given ``hx = index·MULT mod 2^32``.

    Three xorshift rounds (13, 17, 5): nine shift/XOR stages, no adders.
    """

    def __init__(self):
        super().__init__({"hx": In(32), "seed": In(32), "u": Out(32)})

    def elaborate(self, platform):
        m = Module()
        x0 = Signal(32)
        m.d.comb += x0.eq(self.hx ^ self.seed)
        x = Signal(32)
        m.d.comb += x.eq(Mux(x0 == 0, ZERO_SUBST, x0))
        for r in range(3):
            a = Signal(32, name=f"a{r}")
            b = Signal(32, name=f"b{r}")
            c = Signal(32, name=f"c{r}")
            m.d.comb += [
                a.eq(x ^ (x << 13)[:32]),
                b.eq(a ^ (a >> 17)),
                c.eq(b ^ (b << 5)[:32]),
            ]
            x = c
        m.d.comb += self.u.eq(x)
        return m


class QuantileStep(wiring.Component):
    """One step of the streaming quantile estimator (contract, "Weight update"):
    ``tracked = theta < (score << 16)``; ``theta`` moves up by ``(theta·up) >> 32``
    (saturating at 2^32-1) if tracked, else down by ``(theta·dn) >> 32``.

    Pipelined over three cycles so that no 32x32 product sits inside one cycle: ``start``
    with ``score`` at cycle t registers the eight 16x16 partial products of ``theta·up``
    and ``theta·dn``; t+1 sums the middle ones and compares; at t+2 ``done`` is high
    with ``tracked`` and ``theta_next`` (theta plus or minus the top partial product and
    the middle sum). ``theta``, ``up`` and ``dn`` must hold from t to
    t+2 (the caller writes ``theta_next`` back at t+2, so steps start 3 cycles apart).
    """

    def __init__(self, score_bits: int):
        self.score_bits = score_bits
        super().__init__({
            "start": In(1), "theta": In(32), "up": In(32), "dn": In(32),
            "score": In(score_bits),
            "done": Out(1), "tracked": Out(1), "theta_next": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        th = self.theta
        v1, v2 = Signal(), Signal()
        score1 = Signal(self.score_bits)
        m.d.sync += [v1.eq(self.start), v2.eq(v1)]
        with m.If(self.start):
            m.d.sync += score1.eq(self.score)
        # stage 1: partial products (each an unsigned 16x16 multiply)
        parts = {}
        for name, c in (("up", self.up), ("dn", self.dn)):
            for i in range(2):
                for j in range(2):
                    p = Signal(32, name=f"pp_{name}{i}{j}")
                    m.d.sync += p.eq(th[16 * i:16 * i + 16] * c[16 * j:16 * j + 16])
                    parts[name, i, j] = p
        # stage 2: the middle sum of each product, mid = p01 + p10 + (p00 >> 16) (then
        # (theta·c) >> 32 = p11 + (mid >> 16): the low 16 bits of p00 cannot carry past
        # bit 32); the compare
        mids, highs = {}, {}
        for name in ("up", "dn"):
            mid = Signal(34, name=f"mid_{name}")
            hi = Signal(32, name=f"hi_{name}")
            m.d.sync += [mid.eq(parts[name, 0, 1] + parts[name, 1, 0]
                                + (parts[name, 0, 0] >> 16)),
                         hi.eq(parts[name, 1, 1])]
            mids[name], highs[name] = mid, hi
        tracked = Signal()
        m.d.sync += tracked.eq(th < (score1 << 16))
        # stage 3: the new threshold
        up_sum = Signal(34)
        m.d.comb += [up_sum.eq(th + highs["up"] + (mids["up"] >> 16)),
                     self.done.eq(v2), self.tracked.eq(tracked)]
        with m.If(tracked):
            m.d.comb += self.theta_next.eq(Mux(up_sum > _M32, _M32, up_sum))
        with m.Else():
            m.d.comb += self.theta_next.eq(th - highs["dn"] - (mids["dn"] >> 16))
        return m
