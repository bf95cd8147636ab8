"""Where the direct predictor's error near the defects comes from, per material (2DMD test split).

For the atoms within 3 A of a defect site (the A3 atoms), over the first ``--n`` test structures:

* direction: mean cosine between the predicted and the DFT displacement, weighted by the DFT
  displacement's length (1 = every atom moves the right way);
* the same cosine for CHGNet's forces on the unrelaxed cell (would one force call, as an input
  feature, point the right way?);
* magnitude: mean predicted length / mean DFT length, for all A3 atoms and for those that move more
  than 0.3 A, and the share of the A3 error that comes from those far-moving atoms.

    python benchmarks/predictor_error_analysis.py [--models runs/definet/ensemble_l5] [--n 20]

Writes benchmarks/results/predictor_error_analysis.{json,md}. The models are the ones trained by
``benchmarks/direct_predictor.py`` (every <material>*.pt of the folder, averaged).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from defectml.predictor.data import MATERIALS, material_split, unpack
from defectml.predictor.metrics import local_masks
from defectml.predictor.model import Batch
from defectml.predictor.train import load_predictor

ROOT = Path(__file__).resolve().parents[1]
FAR = 0.3  # A: "far-moving" atoms
MOVE_CLASSES = ((0.0, 0.5), (0.5, 1.0), (1.0, np.inf))  # A: largest DFT displacement in a structure
SCALES = (1.0, 0.9, 1.1)  # factors on the predicted displacements (1.0 first: the model as it is)


def weighted_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine between rows of ``a`` and ``b``, weighted by the length of ``b`` (rows of zero skipped)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 1e-8) & (nb > 1e-8)
    if not ok.any():
        return float("nan")
    cos = (a[ok] * b[ok]).sum(1) / na[ok] / nb[ok]
    return float(np.sum(nb[ok] * cos) / nb[ok].sum())


def analyse(model, graphs, calc) -> dict:
    """The statistics above over ``graphs`` (A3 atoms pooled)."""
    pred, target, force = [], [], []
    for g in graphs:
        n = g.n_atoms
        mask = local_masks(g)["A3"]
        with torch.no_grad():
            pred.append(model(Batch([g])).numpy()[:n][mask])
        target.append(g.target.numpy()[:n][mask])
        atoms = Atoms(numbers=g.z.numpy()[:n], positions=g.pos.numpy()[:n], cell=g.cell.numpy(), pbc=True)
        atoms.calc = calc
        force.append(atoms.get_forces()[mask])
    p, t, f = (np.concatenate(x) for x in (pred, target, force))
    err = np.abs(p - t).sum(1)
    lp, lt = np.linalg.norm(p, axis=1), np.linalg.norm(t, axis=1)
    far = lt > FAR
    return {
        "a3_atoms": int(len(t)),
        "cosine_model": weighted_cosine(p, t),
        "cosine_chgnet_force": weighted_cosine(f, t),
        "length_ratio_all": float(lp.mean() / lt.mean()),
        "far_fraction": float(far.mean()),
        "length_ratio_far": float(lp[far].mean() / lt[far].mean()) if far.any() else float("nan"),
        "far_error_share": float(err[far].sum() / err.sum()),
    }


def _class_name(lo: float, hi: float) -> str:
    return f">= {lo:g} A" if np.isinf(hi) else f"{lo:g}-{hi:g} A"


def by_largest_move(model, graphs) -> dict:
    """Per-structure A3 errors grouped by the structure's largest DFT displacement (see module doc)."""
    rows = []
    for g in graphs:
        n = g.n_atoms
        mask = local_masks(g)["A3"]
        with torch.no_grad():
            pred = model(Batch([g])).numpy()[:n]
        t = g.target.numpy()[:n]
        largest = float(np.linalg.norm(t, axis=1).max())
        errors = [float(np.abs(t[mask] - f * pred[mask]).mean()) for f in SCALES]
        rows.append((largest, float(np.abs(t[mask]).mean()), *errors))
    a = np.array(rows)
    total_dummy = a[:, 1].sum()
    classes = {}
    for lo, hi in MOVE_CLASSES:
        sel = (a[:, 0] >= lo) & (a[:, 0] < hi)
        classes[_class_name(lo, hi)] = {
            "structures": int(sel.sum()),
            "dummy_share": float(a[sel, 1].sum() / total_dummy),
            "gain": float(1 - a[sel, 2].sum() / a[sel, 1].sum()) if sel.any() else None,
        }
    big = a[:, 0] >= 1.0
    return {
        "structures": len(rows),
        "gain": float(1 - a[:, 2].sum() / total_dummy),
        "classes": classes,
        "gain_if_exact_below_1A": float(1 - a[big, 2].sum() / total_dummy),
        "gain_scaled": {f"{f:g}": float(1 - a[:, 2 + k].sum() / total_dummy) for k, f in enumerate(SCALES)},
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "2dmd-high-density-pairs.tar.gz"))
    p.add_argument("--work", default=str(ROOT / "runs" / "definet"))
    p.add_argument("--models", default=str(ROOT / "runs" / "definet" / "ensemble_l5"))
    p.add_argument("--n", type=int, default=20, help="test structures per material")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from defectml.models import load_model

    calc = load_model("chgnet", threads=a.threads).calculator
    work = Path(a.work)
    root = unpack(a.data, work / "cache")
    rows = {}
    for m in MATERIALS:
        members = sorted(Path(a.models).glob(f"{m}.pt")) + sorted(Path(a.models).glob(f"{m}_s*.pt"))
        if not members:
            print(f"{m}: no model in {a.models}, skipped")
            continue
        model = load_predictor(members)
        split = material_split(root, m, model.config.cutoff, work / "cache")
        rows[m] = {
            "models": [str(x) for x in members],
            **analyse(model, split.test[: a.n], calc),
            "by_largest_move": by_largest_move(model, split.test),
        }
        print(m, json.dumps({k: v for k, v in rows[m].items() if k != "models"}), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictor_error_analysis.json").write_text(json.dumps({"n": a.n, "materials": rows}, indent=2))
    shown = Path(a.models).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    md = [
        f"# Direct predictor: error near the defects (A3 atoms of the first {a.n} test structures)",
        "",
        f"Models: {shown} (averaged). Rerun: `python benchmarks/predictor_error_analysis.py`. Cosines are "
        f"weighted by the DFT displacement's length; far = atoms whose DFT displacement exceeds {FAR} A.",
        "",
        "| material | A3 atoms | cos(model, DFT) | cos(CHGNet force, DFT) | pred/DFT length | far atoms "
        "| pred/DFT length, far | share of A3 error from far atoms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        md.append(
            f"| {m} | {r['a3_atoms']} | {r['cosine_model']:.2f} | {r['cosine_chgnet_force']:.2f} "
            f"| {r['length_ratio_all']:.2f} | {r['far_fraction']:.0%} | {r['length_ratio_far']:.2f} "
            f"| {r['far_error_share']:.0%} |"
        )
    names = [_class_name(lo, hi) for lo, hi in MOVE_CLASSES]
    md += [
        "",
        "All test structures, grouped by their largest DFT displacement: the group's number of structures, "
        "its share of the Dummy A3 error (sum over structures), and the model's A3 gain on it. 'Gain if "
        "exact below 1 A': the material's A3 gain if the model were exact on every structure whose atoms "
        "all move less than 1 A and unchanged on the rest. Last column: the gain, predictions scaled.",
        "",
        "| material | A3 gain | "
        + " | ".join(f"largest move {c}: structures, Dummy share, gain" for c in names)
        + " | gain if exact below 1 A | gain, predictions x0.9 / x1.1 |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for m, r in rows.items():
        c = r["by_largest_move"]
        cells = [
            f"{c['classes'][k]['structures']}, {c['classes'][k]['dummy_share']:.0%}, "
            + (f"{c['classes'][k]['gain']:.0%}" if c["classes"][k]["structures"] else "-")
            for k in names
        ]
        bound = c["gain_if_exact_below_1A"]
        scaled = f"{c['gain_scaled']['0.9']:.1%} / {c['gain_scaled']['1.1']:.1%}"
        md.append(f"| {m} | {c['gain']:.1%} | " + " | ".join(cells) + f" | {bound:.0%} | {scaled} |")
    (out / "predictor_error_analysis.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
