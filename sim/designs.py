"""The testbench of each registered design, and the parameters it runs with by default.

``procube sim NAME`` and ``procube demo`` look designs up here. A testbench reads its
parameters with ``sim.tbutil.params()``; the defaults below are merged with the
design's elaboration parameters, so the testbench knows the configuration it checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TESTBENCHES", "Testbench", "get"]


@dataclass(frozen=True)
class Testbench:
    design: str
    module: str
    defaults: dict = field(default_factory=dict)


TESTBENCHES: dict[str, Testbench] = {
    "fifo": Testbench("fifo", "sim.tb.tb_stream_fifo",
                      {"count": 10000, "gap": 0.3, "stall": 0.3, "burst": 4, "seed": 1}),
    "cubist": Testbench("cubist", "sim.tb.tb_cubist",
                        {"seed": 1, "frames": 4, "gap": 0.2, "stall": 0.2, "real_frames": 1,
                         "bench_frames": 3}),
    "procrustes": Testbench("procrustes", "sim.tb.tb_procrustes",
                            {"seed": 1, "cases": 4, "steps": 3, "stall": 0.1}),
}


def get(name: str) -> Testbench:
    if name not in TESTBENCHES:
        raise ValueError(f"design must be one of {', '.join(sorted(TESTBENCHES))}, "
                         f"not {name!r}")
    return TESTBENCHES[name]
