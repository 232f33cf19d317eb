"""``procube bench procrustes``: sparse speedup of the Procrustes RTL against its own dense
mode, per density, with and without load balancing, on masks from real Dropback training.

Cycles are measured on the RTL (cocotb, Verilator by default) and set beside the cycle
model (``golden.procrustes_cycles``); whole-step figures and the 16x16 ResNet-18
projection come from the model. Writes ``out/bench/procrustes.{json,md,png}``.

Masks: ``golden/assets/dropback_masks_10x.npz`` (the tuned 10x Procrustes MLP, seed 0). The file
holds masks only (no weights), so a mask at another density ``d`` is derived from the
real one: the real mask's entries come first (in a seeded random order), then the other
entries (seeded random order), and the first ``round(d·size)`` are kept. Below the real
density that is a random subset of the real mask; above it, the real mask plus random
entries. The real masks themselves are measured too (``real`` rows).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HELP = "Procrustes RTL: sparse vs dense cycles per density, balanced and not"
MASKS = Path(__file__).resolve().parent.parent / "golden" / "assets" / "dropback_masks_10x.npz"
DENSITIES = (0.1, 0.25, 0.5, 1.0)
BENCH_CFG = dict(val_depth=16384, blk_depth=256, x_depth=512, y_depth=256)
# ResNet-18 (ImageNet) convolutions as GEMMs: (name, out ch, in ch·kh·kw, output H·W)
RESNET18 = [("conv1", 64, 3 * 49, 112 * 112)] + \
    [(f"layer1.{i}", 64, 64 * 9, 56 * 56) for i in range(4)] + \
    [("layer2.0a", 128, 64 * 9, 28 * 28), ("layer2.ds", 128, 64, 28 * 28)] + \
    [(f"layer2.{i}", 128, 128 * 9, 28 * 28) for i in range(3)] + \
    [("layer3.0a", 256, 128 * 9, 14 * 14), ("layer3.ds", 256, 128, 14 * 14)] + \
    [(f"layer3.{i}", 256, 256 * 9, 14 * 14) for i in range(3)] + \
    [("layer4.0a", 512, 256 * 9, 7 * 7), ("layer4.ds", 512, 256, 7 * 7)] + \
    [(f"layer4.{i}", 512, 512 * 9, 7 * 7) for i in range(3)] + \
    [("fc", 1000, 512, 1)]


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator")
    parser.add_argument("--n", type=int, default=16, help="minibatch columns (1..64)")
    parser.add_argument("--quick", action="store_true",
                        help="only the two smaller layers (fc1, fc3)")
    parser.add_argument("--batch", type=int, default=16,
                        help="images per step in the ResNet-18 projection (1..256)")
    parser.add_argument("--act-density", type=float, default=0.5,
                        help="non-zero activations assumed in the projection (0..1]")
    parser.add_argument("-o", "--out", type=Path, default=Path("out/bench"))


def derive_mask(real: np.ndarray, density: float, seed: int) -> np.ndarray:
    """The mask at ``density`` derived from a real mask (module docstring)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    rng = np.random.default_rng(seed)
    flat = real.reshape(-1)
    order = np.concatenate([rng.permutation(np.flatnonzero(flat)),
                            rng.permutation(np.flatnonzero(~flat))])
    out = np.zeros(flat.size, dtype=bool)
    out[order[:round(density * flat.size)]] = True
    return out.reshape(real.shape)


def _rows(mask: np.ndarray) -> list[str]:
    return ["".join("1" if v else "0" for v in r) for r in mask]


def measure(layers: dict, n: int, simulator: str) -> dict:
    from hw.procrustes import Config, Procrustes
    from sim.runner import simulate

    cfg = Config(**BENCH_CFG)
    r = simulate(Procrustes(cfg), test_module="sim.tb.tb_procrustes", simulator=simulator,
                 params={**BENCH_CFG, "layers": {k: _rows(v) for k, v in layers.items()},
                         "n": n, "seed": 1},
                 name="procrustes", testcase="test_bench")
    if not r.passed:
        raise RuntimeError(f"benchmark simulation failed (log: {r.log})")
    return r.metrics["bench"]


