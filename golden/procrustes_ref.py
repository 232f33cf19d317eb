"""Bit-exact functional model of the Procrustes accelerator, and fixed-point training on it.

This module implements ``golden/PROCRUSTES_FIXED.md`` (the contract with the RTL in
``hw/procrustes``) with integers only:

* :class:`FixedConfig`: the number formats (``data_bits``, ``acc_bits``, ``w_frac``,
  ``x_frac``, ``g_frac``);
* :func:`sat`, :func:`rshift`, :func:`quantize`, :func:`dequantize`;
* the three GEMM phases :func:`forward` (``Y = W·X``), :func:`backward`
  (``dX = Wᵀ·dY``) and :func:`weight_grad` (``dW = dY·Xᵀ``), with per-add accumulator
  saturation in the contract's order, and the convolution forms :func:`conv2d_forward`,
  :func:`conv2d_weight_grad` and :func:`conv2d_backward_cols` (lowered with
  ``golden.blockfmt``);
* the weight update :func:`update` (SGD step, PRNG-regenerated and decayed w0, score,
  streaming quantile threshold), with :class:`StepParams` / :func:`step_constants`;
* :class:`FixedMLP`, a fixed-point MLP trained through those functions, with the
  host-side operations (:func:`append_ones`, :func:`relu`, :func:`relu_backward`,
  :func:`softmax_xent_grad`) defined bit-exactly, and a per-phase :class:`StepTrace`.

Speed: GEMM paths
-----------------
Each GEMM output ``a = Σ_k A[m,k]·B[k,n]`` is computed by one of two paths that give
the same integers:

``vector`` (used where it is provably exact)
    If ``Σ_k |A[m,k]|·|B[k,n]| <= 2^(acc_bits-1) - 1``, every partial sum of that output
    (in any order) lies inside the accumulator range, so no add saturates and the
    saturating ordered sum equals the plain sum. ``acc_bits <= 48`` makes every product
    and partial sum an integer below ``2^53`` in magnitude, so a float64 BLAS matmul
    (any blocking or FMA order) computes it exactly. The bound itself is the float64
    matmul ``|A|·|B|`` of non-negative integers: exact while below ``2^53``, and above
    that it cannot drop below ``2^52 > 2^47``, so the test never misclassifies.
``loop`` (the contract, literally)
    A compiled (numba) loop over the non-zeros of the reduction operand in the
    contract's order, saturating after every add. ``path="auto"`` runs it only for the
    outputs that failed the bound; ``path="loop"`` runs it for every output.

The update is one sequential numba loop (the threshold makes it so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from golden.blockfmt import (
    BlockSparse,
    TransposedView,
    conv_output_size,
    gemm_to_nchw,
    im2col,
    lower_conv_weight,
)
from golden.prng import init_bounds, layer_seed, prng_u32, prng_u32_nb

__all__ = [
    "FixedConfig",
    "FixedMLP",
    "StepParams",
    "StepTrace",
    "accumulate",
    "append_ones",
    "backward",
    "conv2d_backward_cols",
    "conv2d_forward",
    "conv2d_weight_grad",
    "dequantize",
    "epoch_batches",
    "forward",
    "forward_error_bound",
    "initial_weights",
    "quantize",
    "relu",
    "relu_backward",
    "rshift",
    "sat",
    "softmax_xent_grad",
    "step_constants",
    "theta_from_float",
    "train_fixed",
    "update",
    "w0_fixed",
    "weight_grad",
]

PATHS = ("auto", "loop")
U32_MAX = 2**32 - 1
THETA_EXTRA_FRAC = 16  # theta has w_frac + 16 fractional bits


# ---------------------------------------------------------------- validation helpers
def _int_in(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _float_in(name: str, v, lo: float, hi: float, *, lo_open=False, hi_open=False) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in {_range(lo, hi, lo_open, hi_open)}, "
                         f"got {v!r}") from None
    ok = math.isfinite(f) and (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
    if not ok:
        raise ValueError(f"{name} must be a number in {_range(lo, hi, lo_open, hi_open)}, "
                         f"got {v!r}")
    return f


def _range(lo, hi, lo_open, hi_open) -> str:
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    return path


# ---------------------------------------------------------------- number formats
@dataclass(frozen=True)
class FixedConfig:
    """Number formats of the accelerator (``golden/PROCRUSTES_FIXED.md``).

    ``data_bits`` in [2, 24]: signed width of weights, activations and gradients.
    ``acc_bits`` in [data_bits, 48]: signed accumulator width (48 keeps every product and
    partial sum exact in int64 and in float64, see the module docstring).
    ``w_frac``, ``x_frac``, ``g_frac`` in [0, data_bits - 1]: fractional bits of weights
    (and dW, w0, scores), activations, gradients; ``g_frac + x_frac >= w_frac`` (the
    weight-gradient shift cannot be negative).
    """

    data_bits: int = 16
    acc_bits: int = 32
    w_frac: int = 12
    x_frac: int = 8
    g_frac: int = 12

    def __post_init__(self):
        db = _int_in("data_bits", self.data_bits, 2, 24)
        _int_in("acc_bits", self.acc_bits, db, 48)
        for name in ("w_frac", "x_frac", "g_frac"):
            _int_in(name, getattr(self, name), 0, db - 1)
        if self.g_frac + self.x_frac < self.w_frac:
            raise ValueError(
                f"g_frac + x_frac must be >= w_frac (the weight-gradient shift "
                f"g_frac + x_frac - w_frac cannot be negative), got "
                f"{self.g_frac} + {self.x_frac} < {self.w_frac}")

    @property
    def data_min(self) -> int:
        return -(1 << (self.data_bits - 1))

    @property
    def data_max(self) -> int:
        return (1 << (self.data_bits - 1)) - 1

    @property
    def acc_min(self) -> int:
        return -(1 << (self.acc_bits - 1))

    @property
    def acc_max(self) -> int:
        return (1 << (self.acc_bits - 1)) - 1

    @property
    def wgrad_shift(self) -> int:
        """``g_frac + x_frac - w_frac``: the output shift of the weight-gradient phase."""
        return self.g_frac + self.x_frac - self.w_frac


def sat(v, bits: int):
    """``min(max(v, -2^(bits-1)), 2^(bits-1) - 1)``; int in, int out; arrays as int64."""
    bits = _int_in("bits", bits, 1, 63)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if isinstance(v, (int, np.integer)):
        return min(max(int(v), lo), hi)
    return np.clip(np.asarray(v, dtype=np.int64), lo, hi)


def rshift(v, s: int):
    """``v`` if ``s == 0`` else ``(v + 2^(s-1)) >> s``: arithmetic shift, round half up
    (a negative tie rounds toward +inf: ``rshift(-3, 1) == -1``)."""
    s = _int_in("s", s, 0, 62)
    if isinstance(v, (int, np.integer)):
        v = int(v)
        return v if s == 0 else (v + (1 << (s - 1))) >> s
    v = np.asarray(v, dtype=np.int64)
    return v.copy() if s == 0 else (v + np.int64(1 << (s - 1))) >> np.int64(s)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def quantize(x, frac: int, bits: int) -> np.ndarray:
    """Float to fixed point: ``sat(floor(x·2^frac + 1/2), bits)`` (round half up, like
    :func:`rshift`), as an int64 numpy array. ``x``: number, numpy array or tensor."""
    frac = _int_in("frac", frac, 0, 62)
    bits = _int_in("bits", bits, 1, 63)
    x = _to_numpy(x).astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("x must be finite (no inf or nan) to quantize")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = np.floor(np.clip(x * 2.0**frac, lo - 1, hi + 1) + 0.5)
    return np.clip(q, lo, hi).astype(np.int64)


def dequantize(q, frac: int) -> np.ndarray:
    """Fixed point to float64: ``q·2^-frac``."""
    frac = _int_in("frac", frac, 0, 62)
    return _to_numpy(q).astype(np.float64) * 2.0**-frac


def _int_matrix(name: str, a, cfg: FixedConfig, ndim: int = 2) -> np.ndarray:
    """A dense int64 array of data_bits values (checked)."""
    if isinstance(a, (BlockSparse, TransposedView)):
        a = a.decode()
    a = _to_numpy(a)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array (fixed point), got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    a = a.astype(np.int64)
    if a.size and (a.min() < cfg.data_min or a.max() > cfg.data_max):
        raise ValueError(f"{name} values must be in [{cfg.data_min}, {cfg.data_max}] "
                         f"(data_bits={cfg.data_bits}), got [{a.min()}, {a.max()}]")
    return a


# ---------------------------------------------------------------- GEMM core
def _csr_dense(a: np.ndarray):
    """Non-zeros of each row of ``a`` in increasing column order."""
    r, c = np.nonzero(a)
    indptr = np.zeros(a.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=a.shape[0]), out=indptr[1:])
    return indptr, c.astype(np.int64), a[r, c].astype(np.int64)


def _csr_walk(walk, rows: int):
    """CSR of a block-format walk (already in row order, increasing column in a row)."""
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(walk.row, minlength=rows), out=indptr[1:])
    return indptr, walk.col.astype(np.int64), walk.value.astype(np.int64)


@numba.njit(cache=False)
def _acc_loop(indptr, idx, val, b, rows, cols, lo, hi, out):
    """The contract's loop: for each listed (m, n), saturate after every add."""
    for t in range(rows.shape[0]):
        m = rows[t]
        n = cols[t]
        a = 0
        for p in range(indptr[m], indptr[m + 1]):
            a += val[p] * b[idx[p], n]
            if a > hi:
                a = hi
            elif a < lo:
                a = lo
        out[m, n] = a


