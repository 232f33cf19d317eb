"""Float CubistMerge golden model (golden.cubist)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from golden.cubist import merge_1d, merge_2d, merge_2d_info, merge_map_2d

# Hand-worked line (C = 3), also used (as ints) by tests/test_cubist_fixed.py:
#   cos(x0, x1) < 0, cos(x1, x2) = 13/14, cos(x2, x3) = 10/sqrt(14*17) ~ 0.648, cos(x3, x4) < 0
#   candidate 1 points right (to 2), score 0.929; candidate 3 points left (to 2), score 0.648.
LINE = [[-5, 0, 1], [2, 1, -3], [1, 2, -3], [-2, 3, -2], [0, -1, 4]]


def test_three_way_merge_by_hand():
    x = torch.tensor(LINE, dtype=torch.float32)
    res = merge_1d(x, 2)
    # Both candidates removed into token 2; per channel, dest then left then right:
    #   ch0: 1 -> 2 (|2| > |1|) -> 2 (|-2| == |2|: left source wins the tie)
    #   ch1: 2 -> 2 (|1| < |2|) -> 3
    #   ch2: -3 -> -3 (tie: destination wins) -> -3
    assert res.merged.tolist() == [[-5, 0, 1], [2, 3, -3], [0, -1, 4]]
    assert res.dest_index.tolist() == [0, 1, 1, 1, 2]
    assert res.removed.tolist() == [False, True, False, True, False]


def test_one_removal_picks_best_score_by_hand():
    res = merge_1d(torch.tensor(LINE, dtype=torch.float32), 1)
    # Only candidate 1 (score 0.929 > 0.648) goes; it merges right into token 2:
    # max-magnitude of [1, 2, -3] and [2, 1, -3] is [2, 2, -3].
    assert res.merged.tolist() == [[-5, 0, 1], [2, 2, -3], [-2, 3, -2], [0, -1, 4]]
    assert res.dest_index.tolist() == [0, 1, 1, 2, 3]


def test_last_candidate_of_even_line_points_left():
    # N = 4: candidate 3 has no right neighbour (-inf), so it points left even though
    # token 2 is anti-parallel to it; candidate 1 is less similar to both neighbours.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    res = merge_1d(x, 1)
    # scores: cand 1 = max(cos(x0,x1)=0, cos(x1,x2)=0.707) = 0.707, cand 3 = -1.
    assert res.removed.tolist() == [False, True, False, False]
    res = merge_1d(x, 2)
    assert res.dest_index.tolist() == [0, 1, 1, 1]
    # token 2 absorbs x1 (from left) and x3 (from right): [1,1] vs [0,1] vs [-1,-1] -> [1, 1]
    assert res.merged.tolist() == [[1, 0], [1, 1]]


# Hand-worked 2-D case: prefix 1, H = 2, W = 3 (odd), r = (1, 1), C = 2.
GRID = [[7, 7], [1, 0], [1, 1], [0, 1], [0, -2], [1, -3], [4, -1]]


def test_2d_by_hand_odd_width():
    x = torch.tensor([GRID], dtype=torch.float32)
    info = merge_2d_info(x, (2, 3), (1, 1), prefix=1)
    # Row 0: cos([1,0],[1,1]) == cos([1,1],[0,1]) = 0.707: tie -> points left; merged
    #        [1,0] with [1,1] -> [1,1] (ch0 tie: destination wins).  Row -> [1,1], [0,1].
    # Row 1: cos([0,-2],[1,-3]) = 0.949 > cos([1,-3],[4,-1]) = 0.537 -> left;
    #        [0,-2] with [1,-3] -> [1,-3].  Row -> [1,-3], [4,-1].
    # Columns (H = 2): row 1 is the only candidate and points left (no row 2):
    #   col 0: [1,1] with [1,-3] -> [1,-3];  col 1: [0,1] with [4,-1] -> [4,1].
    assert info.merged.tolist() == [[[7, 7], [1, -3], [4, 1]]]
    assert info.merge_map.tolist() == [[0, 0, 1, 0, 0, 1]]
    assert info.removed.tolist() == [[False, True, False, True, True, True]]
    assert info.removed_h.tolist() == [[[False, True, False], [False, True, False]]]
    assert info.removed_v.tolist() == [[[False, False], [True, True]]]
    merged, unmerge = merge_2d(x, (2, 3), (1, 1), prefix=1)
    assert unmerge(merged).tolist() == [
        [[7, 7], [1, -3], [1, -3], [4, 1], [1, -3], [1, -3], [4, 1]]
    ]


grids = st.tuples(
    st.integers(1, 3),  # B
    st.integers(2, 7),  # H
    st.integers(2, 7),  # W
    st.integers(1, 5),  # C
    st.integers(0, 4),  # r_h
    st.integers(0, 4),  # r_w
    st.integers(0, 2),  # prefix
    st.integers(0, 2**31 - 1),  # seed
)


def _make(b, h, w, c, prefix, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Small integers: many exact ties in values and in similarities.
    return torch.randint(-3, 4, (b, prefix + h * w, c), generator=g).to(dtype)


@settings(max_examples=120, deadline=None)
@given(grids)
def test_2d_properties(params):
    b, h, w, c, r_h, r_w, prefix, seed = params
    x = _make(b, h, w, c, prefix, seed)
    info = merge_2d_info(x, (h, w), (r_h, r_w), prefix=prefix)
    h2, w2 = h - min(r_h, h // 2), w - min(r_w, w // 2)
    assert info.merged.shape == (b, prefix + h2 * w2, c)
    assert torch.equal(info.merged[:, :prefix], x[:, :prefix])  # prefix untouched
    grid = x[:, prefix:]
    out = info.merged[:, prefix:]
    for bi in range(b):
        m = info.merge_map[bi]
        kept = ~info.removed[bi]
        # Survivors are one per output token ...
        assert sorted(m[kept].tolist()) == list(range(h2 * w2))
        # ... in original order along each row (horizontal pass) and each column.
        mh = info.merge_map[bi].reshape(h, w) % w2
        for i in range(h):
            assert mh[i][~info.removed_h[bi, i]].tolist() == list(range(w2))
        pos = torch.nonzero(kept.reshape(h, w)).tolist()  # row-major (i, j)
        for j2 in range(w2):
            rows = [m[i * w + j].item() // w2 for i, j in pos if m[i * w + j] % w2 == j2]
            assert rows == list(range(h2))
        for t in range(h2 * w2):
            group = grid[bi, m == t]  # every token merged into output t
            mag = group.abs().max(dim=0).values
            assert torch.equal(out[bi, t].abs(), mag)  # max magnitude per channel
            assert all((group[:, ch] == out[bi, t, ch]).any() for ch in range(c))
    # unmerge of any tensor of the merged shape: every slot takes its output token.
    _, unmerge = merge_2d(x, (h, w), (r_h, r_w), prefix=prefix)
    y = torch.randn(b, prefix + h2 * w2, 3)
    u = unmerge(y)
    assert u.shape == (b, prefix + h * w, 3)
    assert torch.equal(u[:, :prefix], y[:, :prefix])
    idx = info.merge_map + prefix
    assert torch.equal(u[:, prefix:], torch.stack([y[i, idx[i]] for i in range(b)]))


@settings(max_examples=40, deadline=None)
@given(grids)
def test_r_zero_is_identity(params):
    b, h, w, c, _, _, prefix, seed = params
    x = _make(b, h, w, c, prefix, seed)
    merged, unmerge = merge_2d(x, (h, w), (0, 0), prefix=prefix)
    assert torch.equal(merged, x)
    assert torch.equal(unmerge(merged), x)
    assert merge_map_2d(x, (h, w), (0, 0), prefix=prefix).tolist() == [list(range(h * w))] * b


def test_r_is_clamped_to_half():
    x = torch.randn(2, 5 * 4, 3)
    merged, unmerge = merge_2d(x, (5, 4), (9, 9))
    assert merged.shape == (2, 3 * 2, 3)
    assert unmerge(merged).shape == x.shape


def test_batch_rows_are_independent():
    x = torch.randn(3, 1 + 6 * 5, 8)
    whole = merge_2d_info(x, (6, 5), (2, 1), prefix=1)
    for i in range(3):
        one = merge_2d_info(x[i : i + 1], (6, 5), (2, 1), prefix=1)
        assert torch.equal(one.merged[0], whole.merged[i])
        assert torch.equal(one.merge_map[0], whole.merge_map[i])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x = torch.randn(2, 1 + 14 * 14, 16)
    xh = x.to(dtype)
    merged, unmerge = merge_2d(xh, (14, 14), (2, 2), prefix=1)
    assert merged.dtype == dtype and merged.shape == (2, 1 + 12 * 12, 16)
    assert unmerge(merged).dtype == dtype
    # Decisions are made in float32 on the half values: same as the float32 run on them.
    ref = merge_2d_info(xh.float(), (14, 14), (2, 2), prefix=1)
    assert torch.equal(merged.float(), ref.merged)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(4, 2), (2, 2), (1, 1)), {}, "x must be a 3-D tensor"),
        ((torch.zeros(1, 5, 2), (2, 2), (1, 1)), {}, r"prefix \+ H\*W = 0 \+ 2\*2 = 4"),
        ((torch.zeros(1, 5, 2), (2, 2), (1, 1)), {"prefix": -1}, "prefix must be an integer >= 0"),
        ((torch.zeros(1, 4, 2), (2, 2), (-1, 1)), {}, "r_h must be an integer >= 0"),
        ((torch.zeros(1, 4, 2), (2, 2), (1, -2)), {}, "r_w must be an integer >= 0"),
        ((torch.zeros(1, 4, 2), (1, 4), (0, 1)), {}, "H must be an integer >= 2"),
        ((torch.zeros(1, 4, 2), (4, 1), (0, 1)), {}, "W must be an integer >= 2"),
        ((torch.zeros(1, 4, 2), 4, (0, 1)), {}, r"hw must be a pair \(H, W\)"),
        ((torch.zeros(1, 4, 2), (2, 2), 1), {}, r"r must be a pair \(r_h, r_w\)"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge_2d(*args, **kwargs)


def test_unmerge_checks_shape():
    _, unmerge = merge_2d(torch.zeros(1, 16, 2), (4, 4), (1, 1))
    with pytest.raises(ValueError, match=r"y must have shape \[1, 9, C\]"):
        unmerge(torch.zeros(1, 16, 2))


def test_merge_1d_bad_r():
    with pytest.raises(ValueError, match="r must be an integer >= 0"):
        merge_1d(torch.zeros(4, 2), -1)


def test_bench_plugin_reports_ratio_and_agreement(capsys):
    import argparse
    import json

    from golden import bench_cubist

    parser = argparse.ArgumentParser()
    bench_cubist.add_arguments(parser)
    args = parser.parse_args(["--repeats", "2", "--agreement", "2", "--json"])
    assert bench_cubist.run(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["threads"] == 1 and res["tome_r"] == 52 and res["repeats"] == 2
    assert res["ratio"] == pytest.approx(res["median_ms"]["cubist"] / res["median_ms"]["tome"],
                                         abs=0.01)
    assert res["met"] == (res["ratio"] <= 2.0)
    assert [(a["inputs"], a["frac_bits"]) for a in res["agreement"]] == [
        (k, f) for k in ("random", "smooth") for f in (12, 16, 20)
    ]
    assert all(a["removed"] == 2 * 52 for a in res["agreement"])
    assert "ratio cubist/tome" in bench_cubist.to_markdown(res)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):
        bench_cubist.run_bench(repeats=0)
