"""Bundled handwritten digits, upsampled for the tiny ViTs.

`sklearn.datasets.load_digits` ships 1797 8x8 images (values 0..16) inside the
package, so nothing is downloaded. `load_digits_split` upsamples them bilinearly to
`size` x `size`, splits them deterministically by seed, normalizes them with the
training-set mean/std, and computes the per-patch foreground mask used by the dense
(segmentation) heads: a patch is foreground when the mean of its pixels, on the
[0, 1] intensity scale before normalization, is above `threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DigitsSplit", "load_digits_split", "patch_foreground"]


@dataclass(frozen=True)
class DigitsSplit:
    """A deterministic train/test split of the upsampled digits.

    `x_*`: float32 `[N, 1, size, size]`, normalized with the training mean/std.
    `y_*`: int64 `[N]` digit labels. `mask_*`: int64 `[N, (size // patch) ** 2]`,
    1 where the patch is foreground, row-major over the patch grid.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    mask_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mask_test: torch.Tensor
    grid: tuple[int, int]
    mean: float
    std: float


def patch_foreground(images: torch.Tensor, patch: int, threshold: float) -> torch.Tensor:
    """Per-patch foreground mask of `images` `[N, 1, S, S]` on the [0, 1] scale.

    Returns int64 `[N, (S // patch) ** 2]`, row-major over the patch grid.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape [N, 1, S, S], got {tuple(images.shape)}")
    if patch < 1 or images.shape[-1] % patch or images.shape[-2] % patch:
        raise ValueError(
            f"patch must be a positive divisor of the image size {tuple(images.shape[-2:])}, "
            f"got {patch}"
        )
    means = F.avg_pool2d(images, patch)  # [N, 1, S/p, S/p]
    return (means.flatten(1) > threshold).long()


def load_digits_split(
    seed: int = 0,
    *,
    test_fraction: float = 0.25,
    size: int = 32,
    patch: int = 4,
    threshold: float = 0.25,
) -> DigitsSplit:
    """Load the bundled digits, upsample to `size`, split by `seed`, normalize.

    test_fraction in (0, 1); size a multiple of 8 in [8, 128]; patch a divisor of
    size; threshold in (0, 1).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if size % 8 or not 8 <= size <= 128:
        raise ValueError(f"size must be a multiple of 8 in [8, 128], got {size}")
    if patch < 1 or size % patch:
        raise ValueError(f"patch must be a positive divisor of size={size}, got {patch}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0)
    masks = patch_foreground(images, patch, threshold)

    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_test = max(1, int(round(test_fraction * len(labels))))
    test_idx, train_idx = order[:n_test], order[n_test:]

    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    normed = (images - mean) / std
    return DigitsSplit(
        x_train=normed[train_idx].contiguous(),
        y_train=labels[train_idx].contiguous(),
        mask_train=masks[train_idx].contiguous(),
        x_test=normed[test_idx].contiguous(),
        y_test=labels[test_idx].contiguous(),
        mask_test=masks[test_idx].contiguous(),
        grid=(size // patch, size // patch),
        mean=mean,
        std=std,
    )
