"""`procube experiment cubist` end to end (quick mode) and its argument checks."""

import argparse
import json

import pytest

from golden.experiments import cubist


def _args(*argv):
    parser = argparse.ArgumentParser()
    cubist.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_plugin_protocol():
    assert isinstance(cubist.HELP, str) and "\n" not in cubist.HELP
    args = _args()
    assert args.timing and args.seed == 0 and args.out == "out/experiments/cubist"
    assert not _args("--no-timing").timing


@pytest.mark.slow
def test_quick_run_writes_outputs_and_is_deterministic(tmp_path, capsys):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert cubist.run(_args("--quick", "--no-timing", "--out", str(out))) == 0
    printed = capsys.readouterr().out
    for out in outs:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first, second = (json.loads((out / "results.json").read_text()) for out in outs)
    assert first == second  # same seed, no timing: identical table
    assert (outs[0] / "results.md").read_text() == (outs[1] / "results.md").read_text()

    rows = first["rows"]
    assert len(rows) == 3 * 5
    assert first["config"]["quick"] and first["config"]["train_images"] == 512
    by = {(r["kind"], r["method"], r["setting"][:8]): r for r in rows}
    for kind in ("deit", "sam", "dino"):
        assert by[(kind, "baseline", "-")]["tokens_final"] == 64
        cub = [r for r in rows if r["kind"] == kind and r["method"] == "CubistMerge"]
        assert [r["tokens_final"] for r in cub] == [49, 36]
        for r in rows:
            if r["kind"] == kind and not r["note"]:
                assert 0 <= r["top1"] <= 100 and 0 <= r["miou"] <= 100
                assert r["speedup"] is None
    tome = [r for r in rows if r["method"] == "ToMe"]
    assert [r["note"] for r in tome if r["kind"] != "deit"] == [cubist.TOME_NA] * 4
    deit_tome = [r for r in tome if r["kind"] == "deit"]
    cub_avg = [
        r["tokens_avg"] for r in rows if r["kind"] == "deit" and r["method"] == "CubistMerge"
    ]
    for r, target in zip(deit_tome, cub_avg):
        assert r["note"] == "" and abs(r["tokens_avg"] - target) <= 1.5  # matched count
    assert "n/a: ToMe breaks the rectangular grid" in printed
    assert "| DINOv3-style | CubistMerge | r=(2,2) before block 2 | 36 |" in printed


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"epochs must be an integer in \[1, 1000\]"):
        cubist.run(_args("--epochs", "0", "--out", str(tmp_path)))
    with pytest.raises(ValueError, match=r"loc must be an integer in \[0, 5\]"):
        cubist.run(_args("--loc", "6", "--out", str(tmp_path)))
    with pytest.raises(ValueError, match=r"repeats must be an integer in \[1, 1000\]"):
        cubist.run(_args("--repeats", "0", "--out", str(tmp_path)))
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        cubist.run(_args("--seed", "-1", "--out", str(tmp_path)))
