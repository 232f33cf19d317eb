import argparse

import pytest

from golden import bench_dropback as bd


def test_resnet18_shapes_count():
    shapes = bd.resnet18_shapes()
    assert len(shapes) == 62
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    assert n == bd.RESNET18_NUMEL


def test_quartiles():
    assert bd._quartiles([2.0]) == (2.0, 2.0, 2.0)
    assert bd._quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(repeats=0), r"repeats must be >= 1, not 0"),
    (dict(threads=0), r"threads must be >= 1, not 0"),
    (dict(warmup=0), r"warmup must be >= 1, not 0"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        bd.run_bench(**kwargs)


def test_markdown_reports_median_ratio_and_spread():
    res = dict(numel=10, track_size=1, repeats=3, warmup=2, threads=1, load_1min=0.5,
               median_cpu_ms=dict(sgd=2.0), median_wall_ms=dict(sgd=2.5), target_ratio=3.0,
               rows=[dict(mode="dropback_topk", ratio_vs_sgd=2.5, ratio_iqr=[2.25, 2.75],
                          met=True, wall_ratio_vs_sgd=2.4, tracked=1, target_tracked=1,
                          fast_path="hint_hit_rate", fast_rate=1.0),
                     dict(mode="procrustes_quantile", ratio_vs_sgd=3.5, ratio_iqr=[3.0, 4.0],
                          met=False, wall_ratio_vs_sgd=3.6, tracked=1, target_tracked=1,
                          fast_path="bulk_block_rate", fast_rate=0.5)])
    md = bd.to_markdown(res)
    assert "| dropback_topk | 2.50 | 2.25-2.75 | 2.40 | met | 1 | 100.0% hint hits |" in md
    assert ("| procrustes_quantile | 3.50 | 3.00-4.00 | 3.60 | NOT met | 1 | 50.0% bulk blocks |"
            in md)


def test_cli_arguments():
    p = argparse.ArgumentParser()
    bd.add_arguments(p)
    a = p.parse_args([])
    assert (a.repeats, a.warmup, a.threads, a.json) == (15, 10, 1, False)
