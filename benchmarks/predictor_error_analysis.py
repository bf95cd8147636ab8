"""Where the direct predictor's error near the defects comes from, per material (2DMD test split).

For the atoms within 3 A of a defect site (the A3 atoms), over the first ``--n`` test structures:

* direction: mean cosine between the predicted and the DFT displacement, weighted by the DFT
  displacement's length (1 = every atom moves the right way);
* the same cosine for CHGNet's forces on the unrelaxed cell (would one force call, as an input
  feature, point the right way?);
* magnitude: mean predicted length / mean DFT length, for all A3 atoms and for those that move more
  than 0.3 A, and the share of the A3 error that comes from those far-moving atoms.

    python benchmarks/predictor_error_analysis.py [--models runs/definet/ensemble] [--n 20]

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


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "2dmd-high-density-pairs.tar.gz"))
    p.add_argument("--work", default=str(ROOT / "runs" / "definet"))
    p.add_argument("--models", default=str(ROOT / "runs" / "definet" / "ensemble"))
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
        rows[m] = {"models": [str(x) for x in members], **analyse(model, split.test[: a.n], calc)}
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
    (out / "predictor_error_analysis.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
