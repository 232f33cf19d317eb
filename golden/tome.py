"""ToMe baseline: bipartite soft matching (Token Merging, Bolya et al., ICLR 2023).

Written from the paper's description, as the comparison point for CubistMerge:

* tokens alternate between set A (even indices) and set B (odd indices);
* similarity is the cosine of the ``metric`` vectors (normalize, then matmul);
* every A token picks its most similar B token; the r best such edges
  (r clamped to |A|, or |A| - 1 with a protected class token) are merged;
* merging is a size-weighted average (``sum(x * size) / sum(size)``), and the
  new sizes are returned for proportional attention;
* with ``class_token`` token 0 is never merged (its scores are -inf).

Output order is ``[unmerged A tokens | B tokens]`` as in ToMe; the unmerged A
tokens keep their original relative order (so a class token stays first).
Spatial order is lost, which is what CubistMerge avoids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["merge"]


def _validate(x: object, metric: object, r: object, size: object) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 3-D tensor [B, N, C], got {got}")
    if not isinstance(metric, torch.Tensor) or metric.dim() != 3:
        got = tuple(metric.shape) if isinstance(metric, torch.Tensor) else type(metric).__name__
        raise ValueError(f"metric must be a 3-D tensor [B, N, C_metric], got {got}")
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"metric must match x in batch and tokens: x {tuple(x.shape[:2])}, "
            f"metric {tuple(metric.shape[:2])}"
        )
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an integer >= 0, got {r!r}")
    if size is not None:
        if not isinstance(size, torch.Tensor) or tuple(size.shape) not in (
            tuple(x.shape[:2]),
            tuple(x.shape[:2]) + (1,),
        ):
            got = tuple(size.shape) if isinstance(size, torch.Tensor) else type(size).__name__
            raise ValueError(f"size must be [B, N, 1] or [B, N] like x, got {got}")
        if bool((size <= 0).any()):
            raise ValueError("size must be > 0 everywhere")


def merge(x: torch.Tensor, metric: torch.Tensor, r: int, *, class_token: bool = False,
          size: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Merge ``r`` tokens of ``x [B, N, C]`` by bipartite matching on ``metric [B, N, Cm]``.

    Returns ``(merged [B, N - r, C], size [B, N - r, 1], unmerge)``; ``unmerge(y)``
    maps any ``[B, N - r, C']`` back to ``[B, N, C']`` in the original order, each
    merged A token taking the value of its B partner.
    """
    _validate(x, metric, r, size)
    b, n, c = x.shape
    dev = x.device
    n_a, n_b = (n + 1) // 2, n // 2
    r = max(min(r, n_a - int(class_token)), 0) if n_b else 0
    size = torch.ones(b, n, 1, device=dev) if size is None else size.reshape(b, n, 1)

    m = F.normalize(metric.float(), dim=-1)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
    if class_token:
        scores[:, 0, :] = float("-inf")
    if n_b:
        best, partner = scores.max(dim=-1)
    else:  # a single token: nothing to match
        best, partner = scores.sum(-1), torch.zeros(b, n_a, dtype=torch.long, device=dev)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]  # A indices merged away
    unm = torch.sort(order[:, r:], dim=-1).values  # A indices kept, original order
    dst = torch.gather(partner, 1, src)  # their B partners

    # Size-weighted average in float32 (exact sums for half inputs), cast back at the end.
    xs = x.float() * size.float()
    xs_a, xs_b = xs[:, 0::2], xs[:, 1::2]
    size_a, size_b = size.float()[:, 0::2], size.float()[:, 1::2]
    src_x = torch.gather(xs_a, 1, src.unsqueeze(-1).expand(b, r, c))
    src_s = torch.gather(size_a, 1, src.unsqueeze(-1))
    sum_b = xs_b.scatter_add(1, dst.unsqueeze(-1).expand(b, r, c), src_x)
    size_b = size_b.scatter_add(1, dst.unsqueeze(-1), src_s)
    unm_x = torch.gather(xs_a, 1, unm.unsqueeze(-1).expand(b, n_a - r, c))
    unm_s = torch.gather(size_a, 1, unm.unsqueeze(-1))
    new_size = torch.cat([unm_s, size_b], dim=1)
    merged = (torch.cat([unm_x, sum_b], dim=1) / new_size).to(x.dtype)

    # Original position -> output index: A token i sits at 2i, B token j at 2j+1.
    n_unm = n_a - r
    a_out = torch.empty(b, n_a, dtype=torch.long, device=dev)
    a_out.scatter_(1, unm, torch.arange(n_unm, device=dev).expand(b, n_unm))
    a_out.scatter_(1, src, n_unm + dst)
    to_out = torch.empty(b, n, dtype=torch.long, device=dev)
    to_out[:, 0::2] = a_out
    to_out[:, 1::2] = n_unm + torch.arange(n_b, device=dev)
    n_merged = n - r

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[:2] != (b, n_merged):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must have shape [{b}, {n_merged}, C], got {got}")
        return torch.gather(y, 1, to_out.unsqueeze(-1).expand(b, n, y.shape[-1]))

    return merged, new_size.to(size.dtype), unmerge
