"""Bit-exact fixed-point CubistMerge: the model of the merge unit (``hw/cubist``).

Implements ``golden/CUBIST_FIXED.md`` with integer arithmetic only.  Tokens are
signed ``width``-bit integers; adjacent tokens are compared by the integer key

    key(a, b) = sign(d) * floor(d^2 * 2^F / (|a|^2 |b|^2)),   d = a . b

(0 if either token is all zero), i.e. ``cos * |cos|`` truncated to F fractional
bits.  Everything else (candidates, ranking, max-magnitude merge, 2-D order,
merge map) is the same code as the float model ``golden.cubist``, which only
differs in the similarity it ranks by.

Arrays: inputs may be numpy or torch integer arrays; results are torch int64
tensors (``.numpy()`` gives numpy int64).  Keys are computed in int64 when
``(C * max|a| * max|b|)^2 * 2^F`` fits (width 8 with C <= 256 and F <= 16 always
does), otherwise with exact Python integers (slower, same result).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from golden.cubist import (
    Merge1D,
    Merge2D,
    _check_r,
    _merge_2d_core,
    _pass_1d,
    check_2d_args,
    merge_2d_info,
    unmerge_2d,
)

__all__ = [
    "Agreement",
    "agreement",
    "key",
    "merge_1d_fixed",
    "merge_2d_fixed",
    "merge_2d_fixed_batch",
    "merge_2d_fixed_info",
    "quantize",
    "random_frames",
    "unmerge_fixed",
]

WIDTHS = (8, 16)
FRAC_BITS_RANGE = (8, 24)
_INT64_MAX = (1 << 63) - 1


def _check_frac_bits(frac_bits: object) -> int:
    lo, hi = FRAC_BITS_RANGE
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not lo <= frac_bits <= hi:
        raise ValueError(f"frac_bits must be an integer in {lo}..{hi}, got {frac_bits!r}")
    return frac_bits


def _check_width(width: object) -> int:
    if width not in WIDTHS or isinstance(width, bool):
        raise ValueError(f"width must be 8 or 16, got {width!r}")
    return int(width)  # type: ignore[arg-type]


def _as_int64(name: str, a: object) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.to(torch.int64)


def _check_range(name: str, t: torch.Tensor, width: int) -> None:
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}] for width={width}, "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )


def key(a: object, b: object, frac_bits: int = 16) -> torch.Tensor:
    """Similarity key of integer tokens ``a, b [..., C]`` -> int64 ``[...]`` in ``[-2^F, 2^F]``."""
    f = _check_frac_bits(frac_bits)
    a, b = _as_int64("a", a), _as_int64("b", b)
    if a.dim() == 0 or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"a and b must have the same channel count C (last axis), got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return _key(a, b, f)


def _key(a: torch.Tensor, b: torch.Tensor, f: int) -> torch.Tensor:
    c = a.shape[-1]
    ma = int(a.abs().max()) if a.numel() else 0
    mb = int(b.abs().max()) if b.numel() else 0
    if ((c * ma * mb) ** 2) << f <= _INT64_MAX:
        d = (a * b).sum(-1)
        den = (a * a).sum(-1) * (b * b).sum(-1)
        num = d * d * (1 << f)
        q = torch.div(num, torch.where(den == 0, 1, den), rounding_mode="floor")
        return torch.where(den == 0, 0, torch.where(d < 0, -q, q))
    # Exact fallback: Python integers (object arrays) where int64 could overflow.
    an, bn = np.broadcast_arrays(a.numpy().astype(object), b.numpy().astype(object))
    d = (an * bn).sum(-1)
    den = (an * an).sum(-1) * (bn * bn).sum(-1)
    d, den = np.asarray(d, dtype=object), np.asarray(den, dtype=object)
    out = np.zeros(d.shape, dtype=np.int64)
    for idx in np.ndindex(d.shape):
        dv, nv = int(d[idx]), int(den[idx])
        if nv:
            q = ((dv * dv) << f) // nv
            out[idx] = -q if dv < 0 else q
    return torch.from_numpy(out)


def _sim(f: int):
    def sim(lines: torch.Tensor) -> torch.Tensor:
        return _key(lines[..., :-1, :], lines[..., 1:, :], f)

    return sim


def merge_1d_fixed(line: object, r: int, *, width: int = 8, frac_bits: int = 16) -> Merge1D:
    """One 1-D pass over integer lines ``[..., N, C]``; ``r`` clamped to ``N // 2``.

    Returns ``Merge1D(merged, dest_index, removed)`` (int64 / int64 / bool tensors).
    """
    width, f = _check_width(width), _check_frac_bits(frac_bits)
    x = _as_int64("line", line)
    if x.dim() < 2:
        raise ValueError(f"line must be [..., N, C] with at least 2 axes, got {tuple(x.shape)}")
    _check_r("r", r)
    _check_range("line", x, width)
    return _pass_1d(x, _sim(f)(x), r)


def merge_2d_fixed_info(tokens: object, hw: tuple[int, int], r: tuple[int, int], *,
                        prefix: int = 0, width: int = 8, frac_bits: int = 16) -> Merge2D:
    """Batched fixed-point 2-D merge of ``[B, prefix + H*W, C]`` with all decisions."""
    width, f = _check_width(width), _check_frac_bits(frac_bits)
    x = _as_int64("tokens", tokens)
    if x.dim() != 3:
        raise ValueError(f"tokens must be [B, prefix + H*W, C], got shape {tuple(x.shape)}")
    h, w, r_h, r_w, prefix = check_2d_args(tuple(x.shape), hw, r, prefix, name="tokens")
    _check_range("tokens", x, width)
    return _merge_2d_core(x, h, w, r_h, r_w, prefix, _sim(f))


def merge_2d_fixed(tokens: object, hw: tuple[int, int], r: tuple[int, int], *,
                   prefix: int = 0, width: int = 8,
                   frac_bits: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-point 2-D merge of one frame ``[prefix + H*W, C]``.

    Returns ``(merged [prefix + (H-r_h)(W-r_w), C], merge_map [H*W])``, both int64.
    """
    t = _as_int64("tokens", tokens)
    if t.dim() != 2:
        raise ValueError(f"tokens must be one frame [prefix + H*W, C], got shape {tuple(t.shape)}")
    info = merge_2d_fixed_info(t.unsqueeze(0), hw, r, prefix=prefix, width=width,
                               frac_bits=frac_bits)
    return info.merged[0], info.merge_map[0]


