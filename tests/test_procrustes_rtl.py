"""The Procrustes RTL in cocotb, bit-exact against golden.procrustes_ref, on both simulators."""

from __future__ import annotations

import re

import numpy as np
import pytest
from amaranth.hdl import Module, Signal, signed
from amaranth.sim import Simulator

from fpga.designs import board_params
from golden.procrustes_cycles import (
    ArrayParams,
    predict_backward,
    predict_forward,
    predict_update,
)
from golden.procrustes_ref import FixedConfig, _narrow
from hw.designs import build
from hw.procrustes import Config, Procrustes
from hw.procrustes.pe_row import round_sat
from sim.runner import simulate

TB = "sim.tb.tb_procrustes"


def _run(simulator, testcase, **params):
    cfg = Config()  # the default configuration: one cached build shared by every test
    r = simulate(Procrustes(cfg), test_module=TB, simulator=simulator, params=params,
                 name="procrustes", testcase=testcase)
    assert r.passed, r.log.read_text()[-4000:] if r.log else r
    return r


def test_every_phase_bit_exact_on_random_sparse_layers(simulator):
    cases = 12 if simulator == "verilator" else 5
    r = _run(simulator, "test_phases", cases=cases, max_dim=21, stall=0.25, seed=5)
    recs = r.metrics["records"]
    assert len(recs) == cases
    assert {"fwd", "bwd", "wgrad", "wgradx", "update"} <= set(recs[0])


def test_one_training_step_of_an_mlp_matches_the_golden_step(simulator):
    r = _run(simulator, "test_train_step", stall=0.1, sizes=[64, 5, 10], batch=5)
    assert len(r.metrics["losses"]) == 1


@pytest.mark.slow
def test_twenty_digits_steps_bit_exact_and_the_loss_decreases():
    r = _run("verilator", "test_digits", steps=20)
    assert len(r.metrics["losses"]) == 20
    assert r.metrics["loss_last"] < r.metrics["loss_first"]


# the area configuration (the iCE40's): serial update on one shared multiplier, shallow
# walker FIFO; 2x2 so that the update's result-bank row and lane selects are exercised
AREA = dict(rows=2, cols=2, lanes=2, fifo_depth=2, area=1, val_depth=512, x_depth=128,
            y_depth=128)


# the iCEBreaker's own configuration (1x1, one lane, 2x2 blocks): the area mode's
# dimension aliases (a dimension divided by one is the command's field) and 4-bit masks
ICE = board_params("icebreaker", "procrustes")


@pytest.mark.slow
@pytest.mark.parametrize("params, max_dim", [(AREA, 11), (ICE, 7)], ids=["2x2", "icebreaker"])
def test_area_configuration_is_bit_exact_and_its_update_cycles_match_the_model(
        simulator, params, max_dim):
    # every phase against golden.procrustes_ref with random stalls on every stream; the
    # update regenerates w0 from the PRNG (decay 1.0 exercises decay's bit 16, 0.0 and
    # extreme values the roundings' signs); cycles against golden.procrustes_cycles
    cfg = Config(**params)
    r = simulate(Procrustes(cfg), test_module=TB, simulator=simulator, name="procrustes",
                 testcase="test_phases",
                 params=dict(cases=6 if simulator == "verilator" else 3, max_dim=max_dim,
                             stall=0.25, seed=7, **params))
    assert r.passed, r.log.read_text()[-4000:] if r.log else r
    ap = ArrayParams.of(cfg)
    assert ap.area == 1
    for rec in r.metrics["records"]:
        M, K, N, bal = rec["M"], rec["K"], rec["N"], rec["balanced"]
        mask = np.array([[ch == "1" for ch in row] for row in rec["mask"]], dtype=bool)
        assert rec["update"] == predict_update(M, K, ap), (M, K)
        assert rec["update"] > 15 * M * K  # fifteen cycles per element
        assert rec["fwd"] == predict_forward(mask, N, ap, bal)
        assert rec["bwd"] == predict_backward(mask, N, ap, bal)
    if params is not AREA:
        return
    # the range checks share the set-up multiplier with the serial update here
    r = simulate(Procrustes(cfg), test_module=TB, simulator=simulator, name="procrustes",
                 testcase="test_bad_commands", params=dict(stall=0.1, **AREA))
    assert r.passed, r.log.read_text()[-4000:] if r.log else r
    assert r.metrics["bad_commands"] >= 13


def _products_of_two_signals(text: str) -> int:
    """$mul cells of an RTLIL text whose factors are both signals (a constant factor,
    like the walker's gkl·lane set-up in the area configuration, is not a multiplier)."""
    n = 0
    for cell in text.split("cell $mul")[1:]:
        body = cell.split("\n  end")[0]
        n += not re.search(r"connect \\[AB] (\d+'[01xz]+|\{\s*\})\s*$", body, re.M)
    return n


