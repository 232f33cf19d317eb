"""CubistMerge spatial merge unit (``golden/CUBIST_FIXED.md`` in gateware).

See ``hw/cubist/README.md`` for the micro-architecture, buffers and interfaces.
"""

from __future__ import annotations

from .layouts import (
    ERR_CONFIG,
    ERR_LAST_TOKEN,
    ERR_LONG,
    ERR_OK,
    ERR_SHORT,
    ERROR_NAMES,
    cfg_layout,
    map_layout,
    status_layout,
    token_layout,
    um_cfg_layout,
)
from .unit import CubistMerge
from .unmerge import Unmerge

__all__ = [
    "ERROR_NAMES",
    "ERR_CONFIG",
    "ERR_LAST_TOKEN",
    "ERR_LONG",
    "ERR_OK",
    "ERR_SHORT",
    "CubistMerge",
    "Unmerge",
    "cfg_layout",
    "design_from_params",
    "map_layout",
    "status_layout",
    "token_layout",
    "um_cfg_layout",
]


def design_from_params(h: int, w: int, c: int, lanes: int, width: int, frac_bits: int,
                       max_prefix: int, unmerge: int, buffers: int = 2,
                       serial_mul: int = 0, shared_keys: int = 0, area: int = 0) -> CubistMerge:
    """The registry's constructor (``procube verilog cubist --h 14 --w 14 ...``)."""
    return CubistMerge(h_max=h, w_max=w, c=c, lanes=lanes, width=width, frac_bits=frac_bits,
                       max_prefix=max_prefix, unmerge=unmerge, buffers=buffers,
                       serial_mul=serial_mul, shared_keys=shared_keys, area=area)
