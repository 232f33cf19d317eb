"""Run a block of torch code with a set number of intra-op threads, then restore."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` for the duration of the block.

    Benchmarks and experiments use one thread: comparable timings, identical results
    on every machine, and no thread thrashing on shared cores.
    """
    if n < 1:
        raise ValueError(f"threads must be >= 1, not {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
