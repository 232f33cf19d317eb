"""ToMe bipartite-matching baseline (golden.tome)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from golden.tome import merge

# Hand-worked: A = tokens 0, 2 = [1, 0], [0, 1]; B = tokens 1, 3 = [1, 0.1], [0.2, 1].
# A0's best partner is B0 (cos 0.995), A1's is B1 (cos 0.981): with r = 1, A0 merges into B0.
X = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]]])


def test_merge_by_hand():
    merged, size, unmerge = merge(X, X, 1)
    # [unmerged A | B]: A1, (A0 + B0) / 2, B1
    assert torch.allclose(merged, torch.tensor([[[0.0, 1.0], [1.0, 0.05], [0.2, 1.0]]]))
    assert size.flatten().tolist() == [1, 2, 1]
    y = torch.tensor([[[10.0], [20.0], [30.0]]])
    # tokens 0 and 1 are both in output 1 now; token 2 is output 0, token 3 output 2
    assert unmerge(y).flatten().tolist() == [20, 20, 10, 30]


def test_size_weighted_average_by_hand():
    size = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
    merged, new_size, _ = merge(X, X, 1, size=size)
    # (3 * [1, 0] + 1 * [1, 0.1]) / 4 = [1, 0.025], size 4
    assert torch.allclose(merged[0, 1], torch.tensor([1.0, 0.025]))
    assert new_size.flatten().tolist() == [1, 4, 1]


def test_class_token_protected():
    x = torch.randn(2, 9, 4)
    x[:, 1] = x[:, 0]  # token 0 is the best match of all: it would go first
    merged, size, unmerge = merge(x, x, 4, class_token=True)
    assert torch.equal(merged[:, 0], x[:, 0])
    assert size[:, 0].flatten().tolist() == [1, 1]
    assert torch.equal(unmerge(merged)[:, 0], x[:, 0])
    merged, _, _ = merge(x, x, 4)
    assert not torch.equal(merged[:, 0], x[:, 0])  # unprotected, it is merged
    # r clamps to |A| - 1 with a class token: 5 A tokens, 4 can go.
    merged, _, _ = merge(x, x, 99, class_token=True)
    assert merged.shape == (2, 5, 4) and torch.equal(merged[:, 0], x[:, 0])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 12), st.integers(1, 5), st.integers(0, 8),
    st.booleans(), st.integers(0, 2**31 - 1),
)
def test_properties(b, n, c, r, cls, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    size = torch.randint(1, 4, (b, n, 1), generator=g).float()
    merged, new_size, unmerge = merge(x, x, r, class_token=cls, size=size)
    n_a = (n + 1) // 2
    r_eff = 0 if n < 2 else min(r, n_a - int(cls))
    assert merged.shape == (b, n - r_eff, c)
    assert new_size.shape == (b, n - r_eff, 1)
    assert torch.equal(new_size.sum(1), size.sum(1))  # sizes add up
    # size-weighted sums are preserved too (merging is an average)
    assert torch.allclose((merged * new_size).sum(1), (x * size).sum(1), atol=1e-4)
    # unmerge: every token takes the output it went to; B tokens and kept A tokens
    # come back unchanged (when nothing merged into them)
    u = unmerge(merged)
    assert u.shape == x.shape
    idx = unmerge(torch.arange(n - r_eff).float().expand(b, -1).unsqueeze(-1)).squeeze(-1)
    for bi in range(b):
        for p in range(n):
            assert torch.equal(u[bi, p], merged[bi, int(idx[bi, p])])
        # each output's size is the summed size of the tokens mapped to it
        sums = torch.zeros(n - r_eff).index_add_(0, idx[bi].long(), size[bi, :, 0])
        assert torch.equal(sums, new_size[bi, :, 0])


def test_r_zero_is_identity():
    x = torch.randn(2, 7, 3)
    merged, size, unmerge = merge(x, x, 0)
    assert torch.equal(merged, torch.cat([x[:, 0::2], x[:, 1::2]], dim=1))  # ToMe's order
    assert torch.equal(size, torch.ones(2, 7, 1))
    assert torch.equal(unmerge(merged), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x = torch.randn(2, 197, 32)
    merged, size, unmerge = merge(x.to(dtype), x.to(dtype), 52, class_token=True)
    assert merged.dtype == dtype and merged.shape == (2, 145, 32)
    assert unmerge(merged).shape == (2, 197, 32)
    ref, _, _ = merge(x.to(dtype).float(), x.to(dtype).float(), 52, class_token=True)
    assert torch.allclose(merged.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(4, 2), torch.zeros(4, 2), 1), {}, "x must be a 3-D tensor"),
        ((torch.zeros(1, 4, 2), torch.zeros(4, 2), 1), {}, "metric must be a 3-D tensor"),
        ((torch.zeros(1, 4, 2), torch.zeros(1, 5, 2), 1), {}, "metric must match x"),
        ((torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), -1), {}, "r must be an integer >= 0"),
        ((torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), 1), {"size": torch.ones(1, 3, 1)},
         r"size must be \[B, N, 1\] or \[B, N\]"),
        ((torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), 1), {"size": torch.zeros(1, 4)},
         "size must be > 0"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge(*args, **kwargs)


def test_unmerge_checks_shape():
    _, _, unmerge = merge(X, X, 1)
    with pytest.raises(ValueError, match=r"y must have shape \[1, 3, C\]"):
        unmerge(X)
