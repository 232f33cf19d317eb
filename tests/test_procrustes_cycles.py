"""The cycle model golden.procrustes_cycles against cycles measured on the RTL."""

from __future__ import annotations

import numpy as np
import pytest

from golden.balance import schedule
from golden.procrustes_cycles import (
    ArrayParams,
    group_counts,
    predict_backward,
    predict_forward,
    predict_update,
    predict_weight_grad,
    predict_weight_grad_sparse,
)
from hw.procrustes import Config, Procrustes
from sim.runner import available_simulators, simulate


def _measured(cases=6, max_dim=24, seed=3, sim=None, cfg=None, **extra):
    sim = sim or ("verilator" if "verilator" in available_simulators() else "icarus")
    r = simulate(Procrustes(Config(**(cfg or {}))), test_module="sim.tb.tb_procrustes",
                 simulator=sim, name="procrustes", testcase="test_phases",
                 params=dict(cases=cases, max_dim=max_dim, seed=seed, **(cfg or {}),
                             **extra))
    assert r.passed
    return r.metrics["records"]


def _mask(rec, key="mask") -> np.ndarray:
    return np.array([[ch == "1" for ch in row] for row in rec[key]], dtype=bool)


def test_model_predicts_every_phase_of_the_rtl_exactly():
    # the target is 5%; the model follows the pipeline cycle by cycle, so it is exact
    ap = ArrayParams.of(Config())
    for rec in _measured():
        mask = _mask(rec)
        M, K, N, bal = rec["M"], rec["K"], rec["N"], rec["balanced"]
        for key, pred in (("fwd", predict_forward(mask, N, ap, bal)),
                          ("bwd", predict_backward(mask, N, ap, bal)),
                          ("wgrad", predict_weight_grad(M, K, N, ap)),
                          ("wgradx", predict_weight_grad_sparse(_mask(rec, "xmask"), M, ap,
                                                                bal)),
                          ("update", predict_update(M, K, ap))):
            assert pred == rec[key], f"{key} {M}x{K} N={N}: model {pred}, rtl {rec[key]}"


def test_model_is_exact_on_one_group_walks_with_many_tiles():
    # M, K <= 15: both walks are one group long (the row is scanned once and replayed
    # per tile); N up to 40 gives up to 10 tiles, so null rows flag many results at once
    ap = ArrayParams.of(Config())
    recs = _measured(cases=4, max_dim=15, seed=9, max_n=40, phases=["fwd", "bwd"])
    assert max(rec["N"] for rec in recs) > 4 * ap.cols  # more than 4 tiles somewhere
    for rec in recs:
        mask, N, bal = _mask(rec), rec["N"], rec["balanced"]
        assert predict_forward(mask, N, ap, bal) == rec["fwd"]
        assert predict_backward(mask, N, ap, bal) == rec["bwd"]


@pytest.mark.icarus
def test_model_is_exact_with_a_shallow_walker_fifo():
    # the default FIFO (16) rarely runs out of credits on small layers; with 2 the
    # credit-limited issue is exercised on every walk (Icarus: a quick build)
    if "icarus" not in available_simulators():
        pytest.skip("icarus is not available")
    ap = ArrayParams.of(Config(fifo_depth=2))
    recs = _measured(cases=3, max_dim=40, seed=11, sim="icarus", cfg=dict(fifo_depth=2),
                     phases=["fwd", "bwd"])
    for rec in recs:
        mask, N, bal = _mask(rec), rec["N"], rec["balanced"]
        assert predict_forward(mask, N, ap, bal) == rec["fwd"]
        assert predict_backward(mask, N, ap, bal) == rec["bwd"]


