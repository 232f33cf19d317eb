"""golden.procrustes_ref against golden/PROCRUSTES_FIXED.md, by hand and by a literal reading."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from golden import procrustes_ref as P
from golden.blockfmt import BlockSparse
from golden.data import load_digits_split
from golden.prng import CounterInit, layer_seed, prng_u32

CFG = P.FixedConfig()

# --- a literal, loop-by-loop reading of PROCRUSTES_FIXED.md (Python ints only) --------


def r_sat(v, bits):
    return min(max(v, -(2 ** (bits - 1))), 2 ** (bits - 1) - 1)


def r_rshift(v, s):
    return v if s == 0 else (v + 2 ** (s - 1)) >> s


def r_gemm(A, B, shift, cfg):
    """For each (m, n): a = 0, a = sat(a + A[m,k]·B[k,n]) over non-zero A[m,k], k up."""
    A, B = np.asarray(A).tolist(), np.asarray(B).tolist()
    out = []
    for m in range(len(A)):
        row = []
        for n in range(len(B[0])):
            a = 0
            for k in range(len(B)):
                if A[m][k] != 0:
                    a = r_sat(a + A[m][k] * B[k][n], cfg.acc_bits)
            row.append(r_sat(r_rshift(a, shift), cfg.data_bits))
        out.append(row)
    return np.array(out, dtype=np.int64)


def r_forward(W, X, cfg=CFG):
    return r_gemm(W, X, cfg.w_frac, cfg)


def r_backward(W, dY, cfg=CFG):
    return r_gemm(np.asarray(W).T, dY, cfg.w_frac, cfg)


def r_wgrad(dY, X, cfg=CFG):
    return r_gemm(dY, np.asarray(X).T, cfg.g_frac + cfg.x_frac - cfg.w_frac, cfg)


def r_update(W, dW, theta, sp, cfg=CFG):
    M, K = np.asarray(W).shape
    W, dW = np.asarray(W).reshape(-1).tolist(), np.asarray(dW).reshape(-1).tolist()
    out, mask = [0] * (M * K), [False] * (M * K)
    for idx in range(M * K - 1, -1, -1):
        w1 = r_sat(W[idx] - r_rshift(sp.lr_q * dW[idx], 16), cfg.data_bits)
        u = prng_u32(sp.seed, idx)
        s = (u >> 16) - 2**15
        w0 = r_rshift(s * sp.bound_q, 15)
        dw0 = r_rshift(sp.decay_q * w0, 16)
        score = abs(w1 - dw0)
        tracked = theta < (score << 16)
        if tracked:
            theta = min(theta + ((theta * sp.up_q) >> 32), 2**32 - 1)
        else:
            theta = theta - ((theta * sp.dn_q) >> 32)
        out[idx] = w1 if tracked else dw0
        mask[idx] = tracked
    return np.array(out).reshape(M, K), theta, np.array(mask).reshape(M, K)


def rand_int(rng, shape, mag, density=1.0):
    a = rng.integers(-mag, mag + 1, size=shape)
    if density < 1:
        a[rng.random(shape) >= density] = 0
    return a


# --- helpers --------------------------------------------------------------------------


def test_sat_rshift_quantize():
    assert P.sat(40000, 16) == 32767 and P.sat(-40000, 16) == -32768 and P.sat(5, 16) == 5
    # round half up, also for negative ties (toward +inf)
    assert [P.rshift(v, 1) for v in (3, 1, -1, -3, -4)] == [2, 1, 0, -1, -2]
    assert P.rshift(-7, 0) == -7
    np.testing.assert_array_equal(P.rshift(np.array([2048, -2048, -6144]), 12), [1, 0, -1])
    np.testing.assert_array_equal(P.quantize([0.5 / 256, -0.5 / 256, 1.0, 1000.0, -1000.0], 8,
                                             16), [1, 0, 256, 32767, -32768])
    np.testing.assert_array_equal(P.dequantize(np.array([256, -128]), 8), [1.0, -0.5])


# --- hand-worked GEMM cases -------------------------------------------------------------


def test_forward_hand():
    # W = [1.0, 0.5] (w_frac 12), X = [1.0, 2.0] (x_frac 8): 1 + 1 = 2.0 -> 512
    assert P.forward([[4096, 2048]], [[256], [512]]).tolist() == [[512]]
    # rounding ties of the output: acc/2^12 = +0.5 -> 1, -0.5 -> 0, -1.5 -> -1
    assert P.forward([[1]], [[2048]]).item() == 1
    assert P.forward([[-1]], [[2048]]).item() == 0
    assert P.forward([[-1]], [[6144]]).item() == -1
    assert P.forward([[1]], [[6144]]).item() == 2


def test_forward_extremes_saturate_output():
    assert P.forward([[-32768]], [[-32768]]).item() == 32767  # 2^30 >> 12 = 2^18
    assert P.forward([[-32768]], [[32767]]).item() == -32768
    assert P.forward([[32767]], [[32767]]).item() == 32767
    assert P.forward([[-32768, -32768]], [[-32768], [-32768]]).item() == 32767  # acc 2^31 - 1


def test_accumulator_saturation_order_matters():
    cfg = P.FixedConfig(acc_bits=24)  # [-8388608, 8388607]
    X = [[3000], [3000], [3000]]
    # 6e6, 12e6 -> 8388607 (saturated), 8388607 - 6e6 = 2388607; rshift 12 -> 583
    assert P.forward([[2000, 2000, -2000]], X, cfg).item() == 583
    assert r_forward([[2000, 2000, -2000]], X, cfg).item() == 583
    # the same terms in the other order never saturate: 6e6 -> (6e6 + 2048) >> 12 = 1465
    assert P.forward([[-2000, 2000, 2000]], X, cfg).item() == 1465
    acc, looped = P.accumulate([[2000, 2000, -2000]], X, cfg)
    assert acc.item() == 2388607 and looped == 1  # the bound forced the ordered loop
    # negative saturation, then recovery
    assert P.accumulate([[-2000, -2000, 2000]], X, cfg)[0].item() == -2388608
    # backward: the column walk, m increasing
    assert P.backward([[2000], [2000], [-2000]], X, cfg).item() == 583
    # weight gradient: n increasing; shift g+x-w = 8: (2388607 + 128) >> 8 = 9330
    assert P.weight_grad([[2000, 2000, -2000]], [[3000, 3000, 3000]], cfg).item() == 9330


def test_backward_and_weight_grad_hand():
    # W = [[1, 0], [0.5, -1]], dY = [1, 1] (g_frac 12): dX = [1.5, -1]
    assert P.backward([[4096, 0], [2048, -4096]], [[4096], [4096]]).tolist() == [[6144], [-4096]]
    # dY = [1, -0.5] (g 12), X = [1, 1] (x 8): dW = 0.5 -> 2048 (w 12)
    assert P.weight_grad([[4096, -2048]], [[256, 256]]).tolist() == [[2048]]
    # output ties at shift 8: +128 -> 1, -128 -> 0
    assert P.weight_grad([[1]], [[128]]).item() == 1
    assert P.weight_grad([[-1]], [[128]]).item() == 0


def test_all_zero_layer():
    rng = np.random.default_rng(1)
    Z = np.zeros((6, 5), dtype=np.int64)
    X, dY = rand_int(rng, (5, 3), 32768 - 1), rand_int(rng, (6, 3), 32767)
    assert not P.forward(Z, X).any() and not P.backward(Z, dY).any()
    bs = BlockSparse.encode(Z)
    assert bs.nnz == 0 and not P.forward(bs, X, path="loop").any()
    assert not P.backward(bs, dY, path="loop").any()
    assert not P.weight_grad(np.zeros((6, 3), dtype=np.int64), X).any()


# --- against the literal reading, and the two paths ---------------------------------------


@pytest.mark.parametrize("mag", [200, 6000, 32767])
def test_phases_match_literal_reading_both_paths(mag):
    rng = np.random.default_rng(mag)
    cfg = P.FixedConfig(acc_bits=28) if mag == 6000 else CFG
    W = rand_int(rng, (9, 13), mag, density=0.6)
    X, dY = rand_int(rng, (13, 7), mag), rand_int(rng, (9, 7), mag)
    for fn, ref, args in ((P.forward, r_forward, (W, X)), (P.backward, r_backward, (W, dY)),
                          (P.weight_grad, r_wgrad, (dY, X))):
        want = ref(*args, cfg)
        np.testing.assert_array_equal(fn(*args, cfg, path="auto"), want)
        np.testing.assert_array_equal(fn(*args, cfg, path="loop"), want)


def test_vector_and_loop_paths_agree_on_mixed_outputs():
    rng = np.random.default_rng(7)
    cfg = P.FixedConfig(acc_bits=30)
    W = rand_int(rng, (40, 64), 32767, density=0.5)
    W[:20] //= 64  # small rows: provably no saturation -> vector path
    X = rand_int(rng, (64, 30), 32767)
    acc_auto, looped = P.accumulate(W, X, cfg, path="auto")
    acc_loop, all_looped = P.accumulate(W, X, cfg, path="loop")
    assert 0 < looped < 40 * 30 and all_looped == 40 * 30  # both paths really ran
    np.testing.assert_array_equal(acc_auto, acc_loop)
    assert (np.abs(acc_loop) == cfg.acc_max).any() or (acc_loop == cfg.acc_min).any()
    # and a fully safe case: the vector path alone
    acc_v, n = P.accumulate(W[:20] // 8, X // 8, cfg)
    assert n == 0
    np.testing.assert_array_equal(acc_v, P.accumulate(W[:20] // 8, X // 8, cfg, "loop")[0])


@pytest.mark.parametrize("block", [(1, 1), (2, 4), (4, 4), (8, 2)])
def test_block_sparse_equals_dense(block):
    rng = np.random.default_rng(block[0] * 10 + block[1])
    W = rand_int(rng, (19, 23), 32767, density=0.3)
    bs = BlockSparse.encode(W, block)
    X, dY = rand_int(rng, (23, 5), 32767), rand_int(rng, (19, 5), 32767)
    for path in P.PATHS:
        np.testing.assert_array_equal(P.forward(bs, X, path=path), P.forward(W, X))
        np.testing.assert_array_equal(P.backward(bs, dY, path=path), P.backward(W, dY))
        np.testing.assert_array_equal(P.accumulate(bs.T, dY, path=path)[0],
                                      P.accumulate(W.T, dY, path="loop")[0])
    np.testing.assert_array_equal(P.backward(bs, dY), r_backward(W, dY))


# --- against float PyTorch ------------------------------------------------------------


@pytest.mark.parametrize("K", [16, 100, 400])
def test_forward_within_quantization_bound_of_float(K):
    """The bound of ``forward``'s docstring: input roundings plus output rounding (no
    saturation: the accumulation is exact). Measured error must be inside it and use a
    real part of it (the bound is not vacuous)."""
    g = torch.Generator().manual_seed(K)
    W = (torch.rand(32, K, generator=g, dtype=torch.float64) - 0.5) * (2 / math.sqrt(K))
    X = torch.randn(K, 24, generator=g, dtype=torch.float64)
    Wq, Xq = P.quantize(W, CFG.w_frac, 16), P.quantize(X, CFG.x_frac, 16)
    assert P.accumulate(Wq, Xq)[1] == 0  # no saturation possible
    Y = P.dequantize(P.forward(Wq, Xq), CFG.x_frac)
    ref = (W @ X).numpy()
    err = np.abs(Y - ref)
    bound = P.forward_error_bound(W, X)
    assert (err <= bound).all()
    assert err.max() > 0.05 * bound.max()
    # against the quantized inputs, only the output rounding remains
    ref_q = (torch.from_numpy(P.dequantize(Wq, 12)) @ torch.from_numpy(P.dequantize(Xq, 8)))
    assert np.abs(Y - ref_q.numpy()).max() <= 2.0**-9


def test_backward_and_weight_grad_within_half_lsb_of_float():
    g = torch.Generator().manual_seed(3)
    Wq = P.quantize(torch.randn(20, 50, generator=g) * 0.1, 12, 16)
    dYq = P.quantize(torch.randn(20, 16, generator=g) * 0.05, 12, 16)
    Xq = P.quantize(torch.randn(50, 16, generator=g), 8, 16)
    Wf, dYf, Xf = (torch.from_numpy(P.dequantize(a, f)) for a, f in
                   ((Wq, 12), (dYq, 12), (Xq, 8)))
    assert np.abs(P.dequantize(P.backward(Wq, dYq), 12) - (Wf.T @ dYf).numpy()).max() <= 2**-13
    assert np.abs(P.dequantize(P.weight_grad(dYq, Xq), 12) - (dYf @ Xf.T).numpy()).max() \
        <= 2**-13


def test_conv_lowered_to_gemm():
    g = torch.Generator().manual_seed(5)
    wq = P.quantize(torch.randn(4, 3, 3, 3, generator=g) * 0.2, 12, 16)
    xq = P.quantize(torch.randn(2, 3, 6, 5, generator=g), 8, 16)
    wf, xf = (torch.from_numpy(P.dequantize(a, f)) for a, f in ((wq, 12), (xq, 8)))
    y = P.conv2d_forward(wq, xq, stride=1, padding=1)
    ref = torch.nn.functional.conv2d(xf, wf, padding=1)
    assert y.shape == (2, 4, 6, 5)
    assert np.abs(P.dequantize(y, 8) - ref.numpy()).max() <= 2**-9
    bs = BlockSparse.encode(wq)  # 4-D kernels are lowered by encode
    np.testing.assert_array_equal(P.conv2d_forward(bs, xq, padding=1, kernel_size=(3, 3)), y)
    # weight gradient: dW = dY . im2col(x)^T, against autograd on the quantized values
    dyq = P.quantize(torch.randn(2, 4, 6, 5, generator=g) * 0.05, 12, 16)
    dyf = torch.from_numpy(P.dequantize(dyq, 12))
    wf.requires_grad_(True)
    torch.nn.functional.conv2d(xf, wf, padding=1).backward(dyf)
    dw = P.conv2d_weight_grad(dyq, xq, (3, 3), padding=1)
    assert dw.shape == (4, 27)
    assert np.abs(P.dequantize(dw, 12) - wf.grad.reshape(4, 27).numpy()).max() <= 2**-13
    cols = P.conv2d_backward_cols(wq, dyq)
    np.testing.assert_array_equal(cols, P.backward(wq.reshape(4, 27),
                                                   dyq.transpose(1, 0, 2, 3).reshape(4, -1)))


# --- weight update ----------------------------------------------------------------------


def test_update_hand_sequence_no_w0():
    # lr 0.5, bound 0 (w0 = 0, so score = |w1|), up = 1/2, down = 1/4
    sp = P.StepParams(lr_q=32768, decay_q=32768, seed=1, bound_q=0, up_q=2**31, dn_q=2**30)
    W, dW = [[100, -50, 0]], [[10, 3, -1]]
    # w1: 0 - rshift(-32768, 16) = 0 (negative tie -> 0); -50 - rshift(98304, 16) = -52;
    # 100 - rshift(327680, 16) = 100 - floor(5 + 0.5) = 95
    # visit idx 2: 4e6 < 0 << 16? no  -> theta = 4e6 - 1e6 = 3e6, W' = 0
    # visit idx 1: 3e6 < 52 << 16 = 3407872 -> tracked, theta = 3e6 + 1.5e6 = 4.5e6
    # visit idx 0: 4.5e6 < 95 << 16 = 6225920 -> tracked, theta = 6.75e6
    Wn, theta, mask = P.update(W, dW, 4_000_000, sp)
    assert Wn.tolist() == [[95, -52, 0]]
    assert theta == 6_750_000 and mask.tolist() == [[True, True, False]]
    # untracked with dn_q = 0: theta unchanged, W' = dw0 = 0
    Wn, theta, mask = P.update([[-32768]], [[0]], 2**31 + 5, P.StepParams(0, 0, 1, 0, 2**31, 0))
    assert not mask.item() and theta == 2**31 + 5 and Wn.item() == 0


def test_update_theta_saturates():
    # w0 = rshift(s * 32767, 15) with s from the PRNG; W on the opposite rail makes
    # score = |W - w0| > 2^15, so theta = 2^31 + 1 tracks it, and theta + theta*up/2^32
    # (up = 2^32 - 1) = 2^32 + 1 saturates to 2^32 - 1.
    u = prng_u32(9, 0)
    s = (u >> 16) - 2**15
    w0 = (s * 32767 + 2**14) >> 15
    assert abs(w0) > 1
    w = -32768 if w0 > 0 else 32767
    sp = P.StepParams(0, 65536, 9, 32767, 2**32 - 1, 0)
    Wn, theta, mask = P.update([[w]], [[0]], 2**31 + 1, sp)
    assert mask.item() and Wn.item() == w and theta == 2**32 - 1


def test_update_decay_and_reset_use_golden_prng():
    seed, bound_q = layer_seed(3, 0), 1024  # bound 0.25
    sp = P.StepParams(lr_q=13107, decay_q=32768, seed=seed, bound_q=bound_q, up_q=0, dn_q=0)
    W = np.array([[700, -3, 5, 0]])
    dW = np.array([[-800, 4, 0, 40]])
    Wn, theta, mask = P.update(W, dW, 30 << 16, sp)  # theta = score 30 LSB, constant
    for idx in range(4):
        u = prng_u32(seed, idx)
        w0 = ((((u >> 16) - 32768) * bound_q) + 2**14) >> 15
        dw0 = (32768 * w0 + 2**15) >> 16  # half of w0, rounded half up
        w1 = W[0, idx] - ((13107 * dW[0, idx] + 2**15) >> 16)
        tracked = abs(w1 - dw0) > 30
        assert mask[0, idx] == tracked
        assert Wn[0, idx] == (w1 if tracked else dw0)
    assert theta == 30 << 16
    assert mask[0, 0] and Wn[0, 0] == 700 + 160  # -0.2 * -800 = +160 moves it far from w0


def test_w0_is_counter_init_quantized():
    """Untracked everywhere (theta max) with decay 1: W' = w0, within
    0.5 (output rounding) + 0.5 (bound_q rounding) + bound_q/2^15 (16-bit truncation of t)
    LSB of CounterInit's float w0."""
    bound = 1 / math.sqrt(64)
    seed = CounterInit(11).param_seed(0)
    sp = P.step_constants(0.0, 1.0, 0.9, 0.01, bound, seed=seed)
    assert sp.bound_q == 512 and sp.decay_q == 65536
    sp = dataclasses.replace(sp, dn_q=0)  # theta stays at the top: nothing is tracked
    Wn, theta, mask = P.update(np.zeros((100, 64), dtype=np.int64),
                               np.zeros((100, 64), dtype=np.int64), 2**32 - 1, sp)
    assert not mask.any()
    ref = CounterInit(11).w0(0, (100, 64), bound).double().numpy() * 2**12
    err = np.abs(Wn - ref)
    assert err.max() <= 1 + 512 / 2**15 + 1e-6
    assert 0.15 < err.mean() < 0.35  # ~uniform rounding error, no bias toward +-bound
    np.testing.assert_array_equal(Wn, P.initial_weights(seed, (100, 64), bound))


