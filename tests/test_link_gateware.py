"""The link gateware in simulation: UART, deframer, input buffer, responder.

Raw frames with each kind of damage must get their NAK and leave the link usable; the
real host driver must get every linktest word through, also when bits are flipped,
bytes dropped and garbage inserted on the way to the board.
"""

import pytest

from fpga.designs import sim_core
from fpga.gateware.link import HostLink
from sim.runner import available_simulators, simulate

SIMS = [s for s in ("icarus", "verilator") if s in available_simulators()]
pytestmark = pytest.mark.skipif(not SIMS, reason="no simulator available")


def _run(testcase, simulator=None, **params):
    core = sim_core("linktest")
    p = {"divisor": core.link.divisor, "timeout_cycles": core.link.timeout_cycles,
         "in_bits": 17, **params}
    r = simulate(core, test_module="sim.tb.tb_fpga_link", simulator=simulator or SIMS[0],
                 name="fpga_linktest", testcase=testcase, params=p)
    assert r.passed, r.log.read_text()[-3000:] if r.log else r
    return r.metrics


def test_damaged_frames_get_their_nak_and_the_link_recovers():
    m = _run("test_frames_errors_and_resync")
    # 256-byte input buffer; one 4-byte beat (stream byte + 3 payload bytes) was committed
    # once although it was sent twice
    assert m["free_after_write"] == 256 - 4
    assert m["status"]["in_beats"] == 1
    assert m["status"]["crc_errors"] == 2 and m["status"]["timeouts"] == 1


def test_host_driver_end_to_end_linktest():
    m = _run("test_host_driver", app="linktest", app_args={"packets": 5, "max_len": 30})
    assert m["passed"] and m["mismatches"] == 0 and m["items"] == 5
    assert m["beats_out"] == m["beats_in"] + 5  # every word echoed, plus one sum per packet
    assert m["link"]["retries"] == 0


def test_host_driver_recovers_from_flips_drops_and_garbage():
    m = _run("test_host_driver", app="linktest", app_args={"packets": 6, "max_len": 40},
             faults={"flip": 0.01, "drop": 0.005, "garbage": 0.01, "seed": 3})
    assert m["passed"] and m["mismatches"] == 0
    assert sum(m["faults"].values()) > 10
    assert m["link"]["retries"] > 0 and m["link"]["crc_errors"] > 0


@pytest.mark.parametrize("kwargs, msg", [
    (dict(divisor=3), r"divisor must be in 4\.\.65536, not 3"),
    (dict(in_depth=100), r"in_depth must be a power of two, not 100"),
    (dict(timeout_cycles=10), r"timeout_cycles must be in 64\.\.1073741824, not 10"),
])
def test_bad_link_parameters_are_refused(kwargs, msg):
    args = dict(inputs=[("i", 8)], outputs=[("o", 8)], info=b"{}", divisor=4,
                timeout_cycles=1000)
    with pytest.raises(ValueError, match=msg):
        HostLink(**{**args, **kwargs})


@pytest.mark.parametrize("simulator", SIMS)
def test_clear_during_a_read_reply_rejects_that_reply_and_the_link_recovers(simulator):
    m = _run("test_clear_during_read_reply", simulator, clear_during_read=True)
    # the CLEAR's own acknowledgement came while the READ reply was still going out
    assert m["status"]["dropped_replies"] == 1
    assert m["status"]["in_beats"] == 0  # CLEAR reset the counters; STATUS wrote no beat
