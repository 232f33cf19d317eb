"""Stream payload layouts and error codes of the merge unit (see ``hw/cubist/README.md``)."""

from __future__ import annotations

from amaranth.hdl import signed
from amaranth.lib import data

__all__ = [
    "ERR_CONFIG",
    "ERR_LAST_TOKEN",
    "ERR_LONG",
    "ERR_OK",
    "ERR_SHORT",
    "ERROR_NAMES",
    "cfg_layout",
    "map_layout",
    "status_layout",
    "token_layout",
    "um_cfg_layout",
]

ERR_OK = 0
ERR_CONFIG = 1  # H, W, r or prefix out of range for this unit
ERR_SHORT = 2  # `last` came before the frame's final beat
ERR_LONG = 3  # no `last` on the frame's final beat: beats dropped until `last`
ERR_LAST_TOKEN = 4  # `last_token` set on a beat that does not end a token, or missing

ERROR_NAMES = {ERR_OK: "ok", ERR_CONFIG: "bad configuration", ERR_SHORT: "frame too short",
               ERR_LONG: "frame too long", ERR_LAST_TOKEN: "last_token misplaced"}

CFG_FIELD_BITS = 8


def cfg_layout() -> data.StructLayout:
    """Per-frame configuration: 8 bits a field, so out-of-range requests can be sent."""
    return data.StructLayout({n: CFG_FIELD_BITS for n in ("h", "w", "r_h", "r_w", "prefix")})


def um_cfg_layout() -> data.StructLayout:
    return data.StructLayout({n: CFG_FIELD_BITS for n in ("h", "w", "r_h", "r_w")})


def token_layout(width: int, lanes: int) -> data.StructLayout:
    """One beat: ``lanes`` channels of a token, channel ``c*P + k`` in lane k of beat c."""
    return data.StructLayout({
        "data": data.ArrayLayout(signed(width), lanes),
        "last_token": 1,
        "last": 1,
    })


def map_layout(h_max: int, w_max: int) -> data.StructLayout:
    return data.StructLayout({"index": range(h_max * w_max), "last": 1})


def status_layout() -> data.StructLayout:
    return data.StructLayout({"error": 3, "frame": 16})
