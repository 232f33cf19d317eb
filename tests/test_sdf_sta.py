"""fpga.sdf_sta: the longest register-to-register path of an SDF written by nextpnr."""

from __future__ import annotations

import pytest

from fpga import sdf_sta

# two flip-flops in PE rows 3 and 5, a LUT between them and a second, shorter path
# through a carry cell; a block RAM launches a third path (its clock-to-out counts)
SDF = r"""(DELAYFILE
  (SDFVERSION "3.0")
  (DIVIDER /)
  (TIMESCALE 1ps)
  (CELL
    (CELLTYPE "top")
    (INSTANCE )
    (DELAY
      (ABSOLUTE
        (INTERCONNECT dut.row3.a_TRELLIS_FF_Q_7/Q lut\/x/A (1000:1500:2000) (900:1400:1900))
        (INTERCONNECT lut\/x/F dut.row5.b_TRELLIS_FF_Q_2/DI (3000:3000:3000) (3000:3000:3000))
        (INTERCONNECT dut.row3.a_TRELLIS_FF_Q_7/Q cc/B (500:500:500) (500:500:500))
        (INTERCONNECT cc/F dut.row5.b_TRELLIS_FF_Q_3/DI (500:500:500) (500:500:500))
        (INTERCONNECT ram/DOA0 dut.row5.b_TRELLIS_FF_Q_4/DI (100:100:100) (100:100:100))
      )
    )
  )
  (CELL
    (CELLTYPE "TRELLIS_FF")
    (INSTANCE dut.row3.a_TRELLIS_FF_Q_7)
    (DELAY
      (ABSOLUTE
        (IOPATH CLK Q (500:500:500) (500:500:500))
      )
    )
  )
  (CELL
    (CELLTYPE "TRELLIS_COMB")
    (INSTANCE lut\/x)
    (DELAY
      (ABSOLUTE
        (IOPATH A F (200:240:250) (200:240:260))
      )
    )
  )
  (CELL
    (CELLTYPE "TRELLIS_COMB")
    (INSTANCE cc)
    (DELAY
      (ABSOLUTE
        (IOPATH B F (400:400:400) (400:400:400))
      )
    )
  )
  (CELL
    (CELLTYPE "DP16KD")
    (INSTANCE ram)
    (DELAY
      (ABSOLUTE
        (IOPATH CLKA DOA0 (4000:4000:4000) (4000:4000:4000))
      )
    )
  )
  (CELL
    (CELLTYPE "TRELLIS_FF")
    (INSTANCE dut.row5.b_TRELLIS_FF_Q_2)
    (TIMINGCHECK
      (SETUPHOLD (posedge DI) (posedge CLK) (100:100:100) (0:0:0))
    )
  )
  (CELL
    (CELLTYPE "TRELLIS_FF")
    (INSTANCE dut.row5.b_TRELLIS_FF_Q_3)
    (TIMINGCHECK
      (SETUPHOLD (posedge DI) (posedge CLK) (100:100:100) (0:0:0))
    )
  )
  (CELL
    (CELLTYPE "TRELLIS_FF")
    (INSTANCE dut.row5.b_TRELLIS_FF_Q_4)
    (TIMINGCHECK
      (SETUPHOLD (posedge DI) (posedge CLK) (100:100:100) (0:0:0))
    )
  )
)
"""


def test_worst_path_takes_the_worst_corner_of_every_arc(tmp_path):
    f = tmp_path / "placed.sdf"
    f.write_text(SDF)
    tm = sdf_sta.analyze(f)
    # 0.5 clk->q + 2.0 net (max) + 0.26 LUT (max of rise/fall) + 3.0 net + 0.1 setup
    assert [round(t, 3) for t, _ in tm.endpoints] == [5.86, 4.2, 2.0]
    assert tm.endpoints[0][1] == ("dut.row5.b_TRELLIS_FF_Q_2", "DI")
    assert tm.loops == 0
    # one path per start -> end register class: the carry path (also a -> b) is folded
    (wp, ram) = sdf_sta.worst_paths(tm, 5)
    assert (wp["from"], wp["to"], wp["delay_ns"], wp["logic_levels"]) == (
        "dut.row3.a_TRELLIS_FF_Q_7", "dut.row5.b_TRELLIS_FF_Q_2", 5.86, 1)
    assert [(pin, kind) for pin, kind, _, _ in wp["steps"]] == [
        (("dut.row3.a_TRELLIS_FF_Q_7", "Q"), "clk->q"), (("lut/x", "A"), "net"),
        (("lut/x", "F"), "cell"), (("dut.row5.b_TRELLIS_FF_Q_2", "DI"), "net")]
    assert (ram["from"], ram["delay_ns"]) == ("ram", 4.2)
    carry = tm.path(("dut.row5.b_TRELLIS_FF_Q_3", "DI"))  # 0.5 + 0.5 + 0.4 + 0.5 (+ 0.1)
    assert [round(a, 3) for _, _, _, a in carry] == [0.5, 1.0, 1.4, 1.9]
    # one class per start -> end register pair: bit indices and row numbers folded
    assert sdf_sta.path_classes(tm, 1.0) == [
        (pytest.approx(5.86), 2, "dut.rowN.a", "dut.rowN.b"),
        (pytest.approx(4.2), 1, "ram", "dut.rowN.b")]
    assert sdf_sta.path_classes(tm, 5.0) == [(pytest.approx(5.86), 1, "dut.rowN.a",
                                              "dut.rowN.b")]


def test_command_line_prints_the_worst_path(tmp_path, capsys):
    f = tmp_path / "placed.sdf"
    f.write_text(SDF)
    assert sdf_sta.main([str(f), "-n", "1", "--summary", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "3 endpoints; worst 5.86 ns (170.65 MHz)" in out
    assert "5.86 ns, 1 cells: dut.row3.a_TRELLIS_FF_Q_7 -> dut.row5.b_TRELLIS_FF_Q_2" in out
    assert "dut.rowN.a -> dut.rowN.b" in out