@pytest.mark.parametrize("decay_q", [65536, 40000, 0])
def test_update_matches_literal_reading(decay_q):
    rng = np.random.default_rng(decay_q)
    W, dW = rand_int(rng, (7, 9), 32767, 0.7), rand_int(rng, (7, 9), 32767)
    W[0, :3] = 32767  # w1 saturation
    dW[0, :3] = -32768
    sp = P.StepParams(lr_q=65535, decay_q=decay_q, seed=0xDEADBEEF, bound_q=32767,
                      up_q=123456789, dn_q=987654321)
    for theta in (0, 5 << 16, 2**32 - 1, 1_000_000_000):
        got = P.update(W, dW, theta, sp)
        want = r_update(W, dW, theta, sp)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]
        np.testing.assert_array_equal(got[2], want[2])
    bs, _, _ = P.update(BlockSparse.encode(W, (2, 4)), dW, 7 << 16, sp)
    assert isinstance(bs, BlockSparse) and bs.block == (2, 4)
    np.testing.assert_array_equal(bs.decode(), P.update(W, dW, 7 << 16, sp)[0])


def test_tracked_fraction_converges_to_one_minus_q():
    """q = 0.9 on a stream of 20 x 10,000 uniform scores, q_step = 1e-3: theta starts at
    q_init = 0.01 (score units), ln(90) ~ 4.5 below the target 0.9, and climbs by
    q_step * q per tracked element, so it arrives within ~5,000 elements (half a pass);
    after 2 warm-up passes every pass tracks 10% +- 10% (relative)."""
    rng = np.random.default_rng(0)
    sp = P.step_constants(0.0, 0.0, 0.9, 1e-3, 0.0, seed=5)
    theta = P.theta_from_float(1e-2)
    fracs = []
    for _ in range(20):
        W = rng.integers(-4096, 4097, size=(100, 100))
        W, theta, mask = P.update(W, np.zeros_like(W), theta, sp)
        fracs.append(mask.mean())
    assert fracs[0] > 0.2  # it did start far off
    assert all(0.09 <= f <= 0.11 for f in fracs[2:]), fracs
    assert abs(theta / 2**28 - 0.9) < 0.03  # the 0.9 quantile of |uniform(-1, 1)|


