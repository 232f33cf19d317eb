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
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


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


# --- compiled pass -----------------------------------------------------------
#
# The pass is one long dependency chain (each decision needs the previous
# theta), so its speed is the latency of one step. A float32 multiply + compare
# + select costs ~10 cycles per element; the kernel below runs the same chain
# on the float32 bit pattern ``b`` of theta with integer adds instead, exactly:
#
# * theta > 0 and the scores are compared as bits: for ``s >= 0`` (NaN and
#   negative scores get key 0, never tracked) ``theta < s`` iff ``b < bits(s)``;
# * up = 1 + U*2**-23 and down = 1 - D*2**-24 exactly (any float32 in [1, 2)
#   resp. [0.5, 1)). With theta = M*2**e (M the 24-bit significand),
#   theta*up = (M + M*U/2**23)*2**e rounds to (M + k)*2**e, k = round(M*U/2**23),
#   as long as the result stays in the binade and M*U/2**23 is not a rounding
#   tie; likewise theta*down = (M - j)*2**e. Over an interval of M (a
#   "region", computed by :func:`_region`) k and j are constant, so there
#   bits(theta*up) = b + k and bits(theta*down) = b - j: an integer add.
# * the chain advances two elements per iteration (both candidate compares of
#   the second element are formed from b before the first decision is known),
#   and falls back to the float32 step outside a region (subnormal or huge
#   theta, binade edges, ties, or factors not of the above form).
#
# The result is bit-identical to :func:`quantile_pass_reference` (hypothesis
# test in tests/test_quantile.py); ~2.8x faster than the float chain.

_BLOCK = 2048  # scores keyed per block (L1-resident), then chained


@numba.njit(inline="always")
def _consts(up, down):
    """(U, D) with up = 1 + U*2**-23, down = 1 - D*2**-24; U = -1: no integer path."""
    if not (up >= 1 and up < 2 and down >= 0.5 and down <= 1):
        return np.int64(-1), np.int64(0)
    u = np.int64(np.float32(up).view(np.uint32)) - 0x3F800000
    if down == 1:
        return u, np.int64(0)
    m = (np.int64(np.float32(down).view(np.uint32)) & 0x7FFFFF) | 0x800000
    return u, (1 << 24) - m


