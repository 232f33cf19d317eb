"""Similarity-key datapath of the merge unit: dot products, norms and the key divider.

* :class:`KeyFront` takes a stream of token beats (P lanes each, B beats a token) and,
  at the end of every token that has a predecessor, emits a job ``(d, na, nb)``:
  ``d = <prev, new>``, ``na = |prev|^2`` (stored when ``prev`` went through) and
  ``nb = |new|^2``. The predecessor's beats are kept in a token memory indexed by
  ``tok`` (one slot for the horizontal pass, one per column for the vertical pass).
* :class:`KeyDivider` turns jobs into keys ``sign(d) * floor(d^2 * 2^F / (na * nb))``
  (0 if ``na * nb == 0``): two multipliers, then ``n`` restoring dividers used round
  robin, each producing ``k`` quotient bits a cycle.

Neither has backpressure: jobs come at most one per B cycles (one per token), and the
divider bank is sized at elaboration so that it accepts one job every B cycles. Keys
leave in job order (all dividers have the same latency).
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Elaboratable, Module, Mux, Signal, signed, unsigned
from amaranth.lib.memory import Memory

__all__ = ["KeyDivider", "KeyFront", "clog2", "divider_plan", "lanes_of", "norm_bits"]


def clog2(n: int) -> int:
    """Bits of an index into ``n`` entries (0 for n <= 1)."""
    return max(n - 1, 0).bit_length()


def norm_bits(c: int, width: int) -> int:
    """Bits of the largest squared norm ``C * 4^(width-1)``."""
    return (c << (2 * (width - 1))).bit_length()


def lanes_of(value, p: int, width: int) -> list:
    """The P signed lanes of a raw ``P*width``-bit vector (lane 0 in the low bits)."""
    return [value[k * width:(k + 1) * width].as_signed() for k in range(p)]


def _tree(m: Module, terms: list, shape, name: str, levels_per_stage: int = 2):
    """Pipelined adder tree: returns (sum, stages added)."""
    level, stages, depth = list(terms), 0, 0
    while len(level) > 1:
        nxt = [level[i] + level[i + 1] if i + 1 < len(level) else level[i]
               for i in range(0, len(level), 2)]
        depth += 1
        if depth % levels_per_stage == 0 and len(nxt) > 1:
            regs = []
            for n, v in enumerate(nxt):
                r = Signal(shape, name=f"{name}_s{stages}_{n}")
                m.d.sync += r.eq(v)
                regs.append(r)
            nxt, stages = regs, stages + 1
        level = nxt
    return level[0], stages


class KeyFront(Elaboratable):
    """Dot product and norms of each token with its predecessor (same ``tok`` slot).

    Inputs (one beat per cycle at most): ``valid``, ``data`` (P*width bits), ``c``
    (beat index), ``tok`` (slot of the predecessor / of this token), ``end`` (last
    beat of the token), ``has_prev`` (emit a job at this token's end).
    Outputs: ``job_valid`` (one cycle), ``job_d``, ``job_na``, ``job_nb``.

    ``ways = 2``: two token streams interleaved beat by beat (input ``way``; their ``tok``
    slots must differ), each with its own accumulators; ``job_way`` says whose job it is.

    ``product_regs``: registers after each product (2: the second one lets the adder
    tree start beside its own registers, for ECP5 timing; 1: fewer flip-flops; 0: the
    products go straight into the adder tree, for a slow clock).

    ``operand_regs = False``: the multipliers take the new beat and the old beat (memory
    output) straight from the input register and the memory, a stage fewer.
    ``mem_attrs``: attributes of both memories (``{"no_rw_check": 1}``), which then need
    no read-during-write logic: the previous-beat memory is written a cycle late, from
    the input register, and the norm memory's read port is not transparent. The caller
    guarantees that two beats of the same ``tok`` slot never come in consecutive cycles
    (``ways = 2``, the two streams taking alternate cycles).
    """

    def __init__(self, *, p: int, width: int, beats: int, tokens: int, c: int,
                 ways: int = 1, product_regs: int = 2, operand_regs: bool = True,
                 mem_attrs: dict | None = None):
        if product_regs not in (0, 1, 2):
            raise ValueError(f"product_regs must be 0, 1 or 2, not {product_regs!r}")
        self.operand_regs = bool(operand_regs)
        self.mem_attrs = mem_attrs
        self.p, self.width, self.beats, self.tokens = p, width, beats, tokens
        self.ways = ways
        self.product_regs = product_regs
        self.cb, self.tb = clog2(beats), clog2(tokens)
        self.nw = norm_bits(c, width)
        self.dw = self.nw + 1
        self.valid = Signal()
        self.data = Signal(p * width)
        self.c = Signal(range(max(beats, 2)))
        self.tok = Signal(range(max(tokens, 2)))
        self.end = Signal()
        self.has_prev = Signal()
        self.way = Signal()
        self.job_valid = Signal()
        self.job_way = Signal()
        self.job_d = Signal(signed(self.dw))
        self.job_na = Signal(unsigned(self.nw))
        self.job_nb = Signal(unsigned(self.nw))

    def elaborate(self, platform):
        m = Module()
        p, w = self.p, self.width
        depth = max(2, 1 << (self.cb + self.tb))
        lean = self.mem_attrs is not None
        m.submodules.prev = prev = Memory(shape=p * w, depth=depth, init=[],
                                          attrs=self.mem_attrs)
        pw = prev.write_port()
        pr = prev.read_port(transparent_for=())  # old value: the predecessor's beat
        addr = Cat(self.c[:self.cb], self.tok[:self.tb])
        if lean:  # (written below)
            m.d.comb += pr.addr.eq(addr)
        else:
            m.d.comb += [pw.addr.eq(addr), pw.data.eq(self.data), pw.en.eq(self.valid),
                         pr.addr.eq(addr)]

        # stage 1: new beat registered beside the old beat from memory
        v1, x1 = Signal(), Signal(p * w)
        ctl = [(self.c == 0, "first"), (self.end, "end"), (self.has_prev, "hp")]
        c1 = {n: Signal(name=f"{n}1") for _, n in ctl}
        tok1, way1 = Signal.like(self.tok), Signal()
        m.d.sync += [v1.eq(self.valid), x1.eq(self.data), tok1.eq(self.tok)]
        if self.ways == 2:
            m.d.sync += way1.eq(self.way)
        m.d.sync += [c1[n].eq(s) for s, n in ctl]
        if lean:  # the new beat written a cycle late (its slot is not read in that cycle)
            addr1 = Signal.like(addr)
            m.d.sync += addr1.eq(addr)
            m.d.comb += [pw.addr.eq(addr1), pw.data.eq(x1), pw.en.eq(v1)]

        # stage 2: the old beat (memory output) and the new beat registered again, so the
        # multipliers start from flip-flops, not from the memory's clock-to-out
        if self.operand_regs:
            x2, o2 = Signal(p * w), Signal(p * w)
            m.d.sync += [x2.eq(x1), o2.eq(pr.data)]
        else:
            x2, o2 = x1, pr.data
        # stage 3: products registered
        prod = signed(2 * w + 1)
        new, old = lanes_of(x2, p, w), lanes_of(o2, p, w)
        if self.product_regs:
            pd = [Signal(prod, name=f"pd{k}") for k in range(p)]
            ps = [Signal(prod, name=f"ps{k}") for k in range(p)]
            m.d.sync += [pd[k].eq(new[k] * old[k]) for k in range(p)]
            m.d.sync += [ps[k].eq(new[k] * new[k]) for k in range(p)]
        else:
            pd = [new[k] * old[k] for k in range(p)]
            ps = [new[k] * new[k] for k in range(p)]
        # stage 4: products registered again, so that the register after each DSP sits
        # beside it and the adder tree starts from its own registers (DSP -> long route
        # -> tree register was the board build's 95 MHz path)
        # (product_regs = 2)
        pdq, psq = pd, ps
        if self.product_regs == 2:
            pdq = [Signal(prod, name=f"pdq{k}") for k in range(p)]
            psq = [Signal(prod, name=f"psq{k}") for k in range(p)]
            m.d.sync += ([pdq[k].eq(pd[k]) for k in range(p)]
                         + [psq[k].eq(ps[k]) for k in range(p)])

        # adder trees (registered every two levels), then one more register
        sum_shape = signed(2 * w + 1 + clog2(p) + 1)
        sd, st = _tree(m, pdq, sum_shape, "td")
        sn, _ = _tree(m, psq, sum_shape, "tn")
        # stages from the input register to the sum register
        delay = 1 + self.operand_regs + self.product_regs + st
        sdr, snr = Signal(sum_shape), Signal(sum_shape)
        m.d.sync += [sdr.eq(sd), snr.eq(sn)]

        def delayed(sig, n, name):
            for i in range(n):
                r = Signal.like(sig, name=f"{name}_d{i}")
                m.d.sync += r.eq(sig)
                sig = r
            return sig

        va = delayed(v1, delay, "v")
        ca = {n: delayed(c1[n], delay, n) for _, n in ctl}
        toka = delayed(tok1, delay, "tok")
        waya = delayed(way1, delay, "way")

        # accumulate stage (a): running sums, predecessor's norm read at the first beat
        acc_d = Array(Signal(signed(self.dw + 1), name=f"acc_d{n}") for n in range(self.ways))
        acc_n = Array(Signal(unsigned(self.nw + 1), name=f"acc_n{n}") for n in range(self.ways))
        m.submodules.norms = norms = Memory(shape=self.nw, depth=max(self.tokens, 2), init=[],
                                            attrs=self.mem_attrs)
        nw_ = norms.write_port()
        nr = norms.read_port(transparent_for=() if self.mem_attrs else (nw_,))
        ad, an = acc_d[waya], acc_n[waya]
        with m.If(va):
            m.d.sync += [ad.eq(Mux(ca["first"], 0, ad) + sdr),
                         an.eq(Mux(ca["first"], 0, an) + snr)]
        # (lean: read at the last beat, used the next cycle: no hold registers per way)
        m.d.comb += [nr.addr.eq(toka[:self.tb]),
                     nr.en.eq(va & (ca["end"] if lean else ca["first"]))]
        vb, endb, hpb, tokb = Signal(), Signal(), Signal(), Signal.like(self.tok)
        firstb, wayb = Signal(), Signal()
        m.d.sync += [vb.eq(va), endb.eq(ca["end"]), hpb.eq(ca["hp"]), tokb.eq(toka),
                     firstb.eq(ca["first"]), wayb.eq(waya)]
        # stage b: token complete
        done = vb & endb
        na = nr.data
        if self.ways == 2 and not lean:  # the other stream's first beat would overwrite it
            na_hold = Array(Signal(self.nw, name=f"na_hold{n}") for n in range(2))
            with m.If(vb & firstb):
                m.d.sync += na_hold[wayb].eq(nr.data)
            na = Mux(firstb, nr.data, na_hold[wayb])
        m.d.comb += [nw_.addr.eq(tokb[:self.tb]), nw_.data.eq(acc_n[wayb]), nw_.en.eq(done),
                     self.job_valid.eq(done & hpb), self.job_d.eq(acc_d[wayb]),
                     self.job_na.eq(na), self.job_nb.eq(acc_n[wayb]), self.job_way.eq(wayb)]
        return m


SPLIT = 17  # operand bits of one DSP partial product (unsigned in an 18x18 signed multiplier)


def _twice(m: Module, value, width: int, name: str):
    """``value`` registered twice: the first register can sit beside the DSP, the second
    beside the logic it feeds (a DSP output routed across the die to the adders was the
    board build's 87 MHz path)."""
    r, r2 = Signal(width, name=name), Signal(width, name=f"{name}_q")
    m.d.sync += [r.eq(value), r2.eq(r)]
    return r2


def _split_product(m: Module, a, b, name: str):
    """``a * b`` as partial products of at most SPLIT x SPLIT bits, each registered twice
    (:func:`_twice`); returns the (unregistered) sum of the registers. A square shares
    its cross product."""
    if len(a) <= SPLIT and len(b) <= SPLIT:
        return _twice(m, a * b, len(a) + len(b), f"{name}_p")
    a0, a1, b0, b1 = a[:SPLIT], a[SPLIT:], b[:SPLIT], b[SPLIT:]
    square = a is b
    parts = {"00": (a0, b0, 0), "01": (a0, b1, SPLIT), "11": (a1, b1, 2 * SPLIT)}
    if not square:
        parts["10"] = (a1, b0, SPLIT)
    total = 0
    for n, (x, y, sh) in parts.items():
        r = _twice(m, x * y, len(x) + len(y), f"{name}_p{n}")
        total = total + ((r << (sh + 1)) if square and n == "01" else (r << sh))
    return total


def divider_plan(frac_bits: int, beats: int, max_units: int = 3) -> tuple[int, int]:
    """``(bits_per_cycle, units)``: the slowest divider bank that takes a job every
    ``beats`` cycles, with at most ``max_units`` dividers."""
    for k in range(1, frac_bits + 1):
        busy = -(-(frac_bits + 1) // k) + 1  # cycles a divider is occupied per job
        units = -(-busy // beats)
        if units <= max_units:
            return k, units
    return frac_bits, 2


class _Divider(Elaboratable):
    """Restoring fraction divider: ``q = floor(num * 2^F / den)`` for ``num <= den``."""

    def __init__(self, nbits: int, frac_bits: int, k: int):
        self.f, self.k = frac_bits, k
        self.start = Signal()
        self.num = Signal(nbits)
        self.den = Signal(nbits)
        self.neg = Signal()
        self.tag = Signal()
        self.done = Signal()
        self.tag_out = Signal()
        self.key = Signal(signed(frac_bits + 2))
        self.rbits = nbits + 1

    def elaborate(self, platform):
        m = Module()
        f, k, rb = self.f, self.k, self.rbits
        cycles = -(-(f + 1) // k)  # the integer bit and F fraction bits, k a cycle
        # Long division of num * 2^F: the first `lead` steps shift in num's low bits, so
        # every cycle runs the same k steps (num >> lead < den, so the implicit higher
        # quotient bits are 0; the extra leading ones fall off q's top).
        lead = k * cycles - f
        rem, den = Signal(rb), Signal(rb)
        low = Signal(lead)  # num's low bits, shifted in during the first cycle
        q = Signal(f + 1)
        neg, zero, first = Signal(), Signal(), Signal()
        cnt = Signal(range(cycles + 1))

        m.d.sync += self.done.eq(0)
        with m.If(self.start):
            m.d.sync += [rem.eq(self.num >> lead), low.eq(self.num[:lead]), den.eq(self.den),
                         neg.eq(self.neg), zero.eq(self.den == 0), first.eq(1),
                         cnt.eq(cycles), self.tag_out.eq(self.tag)]
        with m.Elif(cnt != 0):
            r, qq = rem, q
            for i in range(k):
                inbit = first & low[lead - 1 - i] if i < lead else Const(0, 1)
                ge = Signal(name=f"ge{i}")
                rn = Signal(rb, name=f"r{i}")
                r2 = Cat(inbit, r)[:rb]
                m.d.comb += [ge.eq(r2 >= den), rn.eq(Mux(ge, r2 - den, r2))]
                r, qq = rn, Cat(ge, qq)[:f + 1]
            m.d.sync += [rem.eq(r), q.eq(qq), first.eq(0), cnt.eq(cnt - 1)]
            with m.If(cnt == 1):
                m.d.sync += self.done.eq(1)
        qs = Signal(signed(f + 2))
        m.d.comb += [qs.eq(q), self.key.eq(Mux(zero, 0, Mux(neg, -qs, qs)))]
        return m


class _LeanDivider(_Divider):
    """:class:`_Divider` in ``ceil(F/k)`` cycles a job, without a restoring multiplexer:
    non-restoring division (the partial remainder ``p`` is signed; each step adds or
    subtracts the divisor by the sign of ``p``, one adder whose sum goes straight into
    ``p``; quotient bit = ``p >= 0``, the same bits as restoring division). The first
    step runs in the start cycle (from the inputs), and only the F fraction bits are
    divided: ``num <= den``, so the integer bit is ``num == den``, and then the quotient
    is exactly ``2^F``."""

    def elaborate(self, platform):
        m = Module()
        f, k = self.f, self.k
        nb = len(self.num)
        w = nb + 2  # |p| < den < 2^nb: 2p + 1 fits in nb + 2 signed bits
        cycles = -(-f // k)
        lead = k * cycles - f  # < k: num's low bits, shifted in during the first step
        p, den, q = Signal(w), Signal(nb), Signal(f)
        neg, zero, same = Signal(), Signal(), Signal()
        cnt = Signal(range(cycles + 1))
        start = self.start
        cur = Mux(start, self.num >> lead, p)
        d = Cat(Mux(start, self.den, den), Const(0, w - nb))
        pos = Mux(start, 1, ~p[-1])
        qq = Mux(start, 0, q)
        for i in range(k):
            inbit = start & self.num[lead - 1 - i] if i < lead else Const(0, 1)
            a = Cat(inbit, cur)[:w]  # 2p + inbit
            b = Mux(pos, ~d, d)[:w]
            # a + b + pos in one carry chain: pos enters as the carry of an extra low bit
            s = Signal(w + 2, name=f"sum{i}")
            m.d.comb += s.eq(Cat(pos, a) + Cat(pos, b))
            cur = s[1:w + 1]
            pos = ~cur[-1]
            qq = Cat(pos, qq)[:f]
        m.d.sync += self.done.eq(0)
        with m.If(start | (cnt != 0)):
            m.d.sync += [p.eq(cur), q.eq(qq)]
        with m.If(start):
            m.d.sync += [den.eq(self.den), neg.eq(self.neg), zero.eq(self.den == 0),
                         same.eq(self.num == self.den), cnt.eq(cycles - 1),
                         self.tag_out.eq(self.tag)]
            if cycles == 1:
                m.d.sync += self.done.eq(1)
        with m.Elif(cnt != 0):
            m.d.sync += cnt.eq(cnt - 1)
            with m.If(cnt == 1):
                m.d.sync += self.done.eq(1)
        qs = Signal(signed(f + 2))
        m.d.comb += [qs.eq(Mux(same, 1 << f, q)), self.key.eq(Mux(zero, 0, Mux(neg, -qs, qs)))]
        return m


class KeyDivider(Elaboratable):
    """Jobs ``(d, na, nb)`` in, keys out in order; ``latency`` cycles from job to key.

    Each job carries a one-bit ``tag``, returned with its key as ``key_tag``.
    ``queue``: jobs may come closer than ``beats`` cycles apart, as long as at most two
    come in any ``2*beats`` cycles (two streams, each at most one job per ``2*beats``
    cycles): one job waits in a register and starts ``beats`` cycles after the previous
    one, so a key can be up to ``beats`` cycles later than ``latency``.
    ``lean``: one divider (:class:`_LeanDivider`, the fewest quotient bits a cycle that
    finish in B cycles) and, with ``serial``, the operands and the divider loaded
    straight from the shift-add registers (no registers between): fewer flip-flops for
    the iCE40.
    """

    def __init__(self, *, dw: int, nw: int, frac_bits: int, beats: int, serial: bool = False,
                 queue: bool = False, lean: bool = False):
        self.f = frac_bits
        self.serial = serial
        self.lean = lean
        self.queue = queue
        self.beats = beats
        # serial: the two products by shift-add in LUTs, `sbits` multiplier bits a cycle,
        # finished within B cycles (a job comes at most every B cycles)
        self.sbits = -(-nw // max(beats - 1, 1))
        self.scycles = -(-nw // self.sbits)
        if lean:  # one _LeanDivider: ceil(F/k) cycles a job, at most B
            self.k, self.units = next(k for k in range(1, frac_bits + 1)
                                      if -(-frac_bits // k) <= beats), 1
        else:
            self.k, self.units = divider_plan(frac_bits, beats)
        self.valid = Signal()
        self.d = Signal(signed(dw))
        self.na = Signal(unsigned(nw))
        self.nb = Signal(unsigned(nw))
        self.tag = Signal()
        self.key_valid = Signal()
        self.key_tag = Signal()
        self.key = Signal(signed(frac_bits + 2))
        self.nbits = 2 * nw
        cycles = -(-(frac_bits + 1) // self.k) + 1 if not lean else -(-frac_bits // self.k)
        # multiplier stages (3 serial, 5 with DSPs), the divider's load cycle, its step
        # cycles, the key register
        # (lean: no load cycle, the first step runs as the job starts)
        self.latency = (3 if serial else 5) - 2 * (lean and serial) + cycles + 1

    def elaborate(self, platform):
        m = Module()
        nb = self.nbits
        valid, d, na, nbv, tag = self.valid, self.d, self.na, self.nb, self.tag
        if self.queue:
            valid, d, na, nbv, tag = self._queue(m)
        # M1: magnitudes registered; M2: products registered; M3: products again (DSP out)
        v1, ad, neg1, a1, b1 = Signal(), Signal(self.d.shape().width), Signal(), \
            Signal.like(self.na), Signal.like(self.nb)
        tag1, tag2, tag3 = Signal(), Signal(), Signal()
        if self.lean and self.serial:
            # the shift-add registers load the job's operands directly
            v1, ad, neg1, a1, b1, tag1 = valid, abs(d)[:len(ad)], d < 0, na, nbv, tag
        else:
            m.d.sync += [v1.eq(valid), ad.eq(abs(d)), neg1.eq(d < 0), a1.eq(na), b1.eq(nbv),
                         tag1.eq(tag)]
        v2, neg2 = Signal(), Signal()
        v3, num3, den3, neg3 = Signal(), Signal(nb), Signal(nb), Signal()
        if self.serial:
            num2, den2 = Signal(nb), Signal(nb)
            self._serial_products(m, v1, ad, a1, b1, neg1, v2, num2, den2, neg2)
            with m.If(v1):
                m.d.sync += tag2.eq(tag1)
            num_sum, den_sum = num2, den2
        else:
            # M1b: operands registered again, next to the DSPs; M2: 17-bit partial
            # products registered (one DSP each) and registered again (M2b); M3: their
            # shifted sum (adders only)
            adq, aq, bq = Signal.like(ad), Signal.like(a1), Signal.like(b1)
            vq, negq, vp, negp, tagq, tagp = (Signal(), Signal(), Signal(), Signal(), Signal(),
                                              Signal())
            m.d.sync += [adq.eq(ad), aq.eq(a1), bq.eq(b1), vq.eq(v1), negq.eq(neg1),
                         vp.eq(vq), negp.eq(negq), v2.eq(vp), neg2.eq(negp),
                         tagq.eq(tag1), tagp.eq(tagq), tag2.eq(tagp)]
            num_sum = _split_product(m, adq, adq, "sq")
            den_sum = _split_product(m, aq, bq, "nn")
        if self.lean and self.serial:
            # the shift-add registers hold the products until the next job (>= B cycles)
            v3, num3, den3, neg3, tag3 = v2, num_sum, den_sum, neg2, tag2
        else:
            m.d.sync += [v3.eq(v2), num3.eq(num_sum), den3.eq(den_sum), neg3.eq(neg2),
                         tag3.eq(tag2)]
        rr = Signal(range(max(self.units, 2)))
        keys = []
        for n in range(self.units):
            div = (_LeanDivider if self.lean else _Divider)(nb, self.f, self.k)
            m.submodules[f"div{n}"] = div
            # (lean: one unit, started by v3 itself, a register: no compare before the
            # start multiplexers, the 28.7 MHz path)
            m.d.comb += [div.start.eq(v3 if self.lean else v3 & (rr == n)),
                         div.num.eq(num3), div.den.eq(den3),
                         div.neg.eq(neg3), div.tag.eq(tag3)]
            keys.append(div)
        with m.If(v3):
            m.d.sync += rr.eq(Mux(rr == self.units - 1, 0, rr + 1))
        # keys leave from a register (the sign/zero fix-up ends a cycle of its own)
        m.d.sync += self.key_valid.eq(Cat(d.done for d in keys).any())
        key, ktag = keys[0].key, keys[0].tag_out
        for dv in keys[1:]:
            key, ktag = Mux(dv.done, dv.key, key), Mux(dv.done, dv.tag_out, ktag)
        m.d.sync += [self.key.eq(key), self.key_tag.eq(ktag)]
        return m

    def _queue(self, m):
        """One waiting job; a job starts at least ``beats`` cycles after the previous."""
        b = self.beats
        since = Signal(range(b + 1), init=b)  # cycles since the last start, saturated
        pv, pd, pa, pb, pt = (Signal(), Signal.like(self.d), Signal.like(self.na),
                              Signal.like(self.nb), Signal())
        start = Signal()
        m.d.comb += start.eq((since >= b) & (pv | self.valid))
        m.d.sync += since.eq(Mux(start, 1, Mux(since == b, b, since + 1)))
        incoming = [pd.eq(self.d), pa.eq(self.na), pb.eq(self.nb), pt.eq(self.tag)]
        with m.If(start & pv):
            m.d.sync += pv.eq(self.valid)
            with m.If(self.valid):
                m.d.sync += incoming
        with m.Elif(~start & self.valid):
            m.d.sync += [pv.eq(1), *incoming]
        return (start, Mux(pv, pd, self.d), Mux(pv, pa, self.na), Mux(pv, pb, self.nb),
                Mux(pv, pt, self.tag))

    def _serial_products(self, m, v1, ad, a1, b1, neg1, v2, num2, den2, neg2):
        """``num2 = ad*ad`` and ``den2 = a1*b1`` by shift-add (no ``*``, so no DSP):
        ``sbits`` bits of the multiplier a cycle, ``v2`` one cycle after the last.

        Each product is one register ``[partial sum | multiplier]`` shifted right ``sbits``
        a cycle, the multiplicand added to its top part (|d| < 2^nw, so every operand has
        nw bits): the adders are nw + sbits wide, not 2*nw."""
        nb, sb, nw = self.nbits, self.sbits, self.nbits // 2
        mb = self.scycles * sb  # multiplier bits consumed (zero-extended beyond nw)
        cnt = Signal(range(self.scycles + 1))
        m.d.sync += v2.eq(0)
        regs = []
        for name, x, y, out in (("sq", ad, ad, num2), ("nn", a1, b1, den2)):
            mul = Signal(nw, name=f"{name}_mcand")
            acc = Signal(mb + nw + sb, name=f"{name}_acc")
            with m.If(v1):
                m.d.sync += [mul.eq(x[:nw]), acc.eq(y[:nw])]
            with m.Elif(cnt != 0):
                terms = [Mux(acc[i], mul << i, 0) for i in range(sb)]
                hi = acc[mb:] + sum(terms[1:], terms[0])
                m.d.sync += acc.eq(Cat(acc[sb:mb], hi[:nw + sb]))
            m.d.comb += out.eq(acc[:nb])
            regs.append(acc)
        with m.If(v1):
            m.d.sync += [neg2.eq(neg1), cnt.eq(self.scycles)]
        with m.Elif(cnt != 0):
            m.d.sync += cnt.eq(cnt - 1)
            with m.If(cnt == 1):
                m.d.sync += v2.eq(1)