# --- FixedMLP -----------------------------------------------------------------------------


class CountingAccel:
    def __init__(self):
        self.calls = {"forward": 0, "backward": 0, "weight_grad": 0, "update": 0}

    def __getattr__(self, name):
        fn = getattr(P, name)

        def wrapped(*a, **k):
            self.calls[name] += 1
            return fn(*a, **k)
        return wrapped


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_xent_grad_matches_torch_label_smoothing(smoothing):
    rng = np.random.default_rng(3)
    z_q = P.quantize(rng.normal(size=(10, 16)) * 3, CFG.x_frac, CFG.data_bits)
    y = rng.integers(0, 10, 16)
    loss, dy = P.softmax_xent_grad(z_q, y, label_smoothing=smoothing)
    z = torch.tensor(P.dequantize(z_q, CFG.x_frac).T, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(z, torch.from_numpy(y), label_smoothing=smoothing)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    # the gradient is rounded half up to g_frac bits: within half an LSB of torch's
    err = np.abs(P.dequantize(dy, CFG.g_frac) - z.grad.numpy().T).max()
    assert err <= 2.0 ** -(CFG.g_frac + 1)
    m = P.FixedMLP([64, 10], seed=1, label_smoothing=smoothing)
    x = rng.normal(size=(8, 64))
    m.train_step(x, y[:8], trace=True)
    _, dy_host = P.softmax_xent_grad(m.last_trace.z[0], y[:8], label_smoothing=smoothing)
    np.testing.assert_array_equal(m.last_trace.dy[0], dy_host)  # the MLP uses its setting
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0.0, 1.0\)"):
        P.softmax_xent_grad(z_q, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0.0, 1.0\)"):
        P.FixedMLP([4, 2], label_smoothing=-0.1)


