"""Three tiny ViTs (DeiT-, SAM- and DINOv3-style) with CubistMerge and ToMe patches.

No pretrained weights can be fetched here, so the models are small enough to train on
the bundled digits in seconds (`golden.data`). Each has a 10-way classification head
and a per-patch foreground head (the dense task), and two patch entries:

* `model.patch_cubist(loc, r=(r_h, r_w))`: `golden.cubist.merge_2d` once, before block
  `loc`. The grid stays rectangular, so every later block is told its new (H, W):
  windowed attention re-pads, relative-position tables are interpolated, RoPE
  coordinates are recomputed. The dense head unmerges back to the full grid.
* `model.patch_tome(r)`: `golden.tome.merge` in every block (between attention and
  MLP), on the attention keys, with proportional attention (`+ log(size)`). The token
  order is lost, so it is only offered for the DeiT-style model; the others raise.

`model.unpatch()` restores the plain model. `model.features(x, block)` returns the
tokens entering a block; `real_feature_frames` trains/caches a tiny DeiT-style model
and returns such features for the merge-unit testbench.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from golden.threads import torch_threads

__all__ = [
    "KINDS",
    "RealFeatures",
    "TinyViT",
    "ViTOutput",
    "build_vit",
    "evaluate",
    "mean_iou",
    "real_feature_frames",
    "rel_pos_table",
    "rope_tables",
    "train_model",
]

KINDS = ("deit", "sam", "dino")
TOME_UNSUPPORTED = {
    "sam": "windowed attention and decomposed relative positions need a rectangular grid",
    "dino": "2-D RoPE needs a rectangular grid of patch coordinates",
}


class ViTOutput(NamedTuple):
    """`logits`: `[B, n_classes]`; `seg`: `[B, H0*W0, 2]` per-patch logits on the full grid."""

    logits: torch.Tensor
    seg: torch.Tensor


# --------------------------------------------------------------------------- positions


def rope_tables(
    hw: tuple[int, int], head_dim: int, base: float = 100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE (DINOv3 style) for an H x W grid: `(sin, cos)`, each `[H*W, head_dim]`.

    Patch centres are normalized to [-1, 1] along each axis of the *current* grid, so a
    merged (smaller) grid spans the same coordinate range with fewer points. The first
    half of the rotated pairs encodes the row coordinate, the second half the column.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D RoPE, got {head_dim}")
    h, w = hw
    quarter = head_dim // 4
    periods = base ** (torch.arange(quarter, dtype=torch.float32) * 2.0 / (head_dim // 2))
    ch = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2.0 - 1.0
    cw = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2.0 - 1.0
    grid_h, grid_w = torch.meshgrid(ch, cw, indexing="ij")
    ang_h = 2 * math.pi * grid_h.reshape(-1, 1) / periods
    ang_w = 2 * math.pi * grid_w.reshape(-1, 1) / periods
    angles = torch.cat([ang_h, ang_w], dim=1).repeat(1, 2)  # [HW, head_dim]
    return angles.sin(), angles.cos()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def rel_pos_table(n: int, table: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings `[n, n, d]` for a length-`n` axis (SAM style).

    `table` holds `2*m - 1` learned offsets (-(m-1) .. m-1) for the size `m` it was
    built for; when `n != m` it is linearly interpolated to `2*n - 1` entries first.
    """
    want = 2 * n - 1
    if table.shape[0] != want:
        table = F.interpolate(
            table.t().unsqueeze(0), size=want, mode="linear", align_corners=False
        )[0].t()
    idx = torch.arange(n)
    return table[idx[:, None] - idx[None, :] + (n - 1)]


# --------------------------------------------------------------------------- blocks


