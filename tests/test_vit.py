"""Tiny ViTs (golden.vit) and the digits loader (golden.data)."""

import math

import numpy as np
import pytest
import torch

from golden.data import load_digits_split, patch_foreground
from golden.vit import (
    Block,
    build_vit,
    mean_iou,
    real_feature_frames,
    rel_pos_table,
    rope_tables,
)

PREFIX = {"deit": 1, "sam": 0, "dino": 3}


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 1, 32, 32)


def _model(kind, **kw):
    torch.manual_seed(0)
    return build_vit(kind, **kw).eval()


# ---------------------------------------------------------------- data


def test_digits_split_shapes_and_determinism():
    a, b, c = load_digits_split(0), load_digits_split(0), load_digits_split(1)
    assert a.x_train.shape == (1348, 1, 32, 32) and a.x_test.shape == (449, 1, 32, 32)
    assert a.mask_train.shape == (1348, 64) and a.grid == (8, 8)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-3


def test_digits_mask_is_patch_mean_above_threshold():
    s = load_digits_split(0)
    raw = s.x_test[:5] * s.std + s.mean  # back to the [0, 1] scale
    means = raw.reshape(5, 8, 4, 8, 4).mean(dim=(2, 4)).reshape(5, 64)
    far = (means - 0.25).abs() > 1e-4  # skip values that round either way
    assert torch.equal(s.mask_test[:5][far], (means > 0.25).long()[far])
    assert 0.2 < s.mask_train.float().mean() < 0.8  # both classes well represented


def test_data_bad_arguments():
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_digits_split(0, test_fraction=1.0)
    with pytest.raises(ValueError, match="size must be a multiple of 8"):
        load_digits_split(0, size=20)
    with pytest.raises(ValueError, match="patch must be a positive divisor"):
        load_digits_split(0, patch=5)
    with pytest.raises(ValueError, match="threshold must be in"):
        load_digits_split(0, threshold=0)
    with pytest.raises(ValueError, match="patch must be a positive divisor"):
        patch_foreground(torch.zeros(1, 1, 8, 8), 3, 0.5)


def test_mean_iou():
    pred = torch.tensor([0, 1, 1, 0])
    target = torch.tensor([0, 1, 0, 0])
    # class 0: TP 2, union 3; class 1: TP 1, union 2
    assert mean_iou(pred, target) == pytest.approx((2 / 3 + 1 / 2) / 2)


# ---------------------------------------------------------------- shapes and patches


@pytest.mark.parametrize("kind", ["deit", "sam", "dino"])
def test_shapes_unpatched(kind, images):
    m = _model(kind)
    out, trace = m.trace(images)
    assert out.logits.shape == (3, 10) and out.seg.shape == (3, 64, 2)
    assert [t["tokens"] for t in trace] == [PREFIX[kind] + 64] * 6
    assert m.features(images, 0).shape == (3, PREFIX[kind] + 64, 64)


@pytest.mark.parametrize("kind", ["deit", "sam", "dino"])
@pytest.mark.parametrize("r", [(1, 1), (2, 2), (0, 3)])
def test_cubist_patch_reduces_tokens_and_restores_dense_output(kind, r, images):
    m = _model(kind).patch_cubist(2, r)
    out, trace = m.trace(images)
    h, w = 8 - r[0], 8 - r[1]
    p = PREFIX[kind]
    assert [t["tokens"] for t in trace] == [p + 64] * 2 + [p + h * w] * 4
    assert [t["hw"] for t in trace] == [(8, 8)] * 2 + [(h, w)] * 4
    assert out.logits.shape == (3, 10) and out.seg.shape == (3, 64, 2)
    assert m.features(images, 2).shape == (3, p + h * w, 64)
    assert m.features(images, 1).shape == (3, p + 64, 64)


def test_cubist_dense_output_is_unmerged_copy(images):
    """Each removed patch gets the seg logits of the token it was merged into, so the
    full-grid output has exactly (8-r_h)(8-r_w) distinct rows when merging before block 0
    of a model with no mixing of distinct tokens into equal ones."""
    m = _model("deit").patch_cubist(0, (2, 2))
    seg = m(images).seg
    for b in range(3):
        assert len(torch.unique(seg[b], dim=0)) == 36