def test_fixed_mlp_trace_replays_phase_by_phase():
    data = load_digits_split(0, size=8)
    x = data.x_train.reshape(len(data.x_train), -1)[:32]
    y = data.y_train[:32]
    acc = CountingAccel()
    m = P.FixedMLP([64, 20, 10], seed=4, track_ratio=5, init_decay=0.9, accel=acc)
    m.train_step(x, y)
    m.train_step(x, y, trace=True)
    assert acc.calls == {"forward": 4, "backward": 2, "weight_grad": 4, "update": 8}
    tr = m.last_trace
    assert m.decay == 0.9
    np.testing.assert_array_equal(tr.x_q, P.quantize(x.numpy().T, 8, 16))
    for l in range(2):
        np.testing.assert_array_equal(tr.z[l], r_forward(tr.weights[l], tr.inputs[l]))
        np.testing.assert_array_equal(tr.dw[l], r_wgrad(tr.dy[l], tr.inputs[l]))
    np.testing.assert_array_equal(tr.inputs[1][:-1], P.relu(tr.z[0]))
    assert (tr.inputs[1][-1] == 256).all()
    loss, dy = P.softmax_xent_grad(tr.z[1], y)
    assert loss == tr.loss
    np.testing.assert_array_equal(tr.dy[1], dy)
    np.testing.assert_array_equal(tr.dx[1], r_backward(tr.weights[1], tr.dy[1]))
    np.testing.assert_array_equal(tr.dy[0], P.relu_backward(tr.dx[1][:-1], tr.z[0]))
    assert tr.dx[0] is None
    names = [u[0] for u in tr.updates]
    assert names == ["b1", "W1", "b0", "W0"]
    theta = tr.updates[0][2]
    for _name, sp, th_in, th_out, w_in, dw_in, w_out, _mask in tr.updates:
        assert th_in == theta
        assert sp.decay_q == round(0.9 * 65536)
        got = r_update(w_in, dw_in, th_in, sp)
        np.testing.assert_array_equal(w_out, got[0])
        assert th_out == got[1]
        theta = th_out
    assert m.theta == theta
    np.testing.assert_array_equal(m.weights[0][:, :64], tr.updates[3][6])
    np.testing.assert_array_equal(m.weights[0][:, 64], tr.updates[2][6][:, 0])


