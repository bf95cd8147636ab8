"""Coordinate errors against DFT-relaxed structures, overall and near the defects."""

from __future__ import annotations

import numpy as np

from defectml.predictor.graph import DefectGraph

RADII = (3.0, 4.0, 5.0, 6.0)


def local_masks(g: DefectGraph, radii=RADII) -> dict[str, np.ndarray]:
    """Real atoms within each radius of any defect site (periodic images included), plus ``all``."""
    real = g.real.numpy()
    n = g.n_atoms
    masks = {"all": real[:n]}
    d = g.defect_distance().numpy()[:n]
    for r in radii:
        masks[f"A{r:g}"] = real[:n] & (d <= r)
    return masks


def coordinate_mae(pred_disp: np.ndarray, g: DefectGraph, radii=RADII) -> dict[str, float]:
    """Mean |predicted - relaxed| over real atoms and x/y/z (A), overall and within each radius.

    Displacements are periodic-image aware (the targets were taken with the minimum image).
    """
    n = g.n_atoms
    err = np.abs(np.asarray(pred_disp)[:n] - g.target.numpy()[:n])
    out = {}
    for name, m in local_masks(g, radii).items():
        out[name] = float(err[m].mean()) if m.any() else float("nan")
    return out


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Average each metric over structures (ignoring structures without atoms in a shell)."""
    keys = rows[0].keys() if rows else []
    return {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
