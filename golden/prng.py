"""Counter-based PRNG shared by the golden models and the Procrustes RTL.

Dropback/Procrustes never store the initial weights w0: they are regenerated
from each weight's index. This module defines that generator bit for bit, so
that an RTL implementation can match it exactly.

Definition (all values are 32-bit unsigned, ``mod 2**32`` wherever a result
would overflow)::

    prng_u32(seed, index):
        x = seed XOR (index * 0x9E3779B9 mod 2**32)    # golden-ratio increment
        if x == 0: x = 0x6D2B79F5                       # xorshift has a fixed point at 0
        repeat 3 times:
            x = x XOR ((x << 13) mod 2**32)
            x = x XOR (x >> 17)                         # logical shift
            x = x XOR ((x << 5) mod 2**32)
        return x

    layer_seed(base_seed, param_index) = prng_u32(base_seed, 0x10000 + param_index)
    uniform(seed, index)               = prng_u32(seed, index) / 2**32      # in [0, 1)

Hardware notes: one round is three shift/XOR stages (no adders); the index
multiply by a constant is the only arithmetic and can be replaced by an
accumulator that adds 0x9E3779B9 per consecutive index. Only the low 32 bits of
``index`` matter. Three rounds can be pipelined as nine XOR stages.

Initial weights (:class:`CounterInit`): parameter ``i`` (its position in the
optimizer's parameter order) with ``numel`` elements, flattened row-major, gets::

    x     = prng_u32(layer_seed(seed, i), j)           # j = 0 .. numel-1
    t     = x * 2**-31 - 1                              # exact in float64, in [-1, 1)
    w0[j] = float32(bound * t)                          # bound, product in float64

with ``bound = 1/sqrt(fan_in)`` (float64), which is PyTorch's default
``kaiming_uniform_(a=sqrt(5))`` bound for Linear/Conv weights. ``fan_in`` is
``numel / shape[0]`` for tensors of two or more dimensions. A 1-D tensor that
directly follows such a weight whose ``shape[0]`` equals its length is that
layer's bias and uses the weight's ``fan_in`` (PyTorch's Linear/Conv bias rule);
any other 1-D or 0-D tensor uses ``bound = 1/sqrt(numel)``. Rounding to float32
can reach ``|w0| == bound``, so the range is ``[-bound, bound]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

MULT = 0x9E3779B9
ZERO_SUBST = 0x6D2B79F5
LAYER_OFFSET = 0x10000
ROUNDS = 3
_MASK32 = 0xFFFFFFFF

# numba-visible constants (uint64 so that the arithmetic stays unsigned).
_U_MULT = np.uint64(MULT)
_U_ZERO = np.uint64(ZERO_SUBST)
_U_MASK = np.uint64(_MASK32)
_U13 = np.uint64(13)
_U17 = np.uint64(17)
_U5 = np.uint64(5)
_TWO_M31 = 2.0**-31


def _check_u32(name: str, value: int) -> int:
    value = int(value)
    if not 0 <= value <= _MASK32:
        raise ValueError(f"{name} must be in [0, 2**32 - 1], not {value}")
    return value


def prng_u32(seed: int, index):
    """The generator. ``index``: int, numpy integer array or torch integer tensor.

    Returns the same kind: ``int``, ``np.uint32`` array, or ``torch.int64``
    tensor holding values in ``[0, 2**32)``.
    """
    seed = _check_u32("seed", seed)
    if isinstance(index, torch.Tensor):
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"index must be an integer tensor, not {index.dtype}")
        x = (index.to(torch.int64) * MULT) & _MASK32
        x = x ^ seed
        x = torch.where(x == 0, torch.full_like(x, ZERO_SUBST), x)
        for _ in range(ROUNDS):
            x = x ^ ((x << 13) & _MASK32)
            x = x ^ (x >> 17)
            x = x ^ ((x << 5) & _MASK32)
        return x
    if isinstance(index, np.ndarray):
        if index.dtype.kind not in "iu":
            raise ValueError(f"index must be an integer array, not {index.dtype}")
        out = np.empty(index.shape, dtype=np.uint32)
        _prng_array(np.uint64(seed), index.astype(np.uint64).reshape(-1), out.reshape(-1))
        return out
    x = ((int(index) * MULT) & _MASK32) ^ seed
    if x == 0:
        x = ZERO_SUBST
    for _ in range(ROUNDS):
        x ^= (x << 13) & _MASK32
        x ^= x >> 17
        x ^= (x << 5) & _MASK32
    return x


@numba.njit(inline="always")
def prng_u32_nb(seed, j):
    """numba form of :func:`prng_u32`; ``seed`` and ``j`` are ``np.uint64``."""
    x = ((j * _U_MULT) & _U_MASK) ^ seed
    if x == 0:
        x = _U_ZERO
    for _ in range(3):
        x = x ^ ((x << _U13) & _U_MASK)
        x = x ^ (x >> _U17)
        x = x ^ ((x << _U5) & _U_MASK)
    return x


def _low32(builder, v, ty):
    """The low 32 bits of an integer value of numba type ``ty``, as LLVM i32."""
    i32 = ir.IntType(32)
    if ty.bitwidth > 32:
        return builder.trunc(v, i32)
    return builder.zext(v, i32) if ty.bitwidth < 32 else v


def _centered_ir(builder, lin, seed32):
    """``prng_u32`` from ``lin = index * MULT`` (mod 2**32), XOR 0x80000000, in i32."""
    i32 = ir.IntType(32)
    x = builder.xor(lin, seed32)
    x = builder.select(builder.icmp_unsigned("==", x, ir.Constant(i32, 0)),
                       ir.Constant(i32, ZERO_SUBST), x)
    for _ in range(ROUNDS):
        x = builder.xor(x, builder.shl(x, ir.Constant(i32, 13)))
        x = builder.xor(x, builder.lshr(x, ir.Constant(i32, 17)))
        x = builder.xor(x, builder.shl(x, ir.Constant(i32, 5)))
    return builder.xor(x, ir.Constant(i32, 0x80000000))


@intrinsic
def _prng_centered32(typingctx, seed, j):
    """``int32(prng_u32(seed, j) XOR 0x80000000)``, i.e. ``x - 2**31``, built from
    32-bit LLVM operations: numba widens every integer operation to 64 bits, and
    the 64-bit lanes (and the masks that keep them to 32 bits) halve the vector
    width of a loop that regenerates w0 (measured: 4.6 -> 3.2 ms per 11.7M w0
    values). Only the low 32 bits of ``seed`` and ``j`` are used, as in
    :func:`prng_u32`."""
    if not (isinstance(seed, types.Integer) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        lin = builder.mul(_low32(builder, args[1], j), ir.Constant(ir.IntType(32), MULT))
        return _centered_ir(builder, lin, _low32(builder, args[0], seed))

    return types.int32(seed, j), codegen


@intrinsic
def _prng_centered32_at(typingctx, seed, base, jj):
    """:func:`_prng_centered32` of index ``base + jj``, added in 32 bits. In a loop
    over ``jj`` with ``base`` fixed, ``base + jj`` computed by numba is a 64-bit
    add, and the vectorized loop carried the index in 64-bit lanes, packed them to
    32 bits and multiplied (on a Zen 4 EPYC, 6.46 ms per 11.7M w0 values into an
    L1 buffer); here the loop counter is truncated where it is used, so it runs
    in 32-bit lanes (5.64 ms)."""
    if not all(isinstance(t, types.Integer) for t in (seed, base, jj)):
        return None

    def codegen(context, builder, signature, args):
        m = ir.Constant(ir.IntType(32), MULT)
        lin = builder.add(builder.mul(_low32(builder, args[1], base), m),
                          builder.mul(_low32(builder, args[2], jj), m))
        return _centered_ir(builder, lin, _low32(builder, args[0], seed))

    return types.int32(seed, base, jj), codegen


@numba.njit(inline="always")
def w0_nb(seed, j, bound):
    """numba form of one initial weight: ``float32(bound * (x * 2**-31 - 1))``.
    ``x * 2**-31 - 1 == (x - 2**31) * 2**-31`` exactly, ``x - 2**31`` is the int32
    :func:`_prng_centered32` returns (int32 -> float64 vectorizes), and
    ``bound * ((x - 2**31) * 2**-31)`` rounds exactly as ``(bound * 2**-31) *
    (x - 2**31)`` (scaling by a power of two commutes with rounding away from
    the subnormal range; the loop-invariant ``bound * 2**-31`` is hoisted)."""
    return np.float32((bound * _TWO_M31) * np.float64(_prng_centered32(seed, j)))


@numba.njit(inline="always")
def w0_at_nb(seed, base, jj, bound):
    """:func:`w0_nb` of index ``base + jj``: for loops over ``jj`` from a fixed
    ``base`` (see :func:`_prng_centered32_at`)."""
    return np.float32((bound * _TWO_M31) * np.float64(_prng_centered32_at(seed, base, jj)))


@numba.njit(cache=False)
def _prng_array(seed, index, out):
    for i in range(index.shape[0]):
        out[i] = np.uint32(prng_u32_nb(seed, index[i]))


@numba.njit(cache=False)
def _w0_fill(seed, bound, out):
    for j in range(out.shape[0]):
        out[j] = w0_nb(seed, np.uint64(j), bound)


def layer_seed(base_seed: int, param_index: int) -> int:
    """One seed per parameter tensor."""
    if param_index < 0:
        raise ValueError(f"param_index must be >= 0, not {param_index}")
    return prng_u32(base_seed, LAYER_OFFSET + int(param_index))


def uniform(seed: int, index):
    """``prng_u32(seed, index) / 2**32`` in ``[0, 1)`` (float64)."""
    x = prng_u32(seed, index)
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64) * 2.0**-32
    if isinstance(x, np.ndarray):
        return x.astype(np.float64) * 2.0**-32
    return x * 2.0**-32


def init_bounds(shapes: Sequence[Sequence[int]]) -> list[float]:
    """``bound`` of every tensor in order, by the fan-in rule of the module docstring."""
    bounds: list[float] = []
    prev: tuple[int, ...] | None = None
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if numel == 0:
            bounds.append(0.0)
        elif len(shape) >= 2:
            bounds.append(1.0 / math.sqrt(numel // shape[0]))
        elif (len(shape) == 1 and prev is not None and len(prev) >= 2
              and prev[0] == shape[0] and math.prod(prev) > 0):
            bounds.append(1.0 / math.sqrt(math.prod(prev) // prev[0]))
        else:
            bounds.append(1.0 / math.sqrt(numel))
        prev = shape
    return bounds


class CounterInit:
    """Initial weights regenerated from (seed, parameter index, element index).

    Pass as ``init=`` to :class:`golden.dropback.Dropback`; call :meth:`apply_`
    on the model's parameters (same order as given to the optimizer) so that
    training starts from the weights the optimizer regenerates.
    """

    def __init__(self, seed: int):
        self.seed = _check_u32("seed", seed)

    def __repr__(self) -> str:
        return f"CounterInit(seed={self.seed})"

    def param_seed(self, param_index: int) -> int:
        return layer_seed(self.seed, param_index)

    def w0(self, param_index: int, shape: Sequence[int], bound: float) -> torch.Tensor:
        """The float32 initial tensor of parameter ``param_index``."""
        out = np.empty(math.prod(int(s) for s in shape), dtype=np.float32)
        _w0_fill(np.uint64(self.param_seed(param_index)), float(bound), out)
        return torch.from_numpy(out).reshape(tuple(shape))

    @torch.no_grad()
    def apply_(self, params: Iterable[torch.Tensor]) -> None:
        """Overwrite ``params`` (in optimizer order) with their regenerated w0."""
        params = list(params)
        bounds = init_bounds([p.shape for p in params])
        for i, (p, b) in enumerate(zip(params, bounds)):
            p.copy_(self.w0(i, p.shape, b).to(p.dtype))


# On-disk cache of the kernels above, stamped with all golden sources (golden/jitcache.py).
from golden import jitcache as _jitcache  # noqa: E402

_jitcache.enable(globals())
