"""Blocks shared by both accelerators."""

from .check import check_int, check_pow2
from .stream_fifo import SkidBuffer, StreamFIFO

__all__ = ["SkidBuffer", "StreamFIFO", "check_int", "check_pow2"]