def _accumulate(a, csr_of, b, cfg: FixedConfig, path: str):
    """``a``: dense int64 [M, K] (zeros skipped); ``csr_of()``: its rows' non-zeros in the
    reduction order; ``b``: int64 [K, N]. Returns (acc int64 [M, N], outputs looped)."""
    M, N = a.shape[0], b.shape[1]
    if path == "loop":
        rows, cols = (x.reshape(-1) for x in np.indices((M, N), dtype=np.int64))
        out = np.zeros((M, N), dtype=np.int64)
    else:
        af, bf = a.astype(np.float64), b.astype(np.float64)
        bound = np.abs(af) @ np.abs(bf)
        out = (af @ bf).astype(np.int64)  # exact where bound <= acc_max (module docstring)
        rows, cols = np.nonzero(bound > cfg.acc_max)
        if rows.size == 0:
            return out, 0
    indptr, idx, val = csr_of()
    _acc_loop(indptr, idx, val, np.ascontiguousarray(b), rows.astype(np.int64),
              cols.astype(np.int64), cfg.acc_min, cfg.acc_max, out)
    return out, int(rows.size)


def _reduction_operand(name: str, w, cfg: FixedConfig, transpose: bool):
    """(dense [rows, K] matrix, lazy CSR in the contract's order) of W or Wᵀ."""
    if isinstance(w, BlockSparse):
        dense = _int_matrix(name, w, cfg)
        if transpose:
            return dense.T, lambda: _csr_walk(w.T.walk_rows(), w.shape[1])
        return dense, lambda: _csr_walk(w.walk_rows(), w.shape[0])
    dense = _int_matrix(name, w, cfg)
    if transpose:
        dense = dense.T
    return dense, lambda: _csr_dense(dense)