def merge_2d_fixed_batch(tokens: object, hw: tuple[int, int], r: tuple[int, int], *,
                         prefix: int = 0, width: int = 8,
                         frac_bits: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_2d_fixed`` on many frames ``[B, prefix + H*W, C]`` at once (vectorized)."""
    info = merge_2d_fixed_info(tokens, hw, r, prefix=prefix, width=width, frac_bits=frac_bits)
    return info.merged, info.merge_map


def unmerge_fixed(merged: object, merge_map: object, prefix: int = 0) -> torch.Tensor:
    """Inverse of ``merge_2d_fixed``: ``[prefix + H'W', C]`` -> ``[prefix + H*W, C]``.

    Also accepts a batch (``merged [B, ...]`` with ``merge_map [B, H*W]``).  Works on
    any integer or float tensor with the merged token count.
    """
    y = merged if isinstance(merged, torch.Tensor) else torch.as_tensor(np.asarray(merged))
    m = _as_int64("merge_map", merge_map)
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"prefix must be an integer >= 0, got {prefix!r}")
    single = y.dim() == 2
    if single:
        y, m = y.unsqueeze(0), m.unsqueeze(0)
    if y.dim() != 3 or m.dim() != 2:
        raise ValueError(
            f"merged must be [tokens, C] or [B, tokens, C] with merge_map [H*W] or [B, H*W], "
            f"got {tuple(y.shape)} and {tuple(m.shape)}"
        )
    if m.numel() and int(m.min()) < 0:
        raise ValueError("merge_map entries must be >= 0")
    out = unmerge_2d(y, m, prefix)
    return out[0] if single else out


def quantize(x_float: object, width: int = 8) -> tuple[torch.Tensor, float]:
    """Symmetric per-tensor quantization to signed ``width`` bits.

    ``scale = max|x| / (2^(width-1) - 1)`` (1.0 for an all-zero tensor);
    ``ints = clamp(round(x / scale), -2^(width-1), 2^(width-1) - 1)`` with
    round-half-to-even.  Returns ``(ints int64, scale)``; ``ints * scale`` dequantizes.
    """
    width = _check_width(width)
    x = x_float if isinstance(x_float, torch.Tensor) else torch.as_tensor(np.asarray(x_float))
    if not x.dtype.is_floating_point:
        raise ValueError(f"x_float must be a floating-point array, got dtype {x.dtype}")
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x_float must be finite (no NaN or inf)")
    qmax = (1 << (width - 1)) - 1
    amax = float(x.abs().max()) if x.numel() else 0.0
    scale = amax / qmax if amax > 0 else 1.0
    ints = torch.clamp(torch.round(x / scale), -qmax - 1, qmax).to(torch.int64)
    return ints, scale


# --- agreement of the fixed-point decisions with the float model -------------------

FRAME_KINDS = ("random", "smooth")


def random_frames(kind: str, frames: int, hw: tuple[int, int], channels: int, *,
                  prefix: int = 0, seed: int = 0) -> torch.Tensor:
    """Float test frames ``[frames, prefix + H*W, C]`` (float32).

    ``random``: i.i.d. standard normal.  ``smooth``: a low-pass filtered random
    field over the grid (3 passes of a 5x5 box filter, like neighbouring patches of
    a real feature map) plus 5% noise, so adjacent tokens are alike.
    """
    if kind not in FRAME_KINDS:
        raise ValueError(f"kind must be one of {FRAME_KINDS}, got {kind!r}")
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(frames, prefix, channels, generator=g)
    grid = torch.randn(frames, channels, h, w, generator=g)
    if kind == "smooth":
        for _ in range(3):
            grid = F.avg_pool2d(F.pad(grid, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        grid = grid / grid.std() + 0.05 * torch.randn(grid.shape, generator=g)
    grid = grid.permute(0, 2, 3, 1).reshape(frames, h * w, channels)
    return torch.cat([pre, grid], dim=1)


class Agreement(NamedTuple):
    removed_total: int
    """Tokens removed by the float model over all frames."""
    removed_agree: int
    """Of those, how many the fixed-point model removed too."""
    frames_identical: int
    """Frames whose merge maps are identical."""
    frames: int

    @property
    def rate(self) -> float:
        return self.removed_agree / self.removed_total if self.removed_total else 1.0


def agreement(x_float: torch.Tensor, hw: tuple[int, int], r: tuple[int, int], *,
              prefix: int = 0, width: int = 8, frac_bits: int = 16) -> Agreement:
    """Compare removed-token decisions: fixed model on ``quantize(x)`` vs float model
    on the dequantized floats (per-frame scale), for ``x [B, prefix + H*W, C]``."""
    qs = [quantize(frame, width) for frame in x_float]
    ints = torch.stack([q for q, _ in qs])
    deq = torch.stack([q.float() * s for q, s in qs])
    fx = merge_2d_fixed_info(ints, hw, r, prefix=prefix, width=width, frac_bits=frac_bits)
    fl = merge_2d_info(deq, hw, r, prefix=prefix)
    agree = int((fx.removed & fl.removed).sum())
    same = int((fx.merge_map == fl.merge_map).all(dim=1).sum())
    return Agreement(int(fl.removed.sum()), agree, same, x_float.shape[0])
