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
    (saturating at 2^32-1) if tracked, else down by ``(theta·dn) >> 32``."""

    def __init__(self, score_bits: int):
        self.score_bits = score_bits
        super().__init__({
            "theta": In(32), "up": In(32), "dn": In(32), "score": In(score_bits),
            "tracked": Out(1), "theta_next": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        up = (self.theta * self.up) >> 32
        dn = (self.theta * self.dn) >> 32
        inc = Signal(33)
        m.d.comb += [
            self.tracked.eq(self.theta < (self.score << 16)),
            inc.eq(self.theta + up),
        ]
        with m.If(self.tracked):
            m.d.comb += self.theta_next.eq(Mux(inc > _M32, _M32, inc))
        with m.Else():
            m.d.comb += self.theta_next.eq(self.theta - dn)
        return m
