"""CubistMerge vs ToMe, off the shelf, on three tiny ViTs trained on digits.

`procube experiment cubist` trains a DeiT-, SAM- and DINOv3-style tiny ViT
(`golden.vit`) on the bundled digits, then, without any fine-tuning, measures top-1
accuracy, per-patch foreground mIoU and forward speedup for: the plain model,
CubistMerge at (r_h, r_w) = (1, 1) and (2, 2) applied once before block `--loc`,
and ToMe (every block) with the per-block r whose *average token count per block*
is closest to that CubistMerge setting's. ToMe is only possible on the DeiT-style
model: it reorders tokens, which windowed attention / relative positions (SAM) and
2-D RoPE (DINOv3) cannot handle; those rows say so.

Writes `results.md` (the table), `results.json` and `results.png` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from golden.data import load_digits_split
from golden.threads import torch_threads
from golden.vit import KINDS, TinyViT, build_vit, evaluate, train_model

HELP = "CubistMerge vs ToMe off the shelf on tiny DeiT/SAM/DINOv3-style ViTs (digits)"

CUBIST_R = ((1, 1), (2, 2))
DEPTH = 6
TOME_NA = "n/a: ToMe breaks the rectangular grid"
STYLE = {"deit": "DeiT-style", "sam": "SAM-style", "dino": "DINOv3-style"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for tests: 2 epochs on 512 training images")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs per model (default 15, or 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    parser.add_argument("--loc", type=int, default=2,
                        help=f"block before which CubistMerge is applied (0..{DEPTH - 1})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed forward passes per variant, median used (default 7, 3 quick)")
    parser.add_argument("--no-timing", dest="timing", action="store_false",
                        help="skip the speedup measurement (results become deterministic)")
    parser.add_argument("--out", default="out/experiments/cubist", help="output directory")


def _token_counts(model: TinyViT, sample: torch.Tensor) -> tuple[int, float]:
    """(grid tokens entering the last block, average grid tokens per block), where a
    block's count is the mean of its attention's and its MLP's token counts."""
    _, trace = model.trace(sample)
    per_block = [(t["tokens"] + t["tokens_mlp"]) / 2 - model.prefix for t in trace]
    return trace[-1]["tokens"] - model.prefix, sum(per_block) / len(per_block)


