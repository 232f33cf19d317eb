import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from golden.quantile import (
    _POS_LEN,
    _POS_SLACK,
    StreamingQuantile,
    _host_has_avx512,
    quantile_pass,
    quantile_pass_reference,
)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 10, width=32), min_size=1, max_size=300),
       st.floats(1e-4, 1.0), st.floats(0.01, 0.99), st.floats(1e-4, 0.5))
def test_compiled_matches_reference_bit_for_bit(scores, theta, q, q_step):
    m1, t1 = quantile_pass_reference(scores, theta, q, q_step)
    m2, t2 = quantile_pass(scores, theta, q, q_step)
    assert np.array_equal(m1, m2)
    assert t1.dtype == t2.dtype == np.float32
    assert t1.tobytes() == t2.tobytes()


def test_visits_last_to_first():
    # theta starts below both scores: the LAST element is tracked first, which
    # raises theta above the first element's score.
    m, _ = quantile_pass_reference([1.0, 1.5], theta=0.9, q=0.5, q_step=0.9)
    assert m.tolist() == [False, True]
    m2, _ = quantile_pass([1.0, 1.5], theta=0.9, q=0.5, q_step=0.9)
    assert m2.tolist() == [False, True]


def _scores(n, rng):
    # realistic |accumulated update|: half-normal with per-layer scales and a heavy tail
    s = np.abs(rng.standard_normal(n) * 1e-4 * rng.choice([0.5, 1, 2], n))
    s[rng.random(n) < 0.01] *= 20
    return s.astype(np.float32)


def _run(ratio, q_step, passes, n=1_000_000):
    k = n // ratio
    rng = np.random.default_rng(ratio)
    s = _scores(n, rng)
    est = StreamingQuantile(q=1 - k / n, q_init=1e-2, q_step=q_step)
    return k, [int(est(np.roll(s, int(rng.integers(n)))).sum()) for _ in range(passes)]


@pytest.mark.parametrize("ratio,q_step", [(2, 1e-6), (10, 1e-5), (10, 1e-4), (20, 1e-4)])
def test_tracked_count_within_10_percent_after_convergence(ratio, q_step):
    # 'Long' = 60 passes of 1M scores (60M elements); the last 20 are checked.
    # A pass that tracks nothing lowers log(theta) by N*q_step*(1-q); theta must
    # travel from q_init = 1e-2 down to ~2e-4 (about 4 in log): ~8 passes at
    # 2x with q_step = 1e-6, fewer in the other cases.
    k, counts = _run(ratio, q_step, 60)
    assert counts[0] < 0.7 * k  # not converged at the start: theta far too high
    for c in counts[-20:]:
        assert abs(c - k) <= 0.1 * k, (counts[-20:], k)


def test_float32_quantizes_small_steps():
    # Known limitation of the float32 estimator: at q_step = 1e-6 and q = 0.9 the
    # down factor 1 - 1e-7 rounds to 1 - 2**-24 and theta*down often rounds back
    # to theta, so the estimator settles about a third above k (see module doc).
    k, counts = _run(10, 1e-6, 100)
    assert all(c > 1.2 * k for c in counts[-10:]), (counts[-10:], k)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\)"):
        StreamingQuantile(1.0)
    with pytest.raises(ValueError, match=r"q_init must be a finite number > 0"):
        StreamingQuantile(0.5, q_init=0)
    with pytest.raises(ValueError, match=r"q_step must be in \(0, 1\)"):
        StreamingQuantile(0.5, q_step=0)


