"""Tests for golden.balance: the Procrustes half-tile pairing scheduler."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from golden.balance import (
    backward_schedule,
    balance_report,
    forward_schedule,
    half_tile_ranges,
    schedule,
)
from golden.blockfmt import BlockSparse

row_counts = st.lists(st.integers(0, 60), min_size=0, max_size=120)
pe_rows = st.integers(1, 20)


def real_looking(seed, m, k, density, sigma=0.5):
    """A Dropback-style mask: keep the largest |w|, where rows and columns have
    log-normal scales (some neurons and channels matter more than others)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k))
    w *= np.exp(sigma * rng.standard_normal((m, 1))) * np.exp(sigma * rng.standard_normal((1, k)))
    w[np.abs(w) < np.quantile(np.abs(w), 1 - density)] = 0
    return w.astype(np.float32)


def test_hand_worked_example():
    # M=8, R=2: T=4, half-tiles [0,2) [2,4) [4,6) [6,8) with work 10, 10, 0, 2.
    nnz = [5, 5, 5, 5, 0, 0, 1, 1]
    plain = schedule(nnz, 2, balanced=False)
    assert plain.ranges.tolist() == [[[0, 2], [2, 4]], [[4, 6], [6, 8]]]
    assert plain.work.tolist() == [20, 2]
    assert plain.makespan == 20 and plain.imbalance == pytest.approx(20 / 11)
    # ascending stable sort: half-tiles 2 (0), 3 (2), 0 (10), 1 (10)
    # PE0 = (densest=1, sparsest=2), PE1 = (2nd densest=0, 2nd sparsest=3)
    bal = schedule(nnz, 2)
    assert bal.ranges.tolist() == [[[2, 4], [4, 6]], [[0, 2], [6, 8]]]
    assert [r.tolist() for r in bal.rows] == [[2, 3, 4, 5], [0, 1, 6, 7]]
    assert bal.work.tolist() == [10, 12]
    assert bal.makespan == 12 and bal.imbalance == pytest.approx(12 / 11)


def test_ties_keep_half_tile_order():
    s = schedule(np.zeros(12, dtype=int), 3)
    # all half-tiles tie: asc = 0..5, PE i gets (5-i, i)
    assert s.ranges[:, :, 0].tolist() == [[10, 0], [8, 2], [6, 4]]
    assert s.imbalance == 1.0 and s.makespan == 0


def test_half_tile_ranges_short_and_empty_tiles():
    # M=10, R=4: T=3, halves of 2 and 1 rows; the last tile is short and then empty
    assert half_tile_ranges(10, 4).tolist() == [
        [0, 2], [2, 3], [3, 5], [5, 6], [6, 8], [8, 9], [9, 10], [10, 10],
    ]  # fmt: skip
    # more PE rows than output rows
    assert half_tile_ranges(3, 5).tolist() == [
        [0, 1], [1, 1], [1, 2], [2, 2], [2, 3], [3, 3], [3, 3], [3, 3], [3, 3], [3, 3],
    ]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(nnz=row_counts, R=pe_rows)
