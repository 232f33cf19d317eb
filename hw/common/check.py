"""Constructor argument checks with messages that name the parameter and its range."""

from __future__ import annotations

__all__ = ["check_int", "check_pow2"]


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]``, or a ValueError saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            rng = f">= {lo}"
        elif lo is None:
            rng = f"<= {hi}"
        else:
            rng = f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {rng}, not {value}")
    return value


def check_pow2(name: str, value, lo: int = 1, hi: int | None = None) -> int:
    """Like :func:`check_int`, and a power of two."""
    check_int(name, value, lo, hi)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two, not {value}")
    return value