def accumulate(a, b, cfg: FixedConfig = FixedConfig(), path: str = "auto"):
    """Raw accumulators of ``a·b``: for each (m, n), ``acc = 0`` then
    ``acc = sat(acc + a[m,k]·b[k,n], acc_bits)`` over the non-zero ``a[m,k]`` in increasing
    ``k``. ``a``: dense int [M, K] or ``BlockSparse`` (its row walk) or ``BlockSparse.T``
    (its column walk). Returns ``(acc int64 [M, N], outputs computed by the ordered loop)``.
    """
    _check_path(path)
    if isinstance(a, TransposedView):
        dense, csr = _reduction_operand("a", a.base, cfg, transpose=True)
    else:
        dense, csr = _reduction_operand("a", a, cfg, transpose=False)
    b = _int_matrix("b", b, cfg)
    if b.shape[0] != dense.shape[1]:
        raise ValueError(f"a [M, K] and b [K, N] must agree on K, got {dense.shape} and "
                         f"{b.shape}")
    return _accumulate(dense, csr, b, cfg, path)


def _narrow(acc: np.ndarray, shift: int, cfg: FixedConfig) -> np.ndarray:
    return np.clip(rshift(acc, shift), cfg.data_min, cfg.data_max)


def forward(W_q, X_q, cfg: FixedConfig = FixedConfig(), path: str = "auto") -> np.ndarray:
    """Forward phase ``Y = W·X`` (int64 [M, N], ``x_frac`` fractional bits).

    ``W_q``: int [M, K] with ``w_frac`` bits, dense (zeros skipped) or ``BlockSparse``;
    ``X_q``: int [K, N] with ``x_frac`` bits. Per output: saturating accumulation over the
    non-zero ``W[m, k]`` in increasing k, then ``sat(rshift(acc, w_frac), data_bits)``.

    Error bound against float (tested): with float inputs ``W``, ``X`` quantized to
    ``W_q``, ``X_q`` (each off by at most half an LSB, ``δw = 2^-(w_frac+1)``,
    ``δx = 2^-(x_frac+1)``) and no saturation (accumulation is then exact),
    ``|Y_q·2^-x_frac - (W·X)[m,n]| <= Σ_k (δx·|W_q[m,k]|·2^-w_frac + δw·|X[k,n]|)
    + 2^-(x_frac+1)``: the two input roundings, then the output rounding. Against the
    quantized inputs only the last term remains. See :func:`forward_error_bound`.
    """
    dense, csr = _reduction_operand("W_q", W_q, cfg, transpose=False)
    X = _int_matrix("X_q", X_q, cfg)
    if X.shape[0] != dense.shape[1]:
        raise ValueError(f"W_q [M, K] and X_q [K, N] must agree on K, got {dense.shape} "
                         f"and {X.shape}")
    acc, _ = _accumulate(dense, csr, X, cfg, _check_path(path))
    return _narrow(acc, cfg.w_frac, cfg)


def backward(W_q, dY_q, cfg: FixedConfig = FixedConfig(), path: str = "auto") -> np.ndarray:
    """Backward phase ``dX = Wᵀ·dY`` (int64 [K, N], ``g_frac`` bits): per (k, n), saturating
    accumulation over the non-zero ``W[m, k]`` in increasing m (the column walk of the
    block format), then ``sat(rshift(acc, w_frac), data_bits)``."""
    dense, csr = _reduction_operand("W_q", W_q, cfg, transpose=True)
    dY = _int_matrix("dY_q", dY_q, cfg)
    if dY.shape[0] != dense.shape[1]:
        raise ValueError(f"W_q [M, K] and dY_q [M, N] must agree on M, got "
                         f"{dense.shape[::-1]} and {dY.shape}")
    acc, _ = _accumulate(dense, csr, dY, cfg, _check_path(path))
    return _narrow(acc, cfg.w_frac, cfg)


def weight_grad(dY_q, X_q, cfg: FixedConfig = FixedConfig(), path: str = "auto") -> np.ndarray:
    """Weight-gradient phase ``dW = dY·Xᵀ`` (int64 [M, K], ``w_frac`` bits), for every
    (m, k): saturating accumulation over n increasing, then
    ``sat(rshift(acc, g_frac + x_frac - w_frac), data_bits)``. (Zero products are skipped
    in the loop; adding 0 to an in-range accumulator never changes it.)"""
    dY = _int_matrix("dY_q", dY_q, cfg)
    X = _int_matrix("X_q", X_q, cfg)
    if dY.shape[1] != X.shape[1]:
        raise ValueError(f"dY_q [M, N] and X_q [K, N] must agree on N, got {dY.shape} "
                         f"and {X.shape}")
    acc, _ = _accumulate(dY, lambda: _csr_dense(dY), np.ascontiguousarray(X.T), cfg,
                         _check_path(path))
    return _narrow(acc, cfg.wgrad_shift, cfg)


