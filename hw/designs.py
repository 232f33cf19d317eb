"""The registry of generatable designs: name → constructor and elaboration parameters.

The CLI (``procube verilog`` / ``procube sim``) builds its options from this table, so a
design appears there by adding one :class:`Design` entry. Constructors validate their
own arguments and raise ``ValueError`` naming the parameter and its range.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

__all__ = ["DESIGNS", "Design", "DesignUnavailable", "Param", "build", "get", "port_manifest"]


class DesignUnavailable(LookupError):
    """The design is registered but its gateware does not exist (yet)."""


@dataclass(frozen=True)
class Param:
    name: str
    default: object
    help: str
    type: type = int
    choices: tuple | None = None


@dataclass(frozen=True)
class Design:
    name: str
    summary: str
    factory: str  # "module:callable", imported lazily
    params: tuple[Param, ...] = field(default_factory=tuple)

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}

    def build(self, **overrides):
        unknown = set(overrides) - {p.name for p in self.params}
        if unknown:
            raise ValueError(f"{self.name} has no parameter {sorted(unknown)[0]!r}")
        kwargs = {**self.defaults(), **overrides}
        module, _, attr = self.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ModuleNotFoundError, AttributeError):
            raise DesignUnavailable(f"design {self.name} is not available yet "
                                    f"({self.factory} does not exist)") from None
        return factory(**kwargs)


def _fifo(width: int, depth: int, kind: str):
    from .common import SkidBuffer, StreamFIFO, check_int

    check_int("width", width, 1, 4096)
    if kind == "skid":
        return SkidBuffer(width)
    if kind == "fifo":
        return StreamFIFO(width, depth)
    raise ValueError(f"kind must be 'fifo' or 'skid', not {kind!r}")


DESIGNS: dict[str, Design] = {}


def register(design: Design) -> Design:
    DESIGNS[design.name] = design
    return design


register(Design(
    name="fifo",
    summary="shared stream FIFO / skid buffer (hw.common)",
    factory="hw.designs:_fifo",
    params=(
        Param("width", 16, "payload width in bits (1..4096)"),
        Param("depth", 16, "FIFO depth in entries (1..65536); ignored for --kind skid"),
        Param("kind", "fifo", "fifo (memory-backed) or skid (2-register slice)", str,
              ("fifo", "skid")),
    ),
))

register(Design(
    name="cubist",
    summary="CubistMerge spatial merge unit (hw.cubist)",
    factory="hw.cubist:design_from_params",
    params=(
        Param("h", 14, "maximum grid height H_max"),
        Param("w", 14, "maximum grid width W_max"),
        Param("c", 64, "channels per token"),
        Param("lanes", 4, "channels per beat P (power of two dividing C)"),
        Param("width", 8, "bits per signed channel value (8 or 16)"),
        Param("frac_bits", 16, "fractional bits of the similarity key (8..24)"),
        Param("max_prefix", 4, "maximum number of pass-through prefix tokens"),
        Param("unmerge", 1, "include the unmerge unit (0 or 1)"),
        Param("buffers", 2, "frame-buffer banks: 2 overlaps frames, 1 halves the memory"),
        Param("serial_mul", 0, "1: key products by shift-add, no DSP (iCE40; needs C/P >= 2)"),
        Param("shared_keys", 0, "1: one key front/divider for both passes, half throughput"),
        Param("area", 0, "1: iCE40 area mode (serial rankers, fewer registers; needs "
                         "shared_keys=1, C/P >= max(H,W)//2 + 3)"),
    ),
))

register(Design(
    name="procrustes",
    summary="Procrustes sparse-training accelerator (hw.procrustes)",
    factory="hw.procrustes:design_from_params",
    params=(
        Param("rows", 4, "PE array rows (power of two, 1..16)"),
        Param("cols", 4, "PE array columns (power of two, 1..16)"),
        Param("data_bits", 16, "signed width of weights, activations, gradients (4..24)"),
        Param("acc_bits", 32, "signed accumulator width (data_bits..48)"),
        Param("lanes", 4, "blocks whose masks a format walker reads per cycle (1..8)"),
        Param("bm", 4, "block rows of the weight format (1, 2, 4 or 8)"),
        Param("bk", 4, "block columns of the weight format (1, 2, 4 or 8)"),
        Param("val_depth", 2048, "weight values held on chip"),
        Param("x_depth", 512, "operand buffer words (cols lanes each)"),
        Param("y_depth", 256, "result bank words per PE row"),
        Param("fifo_depth", 16, "groups in each PE row's walker FIFO (2..16; iCE40: small, "
                                "the FIFO is flip-flops there)"),
        Param("area", 0, "1: area configuration for the iCE40 (serial weight update on one "
                         "shared multiplier, 15 cycles per element; data_bits <= 16)"),
    ),
))


def get(name: str) -> Design:
    if name not in DESIGNS:
        raise ValueError(f"design must be one of {', '.join(sorted(DESIGNS))}, not {name!r}")
    return DESIGNS[name]


def build(name: str, **params):
    return get(name).build(**params)


def port_manifest(component) -> list[dict]:
    """Ports of a converted component: Verilog name, direction and width."""
    from amaranth.hdl import Shape
    from amaranth.lib import wiring

    ports = [{"name": "clk", "dir": "in", "width": 1}, {"name": "rst", "dir": "in", "width": 1}]
    for path, member, _ in component.signature.flatten(component):
        ports.append({
            "name": "__".join(str(p) for p in path),
            "dir": "in" if member.flow == wiring.In else "out",
            "width": Shape.cast(member.shape).width,
        })
    return ports