def test_dino_rope_recomputed_for_reduced_grid(images):
    m = _model("dino").patch_cubist(3, (1, 2))
    _, trace = m.trace(images)
    assert [t["rope"] for t in trace] == [(64, 16)] * 3 + [(42, 16)] * 3


def test_rope_coordinates_span_minus_one_to_one():
    for h, w in ((8, 8), (7, 6)):
        sin, cos = rope_tables((h, w), 16, base=100.0)
        assert sin.shape == cos.shape == (h * w, 16)
        # channel 0: row coordinate with period 1; channel 4: column coordinate.
        want_row = 2 * math.pi * ((torch.arange(h) + 0.5) / h * 2 - 1)
        want_col = 2 * math.pi * ((torch.arange(w) + 0.5) / w * 2 - 1)
        grid_sin, grid_cos = sin.reshape(h, w, 16), cos.reshape(h, w, 16)
        assert torch.allclose(grid_sin[:, 0, 0], want_row.sin(), atol=1e-5)
        assert torch.allclose(grid_cos[:, 0, 0], want_row.cos(), atol=1e-5)
        assert torch.allclose(grid_sin[0, :, 4], want_col.sin(), atol=1e-5)
        assert torch.allclose(grid_cos[0, :, 4], want_col.cos(), atol=1e-5)
        assert torch.allclose(sin[:, :8], sin[:, 8:]) and torch.allclose(cos[:, :8], cos[:, 8:])
    with pytest.raises(ValueError, match="head_dim must be a multiple of 4"):
        rope_tables((4, 4), 6)


def test_sam_rel_pos_interpolated_and_windows_repadded(images):
    m = _model("sam").patch_cubist(1, (1, 1))
    _, trace = m.trace(images)
    # window 3: 8x8 and 7x7 both pad to 9x9; global blocks 2 and 5 see the 7x7 grid.
    assert trace[0]["padded"] == (9, 9) and trace[1]["padded"] == (9, 9)
    assert trace[3]["padded"] == (9, 9) and trace[3]["rel_pos"] == ((3, 3, 16),) * 2
    assert trace[2]["rel_pos"] == ((7, 7, 16),) * 2 and trace[5]["rel_pos"] == ((7, 7, 16),) * 2
    m.patch_cubist(1, (2, 2))
    _, trace = m.trace(images)
    assert trace[3]["padded"] == (6, 6) and trace[2]["rel_pos"] == ((6, 6, 16),) * 2


def test_rel_pos_table_indexing_and_interpolation():
    torch.manual_seed(0)
    table = torch.randn(15, 4)  # built for 8 positions
    same = rel_pos_table(8, table)
    for i, j in ((0, 0), (0, 7), (7, 0), (3, 5)):
        assert torch.equal(same[i, j], table[i - j + 7])
    small = rel_pos_table(6, table)
    assert small.shape == (6, 6, 4)
    for d in range(-5, 6):  # Toeplitz: depends on i - j only
        vals = [small[i, i - d] for i in range(6) if 0 <= i - d < 6]
        assert all(torch.equal(v, vals[0]) for v in vals)
    assert torch.allclose(rel_pos_table(5, torch.full((15, 4), 2.5)), torch.full((5, 5, 4), 2.5))
    lin = torch.arange(15.0).unsqueeze(1)  # linear in the offset stays monotone
    assert torch.all(torch.diff(rel_pos_table(6, lin)[:, 0, 0]) > 0)


