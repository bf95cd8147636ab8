"""Training-step time of the direct predictor: eager PyTorch vs ``torch.compile``, measured in one run.

Times forward + backward + optimiser step on real 2DMD MoS2 batches (8 structures of 192 atoms, 5 A
cutoff) on one CPU thread, for each model width and depth: eager, the whole model compiled, and each
layer compiled on its own (what training falls back to when the whole model does not compile;
compilation time reported apart). The ratio is what to read; absolute times depend on the machine's
load.

    python benchmarks/predictor_training_speed.py [--features 32 64] [--layers 3 5] [--steps 20]

Writes benchmarks/results/predictor_training_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from defectml.predictor.data import material_split, unpack
from defectml.predictor.model import Batch, DefectRelaxNet, ModelConfig, distance_loss
from defectml.predictor.train import compiled_forwards

ROOT = Path(__file__).resolve().parents[1]


def step_times(batches: list[Batch], features: int, layers: int, mode: str) -> tuple[list[float], float]:
    """Per-step seconds after the first step, and the first step's seconds (compilation included).

    ``mode``: ``eager``, ``whole`` (the model compiled) or ``layers`` (each layer compiled alone).
    """
    torch.manual_seed(0)
    model = DefectRelaxNet(ModelConfig(features=features, layers=layers, cutoff=5.0))
    forward = model if mode == "eager" else compiled_forwards(model)[0 if mode == "whole" else 1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for b in batches:
        t0 = time.perf_counter()
        loss = distance_loss(forward(b), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:], times[0]


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "2dmd-high-density-pairs.tar.gz"))
    p.add_argument("--work", default=str(ROOT / "runs" / "definet"))
    p.add_argument("--features", type=int, nargs="+", default=[32, 64])
    p.add_argument("--layers", type=int, nargs="+", default=[3])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(1)
    work = Path(a.work)
    split = material_split(unpack(a.data, work / "cache"), "MoS2", 5.0, work / "cache")
    graphs = split.train[: 8 * (a.steps + 1)]
    batches = [Batch(graphs[k : k + 8]) for k in range(0, len(graphs), 8)]
    rows = []
    for f in a.features:
        for n_layers in a.layers:
            eager, _ = step_times(batches, f, n_layers, "eager")
            row = {"features": f, "layers": n_layers, "eager_s_per_step": float(np.median(eager))}
            for mode in ("whole", "layers"):
                key = "compiled_whole" if mode == "whole" else "compiled_per_layer"
                try:
                    comp, first = step_times(batches, f, n_layers, mode)
                except Exception as exc:  # inductor fails on some depths: record it
                    row[key] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
                    continue
                row[key] = {
                    "s_per_step": float(np.median(comp)),
                    "speedup": float(np.median(eager) / np.median(comp)),
                    "compile_s": first,
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"material": "MoS2", "batch_size": 8, "cutoff_A": 5.0, "threads": 1, "rows": rows}
    (out / "predictor_training_speed.json").write_text(json.dumps(doc, indent=2))
    md = [
        "# Direct predictor: training step, eager vs torch.compile (MoS2, batch 8, 1 thread)",
        "",
        "Median over the steps after the first; the first compiled step includes compilation. "
        "whole = the model compiled; per layer = each layer compiled on its own (training's fallback). "
        f"torch {torch.__version__}. Rerun: `python benchmarks/predictor_training_speed.py "
        f"--features {' '.join(map(str, a.features))} --layers {' '.join(map(str, a.layers))} "
        f"--steps {a.steps}`.",
        "",
        "| features | layers | eager s/step | whole: s/step | speed-up | first step (s) "
        "| per layer: s/step | speed-up | first step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for key in ("compiled_whole", "compiled_per_layer"):
            c = r[key]
            cells += (
                [f"fails ({c['error'].split(':')[0]})", "-", "-"]
                if "error" in c
                else [f"{c['s_per_step']:.3f}", f"{c['speedup']:.1f}x", f"{c['compile_s']:.0f}"]
            )
        head = f"| {r['features']} | {r['layers']} | {r['eager_s_per_step']:.3f} | "
        md.append(head + " | ".join(cells) + " |")
    (out / "predictor_training_speed.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