@dataclass
class _State:
    x: torch.Tensor  # [B, prefix + tokens, C]
    hw: tuple[int, int] | None  # current grid; None once ToMe has broken it
    prefix: int
    size: torch.Tensor | None = None  # [B, N, 1] ToMe token sizes
    unmerges: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    trace: list[dict] | None = None


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, rel_pos: int | None, rope: bool):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.rel_pos_h = self.rel_pos_w = None
        if rel_pos is not None:  # tables built for a rel_pos x rel_pos grid
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos - 1, self.head_dim))

    def forward(self, x, *, hw, prefix, rope=None, size=None, info=None):
        """x `[B, N, C]`; returns (output, keys averaged over heads `[B, N, head_dim]`)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            sin, cos = rope
            if info is not None:
                info["rope"] = tuple(sin.shape)
            qg, kg = q[:, :, prefix:], k[:, :, prefix:]
            q = torch.cat([q[:, :, :prefix], qg * cos + _rotate_half(qg) * sin], dim=2)
            k = torch.cat([k[:, :, :prefix], kg * cos + _rotate_half(kg) * sin], dim=2)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, heads, N, N]
        if self.rel_pos_h is not None:
            h, w = hw
            rh, rw = rel_pos_table(h, self.rel_pos_h), rel_pos_table(w, self.rel_pos_w)
            if info is not None:
                info["rel_pos"] = (tuple(rh.shape), tuple(rw.shape))
            rq = q.reshape(b, self.heads, h, w, self.head_dim)
            bias_h = torch.einsum("bnhwd,hkd->bnhwk", rq, rh)
            bias_w = torch.einsum("bnhwd,wkd->bnhwk", rq, rw)
            attn = attn.view(b, self.heads, h, w, h, w)
            attn = attn + bias_h[..., :, None] + bias_w[..., None, :]
            attn = attn.reshape(b, self.heads, n, n)
        if size is not None:  # proportional attention (ToMe)
            attn = attn + size.log()[:, None, None, :, 0]
        out = attn.softmax(dim=-1) @ v
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        return out, k.mean(dim=1)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, *, window=0, rel_pos=None, rope=False):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, rel_pos=rel_pos, rope=rope)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.tome_r = 0

    def forward(self, st: _State, rope=None) -> _State:
        info = None
        if st.trace is not None:
            info = {"tokens": st.x.shape[1], "hw": st.hw}
            st.trace.append(info)
        h = self.norm1(st.x)
        if self.window:
            a = self._window_attention(h, st, info)
        else:
            a, keys = self.attn(h, hw=st.hw, prefix=st.prefix, rope=rope, size=st.size, info=info)
        x = st.x + a
        if self.tome_r:
            from golden import tome

            x, st.size, unmerge = tome.merge(
                x, keys, self.tome_r, class_token=st.prefix > 0, size=st.size
            )
            st.unmerges.append(unmerge)
            st.hw = None
        if info is not None:
            info["tokens_mlp"] = x.shape[1]
        st.x = x + self.mlp(self.norm2(x))
        return st

    def _window_attention(self, h, st: _State, info):
        """Non-overlapping ws x ws windows over the grid, zero-padded to a multiple of ws."""
        ws = self.window
        (gh, gw), b, c = st.hw, h.shape[0], h.shape[2]
        ph, pw = -gh % ws, -gw % ws
        g = F.pad(h.reshape(b, gh, gw, c), (0, 0, 0, pw, 0, ph))
        hp, wp = gh + ph, gw + pw
        if info is not None:
            info["padded"] = (hp, wp)
        win = g.reshape(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        win = win.reshape(-1, ws * ws, c)
        out, _ = self.attn(win, hw=(ws, ws), prefix=0, info=info)
        out = out.reshape(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, hp, wp, c)[:, :gh, :gw].reshape(b, gh * gw, c)


# --------------------------------------------------------------------------- models


class TinyViT(nn.Module):
    """A tiny ViT of one of three styles (`kind` in `KINDS`).

    * `deit`: CLS token, learned absolute position embeddings, global attention.
    * `sam`: no CLS token; windowed attention (`window` x `window`, zero-padded) with
      decomposed relative positions, global attention in `global_blocks`; the class
      head mean-pools the grid.
    * `dino`: CLS token plus `n_registers` registers (no rotation), 2-D RoPE on the
      patch tokens, global attention, no absolute positions.
    """

    def __init__(
        self,
        kind: str = "deit",
        *,
        dim: int = 64,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        img_size: int = 32,
        patch: int = 4,
        n_classes: int = 10,
        window: int = 3,
        global_blocks: tuple[int, ...] = (2, 5),
        n_registers: int = 2,
        rope_base: float = 100.0,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if dim < 8 or dim % heads or (dim // heads) % 4:
            raise ValueError(
                f"dim must be >= 8 and a multiple of 4*heads (heads={heads}), got {dim}"
            )
        if not 1 <= depth <= 64:
            raise ValueError(f"depth must be in [1, 64], got {depth}")
        if patch < 1 or img_size % patch:
            raise ValueError(
                f"patch must be a positive divisor of img_size={img_size}, got {patch}"
            )
        grid = img_size // patch
        if kind == "sam" and not 1 <= window <= grid:
            raise ValueError(f"window must be in [1, {grid}] (the grid size), got {window}")
        if kind == "dino" and not 0 <= n_registers <= 16:
            raise ValueError(f"n_registers must be in [0, 16], got {n_registers}")
        self.kind = kind
        self.depth = depth
        self.grid = (grid, grid)
        self.head_dim = dim // heads
        self.rope_base = rope_base
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.prefix = {"deit": 1, "sam": 0, "dino": 1 + n_registers}[kind]
        if self.prefix:
            self.prefix_tokens = nn.Parameter(torch.randn(1, self.prefix, dim) * 0.02)
        if kind == "deit":
            self.pos_embed = nn.Parameter(torch.randn(1, self.prefix + grid * grid, dim) * 0.02)
        blocks = []
        for i in range(depth):
            if kind == "sam":
                glob = i in global_blocks
                blocks.append(
                    Block(dim, heads, mlp_ratio, window=0 if glob else window,
                          rel_pos=grid if glob else window)
                )
            else:
                blocks.append(Block(dim, heads, mlp_ratio, rope=kind == "dino"))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)
        self.seg_head = nn.Linear(dim, 2)
        self._cubist: tuple[int, tuple[int, int]] | None = None
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    # ---- patches
    def patch_cubist(self, loc: int, r: tuple[int, int] = (1, 1)) -> TinyViT:
        """Apply CubistMerge once, before block `loc`, removing `r=(r_h, r_w)`.

        Replaces any earlier patch. Returns the model, for chaining.
        """
        if not isinstance(loc, int) or not 0 <= loc < self.depth:
            raise ValueError(f"loc must be an integer in [0, {self.depth - 1}], got {loc!r}")
        if len(r) != 2:
            raise ValueError(f"r must be a pair (r_h, r_w), got {r!r}")
        for name, v, n in (("r_h", r[0], self.grid[0]), ("r_w", r[1], self.grid[1])):
            if not isinstance(v, int) or not 0 <= v <= n // 2:
                raise ValueError(f"{name} must be an integer in [0, {n // 2}], got {v!r}")
        self.unpatch()
        self._cubist = (loc, (int(r[0]), int(r[1])))
        return self

    def patch_tome(self, r: int) -> TinyViT:
        """Apply ToMe in every block, merging `r` tokens per block. DeiT-style only."""
        if self.kind in TOME_UNSUPPORTED:
            raise ValueError(
                f"patch_tome is not available for the {self.kind}-style model: ToMe breaks "
                f"the rectangular grid, and {TOME_UNSUPPORTED[self.kind]}"
            )
        n = self.grid[0] * self.grid[1]
        if not isinstance(r, int) or not 0 <= r <= n // 2:
            raise ValueError(f"r must be an integer in [0, {n // 2}], got {r!r}")
        self.unpatch()
        for blk in self.blocks:
            blk.tome_r = r
        return self

    def unpatch(self) -> TinyViT:
        """Remove any CubistMerge/ToMe patch."""
        self._cubist = None
        for blk in self.blocks:
            blk.tome_r = 0
        return self

    # ---- forward
    def _embed(self, img: torch.Tensor, trace) -> _State:
        if img.ndim != 4 or img.shape[1] != 1:
            raise ValueError(f"input must have shape [B, 1, H, W], got {tuple(img.shape)}")
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        b = x.shape[0]
        if self.prefix:
            x = torch.cat([self.prefix_tokens.expand(b, -1, -1), x], dim=1)
        if self.kind == "deit":
            x = x + self.pos_embed
        return _State(x=x, hw=self.grid, prefix=self.prefix, trace=trace)

    def _run(self, img, stop: int | None = None, trace=None) -> _State:
        st = self._embed(img, trace)
        rope_cache: dict = {}
        for i, blk in enumerate(self.blocks):
            if self._cubist is not None and i == self._cubist[0]:
                from golden import cubist

                (rh, rw), (h, w) = self._cubist[1], st.hw
                st.x, unmerge = cubist.merge_2d(st.x, st.hw, (rh, rw), prefix=st.prefix)
                st.unmerges.append(unmerge)
                st.hw = (h - rh, w - rw)
            if i == stop:
                return st
            rope = None
            if self.kind == "dino":
                if st.hw not in rope_cache:
                    rope_cache[st.hw] = rope_tables(st.hw, self.head_dim, self.rope_base)
                rope = rope_cache[st.hw]
            st = blk(st, rope)
        return st

    def forward(self, img: torch.Tensor) -> ViTOutput:
        return self._heads(self._run(img))

    def trace(self, img: torch.Tensor) -> tuple[ViTOutput, list[dict]]:
        """Forward pass plus, per block, what it saw: `tokens` (count entering it, prefix
        included), `tokens_mlp` (count entering its MLP, after any ToMe merge), `hw`
        (its grid, None after ToMe), and where used `padded` (window grid), `rel_pos`
        (shapes of the h/w tables) and `rope` (shape of the sin table)."""
        trace: list[dict] = []
        return self._heads(self._run(img, trace=trace)), trace

    def features(self, img: torch.Tensor, block: int) -> torch.Tensor:
        """Tokens entering block `block` (`block == depth`: after the last block, before
        the final norm): `[B, prefix + H*W, C]` for the grid current at that point."""
        if not isinstance(block, int) or not 0 <= block <= self.depth:
            raise ValueError(f"block must be an integer in [0, {self.depth}], got {block!r}")
        return self._run(img, stop=block).x

    def _heads(self, st: _State) -> ViTOutput:
        x = self.norm(st.x)
        if self.prefix:
            pooled = x[:, 0]
        elif st.size is not None:
            pooled = (x * st.size).sum(1) / st.size.sum(1)
        else:
            pooled = x.mean(1)
        seg = self.seg_head(x)
        for unmerge in reversed(st.unmerges):
            seg = unmerge(seg)
        return ViTOutput(self.head(pooled), seg[:, self.prefix :])


def build_vit(kind: str, **kwargs) -> TinyViT:
    """A `TinyViT` of the given style (`deit`, `sam`, `dino`) with small defaults."""
    return TinyViT(kind, **kwargs)


# --------------------------------------------------------------------------- training


def mean_iou(pred: torch.Tensor, target: torch.Tensor, n_classes: int = 2) -> float:
    """Mean over classes of IoU = TP / (TP + FP + FN), pooled over all elements."""
    ious = []
    for c in range(n_classes):
        p, t = pred == c, target == c
        union = (p | t).sum().item()
        if union:
            ious.append((p & t).sum().item() / union)
    return float(np.mean(ious)) if ious else 1.0


@torch.no_grad()
def evaluate(model: TinyViT, x, y, mask, batch_size: int = 256) -> tuple[float, float]:
    """(top-1 accuracy, mIoU of the per-patch foreground head), both in [0, 1]."""
    model.eval()
    preds, segs = [], []
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        preds.append(out.logits.argmax(-1))
        segs.append(out.seg.argmax(-1))
    acc = (torch.cat(preds) == y).float().mean().item()
    return acc, mean_iou(torch.cat(segs), mask)


def train_model(
    model: TinyViT,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    progress: Callable[[], None] | None = None,
) -> TinyViT:
    """AdamW + cosine schedule on class CE + per-patch foreground CE. Deterministic for
    a given seed and thread count. `progress()` is called after each epoch."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            out = model(x[idx])
            loss = F.cross_entropy(out.logits, y[idx]) + F.cross_entropy(
                out.seg.reshape(-1, 2), mask[idx].reshape(-1)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress is not None:
            progress()
    model.eval()
    return model


# --------------------------------------------------------------------------- real features


class RealFeatures(NamedTuple):
    """Features of real digits from a trained tiny DeiT-style ViT.

    `frames`: float32 numpy array `[n_frames, prefix + H*W, C]` (tokens entering the
    chosen block, CLS first); `hw`: the grid `(H, W)` = (8, 8); `prefix`: number of
    leading non-grid tokens (1, the CLS token).
    """

    frames: np.ndarray
    hw: tuple[int, int]
    prefix: int


def real_feature_frames(
    n_frames: int,
    seed: int = 0,
    cache_dir: str | os.PathLike = "out/cache",
    *,
    block: int = 2,
    epochs: int = 8,
) -> RealFeatures:
    """Features entering block `block` of a tiny DeiT-style ViT trained on digits.

    The model is trained with `seed` for `epochs` epochs (a few seconds) on the first
    use and cached as a state dict under `cache_dir`; later calls load it. Frames are
    the test images first, then the training images (1797 at most), in split order.
    """
    from golden.data import load_digits_split

    split = load_digits_split(seed)
    total = len(split.x_test) + len(split.x_train)
    if not isinstance(n_frames, int) or not 1 <= n_frames <= total:
        raise ValueError(f"n_frames must be an integer in [1, {total}], got {n_frames!r}")
    model_kwargs = {"dim": 64, "depth": 6, "heads": 4}
    if not isinstance(block, int) or not 0 <= block <= model_kwargs["depth"]:
        raise ValueError(f"block must be an integer in [0, {model_kwargs['depth']}], got {block!r}")
    key = hashlib.sha256(repr((seed, epochs, sorted(model_kwargs.items()))).encode()).hexdigest()
    path = Path(cache_dir) / f"vit_deit_{key[:16]}.pt"
    torch.manual_seed(seed)
    model = build_vit("deit", **model_kwargs)
    # One thread: the same weights on every machine, and no thread thrashing on a
    # loaded shared CPU (two threads there made training many times slower).
    with torch_threads(1):
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
        else:
            train_model(model, split.x_train, split.y_train, split.mask_train, epochs=epochs,
                        seed=seed, batch_size=32)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
        model.eval()
        imgs = torch.cat([split.x_test, split.x_train])[:n_frames]
        with torch.no_grad():
            feats = torch.cat(
                [model.features(imgs[i : i + 256], block) for i in range(0, n_frames, 256)]
            )
    return RealFeatures(feats.numpy().astype(np.float32), model.grid, model.prefix)