def test_window_attention_partition_is_exact():
    """A window as large as the grid is global attention; smaller windows are local."""
    torch.manual_seed(0)
    full = Block(16, 2, 2.0, window=8, rel_pos=8).eval()
    glob = Block(16, 2, 2.0, window=0, rel_pos=8).eval()
    glob.load_state_dict(full.state_dict())
    x = torch.randn(2, 64, 16)
    from golden.vit import _State

    a = full(_State(x=x.clone(), hw=(8, 8), prefix=0)).x
    b = glob(_State(x=x.clone(), hw=(8, 8), prefix=0)).x
    assert torch.allclose(a, b, atol=1e-5)
    local = Block(16, 2, 2.0, window=4, rel_pos=4).eval()
    y0 = local(_State(x=x.clone(), hw=(8, 8), prefix=0)).x.reshape(2, 8, 8, 16)
    x2 = x.clone().reshape(2, 8, 8, 16)
    x2[:, 0, 0] += 1.0  # inside window (0, 0)
    y1 = local(_State(x=x2.reshape(2, 64, 16), hw=(8, 8), prefix=0)).x.reshape(2, 8, 8, 16)
    assert not torch.allclose(y0[:, :4, :4], y1[:, :4, :4])
    assert torch.equal(y0[:, 4:], y1[:, 4:]) and torch.equal(y0[:, :, 4:], y1[:, :, 4:])


@pytest.mark.parametrize("kind", ["sam", "dino"])
def test_tome_refused_where_grid_needed(kind):
    with pytest.raises(ValueError, match="ToMe breaks the rectangular grid"):
        _model(kind).patch_tome(4)


def test_tome_on_deit(images):
    m = _model("deit").patch_tome(5)
    out, trace = m.trace(images)
    assert [t["tokens"] for t in trace] == [65 - 5 * i for i in range(6)]
    assert [t["tokens_mlp"] for t in trace] == [60 - 5 * i for i in range(6)]
    assert all(t["hw"] is None for t in trace[1:])
    assert out.logits.shape == (3, 10) and out.seg.shape == (3, 64, 2)
    with pytest.raises(ValueError, match=r"r must be an integer in \[0, 32\]"):
        m.patch_tome(33)


@pytest.mark.parametrize("kind", ["deit", "sam", "dino"])
def test_unpatch_restores_exact_outputs(kind, images):
    m = _model(kind)
    with torch.no_grad():
        ref = m(images)
        m.patch_cubist(1, (2, 2))
        merged = m(images)
        if kind == "deit":
            m.patch_tome(8)
            assert not torch.equal(m(images).logits, ref.logits)
        m.unpatch()
        again = m(images)
    assert not torch.equal(merged.seg, ref.seg)
    assert torch.equal(again.logits, ref.logits) and torch.equal(again.seg, ref.seg)


def test_model_bad_arguments(images):
    m = _model("deit")
    with pytest.raises(ValueError, match=r"loc must be an integer in \[0, 5\]"):
        m.patch_cubist(6, (1, 1))
    with pytest.raises(ValueError, match=r"r_h must be an integer in \[0, 4\]"):
        m.patch_cubist(0, (5, 1))
    with pytest.raises(ValueError, match=r"r_w must be an integer in \[0, 4\]"):
        m.patch_cubist(0, (1, -1))
    with pytest.raises(ValueError, match=r"block must be an integer in \[0, 6\]"):
        m.features(images, 7)
    with pytest.raises(ValueError, match="kind must be one of"):
        build_vit("swin")
    with pytest.raises(ValueError, match=r"window must be in \[1, 8\]"):
        build_vit("sam", window=9)
    with pytest.raises(ValueError, match="input must have shape"):
        m(torch.zeros(2, 3, 32, 32))


# ---------------------------------------------------------------- real features


@pytest.mark.slow
def test_real_feature_frames_trains_once_then_loads(tmp_path):
    a = real_feature_frames(5, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    frames, hw, prefix = a
    assert frames.shape == (5, 1 + 64, 64) and frames.dtype == np.float32
    assert hw == (8, 8) and prefix == 1
    assert np.isfinite(frames).all() and frames.std() > 0.1
    b = real_feature_frames(7, seed=0, cache_dir=tmp_path)  # from the cache
    assert np.array_equal(b.frames[:5], frames)
    with pytest.raises(ValueError, match=r"n_frames must be an integer in \[1, 1797\]"):
        real_feature_frames(0, cache_dir=tmp_path)
