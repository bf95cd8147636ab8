"""Facts about the 2DMD data and the reference's scoring that the README leans on (test split).

Per material: whether ``val.csv`` lists the same ids as ``train.csv`` (the reference stops early on
``val.csv``), the largest DFT displacement of any atom in any pair (the ``search --pre-relax`` guard
sits above it), and the benchmark ensembles' A3 gain counted two ways: with periodic images (ours)
and with neighbours in the cell only (the reference's ``torch.cdist`` on unwrapped positions).

    python benchmarks/predictor_reference_check.py [--models runs/definet/ensemble_l5]

Writes benchmarks/results/predictor_reference_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from defectml.predictor.data import MATERIALS, material_split, unpack
from defectml.predictor.graph import NodeType
from defectml.predictor.metrics import local_masks
from defectml.predictor.model import Batch
from defectml.predictor.train import load_predictor

ROOT = Path(__file__).resolve().parents[1]


def in_cell_a3(g) -> np.ndarray:
    """Real atoms within 3 A of a defect site, periodic images ignored (the reference's count)."""
    n = g.n_atoms
    pos, types = g.pos.numpy(), g.node_type.numpy()
    d = np.linalg.norm(pos[types != NodeType.PRISTINE][:, None, :] - pos[None, :n, :], axis=-1).min(0)
    return d < 3.0


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "2dmd-high-density-pairs.tar.gz"))
    p.add_argument("--work", default=str(ROOT / "runs" / "definet"))
    p.add_argument("--models", default=str(ROOT / "runs" / "definet" / "ensemble_l5"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(2)
    work = Path(a.work)
    root = unpack(a.data, work / "cache")
    rows = {}
    for m in MATERIALS:
        folder = root / m
        val, train = folder / "val.csv", folder / "train.csv"
        same = val.exists() and train.exists() and val.read_text().split() == train.read_text().split()
        split = material_split(root, m, 5.0, work / "cache")
        graphs = split.train + split.val + split.test
        largest = max(float(np.linalg.norm(g.target.numpy(), axis=1).max()) for g in graphs)
        model = load_predictor(sorted(str(q) for q in Path(a.models).glob(f"{m}*.pt")))
        ours, theirs = [], []
        for g in split.test:
            n = g.n_atoms
            with torch.no_grad():
                pred = model(Batch([g])).numpy()[:n]
            t = g.target.numpy()[:n]
            for out, mask in ((ours, local_masks(g)["A3"]), (theirs, in_cell_a3(g))):
                out.append((np.abs(t[mask]).mean(), np.abs(t[mask] - pred[mask]).mean()))
        gain = {k: float(1 - np.mean([r[1] for r in v]) / np.mean([r[0] for r in v]))
                for k, v in (("with_images", ours), ("in_cell", theirs))}
        rows[m] = {"val_equals_train": bool(same), "has_val_csv": val.exists(), "largest_dft_move_A": largest,
                   "a3_gain": gain}
        print(m, rows[m], flush=True)
    mean = {k: float(np.mean([r["a3_gain"][k] for r in rows.values()])) for k in ("with_images", "in_cell")}
    out = Path(a.out)
    (out / "predictor_reference_check.json").write_text(json.dumps({"materials": rows, "mean_a3_gain": mean},
                                                                   indent=2))
    md = ["# 2DMD facts and the reference's A3 count", "",
          "Rerun: `python benchmarks/predictor_reference_check.py` (models: the benchmark's ensembles).", "",
          "| material | val.csv = train.csv | largest DFT move (A) | A3 gain, images counted "
          "| A3 gain, in cell |",
          "|---|---|---|---|---|"]
    for m, r in rows.items():
        eq = ("yes" if r["val_equals_train"] else "no") if r["has_val_csv"] else "no val.csv"
        md.append(f"| {m} | {eq} | {r['largest_dft_move_A']:.2f} | {r['a3_gain']['with_images']:.1%} "
                  f"| {r['a3_gain']['in_cell']:.1%} |")
    md += ["", f"Mean A3 gain: {mean['with_images']:.1%} with images, {mean['in_cell']:.1%} in the cell."]
    (out / "predictor_reference_check.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