def forward_error_bound(W, X, cfg: FixedConfig = FixedConfig()) -> np.ndarray:
    """The float64 bound [M, N] of :func:`forward`'s docstring on ``|Y_q·2^-x_frac - W·X|``
    for float inputs ``W`` [M, K], ``X`` [K, N] that are quantized without saturating."""
    W, X = _to_numpy(W).astype(np.float64), _to_numpy(X).astype(np.float64)
    wq = dequantize(quantize(W, cfg.w_frac, cfg.data_bits), cfg.w_frac)
    dw, dx = 2.0 ** -(cfg.w_frac + 1), 2.0 ** -(cfg.x_frac + 1)
    return dx * np.abs(wq).sum(1)[:, None] + dw * np.abs(X).sum(0)[None, :] \
        + 2.0 ** -(cfg.x_frac + 1)


# ---------------------------------------------------------------- convolution
def _conv_cols(x_q, kernel_size, stride, padding, cfg):
    x = _int_matrix("x_q", x_q, cfg, ndim=4)
    cols = im2col(x, kernel_size, stride, padding)
    ho, wo = conv_output_size(x.shape[2], x.shape[3], kernel_size, stride, padding)
    return np.ascontiguousarray(cols), x.shape[0], ho, wo


def _conv_weight(w_q):
    if isinstance(w_q, BlockSparse):
        return w_q
    w = _to_numpy(w_q)
    return lower_conv_weight(w) if w.ndim == 4 else w


def conv2d_forward(w_q, x_q, cfg: FixedConfig = FixedConfig(), stride=1, padding=0,
                   kernel_size=None, path: str = "auto") -> np.ndarray:
    """Convolution as the forward GEMM: ``forward(lower_conv_weight(w), im2col(x))``
    reshaped to ``[N, O, Ho, Wo]``. ``w_q``: int ``[O, I, kh, kw]``, or its GEMM form
    ``[O, I*kh*kw]`` (dense or ``BlockSparse``) together with ``kernel_size``."""
    w = _conv_weight(w_q)
    ks = kernel_size if kernel_size is not None else _to_numpy(w_q).shape[2:]
    cols, n, ho, wo = _conv_cols(x_q, tuple(ks), stride, padding, cfg)
    return gemm_to_nchw(forward(w, cols, cfg, path), n, ho, wo)


def conv2d_weight_grad(dy_q, x_q, kernel_size, cfg: FixedConfig = FixedConfig(), stride=1,
                       padding=0, path: str = "auto") -> np.ndarray:
    """Weight gradient of a convolution in GEMM form ``[O, I*kh*kw]``:
    ``weight_grad(dY as [O, N*Ho*Wo], im2col(x))``. ``dy_q``: int ``[N, O, Ho, Wo]``."""
    dy = _int_matrix("dy_q", dy_q, cfg, ndim=4)
    cols, n, ho, wo = _conv_cols(x_q, kernel_size, stride, padding, cfg)
    if dy.shape[0] != n or dy.shape[2:] != (ho, wo):
        raise ValueError(f"dy_q must have shape [{n}, O, {ho}, {wo}], got {dy.shape}")
    dy2 = dy.transpose(1, 0, 2, 3).reshape(dy.shape[1], -1)
    return weight_grad(dy2, cols, cfg, path)


def conv2d_backward_cols(w_q, dy_q, cfg: FixedConfig = FixedConfig(),
                         path: str = "auto") -> np.ndarray:
    """Backward phase of a convolution: ``Wᵀ·dY`` in im2col layout ``[I*kh*kw, N*Ho*Wo]``
    (what the accelerator produces; folding it back to ``[N, I, H, W]`` (col2im) is a host
    operation the contract does not define)."""
    dy = _int_matrix("dy_q", dy_q, cfg, ndim=4)
    return backward(_conv_weight(w_q), dy.transpose(1, 0, 2, 3).reshape(dy.shape[1], -1),
                    cfg, path)


