"""The simulation runner: caching, metrics, waveforms, unavailable simulators."""

import pytest

from hw.common import SkidBuffer
from sim.runner import SimulatorUnavailable, simulate, simulator_unavailable_reason


def test_build_is_cached_by_verilog_hash(tmp_path):
    kw = dict(test_module="sim.tb.tb_stream_fifo", params=dict(width=8, count=50),
              build_root=tmp_path, simulator="verilator")
    a = simulate(SkidBuffer(8), **kw)
    marker = a.build_dir / ".built"
    stamp = marker.stat().st_mtime_ns
    b = simulate(SkidBuffer(8), **kw)
    assert a.passed and b.passed
    assert a.build_dir == b.build_dir
    assert marker.stat().st_mtime_ns == stamp  # not rebuilt
    c = simulate(SkidBuffer(9), **{**kw, "params": dict(width=9, count=50)})
    assert c.build_dir != a.build_dir


def test_metrics_come_back(simulator, tmp_path):
    r = simulate(SkidBuffer(8), test_module="sim.tb.tb_stream_fifo", simulator=simulator,
                 params=dict(width=8, count=123), build_root=tmp_path)
    assert r.passed and r.tests == 1 and r.failures == 0
    assert r.metrics["transfers"] == 123


def test_waves_on_request(simulator, tmp_path):
    r = simulate(SkidBuffer(8), test_module="sim.tb.tb_stream_fifo", simulator=simulator,
                 params=dict(width=8, count=20), build_root=tmp_path, waves=True)
    assert r.passed
    assert r.waves is not None and r.waves.stat().st_size > 0


def test_unknown_simulator_is_a_value_error():
    with pytest.raises(ValueError, match="simulator must be one of verilator, icarus"):
        simulator_unavailable_reason("modelsim")


def test_missing_simulator_is_reported(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "Icarus Verilog is not installed" in simulator_unavailable_reason("icarus")
    with pytest.raises(SimulatorUnavailable, match="icarus"):
        simulate(SkidBuffer(8), test_module="sim.tb.tb_stream_fifo", simulator="icarus")


def test_build_lock_excludes_a_second_holder(tmp_path):
    import threading

    from sim.runner import _build_lock

    first = _build_lock(tmp_path)
    got = threading.Event()

    def second():
        _build_lock(tmp_path).close()
        got.set()

    t = threading.Thread(target=second)
    t.start()
    assert not got.wait(0.5)  # blocked while the first lock is held
    first.close()
    assert got.wait(10)
    t.join()


def _simulate_skid(args):
    simulator, root, count = args
    r = simulate(SkidBuffer(8), test_module="sim.tb.tb_stream_fifo", simulator=simulator,
                 params=dict(width=8, count=count), build_root=root)
    return r.passed, r.metrics.get("transfers"), str(r.build_dir)


def test_two_processes_can_run_one_design_at_once(simulator, tmp_path):
    """Two processes that build and run the same configuration at the same time (two
    pytest sessions, a bench beside a test) share one build directory; both pass."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        out = pool.map(_simulate_skid, [(simulator, tmp_path, 40), (simulator, tmp_path, 41)])
    assert [o[:2] for o in out] == [(True, 40), (True, 41)]
    assert out[0][2] == out[1][2]
