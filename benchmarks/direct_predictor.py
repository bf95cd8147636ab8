"""Direct relaxed-structure predictor on the 2DMD pairs: model vs Dummy vs CHGNet relaxation.

Trains one small model on the published training ids of all six materials (CPU; joint training,
one model), then on each material's 50 test ids reports the coordinate MAE (A; mean over real atoms
and x/y/z, periodic-image aware) over all atoms and within 3/4/5/6 A of any defect site, for the
model and for "Dummy" (the unrelaxed positions), with the inference time per structure. On the
first ``--chgnet-per-material`` test structures of each material, CHGNet (default model) relaxes
from the unrelaxed and from the predicted positions: its coordinate MAE and the FIRE steps saved.

    python benchmarks/direct_predictor.py [--epochs 20] [--features 32] [--cutoff 5] [--chgnet-per-material 5]

Writes benchmarks/results/direct_predictor.{json,md}; the model lands in runs/definet/model.pt
(rerunning resumes its training).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from defectml.predictor.data import MATERIALS, material_split, unpack
from defectml.predictor.metrics import coordinate_mae, mean_metrics
from defectml.predictor.model import ModelConfig
from defectml.predictor.train import TrainSettings, evaluate, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]


def graph_atoms(g, disp: np.ndarray | None = None) -> Atoms:
    """The real atoms of a graph as ASE Atoms (optionally displaced)."""
    n = g.n_atoms
    pos = g.pos.numpy()[:n] + (0 if disp is None else disp[:n])
    return Atoms(numbers=g.z.numpy()[:n], positions=pos, cell=g.cell.numpy(), pbc=True)


def chgnet_relax(atoms: Atoms, calc, fmax: float, steps: int) -> tuple[Atoms, int]:
    from ase.optimize import FIRE

    work = atoms.copy()
    work.calc = calc
    opt = FIRE(work, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return work, int(opt.nsteps)


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "2dmd-high-density-pairs.tar.gz"))
    p.add_argument("--work", default=str(ROOT / "runs" / "definet"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chgnet-per-material", type=int, default=5)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    root = unpack(a.data, work / "cache")
    t0 = time.perf_counter()
    splits = {m: material_split(root, m, a.cutoff, work / "cache") for m in MATERIALS}
    t_graphs = time.perf_counter() - t0
    config = ModelConfig(features=a.features, layers=a.layers, cutoff=a.cutoff)
    settings = TrainSettings(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, threads=a.threads)
    train(
        [g for s in splits.values() for g in s.train],
        [g for s in splits.values() for g in s.val],
        work / "model.pt",
        config,
        settings,
    )
    model, ck = load_checkpoint(work / "model.pt")
    epoch_times = [h["time_s"] for h in ck["history"]]
    rows = {}
    from defectml.models import load_model

    chg = load_model("chgnet", threads=a.threads)
    for m, s in splits.items():
        res, t_inf = evaluate(model, s.test)
        dummy = mean_metrics([coordinate_mae(np.zeros((len(g.z), 3)), g) for g in s.test])
        row = {
            "model": res,
            "dummy": dummy,
            "inference_s": t_inf,
            "n_test": len(s.test),
            "improvement_A3": 1 - res["A3"] / dummy["A3"],
            "improvement_all": 1 - res["all"] / dummy["all"],
        }
        sub = s.test[: a.chgnet_per_material]
        if sub:
            c_rows, m_rows, d_rows, steps_u, steps_p, t_c = [], [], [], [], [], 0.0
            for g in sub:
                with torch.no_grad():
                    from defectml.predictor.model import Batch

                    disp = model(Batch([g])).numpy()
                t1 = time.perf_counter()
                relaxed, n_u = chgnet_relax(graph_atoms(g), chg.calculator, a.fmax, 500)
                t_c += time.perf_counter() - t1
                _, n_p = chgnet_relax(graph_atoms(g, disp), chg.calculator, a.fmax, 500)
                from ase.geometry import find_mic

                d_chg = find_mic(relaxed.positions - g.pos.numpy()[: g.n_atoms], g.cell.numpy(), True)[0]
                full = np.zeros((len(g.z), 3))
                full[: g.n_atoms] = d_chg
                c_rows.append(coordinate_mae(full, g))
                m_rows.append(coordinate_mae(disp, g))
                d_rows.append(coordinate_mae(np.zeros((len(g.z), 3)), g))
                steps_u.append(n_u)
                steps_p.append(n_p)
            row["chgnet_subset"] = {
                "n": len(sub),
                "chgnet": mean_metrics(c_rows),
                "model": mean_metrics(m_rows),
                "dummy": mean_metrics(d_rows),
                "chgnet_s_per_structure": t_c / len(sub),
                "steps_from_unrelaxed": float(np.mean(steps_u)),
                "steps_from_predicted": float(np.mean(steps_p)),
                "steps_saved": 1 - float(np.sum(steps_p)) / max(1, float(np.sum(steps_u))),
            }
        rows[m] = row
        print(
            m,
            json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row["model"].items()}),
            "dummy A3",
            round(dummy["A3"], 4),
            flush=True,
        )
    mean_gain = float(np.mean([r["improvement_A3"] for r in rows.values()]))
    doc = {
        "config": config.to_dict(),
        "train_settings": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "threads": a.threads},
        "n_train": sum(len(s.train) for s in splits.values()),
        "graph_build_s": t_graphs,
        "epoch_time_s": epoch_times,
        "best_val_loss_A": ck["best_val"],
        "materials": rows,
        "mean_improvement_A3": mean_gain,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "direct_predictor.json").write_text(json.dumps(doc, indent=2))
    md = [
        "# Direct relaxed-structure predictor on 2DMD (test split, 50 per material)",
        "",
        f"One model ({a.features} features, {a.layers} layers, cutoff {a.cutoff} A) trained jointly on "
        f"{doc['n_train']} pairs for {len(epoch_times)} epochs on this CPU ({a.threads} threads): "
        f"{np.mean(epoch_times):.0f} s/epoch. Rerun: `python benchmarks/direct_predictor.py`.",
        "",
        "Coordinate MAE (A), mean over real atoms and x/y/z; A3..A6 = atoms within 3..6 A of a defect site.",
        "",
        "| material | Dummy all | model all | Dummy A3 | model A3 | A4 | A5 | A6 | A3 gain | ms/structure |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        md.append(
            f"| {m} | {r['dummy']['all']:.4f} | {r['model']['all']:.4f} | {r['dummy']['A3']:.4f} | "
            f"{r['model']['A3']:.4f} | {r['model']['A4']:.4f} | {r['model']['A5']:.4f} | "
            f"{r['model']['A6']:.4f} | {r['improvement_A3']:.1%} | {1e3 * r['inference_s']:.0f} |"
        )
    md += [
        "",
        f"Mean A3 improvement over Dummy: **{mean_gain:.1%}** (target 70%).",
        "",
        f"CHGNet (0.3.0, FIRE fmax {a.fmax}) on the first {a.chgnet_per_material} test structures "
        "per material:",
        "",
        "| material | Dummy A3 | CHGNet A3 | model A3 | Dummy all | CHGNet all | model all | "
        "CHGNet s/structure | FIRE steps from unrelaxed | from predicted | steps saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        c = r.get("chgnet_subset")
        if c:
            md.append(
                f"| {m} | {c['dummy']['A3']:.4f} | {c['chgnet']['A3']:.4f} | {c['model']['A3']:.4f} | "
                f"{c['dummy']['all']:.4f} | {c['chgnet']['all']:.4f} | {c['model']['all']:.4f} | "
                f"{c['chgnet_s_per_structure']:.1f} | {c['steps_from_unrelaxed']:.0f} | "
                f"{c['steps_from_predicted']:.0f} | {c['steps_saved']:.0%} |"
            )
    (out / "direct_predictor.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
