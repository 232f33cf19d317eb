"""Procrustes sparse-training accelerator (Amaranth): PE array, format walkers, weight
update with PRNG-regenerated w0 and the streaming quantile threshold, and re-encoding.

``Procrustes`` is the top level; ``design_from_params`` is the ``hw.designs`` factory.
The micro-architecture is described in ``hw/procrustes/README.md``.
"""

from .config import Config
from .layouts import Buf, Err, Op, Reg, cmd_layout, resp_layout, sched_words
from .pe_row import PERow
from .top import Procrustes
from .units import Prng, QuantileStep

__all__ = ["Buf", "Config", "Err", "Op", "PERow", "Procrustes", "Prng", "QuantileStep", "Reg",
           "cmd_layout", "design_from_params", "resp_layout", "sched_words"]


def design_from_params(rows: int = 4, cols: int = 4, **params) -> Procrustes:
    """The registry's factory: ``procube verilog procrustes --rows 4 --cols 4 ...``."""
    return Procrustes(Config(rows=rows, cols=cols, **params))