# ---------------------------------------------------------------- weight update
@dataclass(frozen=True)
class StepParams:
    """Per-step, per-layer constants of the update (ranges of the contract):
    ``lr_q`` [0, 2^16-1] (lr·2^16), ``decay_q`` [0, 2^17-1] (decay·2^16), ``seed``
    [0, 2^32-1], ``bound_q`` [0, 2^16-1] (bound·2^w_frac; also at most
    2^(data_bits-1)-1, checked by :func:`update`), ``up_q``, ``dn_q`` [0, 2^32-1]
    (q_step·q·2^32, q_step·(1-q)·2^32)."""

    lr_q: int
    decay_q: int
    seed: int
    bound_q: int
    up_q: int
    dn_q: int

    def __post_init__(self):
        for name, hi in (("lr_q", 2**16 - 1), ("decay_q", 2**17 - 1), ("seed", U32_MAX),
                         ("bound_q", 2**16 - 1), ("up_q", U32_MAX), ("dn_q", U32_MAX)):
            object.__setattr__(self, name, _int_in(name, getattr(self, name), 0, hi))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def step_constants(lr: float, decay: float, q: float, q_step: float, bound: float,
                   cfg: FixedConfig = FixedConfig(), *, seed: int) -> StepParams:
    """:class:`StepParams` from floats, each rounded half up: ``lr`` in [0, 1),
    ``decay`` in [0, 1], ``q`` in (0, 1), ``q_step`` in (0, 1), ``bound`` >= 0 with
    ``round(bound·2^w_frac) <= 2^(data_bits-1) - 1``, ``seed`` the layer's PRNG seed."""
    lr = _float_in("lr", lr, 0.0, 1.0, hi_open=True)
    decay = _float_in("decay", decay, 0.0, 1.0)
    q = _float_in("q", q, 0.0, 1.0, lo_open=True, hi_open=True)
    q_step = _float_in("q_step", q_step, 0.0, 1.0, lo_open=True, hi_open=True)
    bmax = min(cfg.data_max, 2**16 - 1)
    bound = _float_in("bound", bound, 0.0, (bmax + 0.5) / 2**cfg.w_frac, hi_open=True)
    lr_q = _round_half_up(lr * 2**16)
    if lr_q > 2**16 - 1:
        raise ValueError(f"lr must be in [0, 1) and round to at most 65535/2^16, got {lr}")
    return StepParams(lr_q=lr_q, decay_q=_round_half_up(decay * 2**16),
                      seed=_int_in("seed", seed, 0, U32_MAX),
                      bound_q=_round_half_up(bound * 2**cfg.w_frac),
                      up_q=min(_round_half_up(q_step * q * 2**32), U32_MAX),
                      dn_q=min(_round_half_up(q_step * (1 - q) * 2**32), U32_MAX))


def theta_from_float(theta: float, cfg: FixedConfig = FixedConfig()) -> int:
    """A float threshold (score units) as the 32-bit ``theta`` with ``w_frac + 16``
    fractional bits (round half up, saturated to [0, 2^32 - 1])."""
    theta = _float_in("theta", theta, 0.0, math.inf, hi_open=True)
    return min(_round_half_up(theta * 2.0 ** (cfg.w_frac + THETA_EXTRA_FRAC)), U32_MAX)


def w0_fixed(seed: int, n: int, bound_q: int) -> np.ndarray:
    """The regenerated initial weights of elements ``0 .. n-1`` (int64, ``w_frac`` bits):
    ``rshift(((prng_u32(seed, idx) >> 16) - 2^15) · bound_q, 15)``."""
    _int_in("seed", seed, 0, U32_MAX)
    _int_in("n", n, 0, 2**32)
    _int_in("bound_q", bound_q, 0, 2**16 - 1)
    u = prng_u32(seed, np.arange(n, dtype=np.int64)).astype(np.int64)
    return (((u >> 16) - 32768) * bound_q + 16384) >> 15


def initial_weights(seed: int, shape, bound: float, cfg: FixedConfig = FixedConfig()):
    """w0 of a whole tensor (decay 1), int64 of ``shape``: the fixed-point reading of
    ``golden.prng.CounterInit`` (``seed`` is the tensor's layer seed)."""
    bound_q = step_constants(0.0, 1.0, 0.5, 0.5, bound, cfg, seed=seed).bound_q
    return w0_fixed(seed, math.prod(shape), bound_q).reshape(shape)


@numba.njit(inline="always")
def _mulhi32(theta, c):
    """``(theta · c) >> 32`` exactly for theta, c < 2^32, in int64 (16-bit split)."""
    hi = theta * (c >> 16)  # < 2^48
    lo = theta * (c & 0xFFFF)  # < 2^48
    return (hi + (lo >> 16)) >> 16


@numba.njit(cache=False)
def _update_kernel(w, g, theta, lr_q, decay_q, seed, bound_q, up_q, dn_q, lo, hi, out, mask):
    seed_u = np.uint64(seed)
    for idx in range(w.shape[0] - 1, -1, -1):
        w1 = w[idx] - ((lr_q * g[idx] + 32768) >> 16)
        if w1 > hi:
            w1 = hi
        elif w1 < lo:
            w1 = lo
        u = np.int64(prng_u32_nb(seed_u, np.uint64(idx)))
        s = (u >> 16) - 32768
        w0 = (s * bound_q + 16384) >> 15
        dw0 = (decay_q * w0 + 32768) >> 16
        score = abs(w1 - dw0)
        t = theta < (score << 16)
        if t:
            theta = min(theta + _mulhi32(theta, up_q), 4294967295)
            out[idx] = w1
        else:
            theta = theta - _mulhi32(theta, dn_q)
            out[idx] = dw0
        mask[idx] = t
    return theta


