"""Bit-exact fixed-point CubistMerge (golden.cubist_fixed) against golden/CUBIST_FIXED.md."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cubist_golden import GRID, LINE  # the hand-worked cases, shared

from golden.cubist_fixed import (
    agreement,
    key,
    merge_1d_fixed,
    merge_2d_fixed,
    merge_2d_fixed_batch,
    merge_2d_fixed_info,
    quantize,
    random_frames,
    unmerge_fixed,
)

# --- a literal, loop-by-loop reading of CUBIST_FIXED.md (Python ints only) ----------


def ref_key(a, b, f):
    d = sum(x * y for x, y in zip(a, b))
    na, nb = sum(x * x for x in a), sum(y * y for y in b)
    if na == 0 or nb == 0:
        return 0
    q = (d * d * 2**f) // (na * nb)
    return -q if d < 0 else q


def ref_pass(x, r, f):
    n = len(x)
    r = min(r, n // 2)
    s = [ref_key(x[i], x[i + 1], f) for i in range(n - 1)]
    cands = []  # (score, k, points_right)
    for k in range(n // 2):
        left = s[2 * k]
        right = s[2 * k + 1] if 2 * k + 2 < n else None
        pr = right is not None and right > left
        cands.append((right if pr else left, k, pr))
    ranked = sorted(cands, key=lambda t: (-t[0], t[1]))
    removed = {2 * k + 1: pr for _, k, pr in ranked[:r]}
    vals = [list(t) for t in x]

    def mm(a, b):
        return [bv if abs(bv) > abs(av) else av for av, bv in zip(a, b)]

    for e in range(0, n, 2):
        acc = list(x[e])
        if removed.get(e - 1) is True:
            acc = mm(acc, x[e - 1])
        if removed.get(e + 1) is False:
            acc = mm(acc, x[e + 1])
        vals[e] = acc
    kept = [i for i in range(n) if i not in removed]
    out_of = {p: o for o, p in enumerate(kept)}
    dest = [out_of[p] if p in out_of else out_of[p + 1 if removed[p] else p - 1] for p in range(n)]
    return [vals[p] for p in kept], dest


def ref_2d(tokens, h, w, r_h, r_w, prefix, f):
    pre, grid = tokens[:prefix], tokens[prefix:]
    rows, hmaps = [], []
    for i in range(h):
        out, m = ref_pass(grid[i * w : (i + 1) * w], r_w, f)
        rows.append(out)
        hmaps.append(m)
    w2 = len(rows[0])
    cols, vmaps = [], []
    for j in range(w2):
        out, m = ref_pass([rows[i][j] for i in range(h)], r_h, f)
        cols.append(out)
        vmaps.append(m)
    h2 = len(cols[0])
    merged = pre + [cols[j][i] for i in range(h2) for j in range(w2)]
    mmap = [vmaps[hmaps[i][j]][i] * w2 + hmaps[i][j] for i in range(h) for j in range(w)]
    return merged, mmap


# --- key -------------------------------------------------------------------------------


@pytest.mark.parametrize("f", [8, 16, 24])
def test_key_edge_cases(f):
    one = 1 << f
    assert key([0, 0, 0], [1, 2, 3], f).item() == 0  # all-zero token: similarity 0
    assert key([1, 2, 3], [0, 0, 0], f).item() == 0
    assert key([0, 0], [0, 0], f).item() == 0
    assert key([-128] * 64, [-128] * 64, f).item() == one  # parallel
    assert key([3, -4], [6, -8], f).item() == one
    assert key([-128, 5], [127, -5], f).item() == -ref_key([128, -5], [127, -5], f)
    assert key([-128] * 64, [127] * 64, f).item() == -one  # anti-parallel
    assert key([5, -7, 1], [-5, 7, -1], f).item() == -one
    assert key([1, 0], [0, -1], f).item() == 0  # orthogonal
    # cos = 1/sqrt(2): cos*|cos| = 1/2 exactly; cos = 1/sqrt(3) truncates toward zero.
    assert key([1, 0], [1, 1], f).item() == one // 2
    assert key([1, 0, 0], [-1, 1, 1], f).item() == -(one // 3)


def test_key_batched_and_exact_fallback():
    g = np.random.default_rng(0)
    a = g.integers(-32768, 32768, (50, 64))
    b = g.integers(-32768, 32768, (50, 64))
    a[0] = -32768
    b[0] = -32768  # the largest possible products: needs the exact (non-int64) path
    for f in (8, 16, 24):
        got = key(a, b, f).tolist()
        assert got == [ref_key(a[i].tolist(), b[i].tolist(), f) for i in range(50)]
    assert got[0] == 1 << 24
    a8, b8 = a // 256, b // 256
    assert key(a8, b8, 16).tolist() == [ref_key(u.tolist(), v.tolist(), 16) for u, v in zip(a8, b8)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8).flatmap(lambda c: st.tuples(
    st.lists(st.integers(-128, 127), min_size=c, max_size=c),
    st.lists(st.integers(-128, 127), min_size=c, max_size=c),
    st.integers(8, 24),
)))
def test_key_matches_definition(args):
    a, b, f = args
    k = key(a, b, f).item()
    assert k == ref_key(a, b, f)
    assert -(1 << f) <= k <= 1 << f


# --- hand-worked cases (the same ones as the float tests, in ints) -------------------


def test_three_way_merge_by_hand():
    res = merge_1d_fixed(LINE, 2)
    # keys: cand 1 right = key(x1, x2) = 13^2 * 2^16 // 196 = 56508; cand 3 left
    # = 100 * 2^16 // 238 = 27536.  Merge into token 2 exactly as in the float test.
    assert key(LINE[1], LINE[2]).item() == 56508
    assert key(LINE[2], LINE[3]).item() == 27536
    assert res.merged.tolist() == [[-5, 0, 1], [2, 3, -3], [0, -1, 4]]
    assert res.dest_index.tolist() == [0, 1, 1, 1, 2]
    assert res.removed.tolist() == [False, True, False, True, False]
    assert merge_1d_fixed(LINE, 1).merged.tolist() == [[-5, 0, 1], [2, 2, -3], [-2, 3, -2],
                                                       [0, -1, 4]]


def test_2d_by_hand_odd_width():
    # Row 0 tie: key([1,0],[1,1]) == key([1,1],[0,1]) == 2^15 -> points left.
    merged, mmap = merge_2d_fixed(GRID, (2, 3), (1, 1), prefix=1)
    assert merged.tolist() == [[7, 7], [1, -3], [4, 1]]
    assert mmap.tolist() == [0, 0, 1, 0, 0, 1]
    assert unmerge_fixed(merged, mmap, 1).tolist() == [
        [7, 7], [1, -3], [1, -3], [4, 1], [1, -3], [1, -3], [4, 1]
    ]


def test_minus_128_has_the_largest_magnitude():
    # |-128| = 128 > 127: the source -128 replaces the destination's 127.
    # cand 1: key(x0, x1) > 0 (cos ~ 0.22) beats key(x1, x2) < 0, so it points left;
    # cand 3 only has its left key, -2^16.  r = 1 removes cand 1 into token 0.
    line = [[127, 100, 100], [-128, 127, 127], [0, 0, -128], [0, 0, 1]]
    res = merge_1d_fixed(line, 1)
    assert res.merged.tolist() == [[-128, 127, 127], [0, 0, -128], [0, 0, 1]]


# --- the vectorized model against the literal reading ---------------------------------

frames = st.tuples(
    st.integers(2, 6),  # H
    st.integers(2, 7),  # W
    st.integers(1, 4),  # C
    st.integers(0, 4),  # r_h
    st.integers(0, 4),  # r_w
    st.integers(0, 2),  # prefix
    st.sampled_from([8, 12, 16]),  # frac_bits
    st.integers(0, 2**31 - 1),
    st.sampled_from([2, 128]),  # value spread: 2 -> many exact ties
)


@settings(max_examples=150, deadline=None)
@given(frames)
def test_matches_literal_reference(params):
    h, w, c, r_h, r_w, prefix, f, seed, spread = params
    g = np.random.default_rng(seed)
    t = g.integers(-spread, min(spread, 127) + 1, (prefix + h * w, c))
    merged, mmap = merge_2d_fixed(t, (h, w), (r_h, r_w), prefix=prefix, frac_bits=f)
    ref_merged, ref_map = ref_2d(t.tolist(), h, w, r_h, r_w, prefix, f)
    assert merged.tolist() == ref_merged
    assert mmap.tolist() == ref_map
    # the unmerge puts every token's output back in its slot
    assert unmerge_fixed(merged, mmap, prefix).tolist() == (
        t[:prefix].tolist() + [ref_merged[prefix + m] for m in ref_map]
    )


def test_batch_equals_single_frames_width16():
    g = np.random.default_rng(3)
    t = g.integers(-32768, 32768, (4, 2 + 6 * 5, 8))
    merged, mmap = merge_2d_fixed_batch(t, (6, 5), (2, 2), prefix=2, width=16)
    assert tuple(merged.shape) == (4, 2 + 4 * 3, 8)
    for i in range(4):
        m1, map1 = merge_2d_fixed(t[i], (6, 5), (2, 2), prefix=2, width=16)
        assert torch.equal(m1, merged[i]) and torch.equal(map1, mmap[i])
        ref_merged, ref_map = ref_2d(t[i].tolist(), 6, 5, 2, 2, 2, 16)
        assert m1.tolist() == ref_merged and map1.tolist() == ref_map
    assert torch.equal(unmerge_fixed(merged, mmap, 2)[1], unmerge_fixed(merged[1], mmap[1], 2))


# --- agreement with the float model ------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_agreement_with_float_model(kind):
    """Removed-token decisions of the fixed model (on 8-bit ints) vs the float model (on
    the dequantized floats): 14x14 grid, C = 64, r = (2, 2), 200 frames, per-frame scale.

    Measured (share of the float model's 10400 removed tokens also removed by the fixed
    model; frames with identical merge maps in brackets):

    | frac_bits | random          | smooth          |
    |-----------|-----------------|-----------------|
    | 12        | 98.99% (153/200)| 100% (200/200)  |
    | 16        | 99.92% (198/200)| 100% (200/200)  |
    | 20        | 100% (200/200)  | 100% (200/200)  |

    Disagreements come from keys that truncate two close cosines to the same value,
    then broken by position.  The default frac_bits stays 16.
    """
    x = random_frames(kind, 200, (14, 14), 64, seed=1)
    a = agreement(x, (14, 14), (2, 2), frac_bits=16)
    assert a.removed_total == 200 * (196 - 144)
    assert a.rate >= 0.99
    assert a.frames_identical >= 190


def test_agreement_counts_disagreements():
    # Coarse keys (F = 8) on random data must show some disagreement: the measure can fail.
    x = random_frames("random", 50, (14, 14), 64, seed=2)
    a = agreement(x, (14, 14), (2, 2), frac_bits=8)
    assert a.removed_agree < a.removed_total


# --- quantize -------------------------------------------------------------------------


def test_quantize():
    x = torch.tensor([[-2.0, -0.5, 0.0], [0.25, 1.0, 2.0]])
    q, scale = quantize(x, 8)
    assert scale == pytest.approx(2.0 / 127)
    # 0.25 / (2/127) = 15.875 -> 16; 1.0 -> 63.5 -> 64 (half to even); -0.5 -> -31.75 -> -32
    assert q.tolist() == [[-127, -32, 0], [16, 64, 127]]
    assert q.dtype == torch.int64
    q16, s16 = quantize(np.array([3.0, -1.5]), 16)
    assert q16.tolist() == [32767, -16384] and s16 == pytest.approx(3.0 / 32767)
    qz, sz = quantize(torch.zeros(3), 8)
    assert qz.tolist() == [0, 0, 0] and sz == 1.0


# --- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 12}, "width must be 8 or 16, got 12"),
        ({"frac_bits": 7}, r"frac_bits must be an integer in 8\.\.24, got 7"),
        ({"frac_bits": 25}, r"frac_bits must be an integer in 8\.\.24, got 25"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge_2d_fixed(np.zeros((4, 2), dtype=np.int64), (2, 2), (1, 1), **kwargs)


def test_bad_tokens():
    with pytest.raises(ValueError, match=r"tokens must lie in \[-128, 127\] for width=8"):
        merge_2d_fixed(np.full((4, 2), 128), (2, 2), (1, 1))
    with pytest.raises(ValueError, match=r"tokens must lie in \[-32768, 32767\] for width=16"):
        merge_2d_fixed(np.full((4, 2), -32769), (2, 2), (1, 1), width=16)
    with pytest.raises(ValueError, match="tokens must hold integers"):
        merge_2d_fixed(np.zeros((4, 2)), (2, 2), (1, 1))
    with pytest.raises(ValueError, match=r"tokens must be one frame \[prefix \+ H\*W, C\]"):
        merge_2d_fixed(np.zeros((1, 4, 2), dtype=np.int64), (2, 2), (1, 1))
    with pytest.raises(ValueError, match=r"tokens has 4 tokens but prefix \+ H\*W"):
        merge_2d_fixed(np.zeros((4, 2), dtype=np.int64), (2, 2), (1, 1), prefix=1)
    with pytest.raises(ValueError, match="r_w must be an integer >= 0"):
        merge_2d_fixed_info(np.zeros((1, 4, 2), dtype=np.int64), (2, 2), (1, -1))
    with pytest.raises(ValueError, match="a and b must have the same channel count"):
        key([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="width must be 8 or 16"):
        quantize(torch.zeros(2), 4)
    with pytest.raises(ValueError, match="x_float must be a floating-point array"):
        quantize(torch.zeros(2, dtype=torch.int64))
