"""CubistMerge golden model: spatial-preserving 2-D token merging (float).

CubistMerge (Gong and Lis 2025) shrinks an H x W token grid to a dense
(H - r_h) x (W - r_w) grid: every row loses ``r_w`` tokens (horizontal pass),
then every column of the result loses ``r_h`` tokens (vertical pass, on the
merged values).  One 1-D pass over N tokens removing r of them:

* ``s[n]`` is the cosine similarity of the adjacent tokens n and n+1
  (``torch.nn.functional.cosine_similarity`` semantics, always in float32);
* only odd positions ``2k+1`` are candidates; each points at its more similar
  neighbour, ``2k`` or ``2k+2`` (left on a tie; a neighbour past the end counts
  as -inf) and scores that similarity;
* the r candidates with the highest score are removed (ties: lower position
  first);
* a removed token merges into its destination by max-magnitude per channel:
  the value with the larger ``|v|`` is kept, the destination wins ties.

An even token chosen by both of its neighbours takes the per-channel
max-magnitude of all three, in the order destination, left source, right source
(the order of the fixed-point contract, ``golden/CUBIST_FIXED.md``).  The
authors' published code keeps only one of the two sources in that case (the
second scatter into the same destination overwrites the first); this model
keeps both, which is what the hardware does.

``unmerge`` restores the full grid for dense tasks: every removed slot receives
a copy of the token it was merged into.

The selection and merge code here is shared with the bit-exact fixed-point
model (``golden.cubist_fixed``), which only swaps the similarity function, so
the two models can differ only in how similarities compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "Merge1D",
    "Merge2D",
    "adjacent_cosine",
    "merge_1d",
    "merge_2d",
    "merge_2d_info",
    "merge_map_2d",
    "unmerge_2d",
]

Similarity = Callable[[torch.Tensor], torch.Tensor]
"""Maps a line tensor ``[..., N, C]`` to the adjacent similarities ``[..., N - 1]``."""


class Merge1D(NamedTuple):
    """Result of one 1-D pass over lines ``[..., N, C]`` removing r tokens per line."""

    merged: torch.Tensor
    """``[..., N - r, C]``: survivors in original order, with merged values."""
    dest_index: torch.Tensor
    """``[..., N]`` int64: output index of the token each input position ended up in."""
    removed: torch.Tensor
    """``[..., N]`` bool: True where the input token was removed."""


class Merge2D(NamedTuple):
    """Result of a 2-D merge of ``[B, prefix + H*W, C]``, with every decision kept."""

    merged: torch.Tensor
    """``[B, prefix + (H - r_h)(W - r_w), C]``."""
    merge_map: torch.Tensor
    """``[B, H*W]`` int64: for each grid position (row-major), the index of the output
    grid token (prefix not counted) it ended up in."""
    removed_h: torch.Tensor
    """``[B, H, W]`` bool: removed by the horizontal pass (original grid)."""
    removed_v: torch.Tensor
    """``[B, H, W - r_w]`` bool: removed by the vertical pass (horizontally reduced grid)."""
    removed: torch.Tensor
    """``[B, H*W]`` bool: the token at this grid position did not survive either pass."""


def adjacent_cosine(lines: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of adjacent tokens, ``[..., N, C] -> [..., N - 1]`` float32."""
    # The formula of torch.nn.functional.cosine_similarity (each vector divided by
    # max(norm, eps), then the dot product), normalizing every token once.
    x = lines.float()
    unit = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-8)
    return (unit[..., :-1, :] * unit[..., 1:, :]).sum(-1)


