"""Setup timing of a placed design from nextpnr's SDF: the critical path before routing.

nextpnr prints no critical path after placement (only the placer's fmax estimate), and a
large design may take an hour to route, or never converge. But ``--sdf`` works on an
unrouted design too: nextpnr then writes its own *predicted* delay of every net (the
estimate its placer and its fmax figure use) with the cells' delays, clock-to-out
times and setup checks. :func:`analyze` runs a longest-path analysis over that file
(single clock, rising edges, the worst of rise and fall, the maximum of min:typ:max), so
the worst path it reports is the one behind nextpnr's placed fmax estimate.

``python -m fpga.sdf_sta placed.sdf [-n PATHS] [--summary NS]`` prints the worst paths
(one per start/end register pair) and, with ``--summary``, every start -> end pair of
registers (bus indices and PE row numbers folded) that is slower than NS.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Timing", "analyze", "main", "path_classes", "worst_paths"]

_TRIPLE = r"\(([-0-9.]*):([-0-9.]*):([-0-9.]*)\)"
_IOPATH = re.compile(r"\s*\(IOPATH (\S+) (\S+) " + _TRIPLE + r" " + _TRIPLE)
_INTERCONNECT = re.compile(r"\s*\(INTERCONNECT (\S+) (\S+) " + _TRIPLE + r" " + _TRIPLE)
_SETUPHOLD = re.compile(r"\s*\(SETUPHOLD \((?:posedge|negedge) (\S+)\) "
                        r"\((?:posedge|negedge) (\S+)\) " + _TRIPLE)
_CELLTYPE = re.compile(r'\s*\(CELLTYPE "?([^")]*)"?\)')
_INSTANCE = re.compile(r"\s*\(INSTANCE ?(.*)\)\s*$")
_TIMESCALE = re.compile(r"\s*\(TIMESCALE (\d+)\s*(ps|ns)\)")
# clock pins of the ECP5 cells (flip-flops, block RAM, DSP, LUT-RAM write clock)
_CLOCK_PINS = re.compile(r"^(CLK|CLKA|CLKB|WCK|CLK[0-3])$")


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _pin(s: str) -> tuple[str, str]:
    """``cell/port`` (a ``/`` inside a name is escaped) -> (cell, port)."""
    for i in range(len(s) - 1, -1, -1):
        if s[i] == "/" and (i == 0 or s[i - 1] != "\\"):
            return _unescape(s[:i]), _unescape(s[i + 1:])
    raise ValueError(f"not a cell/port pin: {s!r}")


def _worst(groups, scale: float) -> float:
    vals = [float(v) for v in groups if v not in ("", None)]
    return max(vals) * scale if vals else 0.0


@dataclass
class Timing:
    """Arrival times (ns) of every pin reached from a register, and the worst arc into
    each (``pred[pin] = (from_pin, kind, delay)``, kind ``clk->q``, ``net`` or
    ``cell``); ``endpoints`` are (required arrival incl. setup, pin), worst first."""

    arrival: dict = field(default_factory=dict)
    pred: dict = field(default_factory=dict)
    setup: dict = field(default_factory=dict)
    celltype: dict = field(default_factory=dict)
    endpoints: list = field(default_factory=list)
    loops: int = 0

    def path(self, pin) -> list[tuple[tuple[str, str], str, float, float]]:
        """The worst path into ``pin``: (pin, kind, delay, arrival) from its register."""
        steps = []
        cur = pin
        while cur in self.pred:
            prev, kind, d = self.pred[cur]
            steps.append((cur, kind, d, self.arrival[cur]))
            if kind == "clk->q":
                break
            cur = prev
        return steps[::-1]


def analyze(sdf: str | Path) -> Timing:
    """Longest paths of an SDF written by nextpnr (``--sdf``, placed or routed)."""
    scale = 1e-3  # nextpnr writes picoseconds
    comb = defaultdict(list)  # (cell, input) -> [(output, delay)]
    launch = []  # (cell, clock pin, output, clock-to-out)
    nets = defaultdict(list)  # (cell, output) -> [((cell, input), delay)]
    clocks = defaultdict(set)
    iopaths = []
    tm = Timing()
    inst = ctype = None
    with open(sdf) as f:
        for line in f:
            if "(INTERCONNECT" in line:
                m = _INTERCONNECT.match(line)
                nets[_pin(m.group(1))].append((_pin(m.group(2)),
                                               _worst(m.group(3, 4, 5, 6, 7, 8), scale)))
            elif "(IOPATH" in line:
                m = _IOPATH.match(line)
                iopaths.append((inst, _unescape(m.group(1)), _unescape(m.group(2)),
                                _worst(m.group(3, 4, 5, 6, 7, 8), scale)))
            elif "(SETUPHOLD" in line:
                m = _SETUPHOLD.match(line)
                pin = (inst, _unescape(m.group(1)))
                tm.setup[pin] = max(tm.setup.get(pin, 0.0), _worst(m.group(3, 4, 5), scale))
                clocks[inst].add(_unescape(m.group(2)))
            elif "(CELLTYPE" in line:
                ctype = _CELLTYPE.match(line).group(1)
            elif "(INSTANCE" in line:
                inst = _unescape(_INSTANCE.match(line).group(1).strip())
                tm.celltype[inst] = ctype
            elif "(TIMESCALE" in line:
                m = _TIMESCALE.match(line)
                scale = int(m.group(1)) * (1e-3 if m.group(2) == "ps" else 1.0)
    for cell, a, b, d in iopaths:
        if a in clocks[cell] or _CLOCK_PINS.match(a):
            launch.append((cell, a, b, d))
        else:
            comb[(cell, a)].append((b, d))

    def fanout(pin):
        for nxt, d in nets.get(pin, ()):
            yield nxt, d, "net"
        for out, d in comb.get(pin, ()):
            yield (pin[0], out), d, "cell"

    arr, pred = tm.arrival, tm.pred
    for cell, ck, out, d in launch:
        pin = (cell, out)
        if d > arr.get(pin, -1.0):
            arr[pin] = d
            pred[pin] = ((cell, ck), "clk->q", d)
    # topological order of the pins reachable from the launch pins (Kahn)
    seen, order = set(), []
    stack = [(c, o) for c, _, o, _ in launch]
    indeg = defaultdict(int)
    while stack:
        pin = stack.pop()
        if pin in seen:
            continue
        seen.add(pin)
        order.append(pin)
        for nxt, _, _ in fanout(pin):
            indeg[nxt] += 1
            if nxt not in seen:
                stack.append(nxt)
    ready = [p for p in order if indeg[p] == 0]
    done = 0
    while ready:
        pin = ready.pop()
        done += 1
        a = arr.get(pin, 0.0)
        for nxt, d, kind in fanout(pin):
            if a + d > arr.get(nxt, -1.0):
                arr[nxt] = a + d
                pred[nxt] = (pin, kind, d)
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                ready.append(nxt)
    tm.loops = len(order) - done
    tm.endpoints = sorted(((arr[p] + s, p) for p, s in tm.setup.items() if p in arr),
                          reverse=True)
    return tm


def _register_name(cell: str) -> str:
    """A cell's register or memory name: the mapping's suffixes, bit indices and PE row
    numbers folded (``dut.row5.colb2_TRELLIS_FF_Q_4`` -> ``dut.rowN.colb2``)."""
    n = re.sub(r"(_TRELLIS_FF_Q|_DP16KD|_MULT18X18D|_LUT4|_CCU2C|_PFUMX|_L6MUX|_TRELLIS_DPR)\S*$",
               "", cell)
    return re.sub(r"\.row\d+\.", ".rowN.", n)


def worst_paths(tm: Timing, n: int = 5) -> list[dict]:
    """The ``n`` worst paths, one per (start, end) register pair: ``{"delay_ns", "from",
    "to", "logic_levels", "steps": [(pin, kind, delay, arrival)]}``."""
    out, seen = [], set()
    for t, pin in tm.endpoints:
        if len(out) >= n:
            break
        steps = tm.path(pin)
        key = (_register_name(steps[0][0][0]), _register_name(pin[0]))
        if key in seen:
            continue
        seen.add(key)
        out.append({"delay_ns": round(t, 2), "from": steps[0][0][0], "to": pin[0],
                    "logic_levels": sum(1 for s in steps if s[1] == "cell"), "steps": steps})
    return out


def path_classes(tm: Timing, over_ns: float) -> list[tuple[float, int, str, str]]:
    """Every (start register, end register) class of the endpoints slower than
    ``over_ns``: (worst delay, endpoints, start, end), worst first."""
    classes = {}
    for t, pin in tm.endpoints:
        if t < over_ns:
            break
        start = tm.path(pin)[0][0][0]
        key = (_register_name(start), _register_name(pin[0]))
        c = classes.setdefault(key, [t, 0])
        c[1] += 1
    return sorted(((t, k, a, b) for (a, b), (t, k) in classes.items()), reverse=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fpga.sdf_sta", description=__doc__.split("\n")[0])
    p.add_argument("sdf", type=Path)
    p.add_argument("-n", type=int, default=5, help="paths to print (default 5)")
    p.add_argument("--summary", type=float, default=None, metavar="NS",
                   help="also list every start -> end register class slower than NS")
    a = p.parse_args(argv)
    tm = analyze(a.sdf)
    if not tm.endpoints:
        print("no register-to-register path")
        return 1
    worst = tm.endpoints[0][0]
    print(f"{len(tm.endpoints)} endpoints; worst {worst:.2f} ns ({1000 / worst:.2f} MHz)"
          + (f"; {tm.loops} pins in combinational loops (not analysed)" if tm.loops else ""))
    for wp in worst_paths(tm, a.n):
        print(f"\n{wp['delay_ns']:.2f} ns, {wp['logic_levels']} cells: {wp['from']} -> {wp['to']}")
        for (cell, port), kind, d, t in wp["steps"]:
            print(f"  {t:7.2f} +{d:5.2f} {kind:6s} {cell}.{port} [{tm.celltype.get(cell)}]")
    if a.summary is not None:
        print(f"\nstart -> end classes slower than {a.summary} ns (worst, endpoints):")
        for t, k, s, e in path_classes(tm, a.summary):
            print(f"  {t:6.2f} {k:6d}  {s} -> {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