def update(W_q, dW_q, theta: int, step_params: StepParams, cfg: FixedConfig = FixedConfig()):
    """One layer's weight update (contract section "Weight update"), elements visited from
    the last to the first. ``W_q``: int [M, K] (``w_frac``), dense or ``BlockSparse``;
    ``dW_q``: int [M, K] (``w_frac``); ``theta``: the 32-bit threshold carried in.

    Returns ``(W_new, theta_new, tracked_mask)``: ``W_new`` int64 [M, K] (a ``BlockSparse``
    of the same block size when ``W_q`` was one), ``theta_new`` int, ``tracked_mask``
    bool [M, K].
    """
    if not isinstance(step_params, StepParams):
        raise ValueError(f"step_params must be a StepParams, got {type(step_params).__name__}")
    theta = _int_in("theta", theta, 0, U32_MAX)
    sp = step_params
    if sp.bound_q > cfg.data_max:
        raise ValueError(f"bound_q must be in [0, {cfg.data_max}] (w0 must fit in "
                         f"data_bits={cfg.data_bits}), got {sp.bound_q}")
    W = _int_matrix("W_q", W_q, cfg)
    dW = _int_matrix("dW_q", dW_q, cfg)
    if dW.shape != W.shape:
        raise ValueError(f"dW_q must have the shape of W_q {W.shape}, got {dW.shape}")
    if W.size > 2**32:
        raise ValueError(f"W_q must have at most 2^32 elements (32-bit PRNG index), got "
                         f"{W.size}")
    out = np.empty(W.size, dtype=np.int64)
    mask = np.empty(W.size, dtype=np.bool_)
    theta = _update_kernel(np.ascontiguousarray(W).reshape(-1),
                           np.ascontiguousarray(dW).reshape(-1), np.int64(theta),
                           np.int64(sp.lr_q), np.int64(sp.decay_q), np.int64(sp.seed),
                           np.int64(sp.bound_q), np.int64(sp.up_q), np.int64(sp.dn_q),
                           np.int64(cfg.data_min), np.int64(cfg.data_max), out, mask)
    W_new = out.reshape(W.shape)
    if isinstance(W_q, BlockSparse):
        W_new = BlockSparse.encode(W_new, W_q.block)
    return W_new, int(theta), mask.reshape(W.shape)


# ---------------------------------------------------------------- host-side operations
def append_ones(X_q, cfg: FixedConfig = FixedConfig()) -> np.ndarray:
    """``X_q`` [K, N] with a last row of ones (``2^x_frac``): the bias input, so a layer
    ``W·x + b`` is the single GEMM ``[W | b]·[x; 1]``. Needs ``x_frac <= data_bits - 2``."""
    if cfg.x_frac > cfg.data_bits - 2:
        raise ValueError(f"x_frac must be in [0, {cfg.data_bits - 2}] to represent the bias "
                         f"input 1.0, got {cfg.x_frac}")
    X = np.asarray(X_q, dtype=np.int64)
    return np.vstack([X, np.full((1, X.shape[1]), 1 << cfg.x_frac, dtype=np.int64)])


def relu(Z_q) -> np.ndarray:
    """``max(Z, 0)`` on integers (same format in and out)."""
    return np.maximum(np.asarray(Z_q, dtype=np.int64), 0)


def relu_backward(dX_q, Z_q) -> np.ndarray:
    """``dX`` where the forward pre-activation ``Z > 0``, else 0 (integers)."""
    return np.where(np.asarray(Z_q) > 0, np.asarray(dX_q, dtype=np.int64), 0)