@pytest.mark.parametrize("M, K", [(10, 100), (100, 10), (6, 40), (100, 64)])
def test_dense_utilization_at_least_85_percent_when_rows_do_not_divide(M, K):
    # jobs (row, tile) are split evenly over the PE rows, so M = 10 on 4 PE rows no
    # longer leaves two of them idle for a third of the run
    ap = ArrayParams(rows=4, cols=4)
    dense = np.ones((M, K), dtype=bool)
    for N in (16, 20):
        for pred in (predict_forward(dense, N, ap), predict_backward(dense, N, ap)):
            work = M * K * -(-N // ap.cols) * ap.cols
            assert work / (ap.rows * ap.cols * pred) >= 0.85


def test_zero_weights_cost_no_cycles_and_balancing_never_hurts():
    rng = np.random.default_rng(0)
    ap = ArrayParams(rows=4, cols=4)
    dense = np.ones((64, 64), dtype=bool)
    sparse = rng.random((64, 64)) < 0.1
    sparse[:8] = rng.random((8, 64)) < 0.6  # uneven rows: balancing has work to do
    d, s = predict_forward(dense, 16, ap), predict_forward(sparse, 16, ap)
    assert d > 3 * s  # rows 0..7 (one half-tile) hold half of the work
    # dense forward: 16 output rows per PE row, 4 tiles, 64 weights each
    assert 16 * 4 * 64 <= d <= 16 * 4 * 64 * 1.02
    assert predict_forward(sparse, 16, ap, True) <= predict_forward(sparse, 16, ap, False)
    assert predict_backward(sparse, 16, ap, True) <= predict_backward(sparse, 16, ap, False)


def test_a_deeper_walker_fifo_keeps_the_emitter_busy_at_low_density():
    # a group is out for at least four cycles (three if empty), and a job with fewer set
    # bits than groups is walker-bound: with 4 credits the walker cannot work ahead on the
    # dense rows, so the emitter runs dry on the sparse ones that follow (rows alternating
    # between densities 0.2 and 0.02); with 16 it stays within 10% of its work
    rng = np.random.default_rng(2)
    mask = rng.random((100, 64)) < np.where(np.arange(100) % 2 == 0, 0.2, 0.02)[:, None]
    work = mask.sum() * 4 // 4  # 4 tiles of 4 columns on 4 PE rows
    shallow = predict_forward(mask, 16, ArrayParams(fifo_depth=4))
    deep = predict_forward(mask, 16, ArrayParams(fifo_depth=16))
    assert deep < 0.95 * shallow
    assert deep <= 1.1 * work


def test_group_counts_cover_the_row_slices():
    mask = np.zeros((5, 40), dtype=bool)
    mask[2, [0, 15, 16, 39]] = True
    c = group_counts(mask, ArrayParams(lanes=4, bk=4), transpose=False)
    assert c.shape == (5, 3) and c[2].tolist() == [2, 1, 1] and c.sum() == 4
    assert schedule(c.sum(axis=1), 2).total == 4


@pytest.mark.parametrize("kwargs, msg", [
    (dict(rows=3), r"rows must be a power of two >= 1, got 3"),
    (dict(fifo_depth=1), r"fifo_depth must be in \[2, 16\], got 1"),
])
def test_bad_array_parameters_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ArrayParams(**kwargs)


def test_bad_minibatch_is_refused():
    with pytest.raises(ValueError, match=r"N must be a positive integer, got 0"):
        predict_forward(np.ones((4, 4), dtype=bool), 0, ArrayParams())


def test_sparse_weight_gradient_skips_zero_activations():
    # WGRADX walks the activations like weights: at half density it takes about half of
    # the dense WGRAD's cycles; with every activation non-zero, about as many
    rng = np.random.default_rng(1)
    ap = ArrayParams(rows=4, cols=4)
    M, K, N = 64, 64, 256
    dense = predict_weight_grad(M, K, N, ap)
    half = predict_weight_grad_sparse(rng.random((K, N)) < 0.5, M, ap)
    full = predict_weight_grad_sparse(np.ones((K, N), dtype=bool), M, ap)
    assert 0.45 * dense <= half <= 0.6 * dense
    assert 0.95 * dense <= full <= 1.05 * dense


def test_area_update_is_fifteen_cycles_per_element_and_the_encoder_is_unchanged():
    # area mode (iCE40): one element at a time; the encoder's GM·GK·bm·bk is the same
    dflt, area = ArrayParams(rows=1, cols=1), ArrayParams(rows=1, cols=1, area=1)
    for M, K in ((1, 1), (9, 11), (64, 100)):
        enc = -(-M // 4) * -(-K // 4) * 16
        assert predict_update(M, K, dflt) == 3 * M * K + enc + 28
        assert predict_update(M, K, area) == 15 * M * K + enc + 20
    assert ArrayParams.of(Config(area=1)).area == 1


def test_area_parameter_of_the_model_is_checked():
    with pytest.raises(ValueError, match=r"area must be 0 or 1, got 2"):
        ArrayParams(area=2)
