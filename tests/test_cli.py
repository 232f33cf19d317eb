"""The procube command line: help, errors in one line with exit 2, Verilog + manifest."""

import json
import subprocess
import sys

import pytest

import procube

SUBCOMMANDS = ["verilog", "sim", "bench", "experiment", "build", "program", "run", "demo"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", "import procube,sys; sys.exit(procube.main())",
                           *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in SUBCOMMANDS:
        assert f"\n    {cmd}" in r.stdout


@pytest.mark.parametrize("args", [["verilog", "--help"], ["verilog", "fifo", "--help"],
                                  ["sim", "fifo", "--help"], ["bench", "--help"]])
def test_subcommand_help(args):
    r = run_cli(*args)
    assert r.returncode == 0 and "usage: procube" in r.stdout


@pytest.mark.parametrize("args, text", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["verilog", "fifo", "--width", "0"], "width must be in 1..4096, not 0"),
    (["verilog", "fifo", "--depth", "x"], "invalid int value: 'x'"),
    (["verilog", "nosuch"], "invalid choice: 'nosuch'"),
    (["sim", "fifo", "--set", "novalue"], "--set takes KEY=VALUE"),
    (["verilog", "procrustes", "--area", "2"], "area must be in 0..1, not 2"),
    (["verilog", "procrustes", "--fifo-depth", "1"], "fifo_depth must be in 2..16, not 1"),
    (["verilog", "procrustes", "--area", "1", "--data-bits", "20"],
     "data_bits must be in 4..16 with area=1"),
])
def test_bad_arguments_exit_2_with_one_line(args, text):
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert text in lines[0]
    assert "Traceback" not in r.stderr


def test_verilog_writes_verilog_and_manifest(tmp_path):
    assert procube.main(["verilog", "fifo", "--width", "12", "--depth", "8",
                         "-o", str(tmp_path)]) == 0
    text = (tmp_path / "fifo.v").read_text()
    manifest = json.loads((tmp_path / "fifo.json").read_text())
    assert "module fifo(" in text
    assert manifest["params"] == {"width": 12, "depth": 8, "kind": "fifo"}
    ports = {p["name"]: p for p in manifest["ports"]}
    assert ports["i__payload"] == {"name": "i__payload", "dir": "in", "width": 12}
    assert ports["o__valid"]["dir"] == "out"
    for port in ports:
        assert f" {port}" in text


def test_sim_runs_the_testbench(capsys):
    assert procube.main(["sim", "fifo", "--kind", "skid", "--set", "count=200"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "transfers: 200" in out


def test_verilog_procrustes_takes_the_ice40_parameters(tmp_path):
    # issue #6: the area configuration is reachable from the command line and recorded
    assert procube.main(["verilog", "procrustes", "--rows", "1", "--cols", "1", "--lanes",
                         "1", "--fifo-depth", "2", "--area", "1", "--bm", "2", "--bk", "2",
                         "-o", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "procrustes.json").read_text())
    assert {k: manifest["params"][k] for k in ("fifo_depth", "area", "bm", "bk", "lanes")} \
        == {"fifo_depth": 2, "area": 1, "bm": 2, "bk": 2, "lanes": 1}
    text = (tmp_path / "procrustes.v").read_text()
    assert "module procrustes(" in text and "qstep" not in text