@pytest.mark.parametrize("theta,q,q_step", [
    (1.3e-4, 0.9, 1e-6),      # the benchmark's factors: long integer-step regions
    (2.1e-7, 0.067, 6.2e-5),  # many region changes (large down factor)
    (3e-41, 0.5, 0.3),        # subnormal theta: float32 steps, then normal
    (3e38, 0.9, 1e-2),        # near the top binade (theta*up may overflow)
    (0.5, 0.999, 1e-7),       # up == 1 (no change when tracked)
])
def test_compiled_matches_reference_on_special_scores(theta, q, q_step):
    # The compiled pass compares bit patterns and steps theta by integer adds;
    # zeros of both signs, NaN, inf and negative scores must still compare as
    # floats do, and every region / binade edge must give the float32 result.
    rng = np.random.default_rng(7)
    n = 20_000
    s = np.minimum(np.abs(rng.standard_normal(n)) * theta * 1.05, 3.4e38).astype(np.float32)
    special = rng.random(n)
    s[special < 0.02] = -0.0
    s[(special >= 0.02) & (special < 0.03)] = np.nan
    s[(special >= 0.03) & (special < 0.035)] = np.inf
    s[(special >= 0.035) & (special < 0.05)] *= -1
    s[(special >= 0.05) & (special < 0.06)] = 0.0
    with np.errstate(over="ignore"):  # theta*up may round to inf, as in float32 hardware
        m1, t1 = quantile_pass_reference(s, theta, q, q_step)
    m2, t2 = quantile_pass(s, theta, q, q_step)
    assert np.array_equal(m1, m2)
    assert t1.tobytes() == t2.tobytes()
    assert 0 < m1.sum() < n  # both decisions occur


def _bits(x):
    return np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64)


def _from_bits(b):
    return np.asarray(b, dtype=np.int64).astype(np.int32).view(np.float32)


