"""fpga.ooc: out-of-context fmax of a registered design (wrapper in simulation, one real
iCE40 place and route of a small FIFO, argument checks)."""

from __future__ import annotations

import argparse

import pytest
from amaranth.sim import Simulator

from fpga import ooc
from hw.designs import build as build_design


def test_wrapper_drives_every_input_and_observes_outputs():
    dut = build_design("fifo", width=8, depth=16, kind="fifo")
    top = ooc.OOCTop(dut)
    # i.payload 8 + i.valid + o.ready in; i.ready + o.payload 8 + o.valid + level 5 out
    assert (top.in_bits, top.out_bits) == (10, 15)
    seen = {"valid": set(), "ready": set(), "payload": set(), "o_valid": set(), "obs": set()}

    async def bench(ctx):
        for _ in range(300):
            await ctx.tick()
            seen["valid"].add(ctx.get(dut.i.valid))
            seen["ready"].add(ctx.get(dut.o.ready))
            seen["payload"].add(ctx.get(dut.i.payload))
            seen["o_valid"].add(ctx.get(dut.o.valid))
            seen["obs"].add(ctx.get(top.observe))

    sim = Simulator(top)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert seen["valid"] == seen["ready"] == {0, 1}
    assert len(seen["payload"]) > 50  # the inputs are not constant
    assert seen["o_valid"] == {0, 1}  # data went through the FIFO
    assert seen["obs"] == {0, 1}  # the MISR reaches the pin


def test_fifo_on_ice40_reports_fmax_and_keeps_the_memory(tmp_path):
    res = ooc.measure("fifo", {"width": 8, "depth": 16}, board="icebreaker", out=tmp_path)
    run = res["runs"][0]
    assert res["device"] == "iCE40UP5K-SG48" and res["params"]["width"] == 8
    assert 10 < run["fmax_mhz"] < 500
    assert run["resources"]["BRAM"]["used"] >= 1  # the FIFO's storage was not pruned
    assert run["resources"]["LUT"]["used"] > 15  # wrapper's 15 MISR bits plus the FIFO
    assert run["critical_path"]["delay_ns"] > 0 and run["cached"] is False
    assert res["fmax_mhz"]["min"] == res["fmax_mhz"]["max"] == run["fmax_mhz"]
    again = ooc.measure("fifo", {"width": 8, "depth": 16}, board="icebreaker", out=tmp_path)
    assert again["runs"][0]["cached"] is True
    assert again["runs"][0]["fmax_mhz"] == run["fmax_mhz"]
    lines = ooc.summary_lines(res)
    assert any(f"fmax {run['fmax_mhz']:.2f} MHz" in ln for ln in lines)