def test_area_configuration_takes_one_multiplier_for_the_update():
    # the area mode's update has no quantile-step unit and one 16x16 product; the default
    # keeps its pipelined unit (eight partial products)
    from amaranth.back import rtlil

    area = rtlil.convert(Procrustes(Config(rows=1, cols=1, area=1)), name="p")
    dflt = rtlil.convert(Procrustes(Config(rows=1, cols=1)), name="p")
    assert "qstep" not in area and "qstep" in dflt
    # area: the MAC, the walker's two set-up products and the two shared ones
    assert _products_of_two_signals(area) == 5
    assert _products_of_two_signals(area) < _products_of_two_signals(dflt) - 8


# eight rows (the ULX3S's), narrow and shallow to build fast: the result words reach the
# top level one lane at a time through the rows' registered picks (hw/procrustes/top.py)
EIGHT = dict(rows=8, cols=2, lanes=2, val_depth=512, x_depth=64, g_depth=64, y_depth=64,
             blk_depth=64)


def test_every_result_bank_of_eight_rows_loads_and_unloads_its_own_words(simulator):
    r = simulate(Procrustes(Config(**EIGHT)), test_module=TB, simulator=simulator,
                 name="procrustes", testcase="test_result_banks",
                 params=dict(stall=0.25, seed=3, count=6, **EIGHT))
    assert r.passed, r.log.read_text()[-4000:] if r.log else r
    assert r.metrics["banks"] == 8


@pytest.mark.slow
def test_eight_rows_every_phase_bit_exact_and_cycles_match_the_model():
    # the update and the encoder read dW and W' from every row, the farthest included
    cfg = Config(**EIGHT)
    r = simulate(Procrustes(cfg), test_module=TB, simulator="verilator", name="procrustes",
                 testcase="test_phases",
                 params=dict(cases=6, max_dim=17, stall=0.25, seed=11, **EIGHT))
    assert r.passed, r.log.read_text()[-4000:] if r.log else r
    recs = r.metrics["records"]
    assert max(rec["M"] for rec in recs) >= 8  # the eighth row holds results
    ap = ArrayParams.of(cfg)
    for rec in recs:
        M, K, N, bal = rec["M"], rec["K"], rec["N"], rec["balanced"]
        mask = np.array([[ch == "1" for ch in row] for row in rec["mask"]], dtype=bool)
        assert rec["update"] == predict_update(M, K, ap), (M, K)
        assert rec["fwd"] == predict_forward(mask, N, ap, bal)
        assert rec["bwd"] == predict_backward(mask, N, ap, bal)


def test_bad_commands_set_an_error_and_the_next_command_runs(simulator):
    r = _run(simulator, "test_bad_commands", stall=0.1)
    assert r.metrics["bad_commands"] >= 13  # 10 commands and 3 schedule tables


