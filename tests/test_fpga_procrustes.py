"""Procrustes on a (simulated) board: training steps through host driver → UART → link →
array → link → host, every tensor checked against ``golden.procrustes_ref``; the
workload's argument checks; and the board configurations the FPGA flow builds."""

from types import SimpleNamespace

import pytest

from fpga import apps
from fpga.designs import board_params, make_accel, sim_core
from fpga.procrustes_app import _pack, _unpack
from sim.runner import available_simulators, simulate

needs_icarus = pytest.mark.skipif("icarus" not in available_simulators(),
                                  reason="icarus: not installed")
SMALL = dict(rows=2, cols=2, val_depth=256, x_depth=64, y_depth=64)


def _train_one_step_through_the_board(params, sizes):
    """One training step of ``sizes`` on a simulated board with the array ``params``,
    every tensor checked against the golden step; returns the testbench's metrics."""
    core = sim_core("procrustes", params)
    app_args = {"steps": 1, "sizes": sizes, "batch": 3, "lr": 0.3, "seed": 2}
    r = simulate(core, test_module="sim.tb.tb_fpga_link", simulator="icarus",
                 name="fpga_procrustes", testcase="test_host_driver",
                 params={"divisor": core.link.divisor,
                         "timeout_cycles": core.link.timeout_cycles,
                         "app": "procrustes", "app_args": app_args})
    assert r.passed, r.log.read_text()[-3000:] if r.log else r
    m = r.metrics
    # per step: z of 2 layers, dx of layer 1, dw of 2 layers, 4 updates x (weights,
    # theta, tracked count), the loss
    assert m["items"] == 2 + 1 + 2 + 4 * 3 + 1 and m["mismatches"] == 0
    return m


@needs_icarus
@pytest.mark.slow
def test_training_step_through_the_simulated_board_matches_the_golden_model():
    m = _train_one_step_through_the_board(SMALL, [16, 6, 4])
    assert m["beats_in"] > 0 and m["beats_out"] > 0 and m["cycles"] > 0


@needs_icarus
@pytest.mark.slow
def test_icebreaker_area_configuration_trains_through_the_simulated_board():
    # the iCEBreaker's defaults (1x1, 2-deep walker FIFO, one mask lane, area=1: the
    # serial update) behind the UART link
    params = board_params("icebreaker", "procrustes")
    assert params["area"] == 1
    _train_one_step_through_the_board(params, [4, 6, 3])


def _board(**params):
    p = {**SMALL, "data_bits": 16, "acc_bits": 32, "lanes": 4, **params}
    return SimpleNamespace(design="procrustes", info={"params": p})


@pytest.mark.parametrize("kwargs, msg", [
    ({"sizes": (16,)}, r"sizes must have 2\.\.4 entries, not 1"),
    ({"sizes": (10, 4)}, r"sizes\[0\] must be one of 64, 16, 4 \(digits pooled\), not 10"),
    ({"sizes": (16, 1)}, r"sizes\[1:\] must be in 2\.\.256, not \[1\]"),
    ({"steps": 0}, r"steps must be in 1\.\.1000, not 0"),
    ({"batch": 300}, r"batch must be in 1\.\.256, not 300"),
    ({"lr": 1.5}, r"lr must be in \(0, 1\), not 1.5"),
    ({"sizes": (64, 40)}, r"sizes and batch must fit the board's val_depth=256: layer "
                          r"64->40 with batch 3 needs 2600"),
    ({"batch": 200}, r"sizes and batch must fit the board's x_depth=64"),
])
def test_bad_workloads_are_refused_before_anything_is_sent(kwargs, msg):
    args = {"steps": 1, "sizes": (16, 4), "batch": 3, "lr": 0.3, "seed": 1, **kwargs}
    with pytest.raises(ValueError, match=msg):
        apps.run_procrustes(_board(), **args)


def test_app_refuses_a_board_with_another_design():
    with pytest.raises(ValueError, match="design must match the board's \\('cubist'\\)"):
        apps.run_procrustes(SimpleNamespace(design="cubist", info={}))


def test_lane_packing_round_trips_signed_values():
    vals = [-32768, 32767, -1, 0, 5]
    assert _unpack(_pack(vals, 16), 16, len(vals)) == vals
    assert _pack([-1], 4) == 0xF


def test_board_defaults_give_a_valid_procrustes_configuration_per_board():
    for board in ("icebreaker", "ulx3s"):
        accel, full = make_accel("procrustes", board_params(board, "procrustes"))
        assert {"cmd", "din", "resp", "dout"} <= set(accel.signature.members)
        for k, v in board_params(board, "procrustes").items():
            assert full[k] == v