@pytest.mark.parametrize("kwargs, match", [
    ({"board": "de10"}, r"board must be one of icebreaker, ulx3s, not 'de10'"),
    ({"seeds": [0]}, r"seed must be in 1\.\.2147483647, not 0"),
    ({"seeds": []}, r"number of seeds must be in 1\.\.8, not 0"),
    ({"seeds": list(range(1, 10))}, r"number of seeds must be in 1\.\.8, not 9"),
    ({"target_mhz": 0.5}, r"target_mhz must be in 1\.\.500, not 0\.5"),
    ({"params": {"width": 0}}, r"width must be in 1\.\.4096"),
    ({"router": "router3"}, r"router must be one of router1, router2, not 'router3'"),
    ({"nextpnr_args": ["--seed=2"]}, r"nextpnr_args must be among --placer, .*not '--seed'"),
    ({"nextpnr_args": ["--placer=magic"]},
     r"nextpnr_args: --placer must be one of heap, sa, static, not 'magic'"),
    ({"nextpnr_args": ["--placer-heap-beta=1.5"]},
     r"nextpnr_args: --placer-heap-beta must be in 0\.1\.\.1\.0, not '1\.5'"),
    ({"nextpnr_args": ["--placer-heap-beta=0.5;ls"]},
     r"nextpnr_args: --placer-heap-beta must be in 0\.1\.\.1\.0, not '0\.5;ls'"),
    ({"nextpnr_args": ["--tmg-ripup=1"]}, r"nextpnr_args: --tmg-ripup takes no value, not '1'"),
    ({"nextpnr_args": ["--tmg-ripup"], "board": "icebreaker"},
     r"nextpnr_args are for the ECP5 \(ulx3s\), not icebreaker"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ooc.measure("fifo", out=tmp_path, **kwargs)


def test_bad_design_and_dut():
    with pytest.raises(ValueError, match="design must be one of"):
        ooc.measure("nope")
    with pytest.raises(ValueError, match="dut must be an amaranth wiring.Component"):
        ooc.OOCTop(object())


def test_cli_options():
    p = argparse.ArgumentParser()
    ooc.add_arguments(p)
    a = p.parse_args(["--design", "cubist", "--param", "h=8", "--seed", "2", "--seed", "3"])
    assert (a.design, a.param, a.seed, a.board) == ("cubist", [("h", 8)], [2, 3], "ulx3s")
    assert (a.router, a.place_only) == (None, False)
    assert "LFSR" in p.format_help()
    assert a.nextpnr_arg == []
    a = p.parse_args(["--design", "fifo", "--router", "router2", "--place-only",
                      "--nextpnr-arg=--placer=static", "--nextpnr-arg=--tmg-ripup"])
    assert (a.router, a.place_only) == ("router2", True)
    assert a.nextpnr_arg == ["--placer=static", "--tmg-ripup"]
    with pytest.raises(SystemExit):
        p.parse_args(["--design", "fifo", "--router", "router9"])


def test_placed_fmax_is_the_last_estimate_of_the_log():
    log = ("Info: Max frequency for clock '$glbnet$cd_sync.clk': 61.20 MHz (FAIL at 100.00 MHz)\n"
           "Info: Max frequency for clock '$glbnet$cd_sync.clk': 74.87 MHz (FAIL at 100.00 MHz)\n")
    assert ooc.placed_fmax(log) == 74.87
    from fpga.build import BuildError
    with pytest.raises(BuildError, match="no 'Max frequency for clock' line"):
        ooc.placed_fmax("Info: Program finished normally.\n")


def test_place_only_and_router2_on_the_ecp5(tmp_path):
    # --no-route: the fmax is the placer's estimate, the critical path is found in the
    # SDF of nextpnr's predicted delays (fpga.sdf_sta): its delay is the estimate's;
    # --router router2 routes, with the usual report and critical path; nextpnr_args
    # reach nextpnr's command line
    placed = ooc.measure("fifo", {"width": 8, "depth": 16}, out=tmp_path, place_only=True,
                         nextpnr_args=["--placer-heap-beta=0.8", "--tmg-ripup"])
    run = placed["runs"][0]
    assert placed["place_only"] is True and run["placed_only"] is True
    assert placed["nextpnr_args"] == ["--placer-heap-beta", "0.8", "--tmg-ripup"]
    assert 10 < run["fmax_mhz"] < 1000
    cp = run["critical_path"]
    assert cp["estimated"] is True and cp["nets"]
    assert 1000 / cp["delay_ns"] == pytest.approx(run["fmax_mhz"], rel=0.01)
    assert run["resources"]["LUT"]["used"] > 15
    script = (tmp_path / run["dir"].split("/")[-1] / "build_top.sh").read_text()
    assert "--no-route --sdf top.sdf" in script and "--router" not in script
    assert "--placer-heap-beta 0.8 --tmg-ripup" in script
    assert any("placement estimate of fmax" in ln for ln in ooc.summary_lines(placed))
    assert "nextpnr --placer-heap-beta 0.8 --tmg-ripup" in ooc.summary_lines(placed)[0]
    routed = ooc.measure("fifo", {"width": 8, "depth": 16}, out=tmp_path, router="router2")
    run2 = routed["runs"][0]
    assert routed["router"] == "router2" and run2["placed_only"] is False
    assert run2["critical_path"]["delay_ns"] > 0 and 10 < run2["fmax_mhz"] < 1000
    script = (tmp_path / run2["dir"].split("/")[-1] / "build_top.sh").read_text()
    assert "--router router2" in script and "--no-route" not in script
    assert "--placer-heap-beta" not in script


def test_ecp5_flow_keeps_the_flip_flops_of_kept_signals(tmp_path):
    # four copies of one register (hw.procrustes's per-row broadcast registers): Yosys
    # merges identical flip-flops unless the cell is kept; the ULX3S's script keeps the
    # flip-flop of every signal with the keep attribute, and only those
    import subprocess

    from amaranth.back import rtlil
    from amaranth.hdl import Cat, Module, Signal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    from fpga.boards import get_board
    from fpga.toolchain import find_toolchain

    class Copies(wiring.Component):
        def __init__(self, keep):
            self.keep = keep
            super().__init__({"a": In(16), "b": In(64), "o": Out(64)})

        def elaborate(self, platform):
            m = Module()
            regs = [Signal(16, name=f"r{i}", attrs={"keep": 1} if self.keep else {})
                    for i in range(4)]
            m.d.sync += [r.eq(self.a) for r in regs]
            m.d.comb += self.o.eq(Cat(*[r & self.b[16 * i:16 * i + 16]
                                        for i, r in enumerate(regs)]))
            return m

    env = find_toolchain("ecp5")
    script = get_board("ulx3s").script_after_read
    ffs = {}
    for keep in (False, True):
        il = tmp_path / f"k{int(keep)}.il"
        il.write_text(rtlil.convert(Copies(keep), name="top"))
        stat = tmp_path / f"stat{int(keep)}.txt"
        # relative paths from the build directory: YoWASP's tools see the working
        # directory, not the whole file system
        res = subprocess.run([env["YOSYS"], "-q", "-p", f"read_rtlil {il.name}; {script}; "
                              f"synth_ecp5 -top top; tee -q -o {stat.name} stat"],
                             env=env, cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        ffs[keep] = int(next(ln.split()[0] for ln in stat.read_text().splitlines()
                             if ln.strip().endswith("TRELLIS_FF")))
    assert ffs == {False: 16, True: 64}


def test_procrustes_area_parameters_reach_the_design_and_are_checked(tmp_path):
    # --param area=... / fifo_depth=... are the design's own parameters, checked by its
    # constructor before any tool runs; the iCEBreaker's defaults carry the area mode
    with pytest.raises(ValueError, match=r"area must be in 0\.\.1, not 3"):
        ooc.measure("procrustes", {"area": 3}, board="icebreaker", out=tmp_path)
    with pytest.raises(ValueError, match=r"fifo_depth must be in 2\.\.16, not 17"):
        ooc.measure("procrustes", {"fifo_depth": 17}, board="icebreaker", out=tmp_path)
    from fpga.designs import board_params
    assert board_params("icebreaker", "procrustes")["area"] == 1
    assert board_params("ulx3s", "procrustes").get("area", 0) == 0