@pytest.mark.parametrize("theta,q,q_step,near", [
    (1.3e-4, 0.9, 1e-6, 3000),     # the benchmark's factors; band of a 256-block ~2300 ulps
    (0.0234373, 0.9, 1e-6, 600),   # theta on a region edge (the attractor of the benchmark)
    (2.1e-7, 0.067, 4e-6, 9000),    # narrower regions: many blocks cross one
    (0.7, 0.5, 1e-5, 60_000),       # larger steps: regions a few blocks wide
])
def test_bulk_blocks_match_reference_on_adversarial_streams(theta, q, q_step, near):
    # Blocks of scores far from theta (decided in bulk) alternate with blocks whose
    # scores sit within `near` ulps of theta's start (band edges, scores equal to
    # theta, keys right at b +- (m-1)*step), zeros, NaN and negative scores: every
    # branch of golden.quantile._blocks must give the float32 reference bits.
    rng = np.random.default_rng(11)
    n = 40 * 256 + 77  # a partial block at the front
    b0 = int(_bits(theta))
    far = np.where(rng.random(n) < 1 - q, theta * 50.0, theta / 50.0)
    near_b = b0 + rng.integers(-near, near + 1, n)
    s = np.asarray(far, dtype=np.float32)
    blk = (np.arange(n) // 256) % 3 == 1
    s[blk] = _from_bits(near_b[blk])
    s[rng.random(n) < 0.002] = 0.0
    s[rng.random(n) < 0.002] = np.nan
    s[rng.random(n) < 0.002] = -theta
    s[5 * 256 + 3] = np.float32(theta)  # exactly theta, inside a bulk-looking block
    m1, t1 = quantile_pass_reference(s, theta, q, q_step)
    stats = np.zeros(3, dtype=np.int64)
    m2, t2 = quantile_pass(s, theta, q, q_step, stats=stats)
    m3, t3 = quantile_pass(s, theta, q, q_step, bulk=False)
    assert np.array_equal(m1, m2) and np.array_equal(m1, m3)
    assert t1.tobytes() == t2.tobytes() == t3.tobytes()
    assert stats[0] > 0 and stats[1] > 0  # both the bulk step and the chain ran


def test_bulk_matches_chain_on_long_converging_stream():
    # Several passes over 300k half-normal scores from q_init: theta travels down
    # across region and binade edges, then settles (mostly bulk blocks).
    rng = np.random.default_rng(3)
    s = np.abs(rng.standard_normal(300_000) * 1e-4).astype(np.float32)
    ta = tb = np.float32(1e-2)
    stats = np.zeros(3, dtype=np.int64)
    for _ in range(6):
        ma, ta = quantile_pass(s, ta, 0.9, 1e-5, stats=stats)
        mb, tb = quantile_pass(s, tb, 0.9, 1e-5, bulk=False)
        assert np.array_equal(ma, mb) and ta.tobytes() == tb.tobytes()
    assert stats[0] > stats[1] > 0  # mostly bulk, the chain at region edges


@pytest.mark.parametrize("theta,frac,q,q_step", [
    (0.0234373, 0.093, 0.9, 1e-6),  # pinned on the down-factor tie pattern 1.5 * 2**-6
    (0.015625, 0.093, 0.9, 1e-6),   # on a binade edge (no integer form just below it)
    (0.0234373, 0.5, 0.5, 3e-6),    # other factors: other edges
])
def test_theta_pinned_on_a_region_edge_matches_reference(theta, frac, q, q_step):
    # Bimodal scores (the benchmark's quantile mode after a few steps): every score
    # is far from theta, so theta settles where the step sizes on either side of a
    # region edge balance the tracked fraction, and stays within a few ulps of that
    # edge (and on its tie pattern, which belongs to no region): the chain's edge
    # steps (golden.quantile._edge_steps) run most of the time.
    rng = np.random.default_rng(5)
    n = 60_000
    s = np.where(rng.random(n) < frac, theta * (2 + rng.random(n)),
                 theta * 1e-3 * rng.random(n)).astype(np.float32)
    t_ref = t_fast = np.float32(theta)
    for _ in range(2):
        m1, t_ref = quantile_pass_reference(s, t_ref, q, q_step)
        m2, t_fast = quantile_pass(s, t_fast, q, q_step)
        assert np.array_equal(m1, m2)
        assert t_ref.tobytes() == t_fast.tobytes()


def test_stats_argument_checked():
    with pytest.raises(ValueError, match=r"stats must be None or an int64 numpy array of shape"):
        quantile_pass([1.0], 0.5, 0.5, 0.1, stats=np.zeros(2, dtype=np.int64))


# Region edges of the benchmark's factors (q = 0.9, q_step = 1e-6: up = 1 + 8*2**-23,
# down = 1 - 2*2**-24), with theta's significand m: the down step round(m*2/2**24)
# changes from 1 to 2 at m = 1.5*2**23 (an exact tie there, rounded to even: a tie
# pattern that belongs to no region), the up step round(m*8/2**23) from 11 to 12 at
# m = 1.4375*2**23 (also a tie); 2**-6 is a binade edge. The others were found by
# scanning the region edges of other factors for each way the straddling walk
# (golden.quantile._edge_bulk) can go: the down step alone changes (uniform up)
# with da and da - db powers of two or not, the tie pattern stepping like the
# region above or none; the up step alone changes (uniform down), with a tie or
# without; both change (the general walk, _downs per run).
_UP, _DOWN, _GENERAL = 1, 2, 0  # golden.quantile._WALK_*
_EDGES = [(1.5 * 2**-6, 0.9, 1e-6, _UP),            # da = 2, db = 1: shifts; tie steps as A
          (1.4375 * 2**-6, 0.9, 1e-6, _DOWN),       # ib = 11, ia = 12, with a tie
          (0.0166015625, 0.9, 1e-6, _DOWN),         # ib = 8, ia = 9, the tie steps as B
          (0.0234373, 0.5, 3e-6, _DOWN),            # ib = 19, ia = 20
          (0.015964676, 0.9, 3e-6, _DOWN),          # ib = 23, ia = 24, no tie
          (0.021875, 0.9, 3e-6, _UP),               # da = 4, db = 3: shifts, no tie
          (0.028125001, 0.9, 3e-6, _UP),            # da = 5, db = 4: the divide by mag
          (0.021484375, 0.9, 5e-6, _UP),            # da = 6, db = 5: the divide; tie as A
          (0.017578125, 0.9, 5e-6, _UP),            # da = 5, db = 4, the tie steps as B
          (0.0171875, 0.9, 6e-6, _GENERAL),         # up 49 -> 50 and down 5 -> 6
          (2.0**-6, 0.9, 1e-6, None)]               # binade edge: no straddling walk


def _walk_kind_at(theta, q, q_step):
    """The straddling walk that blocks starting at ``theta`` take, None if none."""
    from golden.quantile import _consts, _edge_pieces, _region, _region_cache, _walk_kind, factors
    up, down = factors(q, q_step)
    u, d = _consts(up, down)
    b = int(_bits(theta))
    lo, hi, inc, dec = _region(b, u, d)
    ok, lb, hb, ib, db, tp, it, dt, la, ha, ia, da = _edge_pieces(
        b, u, d, up, down, _region_cache(), lo, hi, inc, dec)
    return int(_walk_kind(ib, db, tp, it, dt, ia, da)) if ok else None


@pytest.mark.parametrize("edge,q,q_step,kind", _EDGES)
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_straddling_bulk_blocks_match_reference(edge, q, q_step, kind, offset):
    # theta starts exactly at, one ulp below or above an edge; the scores are far
    # from theta (decisions known) in blocks of every kind: all tracked, none
    # tracked, the fraction tracked that pins theta on the edge; and a few blocks
    # with scores equal to the starting theta or within a few ulps of it (the
    # serial chain, when theta is still near them).
    # The straddling bulk step (golden.quantile._edge_bulk) must give the float32
    # reference bits, mask and theta, after every block.
    rng = np.random.default_rng(abs(hash((edge, q, offset))) % 2**32)
    theta = _from_bits(int(_bits(edge)) + offset)[()]
    assert _walk_kind_at(theta, q, q_step) == kind  # the walk this case is for
    n = 24 * 256 + 100
    frac = np.repeat(rng.choice([0.0, 1.0, 0.093, 0.093, 0.093, 0.3], n // 256 + 1), 256)[:n]
    s = np.where(rng.random(n) < frac, theta * (2 + rng.random(n)),
                 theta * 1e-3 * rng.random(n)).astype(np.float32)
    blk = np.arange(n) // 256
    near = (blk % 7 == 3) & (blk < 20)  # not among the first blocks visited (the last)
    s[near] = _from_bits(int(_bits(theta)) + rng.integers(-3, 4, int(near.sum())))
    s[7 * 256 + 5] = theta
    stats = np.zeros(3, dtype=np.int64)
    t_ref = t_fast = theta
    for _ in range(2):
        m1, t_ref = quantile_pass_reference(s, t_ref, q, q_step)
        m2, t_fast = quantile_pass(s, t_fast, q, q_step, stats=stats)
        assert np.array_equal(m1, m2)
        assert t_ref.tobytes() == t_fast.tobytes()
    if kind is not None:  # a binade edge has no integer form below it: the chain
        assert stats[2] > 0  # the straddling bulk step ran


@pytest.mark.parametrize("edge,q,q_step,kind", [e for e in _EDGES if e[3] is not None])
@pytest.mark.parametrize("n", [37, 100, 255])
def test_straddling_block_of_any_length_matches_reference(edge, q, q_step, kind, n):
    # one block, shorter than a bulk block and not a whole number of 64-key words:
    # the tracked positions of its first keys come from the scalar tail of
    # golden.quantile._tracked_positions, not from the 64-wide compress
    rng = np.random.default_rng(n)
    theta = np.float32(edge)
    s = np.where(rng.random(n) < 0.3, theta * (2 + rng.random(n)),
                 theta * 1e-3 * rng.random(n)).astype(np.float32)
    stats = np.zeros(3, dtype=np.int64)
    m1, t_ref = quantile_pass_reference(s, theta, q, q_step)
    m2, t_fast = quantile_pass(s, theta, q, q_step, stats=stats)
    assert np.array_equal(m1, m2)
    assert t_ref.tobytes() == t_fast.tobytes()
    assert stats[2] == 1  # the block took the straddling bulk step


_EDGE_RUN = []  # the compiled driver of _edge_run_at, built once per process


def _edge_run_driver():
    """A compiled caller of golden.quantile._edge_run (an inline-only kernel).
    Built on first use and kept: each build compiles the run (seconds)."""
    if not _EDGE_RUN:
        import numba

        from golden.quantile import _edge_run, _run_consts

        @numba.njit
        def go(key, b, pc, mask, pos):
            stats = np.zeros(3, dtype=np.int64)
            ok, imax, dmax, mag, kind, a0, sh, se = _run_consts(pc[2], pc[3], pc[4], pc[5],
                                                                 pc[6], pc[7], pc[9], pc[10])
            end, b = _edge_run(key, key.shape[0], b, pc[0], pc[1], pc[2], pc[3], pc[4], pc[5],
                               pc[6], pc[7], pc[8], pc[9], pc[10], imax, dmax, mag, kind, a0,
                               sh, se, mask, 0, stats, pos)
            return ok, end, b, stats[2]

        _EDGE_RUN.append(go)
    return _EDGE_RUN[0]


def _edge_run_at(s, theta, q, q_step):
    """golden.quantile._edge_run over the keys of ``s`` from ``theta`` (the pieces
    of theta's edge): (end, theta after the blocks it took, mask, blocks taken)."""
    from golden.quantile import _consts, _edge_pieces, _region, _region_cache, factors

    up, down = factors(q, q_step)
    u, d = _consts(up, down)
    b = int(_bits(theta))
    lo, hi, inc, dec = _region(b, u, d)
    ok, *pieces = _edge_pieces(b, u, d, up, down, _region_cache(), lo, hi, inc, dec)
    assert ok
    key = np.where(s > 0, _bits(s), 0).astype(np.int32)
    mask = np.zeros(s.shape[0], dtype=bool)
    ok, end, bits, taken = _edge_run_driver()(key, b, np.array(pieces, dtype=np.int64), mask,
                                              np.empty(_POS_LEN, dtype=np.int32))
    assert ok == 1  # the straddling step applies to these pieces
    return int(end), _from_bits(bits)[()], mask, int(taken)


def _pinned_stream(theta, q, q_step, n):
    """Scores far from ``theta`` that keep the reference's theta within one step
    of ``theta`` (tracked when theta is at or below it): every block straddles."""
    from golden.quantile import factors
    up, down = factors(q, q_step)
    s = np.empty(n, dtype=np.float32)
    t = theta
    for i in range(n - 1, -1, -1):
        if t <= theta:
            s[i], t = theta * 3, np.float32(t * up)
        else:
            s[i], t = theta * 1e-3, np.float32(t * down)
    return s


@pytest.mark.parametrize("edge,q,q_step,kind", [e for e in _EDGES if e[3] is not None])
def test_edge_run_stops_where_blocks_leave_it(edge, q, q_step, kind):
    # golden.quantile._edge_run takes consecutive straddling blocks; the blocks it
    # took must match the float32 reference (mask and theta), and it must stop
    # before a block with a key in its band (in a 64-key word, or in the scalar
    # tail of a block that is not a whole number of words) and before a block the
    # plain bulk step takes (theta pushed far above the edge by a block of
    # tracked scores). _blocks then takes that block (the tests above).
    theta = np.float32(edge)
    n = 12 * 256 + 100  # visited last to first: the partial block (100) comes last
    s = _pinned_stream(theta, q, q_step, n)

    def check(s, end_expected, past=None):
        # stops exactly at end_expected, or (past) after taking that block
        end, t, mask, taken = _edge_run_at(s, theta, q, q_step)
        m_ref, t_ref = quantile_pass_reference(s[end:], theta, q, q_step)
        assert end <= past if past is not None else end == end_expected
        assert taken == (n - end + 255) // 256
        assert np.array_equal(mask[end:], m_ref)
        assert t.tobytes() == t_ref.tobytes()

    check(s, 0)  # every block, the partial one too
    # a key equal to theta at a block's entry: in a 64-key word, in the partial
    # block's word and in its scalar tail (its first 100 % 64 = 36 keys)
    for blk, at in ((5, 200), (5, 17), (12, 40), (12, 17)):
        s2 = s.copy()
        start = max(0, n - 256 * (blk + 1))  # block `blk` in visit order
        _, t_ref = quantile_pass_reference(s2[n - 256 * blk:], theta, q, q_step)
        s2[start + at] = t_ref
        check(s2, n - 256 * blk)
    # keys on the band's bounds (b - (m-1)*dmax, b + (m-1)*imax] of block 5 (m =
    # 256, in a word) and of the partial block (m = 100, in the tail): the bounds
    # themselves are in the band (the run stops), one ulp outside they are not
    # (the run takes the block; theta, moved by the key, may then leave the edge)
    from golden.quantile import _consts, _edge_pieces, _region, _region_cache, factors
    up, down = factors(q, q_step)
    u, d = _consts(up, down)
    b0 = int(_bits(theta))
    _, lb, hb, ib, db, tp, it, dt, la, ha, ia, da = _edge_pieces(
        b0, u, d, up, down, _region_cache(), *_region(b0, u, d))
    imax, dmax = max(ib, it, ia), max(db, dt, da)
    for blk, at, m in ((5, 100, 256), (12, 20, 100)):
        start = max(0, n - 256 * (blk + 1))
        _, t_ref = quantile_pass_reference(s[n - 256 * blk:], theta, q, q_step)
        b = int(_bits(t_ref))
        for key, inside in ((b + (m - 1) * imax, True), (b + (m - 1) * imax + 1, False),
                            (b - (m - 1) * dmax, False), (b - (m - 1) * dmax + 1, True)):
            s2 = s.copy()
            s2[start + at] = _from_bits(key)
            check(s2, n - 256 * blk, past=None if inside else start)
    s3 = s.copy()
    s3[n - 4 * 256:n - 3 * 256] = theta * 3  # block 3 all tracked: far above the edge
    check(s3, n - 4 * 256)


_SCAN64 = {}


def _scan64_driver(native):
    """A compiled caller of golden.quantile._band_scan64 with the path as an argument
    (the estimator takes the one for this CPU; both are checked here). ``native``:
    the compress path's AVX-512 register-form IR, else its portable IR (LLVM's
    masked.compressstore); the flag is read when the caller compiles."""
    if native not in _SCAN64:
        import numba

        import golden.quantile as gq

        @numba.njit(cache=False)
        def go(kv, blo, bhi, mask, pos, compress):
            n = np.int64(0)
            nb = np.int64(0)
            top = kv.shape[0]
            while top >= 64:
                n, b = gq._band_scan64(kv, top - 64, blo, bhi, mask, 0, pos, n,
                                       np.int32(kv.shape[0] - top), compress)
                nb += b
                top -= 64
            return n, nb

        saved = gq._COMPRESS
        gq._COMPRESS = native
        try:  # compile both specializations now, under the flag
            for c in (True, False):
                go(np.zeros(64, np.int32), np.int32(0), np.int32(0), np.zeros(64, bool),
                   np.zeros(_POS_LEN, np.int32), c)
        finally:
            gq._COMPRESS = saved
        _SCAN64[native] = go
    return _SCAN64[native]


@pytest.mark.parametrize("path", ["compress-avx512", "compress-portable", "table"])
@pytest.mark.parametrize("frac", [0.0, 0.03, 0.5, 1.0])
def test_band_scan_paths_give_mask_positions_and_band_count(path, frac):
    # Each way of listing the tracked positions of 64-key words (AVX-512's
    # register-form compress and full stores, the portable compress-store IR, the
    # byte table) against plain numpy: the mask, the visit positions (0: the last
    # key) ascending, the counts; words of all-zero, all-one and sparse bits, and
    # the band's own edges (blo excluded, bhi included). The entries written past
    # the last position stay inside _POS_SLACK.
    if path == "compress-avx512" and not _host_has_avx512():
        pytest.skip("this CPU has no AVX-512F, so the register-form compress cannot run")
    compress = path != "table"
    rng = np.random.default_rng(int(frac * 100) + compress)
    m = 256
    kv = np.where(rng.random(m) < frac, 5000, 0).astype(np.int32)
    kv += rng.integers(0, 40, m).astype(np.int32)
    kv[rng.integers(0, m, 8)] = 1000  # on blo: outside the band
    kv[rng.integers(0, m, 8)] = 2000  # on bhi: inside it
    blo, bhi = np.int32(1000), np.int32(2000)
    mask = np.zeros(m, dtype=bool)
    pos = np.full(_POS_LEN, -7, dtype=np.int32)
    n, nb = _scan64_driver(path == "compress-avx512")(kv, blo, bhi, mask, pos, compress)
    above = kv > bhi
    assert np.array_equal(mask, above)
    want = np.sort(m - 1 - np.nonzero(above)[0])
    assert n == want.size and np.array_equal(pos[:n], want)
    assert (pos[n + _POS_SLACK:] == -7).all()  # nothing written past the slack
    assert nb == int(((kv > blo) & (kv <= bhi)).sum())