def test_fixed_mlp_initial_weights_and_learning():
    m = P.FixedMLP([64, 30, 10], seed=2)
    ref = CounterInit(2)
    w = ref.w0(0, (30, 64), 1 / 8).double().numpy() * 2**12
    assert np.abs(m.weights[0][:, :64] - w).max() <= 1.1
    b = ref.w0(3, (10,), 1 / math.sqrt(30)).double().numpy() * 2**12
    assert np.abs(m.weights[1][:, 30] - b).max() <= 1.1
    assert m.numel == 64 * 30 + 30 + 30 * 10 + 10 and m.track_size == m.numel // 10
    data = load_digits_split(0, size=8)
    x, y = data.x_train.reshape(len(data.x_train), -1)[:256], data.y_train[:256]
    losses = P.train_fixed(m, x, y, epochs=8, seed=0)
    assert losses[-1] < 0.5 * losses[0]
    assert m.accuracy(x, y) > 70
    assert 0.5 * m.track_size < m.tracked_count < 2 * m.track_size


def test_epoch_batches_are_full_and_follow_the_permutation():
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):  # one randperm per epoch, as before partial batches were dropped
        bs = P.epoch_batches(70, 32, gen)
        assert [len(b) for b in bs] == [32, 32]
        assert torch.equal(torch.cat(bs), torch.randperm(70, generator=ref)[:64])
    assert [len(b) for b in P.epoch_batches(64, 32, gen)] == [32, 32]
    assert [len(b) for b in P.epoch_batches(5, 5, gen)] == [5]
    for bad in (0, 71, 2.0):
        with pytest.raises(ValueError, match=r"batch must be an integer in \[1, 70\]"):
            P.epoch_batches(70, bad, gen)


