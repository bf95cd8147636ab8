"""Apply a trained predictor: unrelaxed defect structure (+ pristine) -> relaxed structure."""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms

from defectml.errors import UntrustedPrediction
from defectml.predictor.graph import build_graph
from defectml.predictor.model import Batch, DefectRelaxNet, Ensemble, recycled
from defectml.predictor.prior import attach_priors, needs_prior


def predict_relaxed(
    model: DefectRelaxNet | Ensemble,
    unrelaxed: Atoms,
    pristine: Atoms,
    device: str = "cpu",
    reference: Atoms | None = None,
    max_move: float | None = None,
    passes: int = 1,
) -> Atoms:
    """``unrelaxed`` with every atom moved by the predicted displacement (cell unchanged).

    ``reference``: the undistorted defect cell (same atoms) from which node types are read when
    ``unrelaxed`` is a distorted trial. ``max_move`` (A): a prediction that moves any atom further
    is refused with :class:`UntrustedPrediction` (the network has left what it was trained on).
    ``passes`` > 1 applies the model again to its own prediction (:func:`recycled`).
    """
    if reference is not None:
        g = build_graph(reference, pristine, model.config.cutoff, positions=unrelaxed.positions)
    else:
        g = build_graph(unrelaxed, pristine, model.config.cutoff)
    if needs_prior(model):
        attach_priors([g], ["input"])
    with torch.no_grad():
        disp = recycled(model, Batch([g], device), passes).cpu().numpy()[: len(unrelaxed)]
    largest = float(np.linalg.norm(disp, axis=1).max()) if len(disp) else 0.0
    if not np.isfinite(disp).all() or (max_move is not None and largest > max_move):
        raise UntrustedPrediction(f"the predictor moves an atom by {largest:.1f} Å (limit {max_move} Å)")
    out = unrelaxed.copy()
    out.calc = None
    out.positions = unrelaxed.positions + disp.astype(np.float64)
    out.wrap()
    return out
