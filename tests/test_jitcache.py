import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import golden
from golden.jitcache import source_stamp

_GOLDEN = Path(golden.__file__).parent

# one golden kernel called in a fresh process; prints its outputs and the cache hits
_RUN = """
import numpy as np
from golden import prng
out = prng.prng_u32(7, np.arange(5))
print(out.tolist(), prng._prng_array.stats.cache_hits.most_common() != [])
"""


def _run(cache_dir, **env):
    e = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **env)
    res = subprocess.run([sys.executable, "-c", _RUN], capture_output=True, text=True, env=e,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_stamp_covers_every_golden_source(tmp_path):
    for p in _GOLDEN.glob("*.py"):
        shutil.copy(p, tmp_path / p.name)
    assert source_stamp(tmp_path) == source_stamp(_GOLDEN)
    # an edit of a module a kernel inlines (not the kernel's own file) changes it
    q = tmp_path / "quantile.py"
    q.write_text(q.read_text() + "\n# edited\n")
    assert source_stamp(tmp_path) != source_stamp(_GOLDEN)


def test_second_process_loads_the_kernels_from_the_disk_cache(tmp_path):
    first = _run(tmp_path)
    second = _run(tmp_path)
    assert first[-1] == "False" and second[-1] == "True"  # compiled, then loaded
    assert first[:-1] == second[:-1]  # the same numbers either way
    assert any(tmp_path.rglob("prng._prng_array*.nbi"))


def test_cache_can_be_turned_off(tmp_path):
    _run(tmp_path, PROCUBE_NUMBA_CACHE="0")
    again = _run(tmp_path, PROCUBE_NUMBA_CACHE="0")
    assert again[-1] == "False" and not any(tmp_path.rglob("*.nbi"))


def test_warm_runs_every_part_and_says_so(capsys):
    # make test runs `python -m golden.warm` before the parallel workers start
    from golden import warm

    assert warm.main(["--jobs", "2"]) == 0  # the two lanes in two processes
    out = capsys.readouterr().out
    assert out.startswith("golden kernels ready: ")
    for part in ("quantile", "dropback top-k (stored w0)", "quantile pass",
                 "dropback top-k (CounterInit)", "prng", "procrustes_ref"):
        assert f"{part} " in out
    assert "jobs 2)" in out
    assert warm.main(["--jobs", "1"]) == 0
    assert "jobs 1)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        warm.main(["--jobs", "0"])
    assert e.value.code == 2
    assert "--jobs must be >= 1, not 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="jobs must be >= 1, not 0"):
        warm.warm(0)


def test_warm_lanes_share_no_kernel():
    # the lanes run in two processes at once: a kernel compiled in both would have its
    # cache entry written by two processes. Each lane in a fresh process of its own.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from golden import warm

    def in_fresh_process(lane):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(warm.lane_kernels, lane).result()

    quantile, other = in_fresh_process(0), in_fresh_process(1)
    assert "golden.dropback._quantile_all" in quantile
    assert any(k.startswith("golden.prng.") for k in quantile)  # CounterInit's
    assert "golden.quantile._pass" in other and len(other) >= 3
    assert not quantile & other, sorted(quantile & other)