def test_train_fixed_steps_on_full_batches_only():
    m = P.FixedMLP([64, 8, 10], seed=1)
    data = load_digits_split(0, size=8)
    x, y = data.x_train.reshape(len(data.x_train), -1)[:40], data.y_train[:40]
    sizes = []
    step = m.train_step
    m.train_step = lambda xb, yb: (sizes.append(len(xb)), step(xb, yb))[1]
    assert len(P.train_fixed(m, x, y, epochs=2, batch=16)) == 2
    assert sizes == [16, 16, 16, 16]  # 40 images: 8 left over each epoch
    before = [w.copy() for w in m.weights]
    with pytest.raises(ValueError, match=r"batch must be an integer in \[1, 40\]"):
        P.train_fixed(m, x, y, epochs=1, batch=41)
    assert all(np.array_equal(a, b) for a, b in zip(before, m.weights))  # nothing changed


# --- errors --------------------------------------------------------------------------------


def test_value_errors():
    with pytest.raises(ValueError, match=r"data_bits must be an integer in \[2, 24\]"):
        P.FixedConfig(data_bits=32)
    with pytest.raises(ValueError, match=r"acc_bits must be an integer in \[16, 48\]"):
        P.FixedConfig(acc_bits=64)
    with pytest.raises(ValueError, match=r"w_frac must be an integer in \[0, 15\]"):
        P.FixedConfig(w_frac=16)
    with pytest.raises(ValueError, match="g_frac \\+ x_frac must be >= w_frac"):
        P.FixedConfig(w_frac=12, x_frac=2, g_frac=4)
    with pytest.raises(ValueError, match=r"W_q values must be in \[-32768, 32767\]"):
        P.forward([[40000]], [[1]])
    with pytest.raises(ValueError, match="X_q must be an integer array"):
        P.forward([[1]], [[0.5]])
    with pytest.raises(ValueError, match="must agree on K"):
        P.forward(np.ones((2, 3), dtype=int), np.ones((4, 1), dtype=int))
    with pytest.raises(ValueError, match="path must be one of auto, loop"):
        P.forward([[1]], [[1]], path="vector")
    with pytest.raises(ValueError, match=r"lr_q must be an integer in \[0, 65535\]"):
        P.StepParams(65536, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"up_q must be an integer in \[0, 4294967295\]"):
        P.StepParams(0, 0, 0, 0, -1, 0)
    with pytest.raises(ValueError, match=r"lr must be a number in \[0.0, 1.0\)"):
        P.step_constants(1.0, 1.0, 0.9, 0.01, 0.1, seed=0)
    with pytest.raises(ValueError, match=r"q must be a number in \(0.0, 1.0\)"):
        P.step_constants(0.1, 1.0, 1.0, 0.01, 0.1, seed=0)
    with pytest.raises(ValueError, match=r"bound must be a number in \[0.0, 7.99"):
        P.step_constants(0.1, 1.0, 0.9, 0.01, 8.0, seed=0)
    with pytest.raises(ValueError, match=r"bound_q must be in \[0, 127\]"):
        P.update([[0]], [[0]], 0, P.StepParams(0, 0, 0, 128, 0, 0),
                 P.FixedConfig(data_bits=8, acc_bits=16, w_frac=6, x_frac=4, g_frac=6))
    with pytest.raises(ValueError, match=r"theta must be an integer in \[0, 4294967295\]"):
        P.update([[0]], [[0]], -1, P.StepParams(0, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="dW_q must have the shape of W_q"):
        P.update([[0, 0]], [[0]], 0, P.StepParams(0, 0, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="layer_sizes must be at least two positive integers"):
        P.FixedMLP([64])
    with pytest.raises(ValueError, match=r"track_ratio must be a number in \[1.0, inf\)"):
        P.FixedMLP([4, 2], track_ratio=0.5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        P.softmax_xent_grad(np.zeros((3, 2), dtype=np.int64), [0, 3])
    with pytest.raises(ValueError, match="x must be finite"):
        P.quantize([math.nan], 8, 16)
    with pytest.raises(ValueError, match=r"x_frac must be in \[0, 14\]"):
        P.append_ones(np.zeros((1, 1), dtype=np.int64), P.FixedConfig(x_frac=15))