def test_every_row_once_and_work_adds_up(nnz, R):
    nnz = np.array(nnz, dtype=np.int64)
    M = len(nnz)
    for balanced in (False, True):
        s = schedule(nnz, R, balanced)
        assert s.ranges.shape == (R, 2, 2) and s.work.shape == (R,)
        rows = s.rows
        allrows = np.concatenate(rows)
        np.testing.assert_array_equal(np.sort(allrows), np.arange(M))
        assert [int(nnz[r].sum()) for r in rows] == s.work.tolist()
        assert s.total == nnz.sum()
        assert s.makespan == s.work.max()
    T = -(-M // R)
    plain = schedule(nnz, R, balanced=False)
    for r, rws in enumerate(plain.rows):
        np.testing.assert_array_equal(rws, np.arange(min(r * T, M), min((r + 1) * T, M)))


@settings(max_examples=200, deadline=None)
@given(nnz=row_counts, R=pe_rows)
def test_balanced_never_worse(nnz, R):
    bal = schedule(nnz, R)
    plain = schedule(nnz, R, balanced=False)
    assert bal.makespan <= plain.makespan
    assert bal.imbalance <= plain.imbalance + 1e-12


def _min_max_pair_sum(vals):
    """Brute force: the smallest possible largest pair sum over all pairings."""
    if not vals:
        return 0
    first, rest = vals[0], vals[1:]
    return min(
        max(first + rest[j], _min_max_pair_sum(rest[:j] + rest[j + 1 :])) for j in range(len(rest))
    )


@settings(max_examples=100, deadline=None)
@given(nnz=st.lists(st.integers(0, 30), min_size=1, max_size=24), R=st.integers(1, 4))
def test_pairing_is_optimal_over_all_pairings(nnz, R):
    halves = half_tile_ranges(len(nnz), R)
    prefix = np.concatenate([[0], np.cumsum(nnz)])
    hwork = [int(prefix[b] - prefix[a]) for a, b in halves]
    assert schedule(nnz, R).makespan == _min_max_pair_sum(hwork)


def test_adversarial_one_dense_tile():
    # M=64, R=8: T=8. Tile 0 is dense (100 per row), every other row has 1.
    nnz = np.ones(64, dtype=np.int64)
    nnz[:8] = 100
    plain, bal = schedule(nnz, 8, balanced=False), schedule(nnz, 8)
    assert plain.makespan == 800
    # each dense half-tile (400) is paired with a sparse one (4 rows x 1)
    assert bal.makespan == 404
    assert plain.makespan / bal.makespan == pytest.approx(800 / 404)


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_real_looking_masks_balance_well(density):
    fwd_plain, fwd_bal, bwd_plain, bwd_bal = [], [], [], []
    for seed in range(4):
        bs = BlockSparse.encode(real_looking(seed, 256, 2304, density))
        f0, f1 = forward_schedule(bs, 16, False), forward_schedule(bs, 16)
        b0, b1 = backward_schedule(bs, 16, False), backward_schedule(bs, 16)
        assert f1.makespan <= f0.makespan and b1.makespan <= b0.makespan
        fwd_plain.append(f0.imbalance)
        fwd_bal.append(f1.imbalance)
        bwd_plain.append(b0.imbalance)
        bwd_bal.append(b1.imbalance)
    # balanced: within 15% of the ideal cycle count on average
    assert np.mean(fwd_bal) < 1.15 and np.mean(bwd_bal) < 1.15
    # and it removes at least half of the excess over ideal
    assert np.mean(fwd_bal) - 1 < 0.5 * (np.mean(fwd_plain) - 1)
    assert np.mean(bwd_bal) - 1 < 0.5 * (np.mean(bwd_plain) - 1)


def test_phase_helpers_use_row_and_column_counts():
    w = real_looking(7, 40, 72, 0.3)
    bs = BlockSparse.encode(w)
    f = forward_schedule(bs, 4)
    b = backward_schedule(bs, 4, balanced=False)
    assert [int(np.count_nonzero(w[r])) for r in f.rows] == f.work.tolist()
    assert [int(np.count_nonzero(w[:, c])) for c in b.rows] == b.work.tolist()
    assert sum(len(r) for r in b.rows) == 72


def test_balance_report():
    bs = BlockSparse.encode(real_looking(0, 64, 288, 0.25))
    text = balance_report(bs, 8)
    lines = text.splitlines()
    assert lines[0].startswith("BlockSparse(shape=(64, 288)") and "R=8" in lines[0]
    assert [ln.split()[:2] for ln in lines[2:]] == [
        ["forward", "unbalanced"], ["forward", "balanced"],
        ["backward", "unbalanced"], ["backward", "balanced"],
    ]  # fmt: skip
    fwd = forward_schedule(bs, 8, balanced=False).makespan
    assert int(lines[2].split()[2]) == fwd


@pytest.mark.parametrize(
    "args, match",
    [
        (([1, 2], 0), r"R \(PE rows\) must be a positive integer, got 0"),
        (([1, 2], 2.0), r"R \(PE rows\) must be a positive integer"),
        (([1, -2], 2), "row_nnz must be >= 0 everywhere"),
        (([[1, 2]], 2), "row_nnz must be a 1-D array of integers"),
        (([1.5, 2.0], 2), "row_nnz must be a 1-D array of integers"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        schedule(*args)


@settings(max_examples=150, deadline=None)
@given(nnz=row_counts, R=pe_rows, nt=st.integers(1, 6))
def test_jobs_cover_every_row_and_tile_once(nnz, R, nt):
    nnz = np.array(nnz, dtype=np.int64)
    for balanced in (False, True):
        s = schedule(nnz, R, balanced, nt)
        jobs = np.concatenate(s.jobs)
        np.testing.assert_array_equal(np.sort(jobs), np.arange(len(nnz) * nt))
        assert [int(nnz[j // nt].sum()) for j in s.jobs] == s.work.tolist()
        # the table form: (row, tile, jobs) of each range gives back the same jobs
        for pe, ranges in zip(s.jobs, s.table().tolist()):
            again = [o * nt + t + i for o, t, n in ranges for i in range(n)]
            assert again == pe.tolist()
            assert all(n == 0 or (0 <= t < nt and 0 <= o < len(nnz)) for o, t, n in ranges)
    assert schedule(nnz, R, True, nt).makespan <= schedule(nnz, R, False, nt).makespan


def test_jobs_split_rows_that_do_not_divide_the_pe_rows():
    # fc3-like: 10 dense rows on 4 PE rows. By rows: 3, 3, 3, 1 rows; with 4 tiles per
    # row, 40 jobs: 10 each.
    nnz = np.full(10, 100)
    assert [len(r) for r in schedule(nnz, 4, balanced=False).rows] == [3, 3, 3, 1]
    assert schedule(nnz, 4).makespan * 4 == 1200  # balanced by rows: still 3 rows x 4 tiles
    by_jobs = schedule(nnz, 4, nt=4)
    assert [len(j) for j in by_jobs.jobs] == [10] * 4
    assert by_jobs.work.tolist() == [1000] * 4
    # all half-tiles tie (5 jobs, 500 each): PE row i gets half-tiles (7 - i, i); PE row
    # 0 starts inside row 8 (job 35 = row 8, tile 3)
    assert by_jobs.ranges.tolist()[0] == [[35, 40], [0, 5]]
    assert by_jobs.table().tolist()[0] == [[8, 3, 5], [0, 0, 5]]
    assert by_jobs.rows[0].tolist() == [8, 9, 9, 9, 9, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("nt", [0, -1, 1.5, True])
def test_bad_tile_count(nt):
    with pytest.raises(ValueError, match=r"nt \(tiles per row\) must be a positive integer"):
        schedule([1, 2, 3], 2, nt=nt)