def softmax_xent_grad(logits_q, labels, cfg: FixedConfig = FixedConfig(), *,
                      label_smoothing: float = 0.0):
    """Host-side loss and its gradient. ``logits_q``: int [C, N] with ``x_frac`` bits
    (the last forward output); ``labels``: int [N].

    Runs on the host, in float64, not on the accelerator: ``z = logits_q·2^-x_frac``,
    ``p = softmax(z)`` per column, ``loss = mean(-log p[label])`` (float),
    ``dY = (p - onehot) / N`` (the gradient of the mean loss) quantized to ``g_frac``
    bits (round half up, saturated). Returns ``(loss, dY_q int64 [C, N])``. With
    ``label_smoothing`` e in [0, 1) the target is ``(1 - e)·onehot + e/C`` (as
    ``torch.nn.CrossEntropyLoss(label_smoothing=e)``) in the loss and the gradient.
    """
    e_ls = _float_in("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)
    Z = dequantize(logits_q, cfg.x_frac)
    y = _to_numpy(labels).astype(np.int64).reshape(-1)
    if Z.ndim != 2 or y.shape[0] != Z.shape[1]:
        raise ValueError(f"labels must have one entry per column of logits_q {Z.shape}, got "
                         f"{y.shape[0]}")
    if y.size and (y.min() < 0 or y.max() >= Z.shape[0]):
        raise ValueError(f"labels must be in [0, {Z.shape[0] - 1}], got [{y.min()}, {y.max()}]")
    Z = Z - Z.max(axis=0, keepdims=True)
    e = np.exp(Z)
    p = e / e.sum(axis=0, keepdims=True)
    cols = np.arange(y.shape[0])
    target = np.full_like(p, e_ls / p.shape[0])
    target[y, cols] += 1.0 - e_ls
    loss = float(-np.mean(np.sum(target * (Z - np.log(e.sum(axis=0, keepdims=True))), axis=0)))
    return loss, quantize((p - target) / y.shape[0], cfg.g_frac, cfg.data_bits)


# ---------------------------------------------------------------- fixed-point MLP
class _Reference:
    """The accelerator phases of this module (the default ``accel`` of :class:`FixedMLP`;
    an RTL-in-the-loop testbench passes an object with the same four methods)."""

    forward = staticmethod(forward)
    backward = staticmethod(backward)
    weight_grad = staticmethod(weight_grad)
    update = staticmethod(update)


@dataclass
class StepTrace:
    """Every tensor crossing the host/accelerator boundary in one ``train_step``, in GEMM
    layout, per layer ``l`` (all int64 unless said otherwise):

    ``x_q`` [in, N] the quantized input; ``inputs[l]`` the layer's GEMM input with the ones
    row; ``weights[l]`` the GEMM matrix ``[W | b]`` used by all three phases; ``z[l]`` the
    forward output (pre-activation); ``dy[l]`` the gradient entering the layer (from
    :func:`softmax_xent_grad` for the last, else :func:`relu_backward`); ``dx[l]`` the
    backward output (``None`` for layer 0, which has none); ``dw[l]`` the weight gradient
    ``[dW | db]``; ``updates``: one record per :func:`update` call in call order (last
    layer first, bias before weight): ``(name, step_params, theta_in, theta_out, W_in,
    dW_in, W_out, mask)``; ``loss`` the host's float loss.
    """

    x_q: np.ndarray
    inputs: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    z: list = field(default_factory=list)
    dy: list = field(default_factory=list)
    dx: list = field(default_factory=list)
    dw: list = field(default_factory=list)
    updates: list = field(default_factory=list)
    loss: float = math.nan


class FixedMLP:
    """An MLP (Linear + ReLU, no activation after the last layer) trained in fixed point
    through this module: every GEMM and every update is an accelerator phase, everything
    else is one of the host operations above.

    Layer ``l`` is the GEMM matrix ``A_l = [W_l | b_l]`` of shape ``[out, in + 1]`` on
    inputs with a ones row (:func:`append_ones`). Its parameters are numbered like
    ``nn.Sequential`` of ``nn.Linear`` (``W_l`` is parameter ``2l``, ``b_l`` is ``2l+1``),
    so ``w0`` of each element is the fixed-point reading of ``CounterInit(seed)``'s
    (:func:`initial_weights`), and the update runs, like ``golden.dropback.Dropback``,
    over the parameters from the last to the first (``b_l`` then ``W_l``), each as its
    own :func:`update` call ([out, 1] and [out, in]) with its own layer seed; ``theta``
    carries through all of them and across steps.

    Budget: ``k = N // track_ratio`` of all ``N`` parameters, ``q = 1 - k/N``. ``decay``
    starts at 1 and is multiplied by ``init_decay`` at every step after the first
    (float64, as in ``Dropback``); ``decay_q = round(decay·2^16)``. ``q_step`` defaults to
    ``min(0.5, 11.69/N)`` (the published ResNet-18 ``q_step·N``). ``label_smoothing``
    goes to the host's :func:`softmax_xent_grad` (no accelerator phase changes).
    """

    def __init__(self, layer_sizes, cfg: FixedConfig = FixedConfig(), seed: int = 0,
                 track_ratio: float = 10, q_init: float = 1e-2, q_step: float | None = None,
                 init_decay: float = 0.99, *, lr: float = 0.2, label_smoothing: float = 0.0,
                 accel=None):
        sizes = list(layer_sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                                 or s < 1 for s in sizes):
            raise ValueError(f"layer_sizes must be at least two positive integers, got {sizes!r}")
        if not isinstance(cfg, FixedConfig):
            raise ValueError(f"cfg must be a FixedConfig, got {type(cfg).__name__}")
        append_ones(np.zeros((1, 1), dtype=np.int64), cfg)  # checks x_frac
        self.cfg = cfg
        self.sizes = [int(s) for s in sizes]
        self.seed = _int_in("seed", seed, 0, U32_MAX)
        self.track_ratio = _float_in("track_ratio", track_ratio, 1.0, math.inf, hi_open=True)
        self.init_decay = _float_in("init_decay", init_decay, 0.0, 1.0, lo_open=True)
        self.lr = _float_in("lr", lr, 0.0, 1.0, hi_open=True)
        self.label_smoothing = _float_in("label_smoothing", label_smoothing, 0.0, 1.0,
                                         hi_open=True)  # host-side loss only
        shapes = []
        for i, o in zip(self.sizes[:-1], self.sizes[1:]):
            shapes += [(o, i), (o,)]
        self.numel = sum(math.prod(s) for s in shapes)
        self.track_size = int(self.numel // self.track_ratio)
        if self.track_size < 1:
            raise ValueError(f"track_ratio must be in [1, {self.numel}] (at least one tracked "
                             f"weight), got {track_ratio}")
        self.q = 1.0 - self.track_size / self.numel
        if not 0 < self.q < 1:
            raise ValueError(f"track_ratio must be > 1 (q = 1 - k/N in (0, 1)), got {track_ratio}")
        self.q_step = _float_in("q_step", q_step if q_step is not None
                                else min(0.5, 1e-6 * 11_689_512 / self.numel),
                                0.0, 1.0, lo_open=True, hi_open=True)
        self.theta = theta_from_float(_float_in("q_init", q_init, 0.0, math.inf, lo_open=True,
                                                hi_open=True), cfg)
        self.bounds = init_bounds(shapes)
        self.seeds = [layer_seed(self.seed, i) for i in range(len(shapes))]
        self.weights = []  # A_l = [W_l | b_l]
        for l in range(len(self.sizes) - 1):
            w = initial_weights(self.seeds[2 * l], shapes[2 * l], self.bounds[2 * l], cfg)
            b = initial_weights(self.seeds[2 * l + 1], shapes[2 * l + 1],
                                self.bounds[2 * l + 1], cfg)
            self.weights.append(np.hstack([w, b[:, None]]))
        self.accel = accel if accel is not None else _Reference()
        self.decay = 1.0
        self.step_count = 0
        self.tracked_count = self.numel
        self.last_trace: StepTrace | None = None

    @property
    def layers(self) -> int:
        return len(self.weights)

    def quantize_input(self, x) -> np.ndarray:
        """Float inputs ``[N, in]`` to the accelerator's ``X_q`` ``[in, N]`` (``x_frac``)."""
        x = _to_numpy(x).reshape(len(x), -1)
        if x.shape[1] != self.sizes[0]:
            raise ValueError(f"x must have {self.sizes[0]} features, got {x.shape[1]}")
        return quantize(x.T, self.cfg.x_frac, self.cfg.data_bits)

    def forward_batch(self, x, trace: StepTrace | None = None) -> np.ndarray:
        """Integer logits ``[C, N]`` (``x_frac`` bits) of float inputs ``x`` ``[N, in]``."""
        h = self.quantize_input(x)
        if trace is not None:
            trace.x_q = h
        for l, A in enumerate(self.weights):
            xa = append_ones(h, self.cfg)
            z = self.accel.forward(A, xa, self.cfg)
            if trace is not None:
                trace.inputs.append(xa)
                trace.weights.append(A.copy())
                trace.z.append(z)
            h = relu(z) if l < self.layers - 1 else z
        return h

    def predict(self, x) -> np.ndarray:
        """Class of each row of ``x`` (argmax of the integer logits; ties: lowest class)."""
        return self.forward_batch(x).argmax(axis=0)

    def accuracy(self, x, y) -> float:
        return 100.0 * float(np.mean(self.predict(x) == _to_numpy(y)))

    def train_step(self, x, y, trace: bool = False) -> float:
        """One SGD + Procrustes step on a minibatch; returns the host's float loss. With
        ``trace=True`` the step's tensors are kept in ``last_trace`` (:class:`StepTrace`)."""
        cfg, acc = self.cfg, self.accel
        tr = StepTrace(x_q=np.empty(0, dtype=np.int64))
        logits = self.forward_batch(x, tr)
        loss, dy = softmax_xent_grad(logits, y, cfg, label_smoothing=self.label_smoothing)
        tr.loss = loss
        dws = [None] * self.layers
        dys, dxs = [None] * self.layers, [None] * self.layers
        for l in range(self.layers - 1, -1, -1):
            dys[l] = dy
            dws[l] = acc.weight_grad(dy, tr.inputs[l], cfg)
            if l > 0:
                dxs[l] = acc.backward(self.weights[l], dy, cfg)
                dy = relu_backward(dxs[l][:-1], tr.z[l - 1])  # drop the ones row's gradient
        tr.dy, tr.dx, tr.dw = dys, dxs, dws
        if self.step_count > 0:
            self.decay *= self.init_decay
        self.step_count += 1
        tracked = 0
        for l in range(self.layers - 1, -1, -1):
            A, dA = self.weights[l], dws[l]
            K = A.shape[1] - 1
            new = np.empty_like(A)
            for name, pi, cols in ((f"b{l}", 2 * l + 1, slice(K, K + 1)),
                                   (f"W{l}", 2 * l, slice(0, K))):
                sp = step_constants(self.lr, self.decay, self.q, self.q_step, self.bounds[pi],
                                    cfg, seed=self.seeds[pi])
                w_in, dw_in = A[:, cols], dA[:, cols]
                theta_in = self.theta
                w_out, self.theta, mask = acc.update(w_in, dw_in, theta_in, sp, cfg)
                new[:, cols] = w_out
                tracked += int(np.count_nonzero(mask))
                if trace:
                    tr.updates.append((name, sp, theta_in, self.theta, w_in.copy(),
                                       dw_in.copy(), np.asarray(w_out).copy(), mask))
            self.weights[l] = new
        self.tracked_count = tracked
        self.last_trace = tr if trace else None
        return loss


def epoch_batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's minibatches: a fresh ``torch.randperm(n)`` from ``gen``, cut into
    ``n // batch`` full batches. The ``n % batch`` images left over are not used this
    epoch (the next permutation mixes them back in): every step averages the loss over
    exactly ``batch`` images. A partial batch (4 images for 1,348 at batch 32) gives a
    step with ~2.8x the gradient noise (sqrt(32/4)), and the quantile estimator's tracked
    count, which is not fixed, can jump on it. ``batch`` must be in [1, n]."""
    _int_in("batch", batch, 1, max(int(n), 1))
    order = torch.randperm(n, generator=gen)
    return [order[s:s + batch] for s in range(0, n - batch + 1, batch)]


def train_fixed(model: FixedMLP, x_train, y_train, *, epochs: int, batch: int = 32,
                seed: int = 0, progress=None) -> list[float]:
    """Train ``model`` for ``epochs`` with the minibatches of the float experiment
    (:func:`epoch_batches` from ``torch.Generator().manual_seed(seed)``: full batches
    only). Returns the mean loss of each epoch."""
    _int_in("epochs", epochs, 1, 10**6)
    x = _to_numpy(x_train).reshape(len(x_train), -1)
    y = _to_numpy(y_train)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        ls = [model.train_step(x[idx.numpy()], y[idx.numpy()])
              for idx in epoch_batches(len(x), batch, gen)]
        losses.append(float(np.mean(ls)))
        if progress is not None:
            progress.update(1)
    return losses


# On-disk cache of the kernels above, stamped with all golden sources (golden/jitcache.py).
from golden import jitcache as _jitcache  # noqa: E402

_jitcache.enable(globals())