def _lowest(dtype: torch.dtype) -> float | int:
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _pass_1d(x: torch.Tensor, s: torch.Tensor, r: int) -> Merge1D:
    """Select and merge on lines ``x [..., N, C]`` given adjacent similarities ``s [..., N-1]``.

    ``s`` may be float (cosines) or integer (fixed-point keys); only its order matters.
    """
    n = x.shape[-2]
    k = n // 2
    r = min(r, k)
    lead = x.shape[:-2]
    dev = x.device

    left = s[..., 0 : 2 * k : 2]  # s[2k]: candidate 2k+1 vs 2k
    right = s[..., 1::2]  # s[2k+1]: candidate 2k+1 vs 2k+2, exists iff 2k+2 < N
    if right.shape[-1] < k:
        right = F.pad(right, (0, k - right.shape[-1]), value=_lowest(s.dtype))
    points_right = right > left
    score = torch.maximum(left, right)

    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    removed_cand = torch.zeros(lead + (k,), dtype=torch.bool, device=dev)
    removed_cand.scatter_(-1, order[..., :r], True)
    removed = torch.zeros(lead + (n,), dtype=torch.bool, device=dev)
    removed[..., 1 : 2 * k : 2] = removed_cand

    # Merge, touching only the r removed tokens per line (flattened to rows).  Sources
    # pointing right are the left sources of their destination and go first; a
    # destination has at most one source of each kind, so no phase writes it twice.
    c = x.shape[-1]
    xf = x.reshape(-1, n, c)
    nrows = xf.shape[0]
    rows = torch.arange(nrows, device=dev).unsqueeze(-1).expand(nrows, r)
    src = order[..., :r].reshape(nrows, r)
    src_right = torch.gather(points_right.reshape(nrows, k), -1, src)
    src_val = xf[rows, 2 * src + 1]
    dst = 2 * src + 2 * src_right.long()
    y = xf.clone()
    for phase in (src_right, ~src_right):
        at = (rows[phase], dst[phase])
        cur, val = y[at], src_val[phase]
        y[at] = torch.where(val.abs() > cur.abs(), val, cur)
    merged = y[~removed.reshape(nrows, n)].reshape(lead + (n - r, c))

    arange = torch.arange(n, device=dev)
    target = arange.expand(lead + (n,)).clone()
    target[..., 1 : 2 * k : 2] = 2 * torch.arange(k, device=dev) + 2 * points_right.long()
    target = torch.where(removed, target, arange)
    out_pos = torch.cumsum((~removed).long(), dim=-1) - 1
    return Merge1D(merged, torch.gather(out_pos, -1, target), removed)