def _match_tome_r(model: TinyViT, sample: torch.Tensor, target_avg: float) -> int:
    """Per-block ToMe r whose average tokens per block is closest to `target_avg`
    (ties: the smaller r)."""
    best = None
    for r in range(0, model.grid[0] * model.grid[1] // 2 + 1):
        model.patch_tome(r)
        gap = abs(_token_counts(model, sample)[1] - target_avg)
        if best is None or gap < best[0] - 1e-9:
            best = (gap, r)
    model.unpatch()
    return best[1]


def _variants(model: TinyViT, loc: int, sample: torch.Tensor) -> list[dict]:
    """The settings to evaluate for one model, as dicts with a `patch` callable."""
    out = [{"method": "baseline", "setting": "-", "patch": model.unpatch}]
    for r in CUBIST_R:
        out.append({"method": "CubistMerge", "setting": f"r=({r[0]},{r[1]}) before block {loc}",
                    "patch": lambda r=r: model.patch_cubist(loc, r)})
    for r in CUBIST_R:
        model.patch_cubist(loc, r)
        target = _token_counts(model, sample)[1]
        model.unpatch()
        label = f"matched to CubistMerge ({r[0]},{r[1]})"
        if model.kind != "deit":
            out.append({"method": "ToMe", "setting": label, "patch": None})
            continue
        rt = _match_tome_r(model, sample, target)
        out.append({"method": "ToMe", "setting": f"r={rt} per block, {label}",
                    "patch": lambda rt=rt: model.patch_tome(rt)})
    return out


@torch.no_grad()
def _time_variants(model: TinyViT, variants: list[dict], x: torch.Tensor, repeats: int,
                   batch: int = 128) -> list[float | None]:
    """Speedup of each variant over the first (the baseline): batched forward passes over
    `x`, all variants timed back to back in each round so that load from other processes
    hits them alike; the median over `repeats` rounds of the per-round time ratio."""
    live = [v for v in variants if v["patch"] is not None]
    ratios: dict[int, list[float]] = {id(v): [] for v in live}
    for rep in range(repeats + 1):  # the first round is a warm-up
        times = {}
        for v in live:
            v["patch"]()
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                model(x[i : i + batch])
            times[id(v)] = time.perf_counter() - t0
        if rep:
            for v in live:
                ratios[id(v)].append(times[id(live[0])] / times[id(v)])
    model.unpatch()
    return [statistics.median(ratios[id(v)]) if v["patch"] else None for v in variants]


def run_experiment(*, epochs: int, seed: int = 0, loc: int = 2, timing: bool = True,
                   repeats: int = 7, quick: bool = False, progress: bool = True) -> dict:
    """Train the three models and measure every variant. Returns the results dict that
    is written to `results.json`: `config` and `rows` (one dict per table row)."""
    if not isinstance(epochs, int) or not 1 <= epochs <= 1000:
        raise ValueError(f"epochs must be an integer in [1, 1000], got {epochs!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(loc, int) or not 0 <= loc < DEPTH:
        raise ValueError(f"loc must be an integer in [0, {DEPTH - 1}], got {loc!r}")
    if not isinstance(repeats, int) or not 1 <= repeats <= 1000:
        raise ValueError(f"repeats must be an integer in [1, 1000], got {repeats!r}")

    split = load_digits_split(seed)
    x_tr, y_tr, m_tr = split.x_train, split.y_train, split.mask_train
    if quick:
        x_tr, y_tr, m_tr = x_tr[:512], y_tr[:512], m_tr[:512]
    rows = []
    # one thread: deterministic, comparable timings, kind to shared CPUs
    with torch_threads(1):
        bar = tqdm(total=epochs * len(KINDS), desc="training", unit="epoch",
                   disable=not progress, file=sys.stderr)
        models = {}
        for kind in KINDS:
            torch.manual_seed(seed)
            model = build_vit(kind, depth=DEPTH)
            bar.set_postfix_str(kind)
            models[kind] = train_model(model, x_tr, y_tr, m_tr, epochs=epochs, seed=seed,
                                       batch_size=32, progress=lambda: bar.update(1))
        bar.close()
        sample = split.x_test[:1]
        for kind, model in models.items():
            variants = _variants(model, loc, sample)
            speedups = (_time_variants(model, variants, split.x_test, repeats) if timing
                        else [None] * len(variants))
            for v, speedup in zip(variants, speedups):
                row = {"model": STYLE[kind], "kind": kind, "method": v["method"],
                       "setting": v["setting"]}
                if v["patch"] is None:
                    row.update(tokens_final=None, tokens_avg=None, top1=None, miou=None,
                               speedup=None, note=TOME_NA)
                else:
                    v["patch"]()
                    final, avg = _token_counts(model, sample)
                    acc, miou = evaluate(model, split.x_test, split.y_test, split.mask_test)
                    model.unpatch()
                    row.update(tokens_final=final, tokens_avg=round(avg, 2),
                               top1=round(100 * acc, 2), miou=round(100 * miou, 2),
                               speedup=round(speedup, 3) if timing else None, note="")
                rows.append(row)
    config = {"epochs": epochs, "seed": seed, "loc": loc, "quick": quick, "timing": timing,
              "repeats": repeats if timing else None, "train_images": len(x_tr),
              "test_images": len(split.x_test), "depth": DEPTH, "grid": list(split.grid)}
    return {"config": config, "rows": rows}


def format_table(results: dict) -> str:
    """The markdown table of `results` (from `run_experiment`)."""
    timing = results["config"]["timing"]
    head = ["model", "method", "setting", "grid tokens (last block)", "avg tokens/block",
            "top-1 %", "mIoU %"] + (["speedup"] if timing else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        if r["note"]:
            cells = [r["model"], r["method"], r["setting"], r["note"]]
            cells += ["-"] * (len(head) - len(cells))
        else:
            cells = [r["model"], r["method"], r["setting"], str(r["tokens_final"]),
                     f"{r['tokens_avg']:.1f}", f"{r['top1']:.1f}", f"{r['miou']:.1f}"]
            if timing:
                cells.append(f"{r['speedup']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(results: dict, path: Path) -> None:
    """Top-1 and mIoU against average tokens per block, one line per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "top1", "top-1 accuracy (%)"),
                           (axes[1], "miou", "foreground mIoU (%)")):
        for kind in KINDS:
            rows = [r for r in results["rows"] if r["kind"] == kind and not r["note"]]
            cub = [r for r in rows if r["method"] != "ToMe"]
            line = ax.plot([r["tokens_avg"] for r in cub], [r[key] for r in cub], "o-",
                           label=f"{STYLE[kind]} CubistMerge")[0]
            tome = [r for r in rows if r["method"] == "ToMe"]
            if tome:
                ax.plot([r["tokens_avg"] for r in tome], [r[key] for r in tome], "x--",
                        color=line.get_color(), label=f"{STYLE[kind]} ToMe")
        ax.set_xlabel("average grid tokens per block")
        ax.set_ylabel(label)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Off the shelf, no fine-tuning (digits, 8x8 grid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> int:
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 15)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    results = run_experiment(epochs=epochs, seed=args.seed, loc=args.loc, timing=args.timing,
                             repeats=repeats, quick=args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    c = results["config"]
    intro = (f"CubistMerge vs ToMe, off the shelf: {c['epochs']} epochs, seed {c['seed']}, "
             f"{c['train_images']} train / {c['test_images']} test digits, "
             f"CubistMerge before block {c['loc']} of {c['depth']}; ToMe r matched on "
             f"average tokens per block.")
    if c["timing"]:
        intro += (f" Speedup: batched forward over the test set, 1 torch thread, median over"
                  f" {c['repeats']} rounds of (unpatched time / patched time), both measured"
                  " back to back in the same round.")
    (out / "results.md").write_text(intro + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_plot(results, out / "results.png")
    print(intro + "\n\n" + table)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0
