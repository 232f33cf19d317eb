"""``procube run``: run an accelerator on a board over its UART host link.

Connects with pyserial, reads the board's descriptor, streams a workload, checks every
result against the golden model and prints cycles and wall time. Exit status 0 when
every result matched, 1 on a mismatch or a link failure (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from .apps import APPS
from .host import Board, Link, LinkError, SerialTransport

__all__ = ["HELP", "add_arguments", "run", "run_on"]

HELP = "run an accelerator on a board over its UART host link"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("design", choices=["linktest", "cubist", "procrustes"])
    parser.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB1")
    parser.add_argument("--baud", type=int, default=1_000_000,
                        help="UART rate the bitstream was built for (default: 1000000)")
    parser.add_argument("--timeout", type=float, default=0.5,
                        help="seconds to wait for a reply before retrying (default: 0.5)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default: 1)")
    g = parser.add_argument_group("cubist")
    g.add_argument("--frames", type=int, default=2, help="frames (default: 2)")
    g.add_argument("--r-h", type=int, default=1, help="rows removed per column (default: 1)")
    g.add_argument("--r-w", type=int, default=1, help="columns removed per row (default: 1)")
    g.add_argument("--prefix", type=int, default=0, help="prefix tokens (default: 0)")
    g = parser.add_argument_group("procrustes")
    g.add_argument("--steps", type=int, default=2, help="training steps (default: 2)")
    g.add_argument("--sizes", default="64,12,10",
                   help="MLP layer sizes, comma-separated; the first 64, 16 or 4 (digits "
                        "pooled) (default: 64,12,10)")
    g.add_argument("--batch", type=int, default=12, help="minibatch (default: 12)")
    g.add_argument("--lr", type=float, default=0.3, help="learning rate (default: 0.3)")
    g = parser.add_argument_group("linktest")
    g.add_argument("--packets", type=int, default=8, help="packets (default: 8)")
    g.add_argument("--max-len", type=int, default=64, help="words per packet, at most")


def app_kwargs(args) -> dict:
    if args.design == "cubist":
        return {"frames": args.frames, "r_h": args.r_h, "r_w": args.r_w,
                "prefix": args.prefix, "seed": args.seed}
    if args.design == "procrustes":
        try:
            sizes = tuple(int(v) for v in args.sizes.split(","))
        except ValueError:
            raise ValueError(f"sizes must be comma-separated integers, not {args.sizes!r}") \
                from None
        return {"steps": args.steps, "sizes": sizes, "batch": args.batch, "lr": args.lr,
                "seed": args.seed}
    return {"packets": args.packets, "max_len": args.max_len, "seed": args.seed}


def run_on(transport, design: str, kwargs: dict, *, timeout: float = 0.5):
    """Connect over ``transport``, run ``design``'s app; the :class:`RunReport`."""
    board = Board(Link(transport, reply_timeout=timeout))
    return APPS[design](board, **kwargs)


def run(args) -> int:
    if not 1200 <= args.baud <= 12_000_000:
        raise ValueError(f"baud must be in 1200..12000000, not {args.baud}")
    if not args.timeout > 0:
        raise ValueError(f"timeout must be > 0, not {args.timeout}")
    kwargs = app_kwargs(args)  # bad options are refused before the port is opened
    try:
        transport = SerialTransport(args.port, args.baud)
        try:
            report = run_on(transport, args.design, kwargs, timeout=args.timeout)
        finally:
            transport.close()
    except LinkError as e:
        print(f"procube run: {e}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0 if report.passed else 1