def _check_r(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def merge_1d(x: torch.Tensor, r: int) -> Merge1D:
    """One 1-D CubistMerge pass over the token axis of ``x [..., N, C]``.

    Every line (all leading dims) loses ``min(r, N // 2)`` tokens.  Returns
    ``Merge1D(merged, dest_index, removed)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor [..., N, C] with at least 2 dimensions")
    _check_r("r", r)
    return _pass_1d(x, adjacent_cosine(x), r)


def check_2d_args(shape: tuple[int, ...], hw: object, r: object, prefix: object,
                  name: str = "x") -> tuple[int, int, int, int, int]:
    """Validate 2-D merge arguments for ``name`` of shape ``[..., prefix + H*W, C]``.

    Returns ``(H, W, r_h, r_w, prefix)`` with r clamped to half of each axis.
    """
    try:
        h, w = hw  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"hw must be a pair (H, W) of integers >= 2, got {hw!r}") from None
    for label, v in (("H", h), ("W", w)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise ValueError(f"hw=(H, W): {label} must be an integer >= 2, got {v!r}")
    try:
        r_h, r_w = r  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"r must be a pair (r_h, r_w) of integers >= 0, got {r!r}") from None
    _check_r("r_h", r_h)
    _check_r("r_w", r_w)
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise ValueError(f"prefix must be an integer >= 0, got {prefix!r}")
    if shape[-2] != prefix + h * w:
        raise ValueError(
            f"{name} has {shape[-2]} tokens but prefix + H*W = {prefix} + {h}*{w} = "
            f"{prefix + h * w}"
        )
    return h, w, min(r_h, h // 2), min(r_w, w // 2), prefix


def _merge_2d_core(x: torch.Tensor, h: int, w: int, r_h: int, r_w: int, prefix: int,
                   sim: Similarity) -> Merge2D:
    b, _, c = x.shape
    grid = x[:, prefix:].reshape(b, h, w, c)
    hp = _pass_1d(grid, sim(grid), r_w)  # rows: [B, H, W', C]
    cols = hp.merged.transpose(1, 2)  # [B, W', H, C]
    vp = _pass_1d(cols, sim(cols), r_h)  # columns: [B, W', H', C]
    w2, h2 = w - r_w, h - r_h
    out_grid = vp.merged.transpose(1, 2).reshape(b, h2 * w2, c)
    merged = torch.cat([x[:, :prefix], out_grid], dim=1)

    # Grid position (i, j): j' = hmap[i, j], i' = vmap[j', i]; index i' * W' + j'.
    hmap = hp.dest_index  # [B, H, W]
    vmap_rows = vp.dest_index.transpose(1, 2)  # [B, H, W']: vmap[j', i] at [i, j']
    i2 = torch.gather(vmap_rows, 2, hmap)
    merge_map = (i2 * w2 + hmap).reshape(b, h * w)
    removed_v = vp.removed.transpose(1, 2)  # [B, H, W']
    removed = hp.removed | torch.gather(removed_v, 2, hmap)
    return Merge2D(merged, merge_map, hp.removed, removed_v, removed.reshape(b, h * w))


def merge_2d_info(x: torch.Tensor, hw: tuple[int, int], r: tuple[int, int], *,
                  prefix: int = 0) -> Merge2D:
    """CubistMerge of ``x [B, prefix + H*W, C]`` with every decision returned (``Merge2D``)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 3-D tensor [B, prefix + H*W, C], got {got}")
    h, w, r_h, r_w, prefix = check_2d_args(tuple(x.shape), hw, r, prefix)
    return _merge_2d_core(x, h, w, r_h, r_w, prefix, adjacent_cosine)


def merge_map_2d(x: torch.Tensor, hw: tuple[int, int], r: tuple[int, int], *,
                 prefix: int = 0) -> torch.Tensor:
    """``[B, H*W]`` int64: output grid index each grid position of ``x`` goes to."""
    return merge_2d_info(x, hw, r, prefix=prefix).merge_map


def unmerge_2d(y: torch.Tensor, merge_map: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """Restore the full grid: ``y [B, prefix + H'W', C'] -> [B, prefix + H*W, C']``.

    Every grid position takes the output token it was merged into (kept tokens
    return to their own slot, removed slots get a copy of their destination).
    ``y`` may be any tensor with the merged token count, e.g. a later layer's output.
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 3:
        raise ValueError("y must be a 3-D tensor [B, tokens, C]")
    b, n_out = merge_map.shape
    if y.shape[0] != b:
        raise ValueError(f"y has batch {y.shape[0]} but the merge was done on batch {b}")
    n_grid = int(merge_map.max()) + 1 if merge_map.numel() else 0
    if y.shape[1] < prefix + n_grid:
        raise ValueError(
            f"y has {y.shape[1]} tokens, the merge map needs at least prefix + {n_grid}"
        )
    idx = (merge_map.to(y.device) + prefix).unsqueeze(-1).expand(b, n_out, y.shape[-1])
    return torch.cat([y[:, :prefix], torch.gather(y, 1, idx)], dim=1)


def merge_2d(x: torch.Tensor, hw: tuple[int, int], r: tuple[int, int], *,
             prefix: int = 0) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """CubistMerge of ``x [B, prefix + H*W, C]`` on the ``hw = (H, W)`` grid.

    Returns ``(merged, unmerge)``: ``merged`` is ``[B, prefix + (H-r_h)(W-r_w), C]``
    (r clamped to half of each axis), prefix tokens first and untouched;
    ``unmerge(y)`` maps any ``[B, prefix + (H-r_h)(W-r_w), C']`` back to
    ``[B, prefix + H*W, C']``.
    """
    info = merge_2d_info(x, hw, r, prefix=prefix)
    n_merged = info.merged.shape[1]
    b = x.shape[0]

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[:2] != (b, n_merged):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must have shape [{b}, {n_merged}, C], got {got}")
        return unmerge_2d(y, info.merge_map, prefix)

    return info.merged, unmerge
