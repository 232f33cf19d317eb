"""Benchmark: CubistMerge golden ``merge_2d`` vs ToMe's ``merge``, CPU time.

Input ``[1, 197, 768]`` float32 (a DeiT-B / ViT-B token set: 1 class token +
a 14x14 grid).  CubistMerge with ``r = (2, 2)`` (196 -> 144 grid tokens) against
ToMe removing the same number of tokens (r = 52) with the class token
protected and ``metric = x``.  Both calls are timed interleaved (one of each
per repeat, after warm-up); the medians and their ratio come from the same run.
Torch runs on 1 thread for stability on shared cores.  Target: ratio <= 2.0.

``--agreement N`` also measures, on N frames of 14x14x64 int8 tokens, how many
of the float model's removed tokens the bit-exact fixed-point model also removes,
for frac_bits 12, 16 and 20.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from golden.cubist import merge_2d
from golden.cubist_fixed import FRAME_KINDS, agreement, random_frames
from golden.threads import torch_threads
from golden.tome import merge as tome_merge

HELP = "CubistMerge golden merge_2d vs ToMe merge on [1, 197, 768], CPU time ratio"
TARGET_RATIO = 2.0
AGREEMENT_FRAC_BITS = (12, 16, 20)


def run_bench(repeats: int = 50, warmup: int = 5, threads: int = 1, seed: int = 0) -> dict:
    """Interleaved timings of both merges; returns medians (ms) and the ratio."""
    if repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats}")
    if threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads}")
    with torch_threads(threads):
        x = torch.randn(1, 197, 768, generator=torch.Generator().manual_seed(seed))
        r_tome = 196 - 12 * 12
        calls = {
            "cubist": lambda: merge_2d(x, (14, 14), (2, 2), prefix=1),
            "tome": lambda: tome_merge(x, x, r_tome, class_token=True),
        }
        for _ in range(warmup):
            for fn in calls.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        used_threads = torch.get_num_threads()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med["cubist"] / med["tome"]
    return dict(
        input=[1, 197, 768], cubist_r=[2, 2], tome_r=r_tome, repeats=repeats,
        threads=used_threads,
        median_ms={name: round(t * 1e3, 3) for name, t in med.items()},
        ratio=round(ratio, 2), target_ratio=TARGET_RATIO, met=bool(ratio <= TARGET_RATIO),
    )


def run_agreement(frames: int, seed: int = 1) -> list[dict]:
    """Fixed vs float removed-token agreement, 14x14x64, r = (2, 2), int8."""
    if frames < 1:
        raise ValueError(f"agreement frames must be an integer >= 1, got {frames}")
    rows = []
    for kind in FRAME_KINDS:
        x = random_frames(kind, frames, (14, 14), 64, seed=seed)
        for f in AGREEMENT_FRAC_BITS:
            a = agreement(x, (14, 14), (2, 2), frac_bits=f)
            rows.append(dict(inputs=kind, frac_bits=f, removed=a.removed_total,
                             agree=a.removed_agree, rate=round(a.rate, 5),
                             frames_identical=a.frames_identical, frames=a.frames))
    return rows


def to_markdown(res: dict) -> str:
    ms = res["median_ms"]
    lines = [
        f"Merge of [1, 197, 768] float32 (class token + 14x14 grid), median of "
        f"{res['repeats']} interleaved repeats, {res['threads']} torch thread(s)",
        "",
        "| merge | removes | median ms |",
        "|---|---|---|",
        f"| CubistMerge merge_2d, r=(2, 2) | 52 | {ms['cubist']} |",
        f"| ToMe merge, r={res['tome_r']} | {res['tome_r']} | {ms['tome']} |",
        "",
        f"ratio cubist/tome = {res['ratio']} (target <= {res['target_ratio']}: "
        f"{'pass' if res['met'] else 'FAIL'})",
    ]
    if "agreement" in res:
        lines += [
            "",
            "Fixed-point vs float removed tokens (14x14x64 int8, r=(2, 2)):",
            "",
            "| inputs | frac_bits | agree / removed | rate | identical frames |",
            "|---|---|---|---|---|",
        ]
        for row in res["agreement"]:
            lines.append(
                f"| {row['inputs']} | {row['frac_bits']} | {row['agree']} / {row['removed']} "
                f"| {row['rate'] * 100:.2f}% | {row['frames_identical']} / {row['frames']} |"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=50,
                        help="timed repeats of each merge (median taken), default 50")
    parser.add_argument("--agreement", type=int, default=0, metavar="FRAMES",
                        help="also measure fixed/float agreement on FRAMES frames (e.g. 200)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    res = run_bench(repeats=args.repeats)
    if args.agreement:
        res["agreement"] = run_agreement(args.agreement)
    print(json.dumps(res, indent=2) if args.json else to_markdown(res))
    return 0
