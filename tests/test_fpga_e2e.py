"""The whole path on a simulated board: host driver → UART → link → accelerator → UART →
host driver, checked against the golden models; and the same smoke test on the
gate-level netlist of a board core (Yosys ``synth_ice40`` with the iCE40 cell models)."""

import pytest

from fpga.designs import sim_core
from fpga.gatelevel import netlist
from sim.runner import available_simulators, simulate

needs_icarus = pytest.mark.skipif("icarus" not in available_simulators(),
                                  reason="icarus: not installed")
CUBIST_SMALL = dict(h=4, w=4, c=8, lanes=4, width=8, frac_bits=16, max_prefix=1, unmerge=0)


def _params(core, **kw):
    return {"divisor": core.link.divisor, "timeout_cycles": core.link.timeout_cycles, **kw}


@needs_icarus
@pytest.mark.slow
def test_cubist_frames_through_the_simulated_board_match_the_golden_model():
    core = sim_core("cubist", CUBIST_SMALL)
    r = simulate(core, test_module="sim.tb.tb_fpga_link", simulator="icarus",
                 name="fpga_cubist", testcase="test_host_driver",
                 params=_params(core, app="cubist",
                                app_args={"frames": 2, "r_h": 1, "r_w": 1, "prefix": 1}))
    assert r.passed, r.log.read_text()[-3000:] if r.log else r
    m = r.metrics
    assert m["items"] == 2 and m["mismatches"] == 0
    # per frame: 1 cfg + 17 tokens x 2 beats in; 1 + 3x3 tokens x 2 beats, 16 map
    # entries and 1 status out
    assert m["beats_in"] == 2 * (1 + 17 * 2)
    assert m["beats_out"] == 2 * (10 * 2 + 16 + 1)
    assert m["cycles"] > 0


@needs_icarus
@pytest.mark.slow
def test_gate_level_ice40_netlist_passes_the_rtl_smoke_tests():
    core = sim_core("linktest")
    verilog = netlist(core, "ice40", name="fpga_gl_ice40")
    assert "SB_LUT4" in verilog and "SB_RAM40_4K" in verilog  # really mapped to cells
    for testcase, extra in (("test_host_driver",
                             {"app": "linktest", "app_args": {"packets": 3, "max_len": 10}}),
                            ("test_frames_errors_and_resync", {})):
        r = simulate(None, verilog=verilog, test_module="sim.tb.tb_fpga_link",
                     simulator="icarus", name="fpga_gl_ice40", testcase=testcase,
                     params=_params(core, in_bits=17, **extra))
        assert r.passed, (testcase, r.log.read_text()[-3000:] if r.log else r)


def test_netlist_refuses_unknown_family():
    with pytest.raises(ValueError, match="family must be one of ice40, ecp5, not 'xc7'"):
        netlist(None, "xc7")
