"""``procube program``: flash a bitstream with the board's programmer.

iCEBreaker: ``iceprog`` (``$ICEPROG`` overrides it); ULX3S: ``openFPGALoader -b ulx3s``
(``$OPENFPGALOADER``). Without ``--bitstream``, the newest bitstream built for the
board under ``build/fpga`` is used. ``--dry-run`` prints the command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .boards import BOARDS, get_board

__all__ = ["HELP", "add_arguments", "program_command", "run"]

HELP = "flash a built bitstream onto a board"


def latest_bitstream(board: str, root: Path | str = "build/fpga") -> Path | None:
    spec = get_board(board)
    found = sorted(Path(root).glob(f"{board}-*/{spec.bitstream}"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def program_command(board: str, bitstream: Path | str, env: dict | None = None) -> list[str]:
    """The programmer's argv for ``bitstream``."""
    spec = get_board(board)
    env = os.environ if env is None else env
    var, _, default = spec.programmer[0].partition("=")
    tool = env.get(var) or default
    return [tool] + [a.replace("{bitstream}", str(bitstream)) for a in spec.programmer[1:]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--board", required=True, choices=list(BOARDS))
    parser.add_argument("--bitstream", type=Path, default=None,
                        help="bitstream file (default: the newest one in build/fpga)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the programmer command instead of running it")


def run(args) -> int:
    bitstream = args.bitstream or latest_bitstream(args.board)
    if bitstream is None:
        raise ValueError(f"bitstream must be given: nothing built for {args.board} in "
                         f"build/fpga (run procube build --board {args.board} ...)")
    if not Path(bitstream).is_file():
        raise ValueError(f"bitstream must be an existing file, not {str(bitstream)!r}")
    cmd = program_command(args.board, bitstream)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if shutil.which(cmd[0]) is None:
        print(f"procube program: {cmd[0]} not found: install it (Debian: "
              f"{'fpga-icestorm' if args.board == 'icebreaker' else 'openfpgaloader'}) or "
              f"set ${get_board(args.board).programmer[0].partition('=')[0]}", file=sys.stderr)
        return 1
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {res.returncode}"
        print(f"procube program: {cmd[0]} failed: {reason} (is the board connected?)",
              file=sys.stderr)
        return 1
    print(f"programmed {args.board} with {bitstream}")
    return 0