@pytest.mark.parametrize("kwargs, msg", [
    (dict(rows=3), r"rows must be a power of two, not 3"),
    (dict(cols=32), r"cols must be in 1\.\.16, not 32"),
    (dict(bm=16), r"bm must be in 1\.\.8, not 16"),
    (dict(acc_bits=8), r"acc_bits must be in 16\.\.48, not 8"),
    (dict(w_frac=12, x_frac=0, g_frac=0), r"g_frac \+ x_frac must be >= w_frac"),
    (dict(fifo_depth=1), r"fifo_depth must be in 2\.\.16, not 1"),
    (dict(area=2), r"area must be in 0\.\.1, not 2"),
    (dict(area=1, data_bits=20), r"data_bits must be in 4\.\.16 with area=1"),
])
def test_bad_parameters_are_refused(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Config(**kwargs)


def test_registry_factory_checks_rows_and_builds_16x16():
    with pytest.raises(ValueError, match=r"rows must be a power of two, not 6"):
        build("procrustes", rows=6, cols=4)
    top = build("procrustes", rows=16, cols=16)
    assert (top.cfg.rows, top.cfg.cols) == (16, 16)


@pytest.mark.parametrize("acc_bits, data_bits, shifts", [
    (32, 16, (12, 8)),   # the default: FWD/BWD by w_frac, WGRAD by g_frac + x_frac - w_frac
    (20, 16, (0, 6)),    # no rounding on one side; v can be narrower than data_bits
    (16, 16, (15, 1)),
    (24, 16, (4, 0)),    # v wider than data_bits on both sides, no rounding on one
])
def test_result_rounding_equals_the_contracts_narrow(acc_bits, data_bits, shifts):
    # the result word is rounded and saturated by a shift-first multiplexer and a
    # data_bits increment; it must equal sat(rshift(acc, s), data_bits) for both shifts,
    # at the saturation edges and on random accumulators
    m = Module()
    acc, sel = Signal(signed(acc_bits)), Signal()
    out = round_sat(m, acc, shifts, sel, data_bits, "y")
    cfg = FixedConfig(data_bits=data_bits, acc_bits=acc_bits)
    lo, hi = -(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1
    rng = np.random.default_rng(1)
    vals = {lo, hi, 0, -1, 1}
    for s in shifts:
        for edge in (cfg.data_max, cfg.data_min):
            for d in range(-3, 4):
                v = (edge << s) + d * max(1, 1 << max(s - 1, 0)) + (d % 2)
                vals.add(min(max(v, lo), hi))
    vals |= {int(v) for v in rng.integers(lo, hi, 400, endpoint=True)}
    vals |= {int(v) for v in rng.integers(-(4 << data_bits), 4 << data_bits, 400)
             if lo <= v <= hi}
    vals = sorted(vals)
    bad = []

    async def bench(ctx):
        for k, s in enumerate(shifts):
            ctx.set(sel, k)
            want = _narrow(np.array(vals, dtype=np.int64), s, cfg)
            for v, w in zip(vals, want):
                ctx.set(acc, v)
                if ctx.get(out) != int(w):
                    bad.append((s, v, ctx.get(out), int(w)))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    assert not bad, bad[:5]


def _first_failing_check(c: Config, op: str, sel: str, f: dict):
    """The index of the first range check of ``CHECK`` (hw/procrustes/top.py) that fails
    for the command fields ``f``, or None."""
    GM, GK = -(-f["m"] // c.bm), -(-f["k"] // c.bk)
    GKL, NT = -(-GK // c.lanes), -(-f["n"] // c.cols)
    KT, MT = -(-f["k"] // c.cols), -(-f["m"] // c.rows)
    blk = GM * GKL + f["addr"] <= c.blk_depth
    one = f["arg"] + 1 <= c.val_depth
    tables = {
        "FWD": [blk, f["k"] * NT <= c.x_depth, one],
        "BWD": [blk, f["m"] * NT <= c.x_depth, one],
        "WGRAD": [MT * f["n"] <= c.g_depth, KT * f["n"] <= c.x_depth, MT * KT <= c.y_depth],
        "UPDATE": [blk, f["m"] * f["k"] + f["arg"] <= c.val_depth, MT * KT <= c.y_depth],
        "LOAD": {"": [], "BLOCKS": [blk],
                 "VALUES": [f["count"] + f["addr"] <= c.val_depth],
                 "X": [f["count"] + f["addr"] <= c.x_depth],
                 "G": [f["count"] + f["addr"] <= c.g_depth],
                 "SCHED": [f["count"] + f["addr"] <= 2 * c.rows],
                 "Y": [f["count"] + f["addr"] <= c.y_depth, f["arg"] + 1 <= c.rows]}[sel],
    }[op]
    return next((i for i, ok in enumerate(tables) if not ok), None)


@pytest.mark.parametrize("params", [AREA, ICE], ids=["2x2", "icebreaker"])
def test_area_saturated_command_fields_fail_the_same_range_checks(params):
    # the area configuration latches m, k, n, count, addr (and arg for its checks) as
    # 2^w - 1 when they exceed every operation's limit: each check must decide the same
    from hw.procrustes.top import area_field_limits

    c = Config(**params)
    lims = area_field_limits(c)
    rng = np.random.default_rng(3)
    ops = [("FWD", ""), ("BWD", ""), ("WGRAD", ""), ("UPDATE", "")] + [
        ("LOAD", s) for s in ("BLOCKS", "VALUES", "X", "G", "SCHED", "Y")]
    saturated = 0
    for _ in range(3000):
        f = {}
        for name in ("m", "k", "n", "count", "addr", "arg"):
            top = (1 << 32) if name == "arg" else (1 << 16)
            # mostly near the limits, sometimes anywhere in the field
            hi = min(top, 2 * lims[name] + 4) if rng.random() < 0.8 else top
            f[name] = int(rng.integers(1 if name in "mkn" else 0, hi))
        sat = {}
        for name, v in f.items():
            w = (lims[name] + 1).bit_length()
            sat[name] = v if v < (1 << w) else (1 << w) - 1  # as top._saturate
        saturated += sat != f
        for op, sel in ops:
            assert _first_failing_check(c, op, sel, sat) == \
                _first_failing_check(c, op, sel, f), (op, sel, f, sat)
    assert saturated > 500  # the saturation was exercised