@numba.njit(inline="always")
def _region(b, u, d):
    """Bits interval [lo, hi] around theta bits ``b`` on which theta*up has bits
    b + inc and theta*down bits b - dec; returns (lo, hi, inc, dec), lo > hi if
    there is none (then b is not inside either)."""
    e = b >> 23
    if u < 0 or e == 0 or e >= 255:
        return np.int64(1), np.int64(0), np.int64(0), np.int64(0)
    m = (b & 0x7FFFFF) | 0x800000
    k = (m * u + (1 << 22)) >> 23  # round(m*u/2**23), exact unless a tie
    j = (m * d + (1 << 23)) >> 24
    lo = np.int64(1 << 23) + 1 + j  # theta*down stays in the binade
    hi = np.int64((1 << 24) - 1) - k  # theta*up stays in the binade
    if u > 0:  # (k - 1/2) < m*u/2**23 < (k + 1/2), strictly: same k, no tie
        lo = max(lo, (((2 * k - 1) << 22) // u) + 1)
        hi = min(hi, (((2 * k + 1) << 22) - 1) // u)
    if d > 0:
        lo = max(lo, (((2 * j - 1) << 23) // d) + 1)
        hi = min(hi, (((2 * j + 1) << 23) - 1) // d)
    base = (e << 23) - (1 << 23)
    return base + lo, base + hi, k, j


@numba.njit(inline="always")
def _key(s):
    """Score as a comparable integer: its bits if s > 0, else 0 (-0.0, NaN too)."""
    return np.int64(np.float32(s).view(np.uint32)) if s > 0 else np.int64(0)


_NREG = 4  # regions kept by :func:`_region_cached`


def _region_cache():
    """Empty region cache: rows (lo, hi, inc, dec), lo > hi; then a row whose
    first entry is the next slot; then three rows holding the last edge pieces
    of :func:`_edge_pieces_cached` (empty: lb > ha), then two rows holding the
    :func:`_run_consts` of those pieces (first entry 0: none)."""
    rc = np.zeros((_NREG + 6, 4), dtype=np.int64)
    rc[_NREG + 1, 0] = 1
    rc[:_NREG, 0] = 1
    return rc


@numba.njit(inline="always")
def _region_cached(b, u, d, rc):
    """:func:`_region` through a small cache: theta often settles on the edge of
    two regions (a float32 rounding edge of the factors pins it there, see
    tests/test_quantile.py) and then goes back and forth between them, and
    computing a region takes four integer divisions. Regions partition the bit
    patterns, so a cached region holding ``b`` is the one :func:`_region` gives."""
    for r in range(_NREG):
        if rc[r, 0] <= b and b <= rc[r, 1]:
            return rc[r, 0], rc[r, 1], rc[r, 2], rc[r, 3]
    lo, hi, inc, dec = _region(b, u, d)
    if lo <= hi:
        r = rc[_NREG, 0]
        rc[r, 0] = lo
        rc[r, 1] = hi
        rc[r, 2] = inc
        rc[r, 3] = dec
        rc[_NREG, 0] = (r + 1) % _NREG
    return lo, hi, inc, dec


@numba.njit(inline="always")
def _chain(key, n, b, u, d, up, down, mask, off, rc):
    """Quantile steps over ``key[n-1] .. key[0]`` (mask index ``off + i``) from
    theta bits ``b``; ``rc``: region cache; returns the new bits."""
    i = n - 1
    while i >= 0:
        lo, hi, inc, dec = _region_cached(b, u, d, rc)
        lo2 = lo + dec  # two steps from [lo2, hi2] stay in [lo, hi]
        hi2 = hi - inc
        if i >= 1 and lo2 <= b and b <= hi2:
            span = np.uint64(hi2 - lo2)
            two_up = 2 * inc
            mid = inc - dec
            two_dn = -2 * dec
            while i >= 1:
                k1 = key[np.uint64(i)]
                k2 = key[np.uint64(i - 1)]
                t1 = b < k1
                cu = b < k2 - inc  # second element, if the first went up
                cd = b < k2 + dec  # ... if it went down
                t2 = cu if t1 else cd
                x = two_up if cu else mid
                y = mid if cd else two_dn
                mask[np.uint64(off + i)] = t1
                mask[np.uint64(off + i - 1)] = t2
                b = b + (x if t1 else y)
                i -= 2
                if np.uint64(b - lo2) > span:
                    break
        else:
            i, b = _edge_steps(key, i, b, u, d, up, down, mask, off, rc, lo, hi, inc, dec)
    return b


@numba.njit(inline="always")
def _float_step(b, up, down):
    """(bits of theta*up, bits of theta*down) by float32 arithmetic."""
    th = np.uint32(b).view(np.float32)
    a = th * up
    c = th * down
    # up >= down and theta >= 0: max/min are theta*up / theta*down
    return (np.int64(np.float32(max(a, c)).view(np.uint32)),
            np.int64(np.float32(min(a, c)).view(np.uint32)))


@numba.njit(inline="always")
def _region_at(x, u, d, rc):
    """The region holding bits ``x`` ((1, 0, 0, 0) if none: :func:`_region` may
    return a neighbouring region when ``x`` is a tie pattern)."""
    lo, hi, inc, dec = _region_cached(x, u, d, rc)
    if lo <= x and x <= hi:
        return lo, hi, inc, dec
    return np.int64(1), np.int64(0), np.int64(0), np.int64(0)


@numba.njit(inline="always")
def _edge_pieces(b, u, d, up, down, rc, lo, hi, inc, dec):
    """The two regions on either side of the region edge nearest ``b`` and the
    tie pattern between them, if any: (ok, lb, hb, ib, db, tp, it, dt, la, ha,
    ia, da). Below the edge ([lb, hb]) theta steps by +ib / -db, on the tie
    pattern ``tp`` (-1 if none; it belongs to no region) by +it / -dt, above
    ([la, ha]) by +ia / -da. ``ok`` is False when ``b`` is not in [lb, ha] or
    the edge has no such form (subnormal or huge theta, a binade edge)."""
    # [lo, hi] (steps inc, dec) is the region _region gave for b; it need not hold
    # b when b is a tie pattern, but its steps hold on all of [lo, hi]
    if lo <= hi and (b > hi or (b >= lo and b > hi - (hi - lo) // 2)):  # edge above hi
        lb, hb, ib, db = lo, hi, inc, dec
        la, ha, ia, da = _region_at(hi + 1, u, d, rc)
        tp = np.int64(-1)
        if la > ha:  # hi + 1 is a tie pattern: the region above starts at hi + 2
            tp = hi + 1
            la, ha, ia, da = _region_at(hi + 2, u, d, rc)
    elif lo <= hi:  # edge below lo
        la, ha, ia, da = lo, hi, inc, dec
        lb, hb, ib, db = _region_at(lo - 1, u, d, rc)
        tp = np.int64(-1)
        if lb > hb:
            tp = lo - 1
            lb, hb, ib, db = _region_at(lo - 2, u, d, rc)
    else:  # no region near b (no integer form, or subnormal / huge theta)
        lb, hb, ib, db = np.int64(1), np.int64(0), np.int64(0), np.int64(0)
        la, ha, ia, da = lb, hb, ib, db
        tp = np.int64(-1)
    ok = (lb <= hb and la <= ha and lb <= b and b <= ha
          and (la == hb + 1 or (la == hb + 2 and tp == hb + 1)))
    it, dt = ib, db
    if tp >= 0:
        bu, bd = _float_step(tp, up, down)
        it, dt = bu - tp, tp - bd
    return ok, lb, hb, ib, db, tp, it, dt, la, ha, ia, da


@numba.njit(inline="always")
def _edge_pieces_cached(b, u, d, up, down, rc, lo, hi, inc, dec):
    """:func:`_edge_pieces` through a one-entry cache in rows _NREG+1.._NREG+3 of
    the region cache: the pieces describe their bit intervals exactly, so they
    hold for any ``b`` in [lb, ha] (theta hovering at one edge asks for the same
    pieces block after block; computing them costs several region look-ups)."""
    c = rc[_NREG + 1:_NREG + 4]
    if c[0, 0] <= b and b <= c[2, 0]:
        return (True, c[0, 0], c[0, 1], c[0, 2], c[0, 3], c[1, 0], c[1, 1], c[1, 2],
                c[1, 3], c[2, 0], c[2, 1], c[2, 2])
    ok, lb, hb, ib, db, tp, it, dt, la, ha, ia, da = _edge_pieces(
        b, u, d, up, down, rc, lo, hi, inc, dec)
    if ok:
        c[0, 0], c[0, 1], c[0, 2], c[0, 3] = lb, hb, ib, db
        c[1, 0], c[1, 1], c[1, 2], c[1, 3] = tp, it, dt, la
        c[2, 0], c[2, 1], c[2, 2] = ha, ia, da
        r = rc[_NREG + 4:_NREG + 6]
        r[0, 0], r[0, 1], r[0, 2], r[0, 3], r[1, 0], r[1, 1], r[1, 2], r[1, 3] = _run_consts(
            ib, db, tp, it, dt, la, ia, da)
    return ok, lb, hb, ib, db, tp, it, dt, la, ha, ia, da


@numba.njit(inline="always")
def _edge_steps(key, i, b, u, d, up, down, mask, off, rc, lo, hi, inc, dec):
    """Steps from ``key[i]`` down while theta is near the edge between two
    regions (or on the single tie pattern between them, which belongs to no
    region): the chain's two-element loop needs a margin of one step inside a
    region, and theta often settles right at an edge (the float32 rounding of
    the factors pins it there: a fraction tracked between those that the step
    sizes on either side balance). Below the edge (bits <= hb) the steps are
    those of region B, above (bits >= la) those of region A, and on a tie
    pattern between them those computed once in float32; every step is still
    exactly the float32 step.
    Leaves when theta is more than ``win`` bits from the edge or outside
    [lb, ha]; falls back to one float32 step when the edge has no such form.
    Returns (i, b)."""
    ok, lb, hb, ib, db, tp, it, dt, la, ha, ia, da = _edge_pieces(
        b, u, d, up, down, rc, lo, hi, inc, dec)
    if not ok:  # one float32 step
        t = b < key[np.uint64(i)]
        mask[np.uint64(off + i)] = t
        bu, bd = _float_step(b, up, down)
        return i - 1, (bu if t else bd)
    win = 64 + 4 * (max(ia, ib, it) + max(da, db, dt))
    wlo = max(lb, hb - win)
    span = np.uint64(min(ha, la + win) - wlo)
    while i >= 0:
        t = b < key[np.uint64(i)]
        mask[np.uint64(off + i)] = t
        below = b <= hb
        on_t = b == tp
        inc = ib if below else (it if on_t else ia)
        dec = db if below else (dt if on_t else da)
        b = b + (inc if t else -dec)
        i -= 1
        if np.uint64(b - wlo) > span:
            break
    return i, b


# --- bulk steps over a block (the serial chain broken exactly) ---------------
#
# Inside one region the chain is "b += inc if b < key else -dec", with
# constant inc, dec >= 0. Over a block of m elements (visited last to first)
# that starts at bits b, theta before every element of the block lies in
# [b - (m-1)*dec, b + (m-1)*inc] (induction: each step adds +inc or -dec), so
# if that interval is inside the region every step really is such an integer
# add. Then an element with key > b + (m-1)*inc is tracked whatever happened
# before it in the block, one with key <= b - (m-1)*dec is not, and when every
# key of the block is outside that band the decisions are known without the
# chain and the end bits are b + n_up*inc - (m - n_up)*dec (a sum: the order
# does not matter). Every other block (a key inside the band, the region
# crossed, or no region at all) runs the exact serial chain. Both branches
# give the bits of the float32 reference step by step, so the pass is
# bit-identical to :func:`quantile_pass_reference` (tests/test_quantile.py
# builds streams that hit every branch). With q_step = 1e-6 a block of 256
# moves theta by at most a few thousand ulps, about 1e-4 relative, so once
# theta has converged only a small fraction of blocks has a key in the band.

_SUB = 256  # elements per bulk block


@numba.njit(inline="always")
def _bulk_ok(b, m, lo, hi, inc, dec):
    """Can a block of ``m`` starting at bits ``b`` use the bulk step (region
    [lo, hi] with steps inc/dec computed for it)?"""
    return lo + m * dec <= b and b + m * inc <= hi


@numba.njit(inline="always")
def _bulk_count(key, blo, bhi):
    """(keys in the band (blo, bhi], keys above bhi). Loops here run over whole
    views from 0: numba's offset loops (``range(start, end)``) do not vectorize."""
    nb = np.int32(0)
    nu = np.int32(0)
    for jj in range(key.shape[0]):
        kk = key[jj]
        nb = np.int32(nb + np.int32((kk > blo) & (kk <= bhi)))  # int32 lanes (numba's
        nu = np.int32(nu + np.int32(kk > bhi))  # int32 + int32 is int64: half the width)
    return nb, nu


# --- bulk steps over a block that straddles a region edge ---------------------
#
# theta often settles ON a region edge (the float32 rounding of the factors pins
# it there, see _edge_steps), where a block's band reaches both regions and the
# bulk step above does not apply. With the pieces of _edge_pieces the chain is
# still exact integer steps: +ib/-db at or below hb, +it/-dt on the tie pattern
# tp, +ia/-da from la up. If every step of a block of m stays in [lb, ha]
# (b - m*dmax >= lb, b + m*imax <= ha) and no key is in the band (b -
# (m-1)*dmax, b + (m-1)*imax], the decisions are known as in the plain bulk
# step; the end bits depend on the order, but a run of L downs from x has a
# closed form (da-steps while x >= la, then at most one step from tp, then
# db-steps), so the block costs O(tracked elements): the band count, the mask
# and the tracked positions come 64 keys at a time from one load, two vector
# compares and a compress-store (_band_scan), then one walk over the positions
# (_walk_up, _walk_down or _downs per run, below). Theta hovers at one edge for
# many blocks in a row, so _edge_run takes consecutive blocks with the pieces'
# constants set up once.

_EDGE_MAXSTEP = 4096  # steps up to this many ulps: the floor division below is exact


@numba.njit(inline="always")
def _downs(x, n, hb, db, tp, dt, la, da, mag):
    """Bits after ``n`` down steps from ``x`` (closed form, see above). ``mag`` =
    ceil(2**32 / da): floor(v / da) == (v * mag) >> 32 for 0 <= v < 2**20 and
    da < 2**12 (the error term v * (mag*da - 2**32) / (da * 2**32) < 1/da).
    Needs da >= 1 and, with a tie pattern, dt >= 1 (theta leaves A and tp)."""
    # branch-free (whether a run crosses the edge is data-dependent: branches on
    # it mispredicted about half the time); n*da < 2**20 bounds v as required
    in_a = x >= la
    v = min(x - la, n * da)
    k = min(n, ((v * mag) >> 32) + 1)  # steps until x < la (all n if it stays)
    k = k if in_a else np.int64(0)
    # then one step from tp if theta lands on it with steps left, the rest by db;
    # written as x - n*db - k*(da-db) - (dt-db) to keep the chain on x short
    on_t = (n > k) & (x - k * da == tp)
    return x - n * db - k * (da - db) - ((dt - db) if on_t else np.int64(0))


# Where theta settles, one of the two step kinds is usually the same on both
# sides of the edge: at an edge of the up step's rounding (k changes) the down
# step is the same, at an edge of the down step's (j changes) the up step is.
# Then the walk has a shorter dependency chain than _downs' closed form (two
# multiplies, min/max and compares per tracked element, ~25 cycles):
#
# * uniform up (ia = ib, and it too): downs are -da from a0 up (a0 = tp when the
#   tie pattern steps like A, else la) and -db below. A run of L downs from x
#   takes k = clamp(floor((x - a0)/da) + 1, 0, L) steps of da first, so it ends
#   at x - L*db - k*(da - db); with da and da - db powers of two (the usual case:
#   da = 2, db = 1) the division and product are shifts.
# * uniform down (da = db = dt = dec): before the element at visit position p,
#   theta = z - p*dec, where z is b plus (inc + dec) over the tracked elements
#   visited so far, so "theta > hb" is "z > hb + p*dec": a compare of z against
#   a value known without the chain, then z += inc + dec.
#
# Both give the same bits as the general walk, step by step (tests/test_quantile.py
# runs each kind of edge against the float32 reference).

_WALK_GENERAL, _WALK_UNIFORM_UP, _WALK_UNIFORM_DOWN = 0, 1, 2


@numba.njit(inline="always")
def _walk_kind(ib, db, tp, it, dt, ia, da):
    """Which walk a straddling block can take (see above); ``_WALK_GENERAL``
    (_downs per run) when neither step kind is uniform."""
    if da == db and (tp < 0 or dt == da):
        return _WALK_UNIFORM_DOWN
    if ia == ib and (tp < 0 or it == ia) and (tp < 0 or dt == da or dt == db):
        return _WALK_UNIFORM_UP
    return _WALK_GENERAL


def _host_has_avx512() -> bool:
    """Does this CPU have AVX-512F (a 64-lane compress-store in one instruction)?
    numba compiles for the host CPU, so the choice below is the host's."""
    try:
        from llvmlite import binding as llb
        return bool(llb.get_host_cpu_features().get("avx512f", False))
    except Exception:  # noqa: BLE001 (no feature list: the portable path)
        return False


def _host_is_amd_zen() -> bool:
    """Is this CPU an AMD Zen (LLVM's host name ``znver*``)? Some defaults below were
    measured per machine, and the AVX-512 flag alone does not tell Zen 4 from the
    Intel AVX-512 machine of the earlier sessions."""
    try:
        from llvmlite import binding as llb
        return llb.get_host_cpu_name().startswith("znver")
    except Exception:  # noqa: BLE001 (no host name: not known to be Zen)
        return False


# Tracked positions from a 64-bit word of compare bits, where the CPU has no
# compress instruction (AVX2): LLVM scalarizes masked.compressstore into 64
# conditional stores, one data-dependent branch per key (on an AVX2 EPYC the
# pass over 11.7M keys held in L2 took 18.4 ms, against 1.8 ms for the compares
# alone). Instead each byte of the word stores 8 positions at once from a
# table (one 8-lane load, add and store) and the count advances by the byte's
# popcount: no branch on the data (4.6 ms for the same keys). Row v of
# _POS_LUT lists, ascending, 7 - b for the set bits b of v from the highest
# down (key i + b of a byte is visited before key i + b - 1).
_POS_LUT = np.zeros(256 * 8, dtype=np.int32)
for _v in range(256):
    _row = [7 - _b for _b in range(7, -1, -1) if _v >> _b & 1]
    _POS_LUT[8 * _v:8 * _v + len(_row)] = _row
del _v, _row
_POS_SLACK = 16  # writes past the last position: up to 7 (table), 15 (compress)
_POS_LEN = 256 + _POS_SLACK  # scratch for the positions of one bulk block (_SUB)
_COMPRESS = _host_has_avx512()


def _splat64(builder, x):
    v64 = ir.VectorType(ir.IntType(32), 64)
    t = builder.insert_element(v64(ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(t, v64(ir.Undefined), ir.Constant(v64, [0] * 64))


def _gt64_ir(context, builder, signature, args):
    """IR shared by the two scans: load arr[i:i+64], store mask[mi:mi+64] = key > bhi;
    returns (the compare as <64 x i1>, the band's popcount as i64)."""
    v64 = ir.VectorType(ir.IntType(32), 64)
    b64 = ir.VectorType(ir.IntType(8), 64)
    i64 = ir.IntType(64)
    a = context.make_array(signature.args[0])(context, builder, args[0])
    mk = context.make_array(signature.args[4])(context, builder, args[4])
    idx = context.cast(builder, args[1], signature.args[1], types.int64)
    mi = context.cast(builder, args[5], signature.args[5], types.int64)
    v = builder.load(builder.bitcast(builder.gep(a.data, [idx]), v64.as_pointer()), align=4)
    above = builder.icmp_signed(">", v, _splat64(builder, args[3]))
    band = builder.xor(above, builder.icmp_signed(">", v, _splat64(builder, args[2])))
    builder.store(builder.zext(above, b64),
                  builder.bitcast(builder.gep(mk.data, [mi]), b64.as_pointer()), align=1)
    fpc = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]),
                                         "llvm.ctpop.i64")
    return above, builder.call(fpc, [builder.bitcast(band, i64)])


def _scan_types_ok(arr, i, blo, bhi, mask, mi):
    return (isinstance(arr, types.Array) and arr.dtype == types.int32 and arr.ndim == 1
            and arr.layout == "C" and isinstance(mask, types.Array)
            and mask.dtype == types.boolean and mask.ndim == 1 and mask.layout == "C"
            and blo == types.int32 and bhi == types.int32
            and all(isinstance(t, types.Integer) for t in (i, mi)))


def _compress16_ir(builder, vals, sel, out_ptr):
    """Store the lanes of ``vals`` (16 x i32) selected by ``sel`` (16 x i1), in order,
    at ``out_ptr``. On AVX-512 hosts: the register form of ``vpcompressd`` (zeroing)
    and one full 16-lane store, so up to 15 lanes past the selected ones are written
    (see _POS_SLACK). The memory form, LLVM's lowering of ``masked.compressstore``, is
    microcoded on AMD Zen 4: on this session's Zen 4 EPYC the 64-key scan over 11.7M
    keys held in L2 took 17.2 ms with it, 1.70 ms with the register form, 1.72 ms
    with the byte table (10% of the keys above the band). Elsewhere (tests on CPUs
    without AVX-512) the portable ``masked.compressstore``, which LLVM scalarizes."""
    i32 = ir.IntType(32)
    v16 = ir.VectorType(i32, 16)
    b16 = ir.VectorType(ir.IntType(1), 16)
    if _COMPRESS:
        f = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16, [v16, v16, b16]),
            "llvm.x86.avx512.mask.compress.v16i32")
        packed = builder.call(f, [vals, ir.Constant(v16, [0] * 16), sel])
        builder.store(packed, builder.bitcast(out_ptr, v16.as_pointer()), align=4)
    else:
        f = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [v16, i32.as_pointer(), b16]),
            "llvm.masked.compressstore.v16i32")
        builder.call(f, [vals, out_ptr, sel])


@intrinsic
def _band_gt64(typingctx, arr, i, blo, bhi, mask, mi, out, n, base):
    """The straddling step's whole scan of the 64 keys ``arr[i:i+64]`` in one
    pass: ``mask[mi + t] = arr[i + t] > bhi`` (one 64-byte store), ``base + t``
    for every t < 64 with ``arr[i + 63 - t] > bhi``, ascending, at ``out[n:]``
    (four 16-lane compresses, :func:`_compress16_ir`; the CPU without AVX-512
    uses :func:`_band_word64` instead), and the counts: returns (keys > bhi) +
    (keys in (blo, bhi]) << 32 (``arr``, ``out`` contiguous 1-D int32, ``mask``
    contiguous 1-D bool, blo <= bhi; bounds unchecked; ``out`` needs
    _POS_SLACK entries past the last position). Each key is loaded and
    compared once, where a band-count loop, a mask loop and a compress-store
    pass each did (~1 ms of ~3.7 per 11.7M keys)."""
    if not (_scan_types_ok(arr, i, blo, bhi, mask, mi) and isinstance(out, types.Array)
            and out.dtype == types.int32 and out.ndim == 1 and out.layout == "C"
            and isinstance(n, types.Integer) and isinstance(base, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        i64 = ir.IntType(64)
        v16 = ir.VectorType(i32, 16)
        above, nb = _gt64_ir(context, builder, signature, args)
        o = context.make_array(signature.args[6])(context, builder, args[6])
        nn = context.cast(builder, args[7], signature.args[7], types.int64)
        bs = context.cast(builder, args[8], signature.args[8], types.int32)
        t = builder.insert_element(v16(ir.Undefined), bs, ir.Constant(i32, 0))
        base16 = builder.shuffle_vector(t, v16(ir.Undefined), ir.Constant(v16, [0] * 16))
        fpc = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]),
                                             "llvm.ctpop.i64")
        cur = nn
        for q in range(4):  # positions base + 16q .. base + 16q + 15: keys i+63-16q down
            sel = builder.shuffle_vector(
                above, above, ir.Constant(v16, [63 - k for k in range(16 * q, 16 * q + 16)]))
            vals = builder.add(base16, ir.Constant(v16, list(range(16 * q, 16 * q + 16))))
            _compress16_ir(builder, vals, sel, builder.gep(o.data, [cur]))
            cnt = builder.call(fpc, [builder.zext(builder.bitcast(sel, ir.IntType(16)), i64)])
            cur = builder.add(cur, cnt)
        return builder.add(builder.sub(cur, nn), builder.shl(nb, ir.Constant(i64, 32)))

    return types.int64(arr, i, blo, bhi, mask, mi, out, n, base), codegen


@intrinsic
def _band_word64(typingctx, arr, i, blo, bhi, mask, mi):
    """:func:`_band_gt64` without the positions: ``mask[mi + t] = arr[i + t] >
    bhi`` (one 64-byte store); returns (the compare as a word, bit t for key i +
    t; keys in (blo, bhi])."""
    if not _scan_types_ok(arr, i, blo, bhi, mask, mi):
        return None

    def codegen(context, builder, signature, args):
        above, nb = _gt64_ir(context, builder, signature, args)
        word = builder.bitcast(above, ir.IntType(64))
        return context.make_tuple(builder, signature.return_type, [word, nb])

    return types.UniTuple(types.int64, 2)(arr, i, blo, bhi, mask, mi), codegen


@intrinsic
def _put8(typingctx, out, n, lut, r, off):
    """``out[n:n+8] = lut[r:r+8] + off`` (one 8-lane load, add and store; int32,
    contiguous, bounds unchecked)."""
    if not (all(isinstance(a, types.Array) and a.dtype == types.int32 and a.ndim == 1
                and a.layout == "C" for a in (out, lut))
            and all(isinstance(t, types.Integer) for t in (n, r, off))):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v8 = ir.VectorType(i32, 8)
        o = context.make_array(signature.args[0])(context, builder, args[0])
        lt = context.make_array(signature.args[2])(context, builder, args[2])
        nn = context.cast(builder, args[1], signature.args[1], types.int64)
        rr = context.cast(builder, args[3], signature.args[3], types.int64)
        of = context.cast(builder, args[4], signature.args[4], types.int32)
        row = builder.load(builder.bitcast(builder.gep(lt.data, [rr]), v8.as_pointer()), align=4)
        t = builder.insert_element(v8(ir.Undefined), of, ir.Constant(i32, 0))
        sp = builder.shuffle_vector(t, v8(ir.Undefined), ir.Constant(v8, [0] * 8))
        builder.store(builder.add(row, sp),
                      builder.bitcast(builder.gep(o.data, [nn]), v8.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(out, n, lut, r, off), codegen


@intrinsic
def _popcount(typingctx, x):
    """Set bits of an int64."""
    if x != types.int64:
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]),
                                           "llvm.ctpop.i64")
        return builder.call(f, [args[0]])

    return types.int64(x), codegen


@numba.njit(inline="always")
def _band_scan64(kv, lo64, blo, bhi, mask, moff, pos, n, base, compress):
    """One word of :func:`_band_scan`: keys ``kv[lo64:lo64+64]``, their visit
    positions ``base + 63 - t`` written ascending at ``pos[n:]``; returns (n
    after them, keys in the band). ``compress``: the compress-store (AVX-512),
    else the table (see _POS_LUT)."""
    if compress:
        r = _band_gt64(kv, lo64, blo, bhi, mask, moff + lo64, pos, n, base)
        return n + (r & 0xFFFFFFFF), r >> 32
    word, nb = _band_word64(kv, lo64, blo, bhi, mask, moff + lo64)
    for k in range(8):  # bytes from the highest: keys visited first
        v = (word >> (56 - 8 * k)) & 255
        _put8(pos, n, _POS_LUT, v * 8, base + 8 * k)
        n += _popcount(v)
    return n, nb


@numba.njit(inline="always")
def _band_scan(kv, m, blo, bhi, mask, moff, pos):
    """For the block ``kv[:m]``: mask[moff + j] = kv[j] > bhi, the visit
    positions (0: the last key) of those keys into ``pos`` (at least m +
    _POS_SLACK long), ascending; returns (how many, keys in the band (blo, bhi])."""
    n = np.int64(0)
    nb = np.int64(0)
    top = m  # words of 64 keys kv[top-64:top], from the last
    while top >= 64:
        lo64 = top - 64
        n, b64 = _band_scan64(kv, lo64, blo, bhi, mask, moff, pos, n, np.int32(m - top),
                              _COMPRESS)
        nb += b64
        top = lo64
    for ii in range(top):  # the first keys (m not a multiple of 64), last to first
        jj = top - 1 - ii
        kk = kv[jj]
        t = kk > bhi
        mask[moff + jj] = t
        nb += np.int64((kk > blo) & (kk <= bhi))
        pos[n] = m - 1 - jj
        n += np.int64(t)
    return n, nb


@numba.njit(inline="always")
def _ilog2(v):
    """log2 of ``v`` if it is a power of two >= 1, else -1."""
    if v < 1 or (v & (v - 1)) != 0:
        return np.int64(-1)
    r = np.int64(0)
    while (np.int64(1) << r) < v:
        r += 1
    return r


@numba.njit(inline="always")
def _walk_up(x, pos, n, m, inc, a0, db, da, mag, sh, se):
    """Uniform-up walk over the tracked visit positions ``pos[:n]`` of a block of
    ``m`` from bits ``x``; returns the end bits. ``sh``, ``se``: log2 of ``da``
    and of ``da - db`` (:func:`_ilog2`, -1 if not powers of two: then the divide
    by ``mag``)."""
    e = da - db
    p0 = np.int64(0)
    if sh >= 0 and se >= 0:  # shifts (floor division by 2**sh is exact for any sign)
        y = x - a0 + da  # y >> sh = floor((x - a0) / da) + 1: a short chain on y
        for i in range(n + 1):
            p = np.int64(pos[i]) if i < n else m
            ln = p - p0
            k = min(max(y >> sh, np.int64(0)), ln)
            y = y + ((inc if i < n else np.int64(0)) - ln * db) - (k << se)
            p0 = p + 1
        x = y + a0 - da
    else:  # v*mag >> 32 = floor(v/da) for v < 2**20 (see _downs), negative v too
        for i in range(n + 1):
            p = np.int64(pos[i]) if i < n else m
            ln = p - p0
            v = min(x - a0, ln * da)
            k = min(max(((v * mag) >> 32) + 1, np.int64(0)), ln)
            x = x - ln * db - k * e + (inc if i < n else np.int64(0))
            p0 = p + 1
    return x


@numba.njit(inline="always")
def _walk_down(x, pos, n, m, hb, ib, tp, it, la, ia, dec):
    """Uniform-down walk over the tracked visit positions ``pos[:n]`` of a block
    of ``m`` from bits ``x``; returns the end bits."""
    if tp < 0:  # no tie pattern: above hb is la
        it = ia
    c1 = it - ib  # more than ib from hb + 1 (tp or la) up
    c2 = ia - it  # and this much more from la up
    z = x
    for i in range(n):
        pd = np.int64(pos[i]) * dec
        z += (ib + dec + (c1 if z > hb + pd else np.int64(0))
              + (c2 if z >= la + pd else np.int64(0)))
    return z - m * dec


@numba.njit(inline="always")
def _run_consts(ib, db, tp, it, dt, la, ia, da):
    """(ok, imax, dmax, mag, kind, a0, sh, se): what :func:`_edge_run` needs besides
    the pieces, computed once per pieces (a 64-bit divide, two log2 loops).
    ``ok`` (1/0): the straddling step applies to them (steps small enough for
    the divide by ``mag``, a down step above the edge and from the tie)."""
    imax = max(ib, it, ia)
    dmax = max(db, dt, da)
    ok = (imax < _EDGE_MAXSTEP and dmax < _EDGE_MAXSTEP and da >= 1
          and (tp < 0 or dt >= 1))
    mag = ((np.int64(1) << 32) + da - 1) // da if da >= 1 else np.int64(0)
    kind = np.int64(_walk_kind(ib, db, tp, it, dt, ia, da))
    a0 = tp if (tp >= 0 and dt == da) else la
    sh = _ilog2(da)
    se = _ilog2(da - db)
    return np.int64(ok), imax, dmax, mag, kind, a0, sh, se


@numba.njit(inline="always")
def _plain_at_edge(b, m, lb, hb, ib, db, la, ha, ia, da):
    """Does the plain bulk step (:func:`_bulk_ok`) apply to a block of ``m`` from
    bits ``b``, in the region of the edge pieces that holds ``b``? (Never on the
    tie pattern ``tp``: it has no region.)"""
    if b <= hb:
        return _bulk_ok(b, m, lb, hb, ib, db)
    return b >= la and _bulk_ok(b, m, la, ha, ia, da)


@numba.njit(inline="always")
def _edge_run(key, end, b, lb, hb, ib, db, tp, it, dt, la, ha, ia, da, imax, dmax, mag, kind,
              a0, sh, se, mask, off, stats, pos):
    """Straddling bulk steps over consecutive blocks of :data:`_SUB`, the first
    ``key[end-_SUB:end]`` (visited from end-1 down), from bits ``b``, with the
    edge pieces of :func:`_edge_pieces` (they hold for any bits in [lb, ha]);
    returns (end, bits) after the last block it took. It stops before a block
    that :func:`_blocks` would not give it: the plain bulk step applies (the
    piece holding ``b`` has room for the block), a step could leave [lb, ha], or
    a key lies in the band (then its mask entries written here are rewritten by
    the chain). ``imax`` .. ``se``: :func:`_run_consts` of the pieces (cached with
    them): theta hovering at one edge takes this step block after block, and the
    per-block look-ups and set-up (region cache, pieces, divisor) cost as much
    as the walk. ``pos``: scratch of at least ``_POS_LEN`` int32 (tracked positions)."""
    while end > 0:
        start = max(0, end - _SUB)
        m = end - start
        if (_plain_at_edge(b, m, lb, hb, ib, db, la, ha, ia, da)
                or lb + m * dmax > b or b + m * imax > ha):
            break
        blo = np.int32(b - (m - 1) * dmax)
        bhi = np.int32(b + (m - 1) * imax)
        # the mask and positions are written before the band is known to be empty
        # (if not, the chain rewrites the block's mask; pos is scratch)
        n, nb = _band_scan(key[start:end], m, blo, bhi, mask, off + start, pos)
        if nb != 0:
            break
        if kind == _WALK_UNIFORM_DOWN:
            b = _walk_down(b, pos, n, m, hb, ib, tp, it, la, ia, da)
        elif kind == _WALK_UNIFORM_UP:
            b = _walk_up(b, pos, n, m, ib, a0, db, da, mag, sh, se)
        else:
            x = b
            p0 = np.int64(0)  # visit position of the next element (element end-1-p0)
            for i in range(n):
                p = np.int64(pos[i])
                x = _downs(x, p - p0, hb, db, tp, dt, la, da, mag)
                x += ib if x <= hb else (it if x == tp else ia)  # the tracked element
                p0 = p + 1
            b = _downs(x, m - p0, hb, db, tp, dt, la, da, mag)
        stats[0] += 1
        stats[2] += 1
        end = start
    return end, b


@numba.njit(inline="always")
def _blocks(key, n, b, u, d, up, down, mask, off, rc, stats, pos):
    """The pass over ``key[n-1] .. key[0]`` (mask index ``off + i``) from theta
    bits ``b`` in bulk blocks of :data:`_SUB`; ``rc`` is the region cache
    (:func:`_region_cache`, kept between calls), ``stats`` counts [bulk,
    chained, straddling bulk] blocks (the last also counted as bulk). Returns
    the new bits."""
    c = rc[_NREG + 1:_NREG + 6]  # the cached edge pieces and their run constants
    end = n
    looked_up = False  # True: the block at `end` goes through the look-ups (not the cache)
    while end > 0:
        start = max(0, end - _SUB)
        m = end - start
        done = False
        run = False
        if (not looked_up and c[3, 0] == 1 and c[0, 0] + m * c[3, 2] <= b
                and b + m * c[3, 1] <= c[2, 0]
                and not _plain_at_edge(b, m, c[0, 0], c[0, 1], c[0, 2], c[0, 3], c[1, 3],
                                       c[2, 0], c[2, 1], c[2, 2])):
            # theta still at the cached edge (it stays there block after block, and
            # this is called per chunk of golden.dropback's fused step): the run
            # straight away; if it does not take this block, the look-ups do. Not
            # when the plain bulk step applies: theta inside a region that the cached
            # pieces cover (CounterInit's benchmark stream: 95% of its blocks) would
            # enter the run only to leave it and redo the block through the look-ups
            run = True
        else:
            looked_up = False
            lo, hi, inc, dec = _region_cached(b, u, d, rc)
            if not _bulk_ok(b, m, lo, hi, inc, dec):
                # theta near a region edge (where it often settles): the straddling
                # bulk step if it applies, else chain a longer run at once (the edge
                # steps pay their set-up once for it)
                ok, lb, hb, ib, db, tp, it, dt, la, ha, ia, da = _edge_pieces_cached(
                    b, u, d, up, down, rc, lo, hi, inc, dec)
                # (when ok, the pieces and their run constants are those in c)
                if ok and c[3, 0] == 1 and lb + m * c[3, 2] <= b and b + m * c[3, 1] <= ha:
                    looked_up = True
                    run = True
                else:
                    start = max(0, end - 4 * _SUB)
                    m = end - start
            else:
                blo = np.int32(b - (m - 1) * dec)  # in (0, 2**31): inside the region
                bhi = np.int32(b + (m - 1) * inc)  # (int32 compares vectorize 2x wider)
                kv = key[start:end]
                nb, nu = _bulk_count(kv, blo, bhi)
                if nb == 0:
                    mv = mask[off + start:off + end]
                    for jj in range(m):
                        mv[jj] = kv[jj] > bhi
                    b = b + nu * inc - (m - nu) * dec
                    stats[0] += 1
                    done = True
        if run:  # one call site (the run is inlined: two copies cost code size)
            e2, b = _edge_run(key, end, b, c[0, 0], c[0, 1], c[0, 2], c[0, 3], c[1, 0],
                              c[1, 1], c[1, 2], c[1, 3], c[2, 0], c[2, 1], c[2, 2], c[3, 1],
                              c[3, 2], c[3, 3], c[4, 0], c[4, 1], c[4, 2], c[4, 3], mask, off,
                              stats, pos)
            if e2 < end:  # it took at least this block
                looked_up = False
                end = e2
                continue
            if not looked_up:  # from the cache: this block through the look-ups
                looked_up = True
                continue
            looked_up = False  # a key in the band: the chain
        if not done:
            b = _chain(key[start:end], m, b, u, d, up, down, mask, off + start, rc)
            stats[1] += (m + _SUB - 1) // _SUB  # counted in blocks of _SUB
        end = start
    return b


@numba.njit(cache=False)
def _pass(s, theta, up, down, mask, stats, rc):
    """The pass over ``s`` (last to first) into ``mask``; returns theta."""
    u, d = _consts(up, down)
    key = np.empty(_BLOCK, dtype=np.int32)
    pos = np.empty(_POS_LEN, dtype=np.int32)
    b = np.int64(np.float32(theta).view(np.uint32))
    end = s.shape[0]
    while end > 0:
        start = max(0, end - _BLOCK)
        sv = s[start:end]
        for jj in range(end - start):  # descending, as the chunks (prefetchers);
            j = np.uint64(end - start - 1 - jj)  # unsigned: no wraparound test, vectorizes
            key[j] = _key(sv[j])
        b = _blocks(key, end - start, b, u, d, up, down, mask, start, rc, stats, pos)
        end = start
    return np.uint32(b).view(np.float32)


@numba.njit(cache=False)
def _pass_chain(s, theta, up, down, mask, rc):
    """The serial chain alone (no bulk blocks): the previous compiled pass,
    kept as a second reference for the tests."""
    u, d = _consts(up, down)
    key = np.empty(_BLOCK, dtype=np.int64)
    b = np.int64(np.float32(theta).view(np.uint32))
    end = s.shape[0]
    while end > 0:
        start = max(0, end - _BLOCK)
        for j in range(end - start):
            key[j] = _key(s[start + j])
        b = _chain(key, end - start, b, u, d, up, down, mask, start, rc)
        end = start
    return np.uint32(b).view(np.float32)


def quantile_pass(scores, theta: float, q: float, q_step: float, *, stats=None,
                  bulk: bool = True):
    """Compiled pass, bit-identical to :func:`quantile_pass_reference`.

    ``stats``: an optional int64 array of 3, incremented by the number of bulk
    blocks, of chained blocks and of the bulk blocks that straddled a region
    edge. ``bulk=False`` runs the serial chain only."""
    up, down = factors(q, q_step)
    s = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
    mask = np.empty(s.shape[0], dtype=bool)
    if stats is not None and (not isinstance(stats, np.ndarray) or stats.dtype != np.int64
                              or stats.shape != (3,)):
        raise ValueError("stats must be None or an int64 numpy array of shape (3,)")
    if bulk:
        st = np.zeros(3, dtype=np.int64) if stats is None else stats
        theta = _pass(s, np.float32(theta), up, down, mask, st, _region_cache())
    else:
        theta = _pass_chain(s, np.float32(theta), up, down, mask, _region_cache())
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


# On-disk cache of the kernels above, stamped with all golden sources (golden/jitcache.py).
from golden import jitcache as _jitcache  # noqa: E402

_jitcache.enable(globals())
