import argparse
import json

import numpy as np
import pytest
import torch

from golden.data import load_digits_split
from golden.dropback import Dropback
from golden.experiments import dropback as E


def _args(*argv):
    p = argparse.ArgumentParser()
    E.add_arguments(p)
    return p.parse_args(list(argv))


def test_quick_run_writes_outputs(tmp_path, capsys):
    assert E.run(_args("--quick", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "| mlp | dropback |" in out and "target (>= 10x within 1 point)" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["runs"]) == 2 * (1 + 2 * len(E.RATIOS)) + 1  # + the fixed-point MLP
    assert "| mlp | procrustes, 16-bit fixed point | - | - |" in out
    assert "target (within 2 points of float)" in out
    fv = res["fixed_point"]
    assert fv["target_2pt_met"] == (fv["fixed"] >= fv["float"] - 2)
    for r in res["runs"]:
        c = r["config"]
        assert 0 <= r["accuracy"] <= 100
        if c["method"] == "dropback":
            assert r["tracked"] == r["params"] // c["ratio"]  # exact top-k
    assert (tmp_path / "results.md").read_text().startswith("# Dropback / Procrustes")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    masks = np.load(tmp_path / "masks.npz")
    assert masks["mlp/dropback/fc1.weight"].shape == (100, 64)
    assert masks["cnn/procrustes/conv2.weight"].shape == (32, 16 * 3 * 3)
    assert masks["cnn/dropback/conv1.weight"].dtype == bool


def test_train_one_budget_and_masks_match_weights():
    data = load_digits_split(0, size=8)
    cfg = E.RunConfig("mlp", "dropback", ratio=10, epochs=1, train_limit=128)
    r = E.train_one(cfg, data)
    assert r["tracked"] == 17610 // 10
    total = sum(int(m.sum()) for m in r["masks"].values())
    assert 0 < total <= r["tracked"]  # weight matrices hold at most the whole budget
    assert set(r["masks"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}


def test_optimizer_factory_seam():
    data = load_digits_split(0, size=8)
    seen = []

    def factory(cfg, params):
        seen.append(sum(p.numel() for p in params))
        return Dropback(params, cfg.lr, 100)

    r = E.train_one(E.RunConfig("cnn", "custom", epochs=1, train_limit=64), data,
                    optimizer_factory=factory)
    assert seen == [38282] and r["tracked"] == 100


def test_committed_data_masks():
    masks = np.load(E.DATA_MASKS)
    assert sorted(masks.files) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert masks["fc1.weight"].shape == (100, 64) and masks["fc1.weight"].dtype == bool
    d = E.density({k: masks[k] for k in masks.files})
    assert 0.03 < d < 0.2  # ~10x reduction (biases share the global budget)


def test_models_and_bad_arguments():
    assert sum(p.numel() for p in E.make_model("mlp").parameters()) == 17610
    assert E.make_model("cnn")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="model must be one of mlp, cnn"):
        E.make_model("vit")
    with pytest.raises(ValueError, match="method must be one of dense, dropback, procrustes"):
        E.make_optimizer(E.RunConfig("mlp", "adam"), list(E.make_model("mlp").parameters()))
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        E.run_experiment(epochs=0)
    with pytest.raises(ValueError, match=r"init_decay must be in \(0, 1\]"):
        E.run_experiment(init_decay=0)
