import argparse
import json
import math
from dataclasses import replace

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


@pytest.mark.slow  # ~40 s idle; 5-6 min at load 5 (numba compile 305 s; lenet300 adds ~1 s)
def test_quick_run_writes_outputs(tmp_path, capsys):
    assert E.run(_args("--quick", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "| mlp | dropback |" in out and "target (>= 10x within 1 point)" in out
    assert "| lenet300 (50,610 params) | dense SGD |" in out and "| lenet300 | procrustes |" in out
    assert "- lenet300/dropback: 10x vs dense" in out
    assert "| mlp | procrustes, 16-bit fixed point | - | - |" in out
    assert "target (within 2 points of float)" in out
    assert "Per seed at 10x" in out and "Settings chosen on the validation carve" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert E.MODELS == ("mlp", "lenet300", "cnn")  # the default runs all three
    assert len(res["runs"]) == 3 * (1 + 2 * len(E.RATIOS)) + 1  # + the fixed-point MLP only
    assert set(res["verdicts"]) == {f"{m}/{meth}" for m in E.MODELS for meth in E.METHODS[1:]}
    fv = res["fixed_point"]
    assert fv["target_2pt_met"] == (fv["fixed"] >= fv["float"] - 2)
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert len(tuning["trials"]) == len(E.MODELS) * len(E.METHODS) * 2  # quick: 2 per method
    for key, hp in tuning["best"].items():
        model, method = key.split("/")
        trials = [t for t in tuning["trials"] if (t["model"], t["method"]) == (model, method)]
        top = max(v for t in trials for v in t["val_mean"].values())
        assert hp["val_accuracy"] >= top - E.TIE  # the winner is the best validation score
        assert res["hparams"][key]["epochs"] == hp["epochs"]
    for r in res["runs"]:
        c = r["config"]
        assert c["label_smoothing"] == E.LABEL_SMOOTHING  # one loss for every method
        hp = tuning["best"][f"{c['model']}/{c['method'].replace('-fixed', '')}"]
        assert (c["lr"], c["batch"], c["epochs"]) == (hp["lr"], hp["batch"], hp["epochs"])
        assert 0 <= r["accuracy"] <= 100
        assert r["achieved_reduction"] == pytest.approx(r["params"] / r["tracked"])
        if c["method"] == "dropback":
            assert r["tracked"] == r["params"] // c["ratio"]  # exact top-k
            assert r["achieved_reduction_last_epoch"] == pytest.approx(r["params"] / r["tracked"])
    assert (tmp_path / "results.md").read_text().startswith("# Dropback / Procrustes")
    assert (tmp_path / "tuning.md").read_text().count("| procrustes |") == 2 * len(E.MODELS)
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    masks = np.load(tmp_path / "masks.npz")
    assert masks["mlp/dropback/fc1.weight"].shape == (100, 64)
    assert masks["lenet300/procrustes/fc1.weight"].shape == (300, 64)
    assert masks["lenet300/dropback/fc2.weight"].shape == (100, 300)
    assert masks["cnn/procrustes/conv2.weight"].shape == (32, 16 * 3 * 3)
    assert masks["cnn/dropback/conv1.weight"].dtype == bool
    # the tuned settings can be reused without tuning again, for a subset of the models
    again = tmp_path / "again"
    assert E.run(_args("--quick", "--tuning", str(tmp_path / "tuning.json"), "--models", "mlp",
                       "--out", str(again))) == 0
    assert not (again / "tuning.json").exists()
    rerun = json.loads((again / "results.json").read_text())
    assert rerun["runs"] == [r for r in res["runs"] if r["config"]["model"] == "mlp"]
    assert set(rerun["verdicts"]) == {"mlp/dropback", "mlp/procrustes"}
    assert rerun["fixed_point"] == res["fixed_point"]
    assert sorted(np.load(again / "masks.npz").files) == sorted(
        k for k in masks.files if k.startswith("mlp/"))
    out = capsys.readouterr().out
    assert "| cnn |" not in out and "| lenet300 |" not in out


def test_holdout_never_touches_test_images():
    data = load_digits_split(E.SPLIT_SEED, size=8)
    a, b = E.holdout(data, 0), E.holdout(data, 1)
    assert len(a.y_test) == round(0.2 * len(data.y_train)) == 270
    assert len(a.y_train) + len(a.y_test) == len(data.y_train)

    def rows(x):
        return {bytes(r.numpy().tobytes()) for r in x.reshape(len(x), -1)}

    train = rows(data.x_train)
    assert rows(a.x_test) <= train and rows(a.x_train) <= train
    assert not rows(a.x_test) & rows(a.x_train)
    assert not torch.equal(a.y_test, b.y_test)  # each tuning seed has its own carve
    assert torch.equal(E.holdout(data, 0).x_test, a.x_test)  # and it is reproducible


def test_every_method_gets_the_same_tuning_budget():
    sizes = {m: len(E.grid(m)) for m in E.METHODS}
    assert set(sizes.values()) == {12}
    for hp in E.grid("procrustes"):
        steps = min(E.CHECKPOINTS) * (1078 // hp["batch"])  # full batches only
        assert hp["init_decay"] ** steps < 1e-3  # untracked weights are ~0: MACs skippable
    with pytest.raises(ValueError, match="method must be one of dense, dropback, procrustes"):
        E.grid("adam")


def test_tune_picks_best_validation_first_in_grid_then_fewer_epochs(monkeypatch):
    seen = []

    def fake_train_one(cfg, data, *, progress=None, checkpoints=()):
        seen.append((cfg.model, cfg.method, cfg.ratio, len(data.y_test)))
        top = cfg.lr == 0.1 and cfg.batch in (16, 32) and cfg.init_decay != 0.98
        return dict(curve={e: (90.0 if top and e >= 2 else 50.0) for e in checkpoints})

    monkeypatch.setattr(E, "train_one", fake_train_one)
    monkeypatch.setattr(E, "LRS", (0.05, 0.1))
    monkeypatch.setattr(E, "CHECKPOINTS", (1, 2, 3))
    tuning = E.tune(seeds=2, show_progress=False)
    assert {(m, meth, r) for (m, meth, r, _) in seen} == {
        (m, meth, 1 if meth == "dense" else 10) for m in E.MODELS for meth in E.METHODS}
    assert {n for *_, n in seen} == {270}  # scored on the validation carve only
    assert len(seen) == len(E.MODELS) * len(E.METHODS) * 6 * 2
    best = tuning["best"]
    for m in E.MODELS:
        for meth in ("dense", "dropback"):
            assert best[f"{m}/{meth}"] == dict(lr=0.1, batch=16, epochs=2, val_accuracy=90.0,
                                               init_decay=1.0)
        assert best[f"{m}/procrustes"] == dict(lr=0.1, batch=32, init_decay=0.99, epochs=2,
                                               val_accuracy=90.0)


def test_select_breaks_float_ties_by_grid_order_then_epochs():
    def trial(lr, vals):
        return dict(model="cnn", method="dense", lr=lr, batch=32,
                    val_mean={str(e): v for e, v in zip((50, 100), vals)})

    trials = [trial(0.1, [98.0, 98.88888]), trial(0.2, [98.888895, 98.888895])]
    assert E.select(trials, (50, 100))["cnn/dense"] == dict(
        lr=0.1, batch=32, epochs=100, val_accuracy=98.88888, init_decay=1.0)
    trials[1]["val_mean"]["100"] = 99.07  # one more validation image: a real win
    assert E.select(trials, (50, 100))["cnn/dense"]["lr"] == 0.2


def _fake_results(dense, sparse):
    """Runs with the given per-seed accuracies (dense, and method -> ratio -> list)."""
    runs = []
    for model in E.MODELS:
        for sd, acc in enumerate(dense):
            runs.append(dict(config=dict(model=model, method="dense", ratio=1, seed=sd),
                             params=100, accuracy=acc, achieved_reduction=1.0,
                             achieved_reduction_last_epoch=1.0))
        for method in E.METHODS[1:]:
            for r in E.RATIOS:
                for sd, acc in enumerate(sparse[r]):
                    runs.append(dict(config=dict(model=model, method=method, ratio=r, seed=sd),
                                     params=100, accuracy=acc, achieved_reduction=r * 0.9,
                                     achieved_reduction_last_epoch=r * 0.9))
    return runs


def test_verdict_uses_paired_mean_difference_to_dense():
    res = _fake_results([98.0, 96.0], {2: [98.0, 96.0], 5: [97.5, 95.5], 10: [97.2, 94.7],
                                       20: [90.0, 90.0]})
    assert E.paired_deltas(res, "mlp", "procrustes", 10) == pytest.approx([-0.8, -1.3])
    v = E.verdicts(res)["cnn/procrustes"]
    assert v["delta_10x"] == pytest.approx(-1.05) and not v["target_10x_met"]
    assert v["best_ratio_within_1pt"] == 5
    assert v["delta_10x_std"] == pytest.approx(math.sqrt(0.125))
    assert v["delta_10x_sem"] == pytest.approx(math.sqrt(0.125) / math.sqrt(2))  # 0.25
    assert v["achieved_reduction_10x"] == pytest.approx(9.0)
    res = _fake_results([98.0, 96.0], {2: [98.0, 96.0], 5: [97.5, 95.5], 10: [97.2, 95.0],
                                       20: [90.0, 90.0]})
    v = E.verdicts(res)["mlp/dropback"]
    assert v["target_10x_met"] and v["best_ratio_within_1pt"] == 10
    md = E.to_markdown(res, E.verdicts(res))
    assert "97.20 (-0.80; 9.00x / 9.00x)" in md and "-0.90 ± 0.14" in md
    assert "-0.90 ± 0.14 points (paired, mean ± std over seeds; standard error of the mean " \
           "0.10)" in md


def test_run_defaults_to_four_tuning_carves_and_ten_final_seeds(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_tune(*, seed, seeds, quick, jobs, models):
        seen["tune"] = seeds
        return dict(seeds=list(range(seeds)), val_images=270, checkpoints=[1], trials=[],
                    best={})

    def fake_run_experiment(hparams, *, seed, seeds, quick, jobs, models):
        seen["final"] = seeds
        raise Stop

    monkeypatch.setattr(E, "tune", fake_tune)
    monkeypatch.setattr(E, "run_experiment", fake_run_experiment)
    for argv, want in (((), (4, 10)), (("--quick",), (1, 1)),
                       (("--tune-seeds", "3", "--seeds", "7"), (3, 7))):
        with pytest.raises(Stop):
            E.run(_args(*argv, "--out", str(tmp_path)))
        assert (seen["tune"], seen["final"]) == want
    assert (E.TUNE_SEEDS, E.FINAL_SEEDS) == (4, 10)


def test_train_one_budget_masks_and_checkpoints():
    data = load_digits_split(0, size=8)
    cfg = E.RunConfig("mlp", "dropback", ratio=10, epochs=2, train_limit=128)
    r = E.train_one(cfg, data, checkpoints=(1, 2))
    assert r["tracked"] == 17610 // 10
    total = sum(int(m.sum()) for m in r["masks"].values())
    assert 0 < total <= r["tracked"]  # weight matrices hold at most the whole budget
    assert set(r["masks"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert sorted(r["curve"]) == [1, 2] and r["curve"][2] == r["accuracy"]


def test_train_one_steps_on_full_batches_only():
    data = load_digits_split(0, size=8)
    steps = []

    def factory(cfg, params):
        opt = E.make_optimizer(cfg, params)
        step = opt.step
        opt.step = lambda *a, **k: (steps.append(len(steps)), step(*a, **k))[1]
        return opt

    cfg = E.RunConfig("mlp", "procrustes", ratio=10, epochs=3, batch=32, train_limit=70)
    E.train_one(cfg, data, optimizer_factory=factory)
    assert len(steps) == 3 * 2  # 70 images: two batches of 32, the 6 left over skipped
    with pytest.raises(ValueError, match=r"batch must be an integer in \[1, 70\]"):
        E.train_one(replace(cfg, batch=71), data)


def test_lenet300_is_lenet_300_100_on_the_64_pixels():
    model = E.make_model("lenet300")
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(300, 64), (300,), (100, 300), (100,), (10, 100), (10,)]
    data = load_digits_split(0, size=8)
    r = E.train_one(E.RunConfig("lenet300", "dropback", ratio=10, epochs=1, train_limit=64),
                    data)
    assert r["params"] == 50610 and r["tracked"] == 50610 // 10  # one global budget
    assert {k: m.shape for k, m in r["masks"].items()} == {
        "fc1.weight": (300, 64), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}


def test_procrustes_reports_the_reduction_it_achieved():
    data = load_digits_split(0, size=8)
    cfg = E.RunConfig("cnn", "procrustes", ratio=10, epochs=1, train_limit=256)
    r = E.train_one(cfg, data)
    assert r["achieved_reduction"] == pytest.approx(38282 / r["tracked"])
    assert r["tracked"] != 38282 // 10  # the estimator is approximate, and it is reported
    assert 5 < r["achieved_reduction_last_epoch"] < 20


@pytest.mark.parametrize("method", E.METHODS)
def test_every_method_trains_on_the_label_smoothed_loss(method):
    data = load_digits_split(0, size=8)
    seen = []

    def factory(cfg, params):  # the method's optimizer, keeping the parameters
        seen.append((params, [p.detach().clone() for p in params]))
        return E.make_optimizer(cfg, params)

    cfg = E.RunConfig("mlp", method, ratio=1 if method == "dense" else 10, epochs=1, batch=32,
                      train_limit=32, init_decay=0.9)
    E.train_one(cfg, data, optimizer_factory=factory)
    (trained, init), = seen
    x, y = data.x_train[:32].reshape(32, -1), data.y_train[:32]

    def one_step(smoothing):
        model = E.make_model("mlp")
        ps = list(model.parameters())
        with torch.no_grad():
            for p, p0 in zip(ps, init):
                p.copy_(p0)
        opt = E.make_optimizer(cfg, ps)
        torch.nn.functional.cross_entropy(model(x), y, label_smoothing=smoothing).backward()
        opt.step()
        return ps

    assert E.LABEL_SMOOTHING == 0.1 and cfg.label_smoothing == E.LABEL_SMOOTHING
    for p, q in zip(trained, one_step(E.LABEL_SMOOTHING)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(trained, one_step(0.0)))


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


def test_models_and_bad_arguments(tmp_path):
    assert sum(p.numel() for p in E.make_model("mlp").parameters()) == 17610
    assert E.make_model("cnn")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="model must be one of mlp, lenet300, cnn"):
        E.make_model("vit")
    with pytest.raises(ValueError, match="method must be one of dense, dropback, procrustes"):
        E.make_optimizer(E.RunConfig("mlp", "adam"), list(E.make_model("mlp").parameters()))
    hp = {f"{m}/{meth}": dict(lr=0.1, batch=32, epochs=1, init_decay=1.0)
          for m in E.MODELS for meth in E.METHODS}
    with pytest.raises(ValueError, match="hparams must hold a setting .* missing cnn/dense"):
        E.run_experiment({k: v for k, v in hp.items() if k != "cnn/dense"})
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        E.run_experiment(hp | {"mlp/dense": dict(hp["mlp/dense"], epochs=0)})
    with pytest.raises(ValueError, match=r"init_decay must be in \(0, 1\]"):
        E.run_experiment(hp | {"cnn/procrustes": dict(hp["mlp/dense"], init_decay=0)})
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        E.run_experiment(hp | {"cnn/dropback": dict(hp["mlp/dense"], lr=math.nan)})
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        E.run_experiment(hp, seeds=0)
    with pytest.raises(ValueError, match="tune seeds must be an integer >= 1"):
        E.tune(seeds=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        E.tune(seed=-1)
    with pytest.raises(ValueError, match=r"jobs must be an integer in \[1, \d+\]"):
        E.run_experiment(hp, jobs=0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        E.holdout(load_digits_split(0, size=8), 0, fraction=1.0)
    allowed = "models must be a non-empty subset of mlp, lenet300, cnn"
    for bad_models in ("mlp,vit", "lenet", "lenet-300-100", "", "mlp,"):
        with pytest.raises(ValueError, match=allowed):
            E.run(_args("--models", bad_models, "--out", str(tmp_path)))
    with pytest.raises(ValueError, match=allowed):
        E.tune(models=())
    with pytest.raises(ValueError, match=allowed):
        E.run_experiment(hp, models=("lenet",))
    for models in ("cnn", "lenet300"):  # the data masks are the 64-100-100-10 MLP's
        with pytest.raises(ValueError, match="models must include mlp with --save-data-masks"):
            E.run(_args("--models", models, "--save-data-masks", "--out", str(tmp_path)))
    bad = tmp_path / "tuning.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="tuning must be a tuning.json written by this"):
        E.run(_args("--tuning", str(bad), "--out", str(tmp_path)))