def projection(batch: int, density: float = 0.1, rows: int = 16, cols: int = 16,
               seed: int = 0, act_density: float = 0.5) -> dict:
    """Whole training step of ResNet-18-shaped layers on a ``rows x cols`` array from the
    cycle model, dense vs uniformly random masks at ``density`` (no real ResNet masks
    here). N = batch · output pixels per layer.

    The weight gradient of the sparse step is the cheaper of the dense ``WGRAD`` and
    ``WGRADX`` (activations as the sparse operand) plus the re-layout of dWᵀ into the
    update's layout through the host (one unload and one load word per cycle). Activations
    are uniformly random at ``act_density`` (post-ReLU inputs; an assumption, there are no
    real ResNet activations here) except conv1's (the image) and fc's (an average
    pool), which are dense. The dense step is a dense accelerator: no skipping."""
    from golden.procrustes_cycles import (
        ArrayParams,
        predict_backward,
        predict_forward,
        predict_update,
        predict_weight_grad,
        predict_weight_grad_sparse,
    )

    ap = ArrayParams(rows=rows, cols=cols)
    rng = np.random.default_rng(seed)
    tot = {"dense": dict(fwd=0, bwd=0, wgrad=0, update=0),
           "sparse": dict(fwd=0, bwd=0, wgrad=0, update=0)}
    wgrad_dense_sparse_step = 0  # the sparse step with a dense WGRAD, for comparison
    for name, M, K, hw in RESNET18:
        N = batch * hw
        dense = np.ones((M, K), dtype=bool)
        sparse = rng.random((M, K)) < density
        for key, mask in (("dense", dense), ("sparse", sparse)):
            t = tot[key]
            t["fwd"] += predict_forward(mask, N, ap)
            t["bwd"] += predict_backward(mask, N, ap)
            t["update"] += predict_update(M, K, ap)
        wg = predict_weight_grad(M, K, N, ap)
        tot["dense"]["wgrad"] += wg
        wgrad_dense_sparse_step += wg
        a = 1.0 if name in ("conv1", "fc") else act_density
        if a < 1.0:
            x_mask = rng.random((K, N), dtype=np.float32) < a
            relayout = K * -(-M // cols) + M * -(-K // cols)
            wg = min(wg, predict_weight_grad_sparse(x_mask, M, ap) + relayout)
        tot["sparse"]["wgrad"] += wg
    d, s = (sum(tot[k].values()) for k in ("dense", "sparse"))
    s_dense_wg = s - tot["sparse"]["wgrad"] + wgrad_dense_sparse_step
    return {"array": f"{rows}x{cols}", "density": density, "batch": batch,
            "act_density": act_density, "cycles": tot,
            "step_speedup": d / s,
            "step_speedup_dense_wgrad": d / s_dense_wg,
            "fwd_bwd_speedup": (tot["dense"]["fwd"] + tot["dense"]["bwd"])
            / (tot["sparse"]["fwd"] + tot["sparse"]["bwd"]),
            "paper": "up to 4x (Procrustes, ~10x fewer weights)"}


def run(args) -> int:
    from golden.procrustes_cycles import ArrayParams, predict_backward, predict_forward
    from hw.procrustes import Config

    if not 1 <= args.n <= 64:
        raise ValueError(f"n must be in 1..64, not {args.n}")
    if not 1 <= args.batch <= 256:
        raise ValueError(f"batch must be in 1..256, not {args.batch}")
    act = getattr(args, "act_density", 0.5)
    if not 0.0 < act <= 1.0:
        raise ValueError(f"act_density must be in (0, 1], not {act}")
    if not MASKS.exists():
        raise ValueError(f"the Dropback masks {MASKS} are missing: run "
                         f"`procube experiment dropback` first (no synthetic fallback)")
    z = np.load(MASKS)
    names = [k for k in z.files if not args.quick or k in ("fc1.weight", "fc3.weight")]
    layers = {}
    for i, k in enumerate(names):
        real = z[k].astype(bool)
        layers[f"{k}@dense"] = np.ones_like(real)
        layers[f"{k}@real"] = real
        for d in DENSITIES[:-1]:
            layers[f"{k}@{d}"] = derive_mask(real, d, seed=i)
    t0 = time.monotonic()
    meas = measure(layers, args.n, args.simulator)
    ap = ArrayParams.of(Config(**BENCH_CFG))
    rows_out = []
    for k in names:
        dense = meas[f"{k}@dense"]
        for label in ("real",) + tuple(str(d) for d in DENSITIES):
            key = f"{k}@{'dense' if label == '1.0' else label}"
            mask, m = layers[key], meas[key]
            dens = float(mask.mean())
            for phase in ("fwd", "bwd"):
                pred = (predict_forward if phase == "fwd" else predict_backward)(
                    mask, args.n, ap, True)
                for bal in ("bal", "unbal"):
                    rows_out.append({
                        "layer": k, "mask": label, "density": round(dens, 4), "phase": phase,
                        "balanced": bal == "bal",
                        "dense_cycles": dense[f"{phase}_{bal}"],
                        "sparse_cycles": m[f"{phase}_{bal}"],
                        "speedup": dense[f"{phase}_{bal}"] / m[f"{phase}_{bal}"],
                        "ideal": 1.0 / dens if dens else None,
                        "speedup_over_ideal": (dense[f"{phase}_{bal}"] / m[f"{phase}_{bal}"]
                                               * dens) if dens else None,
                        "model_cycles": pred if bal == "bal" else None,
                    })
    util = []
    for k in names:
        M, K = z[k].shape
        for phase in ("fwd", "bwd"):
            cyc = meas[f"{k}@dense"][f"{phase}_bal"]
            util.append({"layer": k, "phase": phase, "gemm": [M, K, args.n],
                         "cycles": cyc, "utilization": M * K * args.n / (ap.rows * ap.cols * cyc)})
    targets = {  # issue #6: >= 0.8 of ideal at 0.1/0.25/0.5 balanced; >= 85% dense
        "sparse_worst_over_ideal": min(r["speedup_over_ideal"] for r in rows_out
                                       if r["balanced"] and r["mask"] in ("0.1", "0.25", "0.5")),
        "sparse_target": 0.8,
        "dense_worst_utilization": min(u["utilization"] for u in util),
        "dense_target": 0.85,
    }
    result = {"array": f"{ap.rows}x{ap.cols}", "n": args.n, "simulator": args.simulator,
              "mask_source": str(MASKS.name) + " (other densities derived, see HELP)",
              "rows": rows_out, "dense_utilization": util, "targets": targets,
              "projection_resnet18_16x16": projection(args.batch, act_density=act),
              "seconds": round(time.monotonic() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "procrustes.json").write_text(json.dumps(result, indent=1))
    (args.out / "procrustes.md").write_text(markdown(result))
    _plot(result, args.out / "procrustes.png")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(markdown(result))
    return 0


def markdown(res: dict) -> str:
    lines = [f"Procrustes RTL {res['array']}, N={res['n']} ({res['simulator']}); masks: "
             f"{res['mask_source']}", "",
             "| layer | mask | density | phase | balanced | dense cycles | sparse cycles "
             "| speedup | ideal | speedup/ideal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ideal = r["ideal"] or float("nan")
        lines.append(f"| {r['layer']} | {r['mask']} | {r['density']:.3f} | {r['phase']} | "
                     f"{'on' if r['balanced'] else 'off'} | {r['dense_cycles']} | "
                     f"{r['sparse_cycles']} | {r['speedup']:.2f} | {ideal:.2f} | "
                     f"{r['speedup'] / ideal:.2f} |")
    lines += ["", "| dense GEMM | phase | cycles | PE utilization |", "|---|---|---|---|"]
    for u in res["dense_utilization"]:
        lines.append(f"| {u['layer']} {'x'.join(map(str, u['gemm']))} | {u['phase']} | "
                     f"{u['cycles']} | {100 * u['utilization']:.1f}% |")
    t = res.get("targets")
    if t:
        lines += ["", f"Worst balanced speedup/ideal at densities 0.1, 0.25, 0.5: "
                  f"{t['sparse_worst_over_ideal']:.2f} (target {t['sparse_target']}); worst "
                  f"dense PE utilization: {100 * t['dense_worst_utilization']:.1f}% (target "
                  f"{100 * t['dense_target']:.0f}%)"]
    p = res["projection_resnet18_16x16"]
    dwg = p.get("step_speedup_dense_wgrad")
    lines += ["", f"ResNet-18 projection ({p['array']}, batch {p['batch']}, density "
              f"{p['density']}, cycle model): whole step {p['step_speedup']:.2f}x"
              + (f" (activations at density {p['act_density']} skipped in dW; "
                 f"{dwg:.2f}x with dW dense)" if dwg else "")
              + f", forward+backward {p['fwd_bwd_speedup']:.2f}x; paper: {p['paper']}", "",
              "| cycles | fwd | bwd | wgrad | update |", "|---|---|---|---|---|"]
    for k in ("dense", "sparse"):
        c = p["cycles"][k]
        lines.append(f"| {k} | {c['fwd']} | {c['bwd']} | {c['wgrad']} | {c['update']} |")
    return "\n".join(lines) + "\n"


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for phase, mk in (("fwd", "o"), ("bwd", "s")):
        for bal, ls in ((True, "-"), (False, ":")):
            pts = sorted((r["density"], r["speedup"]) for r in res["rows"]
                         if r["phase"] == phase and r["balanced"] == bal)
            ax.plot(*zip(*pts), mk, ls=ls, alpha=0.7,
                    label=f"{phase} {'balanced' if bal else 'unbalanced'}")
    d = np.linspace(0.05, 1, 50)
    ax.plot(d, 1 / d, "k--", label="ideal 1/density")
    ax.plot(d, 0.8 / d, "k:", label="target 0.8/density")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight density")
    ax.set_ylabel("speedup over dense mode")
    ax.set_title(f"Procrustes RTL {res['array']}, N={res['n']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
