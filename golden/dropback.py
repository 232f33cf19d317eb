"""Dropback / Procrustes optimizer (golden model).

Each :meth:`Dropback.step`:

a. ``decay`` starts at 1 and is multiplied by ``init_decay`` on every step but
   the first (float64; the kernels use ``d32 = float32(decay)``);
b. a dense SGD step on every parameter with a gradient, bit-identical to
   ``torch.optim.SGD`` (dampening 0, no Nesterov): ``d_p = g + wd*w`` (fused
   multiply-add, as ATen does), ``buf = buf*momentum + d_p``, ``w = w - lr*d_p``
   (fused multiply-add);
c. score ``s = |w - d32*w0|`` in float32 for every element, in parameter order,
   each parameter flattened row-major (global index = offset + element index);
d. tracked set: the global top-``track_size`` scores, ties won by the lower
   global index (exactly ``track_size`` tracked), or with ``quantile=q`` the
   streaming estimator of :mod:`golden.quantile` run last-to-first over the
   scores, ``theta`` starting at ``q_init`` on the first step and carried over
   between steps (one long stream; this is what lets it converge, see
   :mod:`golden.quantile`);
e. every untracked weight becomes ``d32*w0`` (float32 product) and its momentum
   buffer is reset to 0, so a weight that re-enters the tracked set starts
   without stale momentum (as if it had just been initialised).

``w0`` is a stored copy of the initial parameters, or with
``init=CounterInit(seed)`` regenerated from each element's index by
:mod:`golden.prng` (nothing of w0's size is stored).

The per-element work is done by numba kernels, all bit-identical to the plain
sequence above (tests/test_dropback.py compares them step by step):

* top-k mode, the first step and any step whose threshold hint misses: a
  fused, vectorized SGD update + score pass into a float32 scratch array, an
  exact radix select on the float32 bit patterns (high-16-bit histogram,
  low-16-bit histogram of the boundary bin), a fused mask + reset pass;
* top-k mode, every other step: ONE fused pass on a threshold predicted from
  the last two steps (see "top-k with a threshold hint" below): tracked above
  a narrow band, reset below it (the new weight saved first when it cannot
  be recomputed on a miss), the few elements in it listed and decided
  after the pass from the exact count above the band;
* quantile mode: one pass per parameter, last chunk of _QCHUNK elements (512, or 1024
  without AVX-512) to first:
  update + score + d32*w0 into L1 buffers, the estimator of
  :mod:`golden.quantile` (bulk blocks of 256 decided without the serial chain
  when theta cannot reach any of their scores, the exact integer chain
  otherwise), then the write-back and reset.

No sort, no torch.topk. ``hint_hits``/``hint_misses`` (top-k) and
``bulk_blocks``/``chained_blocks`` (quantile) count how often the fast paths
ran; ``use_hint = False`` forces the radix path on every step (the reference
for the tests).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from golden.prng import CounterInit, init_bounds, w0_at_nb, w0_nb
from golden.quantile import (
    _blocks,
    _consts,
    _host_has_avx512,
    _host_is_amd_zen,
    _key,
    _region_cache,
    check_quantile_args,
    factors,
)

_EMPTY_F32 = np.empty(0, dtype=np.float32)


@intrinsic
def _fma32(typingctx, a, b, c):
    """float32(a*b + c) with ONE rounding (LLVM ``fma``: the FMA instruction, as
    ATen's vectorized ``fmadd`` in ``add_(x, alpha=...)``). The former emulation
    in float64 rounded twice (to float64, then to float32) and differed from the
    FMA, and from torch.optim.SGD, when a*b lies on a float32 rounding midpoint
    and c is tiny (tests/test_dropback.py has such a case); it also ran on
    half-width float64 lanes."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(a, b, c), codegen


@numba.njit(inline="always")
def _sgd(w, g, buf, j, neg_lr, mom, wd):
    wj = w[j]
    dp = g[j]
    if wd != 0:
        dp = _fma32(wj, wd, dp)
    if mom != 0:
        dp = buf[j] * mom + dp
        buf[j] = dp
    return _fma32(dp, neg_lr, wj)


@numba.njit(inline="always")
def _w0(w0, j, seed, bound, counter):
    if counter:
        return w0_nb(seed, np.uint64(j), bound)
    return w0[j]


@numba.njit(inline="always")
def _update_loop(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, scores):
    for j in range(w.shape[0]):
        wn = _sgd(w, g, buf, j, neg_lr, mom, wd)
        w[j] = wn
        scores[j] = abs(wn - d32 * _w0(w0, j, seed, bound, counter))


@numba.njit(cache=False)
def _update_score(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, scores):
    """SGD update of one parameter and its scores. The flags are passed as
    literals to the inlined loop so that each variant compiles branch-free
    (and vectorizes: about 20x faster with the counter-based w0)."""
    z = np.float32(0)
    plain = mom == 0 and wd == 0
    if counter:
        if plain:
            _update_loop(w, g, buf, w0, seed, bound, True, neg_lr, z, z, d32, scores)
        else:
            _update_loop(w, g, buf, w0, seed, bound, True, neg_lr, mom, wd, d32, scores)
    elif plain:
        _update_loop(w, g, buf, w0, seed, bound, False, neg_lr, z, z, d32, scores)
    else:
        _update_loop(w, g, buf, w0, seed, bound, False, neg_lr, mom, wd, d32, scores)


@numba.njit(cache=False)
def _high_hist(bits, hist):
    """Top-k pass: histogram of the high 16 bits of the (non-negative) score bits."""
    for j in range(bits.shape[0]):
        hist[bits[j] >> 16] += 1


@numba.njit(cache=False)
def _low_hist(bits, hi, hist):
    """Top-k pass: histogram of the low 16 bits within high bin ``hi``."""
    for j in range(bits.shape[0]):
        b = bits[j]
        if (b >> 16) == hi:
            hist[b & 0xFFFF] += 1


@numba.njit(cache=False)
def _topk_mask(bits, thr, need_eq, eq_seen, mask):
    """Keep scores > thr and the first ``need_eq`` (in index order) equal to it."""
    for j in range(bits.shape[0]):
        b = bits[j]
        t = b > thr
        if b == thr:  # rare: ties at the threshold, lower index first
            if eq_seen < need_eq:
                t = True
                eq_seen += 1
        mask[j] = t
    return eq_seen


@numba.njit(inline="always")
def _reset_loop(w, buf, w0, seed, bound, counter, mom, d32, mask):
    for j in range(w.shape[0]):
        t = mask[j]
        w[j] = w[j] if t else d32 * _w0(w0, j, seed, bound, counter)
        if mom != 0:
            buf[j] = buf[j] if t else np.float32(0)


@numba.njit(inline="always")
def _reset_thr_loop(w, buf, w0, seed, bound, counter, mom, d32, bits, thr, mask):
    for j in range(w.shape[0]):
        t = bits[j] >= thr
        mask[j] = t
        w[j] = w[j] if t else d32 * _w0(w0, j, seed, bound, counter)
        if mom != 0:
            buf[j] = buf[j] if t else np.float32(0)


@numba.njit(cache=False)
def _reset(w, buf, w0, seed, bound, counter, mom, d32, mask):
    """Every untracked weight to d32*w0, its momentum to 0 (branch-free; the
    flags are literals in each inlined variant, as in :func:`_update_score`)."""
    z = np.float32(0)
    if counter:
        if mom == 0:
            _reset_loop(w, buf, w0, seed, bound, True, z, d32, mask)
        else:
            _reset_loop(w, buf, w0, seed, bound, True, mom, d32, mask)
    elif mom == 0:
        _reset_loop(w, buf, w0, seed, bound, False, z, d32, mask)
    else:
        _reset_loop(w, buf, w0, seed, bound, False, mom, d32, mask)


@numba.njit(cache=False)
def _reset_thr(w, buf, w0, seed, bound, counter, mom, d32, bits, thr, mask):
    """Top-k mask ``bits >= thr`` and reset, in one pass (when every score equal
    to the threshold is tracked, the common case)."""
    z = np.float32(0)
    if counter:
        if mom == 0:
            _reset_thr_loop(w, buf, w0, seed, bound, True, z, d32, bits, thr, mask)
        else:
            _reset_thr_loop(w, buf, w0, seed, bound, True, mom, d32, bits, thr, mask)
    elif mom == 0:
        _reset_thr_loop(w, buf, w0, seed, bound, False, z, d32, bits, thr, mask)
    else:
        _reset_thr_loop(w, buf, w0, seed, bound, False, mom, d32, bits, thr, mask)


@numba.njit(inline="always")
def _w0v(w0v, jj, base, seed, bound, counter):
    """w0 of element ``base + jj`` of a parameter, ``w0v`` the stored view from ``base``."""
    if counter:
        return w0_at_nb(seed, base, jj, bound)
    return w0v[jj]


# Quantile mode: elements per chunk (its buffers and streams stay in L1). The best size
# depends on the machine. On the AVX-512 machine of the earlier sessions, the update,
# score and write-back loops alone over 11.7M elements took 7.7 ms at 2048, 6.0 at 1024
# and 4.8 at 512. On the AVX2 EPYC of session 13, the whole quantile step against the
# same step at 512, both in one process with the rounds paired (40 rounds each run):
# 1024 took 0.920, 0.972, 0.931, 0.992 and 0.965 of the time (median per-round ratio;
# with CounterInit 1.015), 1536 took 0.965 and 2048 0.988. On the Zen 4 EPYC of
# session 14 (AVX-512) 1024 is far slower than 512 (1.412, 1.357; with CounterInit
# 1.157, 1.248) and 256 no faster (0.968, 0.926; 0.996, 1.055), so AVX-512 keeps 512.
_QCHUNK = 512 if _host_has_avx512() else 1024


@numba.njit(inline="always")
def _quantile_loop(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, b, up, down,
                   mask, key, r0, wn, ml, rc, stats, pos):
    """Quantile mode for one parameter in one pass, last chunk of _QCHUNK
    elements to first: d32*w0, then the SGD update and score key of the chunk into L1
    buffers (vectorized), the estimator over the chunk's keys into an L1 mask
    (:func:`golden.quantile._blocks`: bulk blocks, the exact serial chain where
    needed), then the write-back of tracked weights, the reset of the untracked
    and the mask (w0 is regenerated once per element). Loops run over views
    from 0 (offset loops do not vectorize in numba). ``stats``: [bulk blocks,
    chained blocks, straddling bulk blocks, tracked], incremented. Returns theta's bits."""
    u, d = _consts(up, down)
    end = w.shape[0]
    while end > 0:
        start = max(0, end - _QCHUNK)
        m = end - start
        wv = w[start:end]
        gv = g[start:end]
        bv = buf[start:end]
        w0v = w0[start:end]
        # every loop walks the chunk from its last element down (jj = m-1-ii): the
        # chunks are visited last to first, and one descending stream keeps the
        # hardware prefetchers on (ascending loops in descending chunks ran ~2x slower)
        # (unsigned indices: a signed index computed as m-1-ii gets numba's
        # negative-index test, which stops vectorization: ~10x slower)
        if counter:  # w0 of the chunk first, in its own loop (as in _spec_loop); it
            for jj in range(m):  # touches no stream, so it can run upwards
                r0[jj] = d32 * w0_at_nb(seed, start, jj, bound)
        for ii in range(m):
            jj = np.uint64(m - 1 - ii)
            r = r0[jj] if counter else d32 * w0v[jj]
            x = _sgd(wv, gv, bv, jj, neg_lr, mom, wd)
            wn[jj] = x
            r0[jj] = r
            key[jj] = _key(abs(x - r))
        b = _blocks_at(_addr(key), m, b, u, d, up, down, _addr(ml), _addr(rc), rc.shape[0],
                       _addr(stats), stats.shape[0], _addr(pos), pos.shape[0])  # mask in L1
        mv = mask[start:end]
        nt = np.int32(0)
        for ii in range(m):
            jj = np.uint64(m - 1 - ii)
            t = ml[jj]
            x = wn[jj]  # both loaded unconditionally: a select, not a branch (vectorizes)
            r = r0[jj]
            mv[jj] = t
            nt = np.int32(nt + np.int32(t))  # int32 lanes: see _spec_loop
            wv[jj] = x if t else r
            if mom != 0:
                v = bv[jj]
                bv[jj] = v if t else np.float32(0)
        stats[3] += nt
        end = start
    return b


@numba.njit(cache=False)
def _quantile_param(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, b, up, down,
                    mask, key, r0, wn, ml, rc, stats, pos):
    """:func:`_quantile_loop` with literal flags per variant (as :func:`_update_score`)."""
    z = np.float32(0)
    plain = mom == 0 and wd == 0
    if counter:
        if plain:
            return _quantile_loop(w, g, buf, w0, seed, bound, True, neg_lr, z, z, d32, b,
                                  up, down, mask, key, r0, wn, ml, rc, stats, pos)
        return _quantile_loop(w, g, buf, w0, seed, bound, True, neg_lr, mom, wd, d32, b,
                              up, down, mask, key, r0, wn, ml, rc, stats, pos)
    if plain:
        return _quantile_loop(w, g, buf, w0, seed, bound, False, neg_lr, z, z, d32, b,
                              up, down, mask, key, r0, wn, ml, rc, stats, pos)
    return _quantile_loop(w, g, buf, w0, seed, bound, False, neg_lr, mom, wd, d32, b,
                          up, down, mask, key, r0, wn, ml, rc, stats, pos)


def _ptr_intrinsic(dtype):
    @intrinsic
    def _ptr(typingctx, addr):
        """Address (int64) as a pointer to ``dtype`` (for ``numba.carray``)."""
        if addr != types.int64:
            return None
        rt = types.CPointer(dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(rt))

        return rt(addr), codegen
    return _ptr


_f32_ptr = _ptr_intrinsic(types.float32)
_bool_ptr = _ptr_intrinsic(types.boolean)
_i32_ptr = _ptr_intrinsic(types.int32)
_i64_ptr = _ptr_intrinsic(types.int64)


@numba.njit(inline="always")
def _addr(a):
    """The data address of array ``a``, as int64."""
    return np.int64(a.ctypes.data)


# The estimator is a call from the fused step, not inlined into each of its four
# variants: numba types an inline="always" function again at every call site, and that
# typing (not LLVM: 21 s of 408) was nearly all of the fused step's compile time with
# four copies of _blocks; with one, golden.warm's quantile lane took 66 s. The call gets
# the chunk's buffers by address: a call with the arrays themselves (which numba
# reference-counts) made the quantile step ~0.2x of an SGD step slower in three
# alternating `procube bench dropback` runs; by address it was within their noise.
@numba.njit(cache=False)
def _blocks_at(key_a, n, b, u, d, up, down, ml_a, rc_a, rc_n, st_a, st_n, pos_a, pos_n):
    """:func:`golden.quantile._blocks` over the ``n`` keys at ``key_a`` into the mask at
    ``ml_a`` (region cache, stats and positions scratch at the other addresses)."""
    key = numba.carray(_i32_ptr(key_a), n)
    ml = numba.carray(_bool_ptr(ml_a), n)
    rc = numba.carray(_i64_ptr(rc_a), (rc_n, 4))
    stats = numba.carray(_i64_ptr(st_a), st_n)
    pos = numba.carray(_i32_ptr(pos_a), pos_n)
    return _blocks(key, n, b, u, d, up, down, ml, np.int64(0), rc, stats, pos)


@numba.njit(cache=False)
def _quantile_all(tab, seeds, bounds, hyp, counter, d32, b, up, down, key, r0, wn, ml, rc,
                  stats, pos):
    """:func:`_quantile_param` over every parameter, last to first, in ONE call
    from Python: row i of ``tab`` holds the addresses of parameter i's weights,
    gradient, momentum buffer, stored w0 and mask, then its length and the
    lengths of the buffer and w0 views (0: not used); ``seeds``, ``bounds``:
    CounterInit's per parameter; ``hyp``: (-lr, momentum, weight decay) as
    float32. One numba dispatch per parameter (62 on ResNet-18, each unboxing
    nine arrays) and its Python loop cost ~0.07x of an SGD step with warm
    caches and several times that after the step's own streams have evicted
    the interpreter's objects."""
    for ii in range(tab.shape[0]):
        i = tab.shape[0] - 1 - ii
        n = tab[i, 5]
        w = numba.carray(_f32_ptr(tab[i, 0]), n)
        g = numba.carray(_f32_ptr(tab[i, 1]), n)
        buf = numba.carray(_f32_ptr(tab[i, 2]), tab[i, 6])
        w0 = numba.carray(_f32_ptr(tab[i, 3]), tab[i, 7])
        mask = numba.carray(_bool_ptr(tab[i, 4]), n)
        b = _quantile_param(w, g, buf, w0, seeds[i], bounds[i], counter, hyp[i, 0], hyp[i, 1],
                            hyp[i, 2], d32, b, up, down, mask, key, r0, wn, ml, rc, stats, pos)
    return b


# --- top-k with a threshold hint: one pass ------------------------------------
#
# The k-th largest score moves little from one step to the next. From the
# predicted threshold two edges lo < hi are set (a relative band that adapts to
# the prediction errors seen). One fused, vectorized pass per parameter
# (:func:`_spec`) takes the SGD step, scores each element and decides what it
# can:
#
# * score > hi: tracked (mask 1, the new weight kept);
# * score <= lo and the old weight recoverable: reset to d32*w0 at once (mask
#   0). "Recoverable" means the old weight had the bits of d32_prev*w0 (the
#   element was untracked after the previous step and nobody changed it) and,
#   with momentum, its buffer had the bits of 0: the SGD step of this element
#   can then be recomputed exactly from w0 and the gradient if needed;
# * anything else: pending (mask 2, the new weight kept); pending elements are
#   listed by global index in index order, chunk by chunk, only where a chunk
#   has one: those in the band (lo, hi] with their score bits; those below it
#   (tracked after the previous step, now dropped: the usual churn) have their
#   new weight (and momentum) saved in a second list and are reset right
#   there, while the chunk is in cache (resetting them after the pass, by
#   index, cost ~1 ms per step in cache misses).
#
# It also counts the scores above hi and above lo. When count(> hi) < k <=
# count(> lo) (a hit), the k-th largest score is among the pending elements
# in (lo, hi]: the exact threshold and the tie cut (lower index first) come
# from that list, and :func:`_band_fix` marks or resets the band elements.
# Elements reset in the pass are all <= lo < threshold, so untracked anyway.
# Otherwise (a miss: first step, large shift) :func:`_restore` recomputes the
# SGD step of every element reset in the pass, :func:`_unsave` puts back the
# saved ones, and the scores go through the exact radix
# select below, as without the hint. Either way the weights, the momentum
# buffers and the mask are bit-identical to the radix path (the same float32
# operations on the same values; tests/test_dropback.py checks it step by step
# on adversarial streams).
#
# Speed (measured on 11.7M elements, one core): the element loop touches only
# the streams (w, g, w0 or its PRNG, momentum) and L1 buffers of one chunk
# (scores, pending flags, and the mask bytes where ``direct`` is off). On the
# AVX-512 machine of the earlier sessions, writing the mask bytes straight into
# the big mask array inside the loop cost ~1.4 ms per pass, through an L1 buffer
# and a byte copy ~0.6 ms; on the AVX2 machine of session 10 (EPYC) the direct
# write is the faster one (top-k step 2.69x -> 2.48x SGD, 50 alternating rounds
# in one process), and on session 14's Zen 4 EPYC, which has AVX-512, too (the
# direct write's step against the buffered one, paired rounds: 0.971, 0.954,
# 0.946, 0.910; the buffered one against itself: 1.026, 1.007). So the buffer
# is the default only on AVX-512 CPUs that are not AMD Zen. Pending
# elements are found 8 flags per uint64 word and a count-trailing-zeros per element.

_CHUNK = 1024  # elements per chunk of the pass (pending count, then a scan if any)
_DIRECT_MASK = not _host_has_avx512() or _host_is_amd_zen()  # the hint pass's mask write


@intrinsic
def _cttz(typingctx, x):
    """Trailing zero bits of a nonzero uint64 (LLVM ``cttz``)."""
    if not (isinstance(x, types.Integer) and x.bitwidth == 64):
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(x), codegen


@numba.njit(inline="always")
def _sbits(x):
    """Score bits as int32 (scores are >= 0 or NaN with the sign cleared: the
    int32 order is the value order, NaN above inf, as in the radix select)."""
    return np.float32(x).view(np.int32)


@numba.njit(inline="always")
def _spec_loop(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, d32p, lo, hi,
               m8, sbuf, mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, direct):
    p8 = pend.view(np.uint8)  # pending flags of the chunk, read back 8 per uint64
    nc, nl, nleft = st[0], st[1], st[2]
    n_hi = np.int64(0)
    n_lo = np.int64(0)
    end = w.shape[0]
    start = 0
    while start < end:
        stop = min(end, start + _CHUNK)
        m = stop - start
        wv = w[start:stop]
        gv = g[start:stop]
        bv = buf[start:stop]
        if counter:  # w0 of the chunk into L1 first: a separate loop runs ~2x faster
            for jj in range(m):
                w0c[jj] = w0_at_nb(seed, start, jj, bound)
            w0v = w0c
        else:
            w0v = w0[start:stop]
        mv = m8[start:stop]
        c_hi = np.int32(0)
        c_lo = np.int32(0)
        npend = np.int32(0)
        for jj in range(m):
            w0j = w0v[jj]
            r = d32 * w0j
            rec = np.float32(wv[jj]).view(np.int32) == np.float32(d32p * w0j).view(np.int32)
            if mom != 0:
                rec = rec & (np.float32(bv[jj]).view(np.int32) == 0)
            x = _sgd(wv, gv, bv, jj, neg_lr, mom, wd)
            sb = _sbits(abs(x - r))
            sbuf[jj] = sb
            tr = sb > hi
            rs = (sb <= lo) & rec
            wv[jj] = r if rs else x
            if mom != 0:
                bv[jj] = np.float32(0) if rs else bv[jj]
            pj = not (tr or rs)
            code = np.uint8(1) if tr else (np.uint8(2) if pj else np.uint8(0))
            if direct:
                mv[jj] = code
            else:
                mb[jj] = code
            p8[jj] = np.uint8(pj)
            # the counts stay int32 (numba widens int32 + int32 to int64, and int64
            # accumulators held this loop to 4 lanes on AVX2: ymm of int64)
            c_hi = np.int32(c_hi + np.int32(tr))
            c_lo = np.int32(c_lo + np.int32(sb > lo))
            npend = np.int32(npend + np.int32(pj))
        if not direct:
            for jj in range(m):
                mv[jj] = mb[jj]
        if npend > 0:  # the chunk's pending elements in index order
            for jj in range(m, min(_CHUNK, (m + 7) & ~7)):  # flags past a short chunk
                p8[jj] = np.uint8(0)
            for wi in range((m + 7) >> 3):
                word = pend[wi]
                while word != 0:
                    jj = (wi << 3) + np.int64(_cttz(word) >> np.uint64(3))
                    word = word & (word - np.uint64(1))
                    sb = sbuf[jj]
                    if sb > lo:  # in the band: decided after the pass
                        if nc < cidx.shape[0]:
                            cidx[nc] = off + start + jj
                            cbits[nc] = sb
                            nc += 1
                        else:
                            nleft += 1
                    elif nl < lidx.shape[0]:  # below the band: saved, then reset
                        lidx[nl] = off + start + jj
                        lw[nl] = wv[jj]
                        wv[jj] = d32 * w0v[jj]
                        if mom != 0:
                            lb[nl] = bv[jj]
                            bv[jj] = np.float32(0)
                        mv[jj] = np.uint8(0)
                        nl += 1
                    else:
                        nleft += 1
        n_hi += c_hi
        n_lo += c_lo
        start = stop
    st[0], st[1], st[2] = nc, nl, nleft
    st[3] += n_hi
    st[4] += n_lo


@numba.njit(inline="always")
def _spec_variants(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, d32p, lo, hi,
                   m8, sbuf, mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, direct):
    z = np.float32(0)
    plain = mom == 0 and wd == 0
    if counter:
        if plain:
            _spec_loop(w, g, buf, w0, seed, bound, True, neg_lr, z, z, d32, d32p, lo, hi,
                       m8, sbuf, mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, direct)
        else:
            _spec_loop(w, g, buf, w0, seed, bound, True, neg_lr, mom, wd, d32, d32p, lo, hi,
                       m8, sbuf, mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, direct)
    elif plain:
        _spec_loop(w, g, buf, w0, seed, bound, False, neg_lr, z, z, d32, d32p, lo, hi,
                   m8, sbuf, mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, direct)
    else:
        _spec_loop(w, g, buf, w0, seed, bound, False, neg_lr, mom, wd, d32, d32p, lo, hi,
                   m8, sbuf, mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, direct)


@numba.njit(cache=False)
def _spec(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, d32p, lo, hi, m8, sbuf,
          mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, direct):
    """The hint pass over one parameter (global offset ``off``). Pending elements
    in the band go to ``cidx``/``cbits``; those below it (not recoverable) have
    their new weight and momentum saved to ``lidx``/``lw``/``lb`` and are reset;
    either kind stays pending (mask 2, new weight kept) and is only counted in
    ``nleft`` when its list is full. ``sbuf``/``mb``/``pend``: chunk buffers
    (``mb`` unused when ``direct``: the mask bytes go straight to ``m8``).
    ``st``: [band listed, low listed, left pending, count > hi, count > lo],
    updated. Literal flags per variant as in :func:`_update_score`."""
    lo = np.int32(lo)
    hi = np.int32(hi)
    if direct:
        _spec_variants(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, d32p, lo,
                       hi, m8, sbuf, mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, True)
    else:
        _spec_variants(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32, d32p, lo,
                       hi, m8, sbuf, mb, w0c, pend, off, cidx, cbits, lidx, lw, lb, st, False)


@numba.njit(cache=False)
def _unsave(w, buf, mom, idx, lw, lb):
    """Miss path: put back the saved new weights (and momentum) of the elements
    below the band that the pass reset (local indices ``idx``), after
    :func:`_restore` (which recomputed them as if they had been recoverable)."""
    for c in range(idx.shape[0]):
        w[idx[c]] = lw[c]
        if mom != 0:
            buf[idx[c]] = lb[c]


@numba.njit(cache=False)
def _collect(w, w0, seed, bound, counter, d32, m8, off, cidx, cbits, nc):
    """The pending elements (mask 2) of one parameter with their score bits
    (recomputed), from position ``nc``: when the pass's list overflowed."""
    for j in range(w.shape[0]):
        if m8[j] == 2:
            cidx[nc] = off + j
            cbits[nc] = _sbits(abs(w[j] - d32 * _w0(w0, j, seed, bound, counter)))
            nc += 1
    return nc


@numba.njit(cache=False)
def _restore(w, g, buf, w0, seed, bound, counter, neg_lr, mom, wd, d32p, m8):
    """Miss path: the SGD step of every element the pass reset (mask 0), from its
    old weight d32_prev*w0 and zero momentum; mask back to 0/1."""
    for j in range(w.shape[0]):
        m = m8[j]
        if m == 0:
            w[j] = d32p * _w0(w0, j, seed, bound, counter)
            w[j] = _sgd(w, g, buf, j, neg_lr, mom, wd)
        m8[j] = np.uint8(m == 1)


@numba.njit(cache=False)
def _band_fix(w, buf, w0, seed, bound, counter, mom, d32, mask, idx, bits, thr, need_eq,
              eq_seen):
    """Decide the pending elements ``idx`` (local indices, in order) of one
    parameter: tracked if bits > thr or among the first ``need_eq`` ties (global
    index order, ``eq_seen`` so far); the others reset. Returns ``eq_seen``."""
    for c in range(idx.shape[0]):
        j = idx[c]
        b = bits[c]
        t = b > thr
        if b == thr and eq_seen < need_eq:
            t = True
            eq_seen += 1
        mask[j] = t
        if not t:
            w[j] = d32 * _w0(w0, j, seed, bound, counter)
            if mom != 0:
                buf[j] = np.float32(0)
    return eq_seen


@numba.njit(cache=False)
def _score_only(w, w0, seed, bound, counter, d32, scores):
    """Scores of the (already updated) weights, as :func:`_update_score` wrote
    them: the miss path of the hint needs them for the radix select."""
    if counter:
        for j in range(w.shape[0]):
            scores[j] = abs(w[j] - d32 * _w0(w0, j, seed, bound, True))
    else:
        for j in range(w.shape[0]):
            scores[j] = abs(w[j] - d32 * _w0(w0, j, seed, bound, False))


def _select_threshold(hist_hi: np.ndarray, k: int):
    """High bin ``b`` holding the k-th largest score and the count above it."""
    above = np.cumsum(hist_hi[::-1])  # above[i]: count in bins >= 65535 - i
    i = int(np.searchsorted(above, k))  # first i with above[i] >= k
    hi = 65535 - i
    gt = int(above[i - 1]) if i > 0 else 0
    return hi, gt


_BAND_MIN = 2e-4  # hint band half-width (relative) bounds
_BAND_MAX = 0.2


def _sbits_of(x: float) -> int:
    """int32 bits of float32(x) for x >= 0 (clipped to the finite range)."""
    return int(np.float32(min(max(x, 0.0), 3.4e38)).view(np.int32))


class Dropback(torch.optim.Optimizer):
    """Dropback (top-k) or Procrustes (``quantile=``, ``init_decay``) optimizer.

    ``track_size``: weights kept (top-k mode; the nominal budget in quantile
    mode, where ``quantile`` = 1 - k/N drives the estimator). ``init``: ``None``
    (store a copy of w0) or :class:`golden.prng.CounterInit`. Parameters are
    numbered in the order of the param groups (the order ``CounterInit.apply_``
    must see).
    """

    def __init__(self, params, lr, track_size, *, init_decay=1.0, momentum=0.0,
                 weight_decay=0.0, quantile=None, q_init=1e-2, q_step=1e-6, init=None):
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number >= 0, not {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), not {momentum}")
        if not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, not {weight_decay}")
        if not 0 < init_decay <= 1:
            raise ValueError(f"init_decay must be in (0, 1], not {init_decay}")
        if quantile is not None:
            check_quantile_args(quantile, q_init, q_step)
        if init is not None and not isinstance(init, CounterInit):
            raise ValueError(f"init must be None or a CounterInit, not {type(init).__name__}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        plist = self._params()
        for p in plist:
            if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous():
                raise ValueError("params must be contiguous float32 CPU tensors")
        self.numel = sum(p.numel() for p in plist)
        if isinstance(track_size, bool) or int(track_size) != track_size \
                or not 0 <= track_size <= self.numel:
            raise ValueError(
                f"track_size must be an integer in [0, {self.numel}] (the number of "
                f"parameter elements), not {track_size}")
        self.track_size = int(track_size)
        self.init_decay = float(init_decay)
        self.quantile = None if quantile is None else float(quantile)
        self.q_step = float(q_step)
        self.init = init
        self.decay = 1.0
        self.step_count = 0
        self.tracked_count = 0
        self.threshold = float(q_init) if quantile is not None else 0.0
        self._theta = np.float32(q_init)
        # quantile mode: estimator blocks taken in bulk / through the serial chain
        self.bulk_blocks = 0
        self.chained_blocks = 0
        self.edge_blocks = 0  # bulk blocks that straddled a region edge (in bulk_blocks)
        # top-k mode: steps whose threshold came from the hint band / a full radix select
        self.hint_hits = 0
        self.hint_misses = 0
        self.use_hint = True  # False: always the full radix select (the reference path)
        self.direct_mask = _DIRECT_MASK  # hint pass: mask bytes straight to the mask
        self._thr_hist = (None, None)  # last two top-k thresholds
        self._band = 4e-3  # hint band half-width, relative; adapted every step
        self._errs: list[float] = []  # relative errors of the last predictions
        self._listed = (0, 0)  # list lengths of the last hint pass (size the next lists)
        self._min_list = 4096  # smallest list capacity (tests set 1: overflow paths)
        self._d32_prev = 1.0  # float32 decay of the previous step
        self._offsets = np.cumsum([0] + [p.numel() for p in plist]).tolist()
        self._bounds = init_bounds([p.shape for p in plist])
        self._scores = None
        self._bufs = None  # the hint pass's lists and chunk buffers (see _buffers)
        self._views = {}  # id(param) -> cached numpy views (see _work)
        self._qstatic = None  # quantile mode: the kernel table's static part (_qtable)
        self._qbufs = None  # quantile mode: chunk buffers and region cache (_step_quantile)
        for i, p in enumerate(plist):
            st = self.state[p]
            st["mask"] = torch.ones_like(p, dtype=torch.bool)
            if init is None:
                st["w0"] = p.detach().clone()
            if momentum != 0:
                st["momentum_buffer"] = torch.zeros_like(p)
            st["index"] = i

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _check_groups(self):
        """Each param group's own lr, momentum and weight decay (groups may set
        them, and change them between steps) in range, and a momentum buffer for
        every parameter of a group with momentum: a group given momentum that the
        optimizer's default did not have gets zeroed buffers (as SGD's first
        step with momentum), instead of the kernels writing past an empty one."""
        for k, group in enumerate(self.param_groups):
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            if not (lr >= 0 and math.isfinite(lr)):
                raise ValueError(f"param group {k}: lr must be a finite number >= 0, not {lr}")
            if not 0 <= mom < 1:
                raise ValueError(f"param group {k}: momentum must be in [0, 1), not {mom}")
            if not (wd >= 0 and math.isfinite(wd)):
                raise ValueError(
                    f"param group {k}: weight_decay must be a finite number >= 0, not {wd}")
            if mom != 0:
                for p in group["params"]:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p)

    @property
    def mask(self) -> list[torch.Tensor]:
        """Tracked mask of every parameter (after the last step), in order."""
        return [self.state[p]["mask"] for p in self._params()]

    def w0(self, p: torch.Tensor) -> torch.Tensor:
        """w0 of parameter ``p`` (regenerated when ``init`` is a CounterInit)."""
        st = self.state[p]
        if self.init is None:
            return st["w0"]
        i = st["index"]
        return self.init.w0(i, p.shape, self._bounds[i])

    def _work(self):
        """(param, group, flat views and kernel arguments) for params with a grad.

        The numpy views of the weights and of the optimizer's own state are
        cached per parameter (building them costs more than an SGD step on
        ResNet-18's 62 tensors) and rebuilt when a tensor is replaced."""
        out = []
        for group in self.param_groups:
            nlr = np.float32(-group["lr"])
            mom = np.float32(group["momentum"])
            wd = np.float32(group["weight_decay"])
            for p in group["params"]:
                gt = p.grad
                if gt is None:
                    continue
                if gt.is_sparse:
                    raise ValueError("Dropback does not support sparse gradients")
                st = self.state[p]
                c = self._views.get(id(p))
                if (c is None or c[0] is not p or c[1] != p.data_ptr() or c[2] is not st["mask"]
                        or c[3] is not st.get("w0") or c[4] is not st.get("momentum_buffer")):
                    c = self._cache_views(p, st)
                if gt.dtype == torch.float32 and gt.is_contiguous() and not gt.requires_grad:
                    g = gt.numpy().reshape(-1)
                else:
                    g = gt.detach().contiguous().view(-1).to(torch.float32).numpy()
                i, w, w0, seed, bound, counter, mask, bufv = c[5:]
                buf = bufv if mom != 0 else _EMPTY_F32
                out.append((i, w, g, buf, w0, seed, bound, counter, nlr, mom, wd, mask))
        return out

    def _cache_views(self, p, st):
        i = st["index"]
        if self.init is None:
            w0, seed, bound, counter = st["w0"].view(-1).numpy(), 0, 0.0, False
        else:
            w0, seed, bound, counter = (_EMPTY_F32, self.init.param_seed(i),
                                        self._bounds[i], True)
        mb = st.get("momentum_buffer")
        c = (p, p.data_ptr(), st["mask"], st.get("w0"), mb, i, p.detach().view(-1).numpy(),
             w0, np.uint64(seed), float(bound), counter, st["mask"].view(-1).numpy(),
             mb.view(-1).numpy() if mb is not None else _EMPTY_F32)
        self._views[id(p)] = c
        return c

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        if self.step_count > 0:
            self.decay *= self.init_decay
        self.step_count += 1
        d32 = np.float32(self.decay)
        if self.quantile is not None:
            self._step_quantile(d32)
        else:
            self._step_topk(self._work(), d32)
        self._d32_prev = d32
        return loss

    def _update(self, work, d32):
        """SGD update and scores of every parameter with a grad; returns the count."""
        if self._scores is None:
            self._scores = np.empty(self.numel, dtype=np.float32)
        off, n = self._offsets, 0
        for (i, w, g, buf, w0, seed, bound, counter, nlr, mom, wd, _) in work:
            _update_score(w, g, buf, w0, seed, bound, counter, nlr, mom, wd, d32,
                          self._scores[off[i]:off[i + 1]])
            n += w.shape[0]
        return n

    def _reset_all(self, work, d32):
        for (_, w, _, buf, w0, seed, bound, counter, _, mom, _, mask) in work:
            _reset(w, buf, w0, seed, bound, counter, mom, d32, mask)

    def _qtable(self):
        """The kernel table of :func:`_quantile_all` for the params with a grad:
        (table, seeds, bounds, hyp, grads kept alive). The static columns
        (addresses of the weights, buffers, w0 and mask, lengths, CounterInit's
        seed and bound) are rebuilt only when a parameter's cached views are
        (see :meth:`_work`); the gradient addresses and the hyperparameters
        are set on every step (a gradient that is not a contiguous float32
        tensor is converted, and the copy kept alive through the step)."""
        rows, gaddr, spans, keep = [], [], [], []
        for group in self.param_groups:
            first = len(rows)
            for p in group["params"]:
                gt = p.grad
                if gt is None:
                    continue
                if gt.is_sparse:
                    raise ValueError("Dropback does not support sparse gradients")
                st = self.state[p]
                c = self._views.get(id(p))
                if (c is None or c[0] is not p or c[1] != p.data_ptr() or c[2] is not st["mask"]
                        or c[3] is not st.get("w0") or c[4] is not st.get("momentum_buffer")):
                    c = self._cache_views(p, st)
                if not (gt.dtype == torch.float32 and gt.is_contiguous()):
                    gt = gt.detach().contiguous().to(torch.float32)
                    keep.append(gt)
                rows.append(c)
                gaddr.append(gt.data_ptr())
            spans.append((first, len(rows), group))
        cached = self._qstatic
        if (cached is None or len(cached[0]) != len(rows)
                or any(a is not b for a, b in zip(cached[0], rows))):
            tab = np.zeros((len(rows), 8), dtype=np.int64)
            for r, c in enumerate(rows):
                i, w, w0, seed, bound, counter, mask, bufv = c[5:13]
                tab[r] = (w.ctypes.data, 0, bufv.ctypes.data, w0.ctypes.data,
                          mask.ctypes.data, w.shape[0], bufv.shape[0], w0.shape[0])
            seeds = np.array([c[8] for c in rows], dtype=np.uint64)
            bounds = np.array([c[9] for c in rows], dtype=np.float64)
            cached = self._qstatic = (rows, tab, seeds, bounds,
                                      np.zeros((len(rows), 3), dtype=np.float32))
        _, tab, seeds, bounds, hyp = cached
        tab[:, 1] = gaddr
        for first, last, group in spans:
            mom = group["momentum"]
            hyp[first:last] = (-group["lr"], mom, group["weight_decay"])
            # the momentum buffer's view is used only with momentum (as in _work)
            tab[first:last, 6] = [c[12].shape[0] if mom != 0 else 0 for c in rows[first:last]]
        return tab, seeds, bounds, hyp, keep

    def _step_quantile(self, d32):
        up, down = factors(self.quantile, self.q_step)
        b = np.int64(np.float32(self._theta).view(np.uint32))
        if self._qbufs is None or self._qbufs[0] != (up, down):
            # chunk buffers and the region cache, kept between steps (the cache
            # holds exact regions of these factors' steps)
            self._qbufs = ((up, down), np.empty(_QCHUNK, dtype=np.int32),
                           np.empty(_QCHUNK, dtype=np.float32), np.empty(_QCHUNK, dtype=np.float32),
                           np.empty(_QCHUNK, dtype=np.bool_), _region_cache(),
                           np.empty(_QCHUNK, dtype=np.int32))  # pos: the tracked positions
        _, key, r0, wn, ml, rc, pos = self._qbufs
        stats = np.zeros(4, dtype=np.int64)
        tab, seeds, bounds, hyp, keep = self._qtable()
        if tab.shape[0]:
            b = _quantile_all(tab, seeds, bounds, hyp, self.init is not None, d32, b, up, down,
                              key, r0, wn, ml, rc, stats, pos)  # last to first
        del keep  # (converted gradients: alive until here)
        self.bulk_blocks += int(stats[0])
        self.chained_blocks += int(stats[1])
        theta = np.uint32(b).view(np.float32)
        self._theta = np.float32(theta)
        self.threshold = float(theta)
        self.edge_blocks += int(stats[2])
        self.tracked_count = int(stats[3])

    def _step_topk(self, work, d32):
        n_scored = sum(t[1].shape[0] for t in work)
        k = min(self.track_size, n_scored)
        pred = self._predict()
        if k == 0 or pred is None or not self.use_hint:
            self._update(work, d32)
            self._radix_topk(work, d32, k)
        else:
            self._hint_topk(work, d32, k, pred)
        self._thr_hist = (self._thr_hist[1], self.threshold)

    def _predict(self):
        """Predicted threshold: the last one times the last step's ratio (bounded)."""
        t0, t1 = self._thr_hist
        if t1 is None or not (0 < t1 < math.inf):
            return None
        if t0 is None or not (0 < t0 < math.inf):
            return t1
        return t1 * min(2.0, max(0.5, t1 / t0))

    def _buffers(self, cap_c, cap_l):
        """The hint pass's lists and chunk buffers, kept between steps (a fresh
        multi-megabyte list every step cost page faults: ~2000 per step, several
        ms of system time) and grown when a larger capacity is asked for; the
        returned lists are views of exactly the asked capacity."""
        bf = self._bufs
        if bf is None or bf["cidx"].shape[0] < cap_c or bf["lidx"].shape[0] < cap_l:
            old = bf or {}
            cc = max(cap_c, old.get("cidx", np.empty(0)).shape[0])
            cl = max(cap_l, old.get("lidx", np.empty(0)).shape[0])
            bf = dict(cidx=np.empty(cc, dtype=np.int64), cbits=np.empty(cc, dtype=np.int32),
                      lidx=np.empty(cl, dtype=np.int64), lw=np.empty(cl, dtype=np.float32),
                      lb=np.empty(cl, dtype=np.float32),
                      sbuf=np.empty(_CHUNK, dtype=np.int32), mb=np.empty(_CHUNK, dtype=np.uint8),
                      w0c=np.empty(_CHUNK, dtype=np.float32),
                      pend=np.zeros(_CHUNK // 8, dtype=np.uint64), st=np.zeros(5, dtype=np.int64))
            self._bufs = bf
        bf["st"][:] = 0
        return (bf["cidx"][:cap_c], bf["cbits"][:cap_c], bf["lidx"][:cap_l], bf["lw"][:cap_l],
                bf["lb"][:cap_l], bf["sbuf"], bf["mb"], bf["w0c"], bf["pend"], bf["st"])

    def _hint_topk(self, work, d32, k, pred):
        off = self._offsets
        dl = self._band
        lo, hi = _sbits_of(pred * (1 - dl)), _sbits_of(pred * (1 + dl))
        d32p = np.float32(self._d32_prev)
        cap_c = max(self._min_list, 2 * self._listed[0])
        cap_l = max(self._min_list, 2 * self._listed[1])
        cidx, cbits, lidx, lw, lb, sbuf, mb, w0c, pend, st = self._buffers(cap_c, cap_l)
        for (i, w, g, buf, w0, seed, bound, counter, nlr, mom, wd, mask) in work:
            _spec(w, g, buf, w0, seed, bound, counter, nlr, mom, wd, d32, d32p, lo, hi,
                  mask.view(np.uint8), sbuf, mb, w0c, pend, off[i], cidx, cbits, lidx, lw, lb,
                  st, bool(self.direct_mask))
        nc, nl, nleft, n_hi, n_lo = (int(x) for x in st)
        self._listed = (nc + nleft, nl + nleft)
        cut = [off[t[0]] for t in work] + [off[work[-1][0] + 1]]
        if not n_hi < k <= n_lo:  # the k-th score is outside (lo, hi]: full select
            self.hint_misses += 1
            if self._scores is None:
                self._scores = np.empty(self.numel, dtype=np.float32)
            lcut = np.searchsorted(lidx[:nl], cut)
            for n, (i, w, g, buf, w0, seed, bound, counter, nlr, mom, wd, mask) in enumerate(
                    work):
                _restore(w, g, buf, w0, seed, bound, counter, nlr, mom, wd, d32p,
                         mask.view(np.uint8))
                a, b = lcut[n], lcut[n + 1]
                _unsave(w, buf, mom, lidx[a:b] - off[i], lw[a:b], lb[a:b])
                _score_only(w, w0, seed, bound, counter, d32, self._scores[off[i]:off[i + 1]])
            self._radix_topk(work, d32, k)
            self._errs = (self._errs + [abs(self.threshold / pred - 1.0)])[-3:]
            self._band = min(_BAND_MAX, max(4 * dl, 3 * max(self._errs)))
            return
        self.hint_hits += 1
        if nleft:  # a list was full: collect every element still pending again
            # (band and below-band alike: _band_fix resets those below the band)
            nc = nleft + nc
            cidx, cbits = np.empty(nc, dtype=np.int64), np.empty(nc, dtype=np.int32)
            n = 0
            for (i, w, _, _, w0, seed, bound, counter, *_r, mask) in work:
                n = _collect(w, w0, seed, bound, counter, d32, mask.view(np.uint8), off[i],
                             cidx, cbits, n)
            nc = n
        cidx, cbits = cidx[:nc], cbits[:nc]
        r = k - n_hi  # tracked among the listed band elements (1 <= r <= nc)
        thr = np.partition(cbits, nc - r)[nc - r]
        need_eq = r - int(np.count_nonzero(cbits > thr))
        ccut = np.searchsorted(cidx, cut)
        eq_seen = 0
        for n, (i, w, _, buf, w0, seed, bound, counter, _, mom, _, mask) in enumerate(work):
            if ccut[n] < ccut[n + 1]:
                eq_seen = _band_fix(w, buf, w0, seed, bound, counter, mom, d32, mask,
                                    cidx[ccut[n]:ccut[n + 1]] - off[i],
                                    cbits[ccut[n]:ccut[n + 1]], thr, need_eq, eq_seen)
        self.threshold = float(np.int32(thr).view(np.float32))
        self.tracked_count = k
        # half-width: three times the largest relative prediction error of the last
        # three steps (a miss costs about six passes, a wider band only a longer list)
        self._errs = (self._errs + [abs(self.threshold / pred - 1.0)])[-3:]
        self._band = min(_BAND_MAX, max(_BAND_MIN, 3 * max(self._errs)))

    def _radix_topk(self, work, d32, k):
        """Exact top-k from the scores in the scratch array (radix select)."""
        off = self._offsets
        bits = self._scores.view(np.uint32)  # scores >= 0: bit order == value order
        if k == 0:
            for (*_r, mask) in work:
                mask[:] = False
            self._reset_all(work, d32)
            self.threshold = math.inf
            self.tracked_count = 0
            return
        hist = np.zeros(65536, dtype=np.int64)
        for (i, *_r) in work:
            _high_hist(bits[off[i]:off[i + 1]], hist)
        hi, gt = _select_threshold(hist, k)
        low = np.zeros(65536, dtype=np.int64)
        for (i, *_r) in work:
            _low_hist(bits[off[i]:off[i + 1]], np.uint32(hi), low)
        lo, gt2 = _select_threshold(low, k - gt)
        thr = np.uint32((hi << 16) | lo)
        need_eq = k - gt - gt2
        self.threshold = float(thr.view(np.float32))
        if need_eq == low[lo]:  # every tie at the threshold fits: one fused pass
            for (i, w, _, buf, w0, seed, bound, counter, _, mom, _, mask) in work:
                _reset_thr(w, buf, w0, seed, bound, counter, mom, d32,
                           bits[off[i]:off[i + 1]], thr, mask)
        else:  # ties broken by index: mask pass, then reset
            eq_seen = 0
            for (i, *_r, mask) in work:
                eq_seen = _topk_mask(bits[off[i]:off[i + 1]], thr, need_eq, eq_seen, mask)
            self._reset_all(work, d32)
        self.tracked_count = k  # exact by construction (tests count the masks)


# On-disk cache of the kernels above, stamped with all golden sources (golden/jitcache.py).
from golden import jitcache as _jitcache  # noqa: E402

_jitcache.enable(globals())
