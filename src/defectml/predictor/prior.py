"""A universal MLIP's view of the unrelaxed structure, as extra inputs of the direct predictor.

One CHGNet call on the unrelaxed defect cell gives, per atom, its learned atom features (64 numbers
from the last interaction layer, trained on the Materials Project relaxations) and its force. The
predictor can take both (``ModelConfig.prior_features`` / ``force_prior``): the features carry
chemistry learned from far more DFT data than one material's few hundred pairs, the forces point
where the atoms are pushed. Vacancy placeholders get zeros. Priors are cached per structure id.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from defectml.errors import DefectMLError
from defectml.predictor.graph import DefectGraph

PRIOR_FEATURES = 64  # CHGNet 0.3.0 atom feature width


def needs_prior(model) -> bool:
    """Whether a predictor (or any member of an ensemble) takes MLIP priors as inputs."""
    configs = [m.config for m in getattr(model, "members", [model])]
    return any(c.prior_features or c.force_prior for c in configs)


@functools.lru_cache(maxsize=1)
def load_chgnet():
    """The CHGNet model shipped in its wheel (no download), loaded once per process."""
    from chgnet.model import CHGNet

    return CHGNet.load(verbose=False)


def mlip_prior(g: DefectGraph, chgnet) -> tuple[torch.Tensor, torch.Tensor]:
    """CHGNet atom features (nodes, 64) and forces (nodes, 3, eV/A) on the graph's unrelaxed atoms."""
    n = g.n_atoms
    structure = Structure(
        Lattice(g.cell.numpy().astype(np.float64)),
        g.z.numpy()[:n].tolist(),
        g.pos.numpy()[:n].astype(np.float64),
        coords_are_cartesian=True,
    )
    try:
        out = chgnet.predict_structure(structure, return_atom_feas=True)
    except Exception as exc:  # CHGNet raises plain exceptions for elements or graphs it cannot handle
        raise DefectMLError(f"CHGNet cannot evaluate this structure (predictor prior): {exc}") from None
    feat = torch.zeros(len(g.z), PRIOR_FEATURES)
    force = torch.zeros(len(g.z), 3)
    feat[:n] = torch.as_tensor(np.asarray(out["atom_fea"]), dtype=torch.float32)
    force[:n] = torch.as_tensor(np.asarray(out["f"]), dtype=torch.float32)
    if not (torch.isfinite(feat).all() and torch.isfinite(force).all()):
        raise DefectMLError("CHGNet returned non-finite features or forces for the predictor's prior")
    return feat, force


def attach_priors(
    graphs: Iterable[DefectGraph],
    ids: Iterable[str],
    cache: Path | None = None,
    chgnet=None,
    progress: Callable | None = None,
) -> None:
    """Set ``atom_prior`` and ``force_prior`` on every graph, computing only those not in ``cache``.

    The cache (a torch file mapping id -> (features, forces)) is rewritten after new entries, so an
    interrupted run keeps what it computed.
    """
    graphs, ids = list(graphs), list(ids)
    stored = torch.load(cache, weights_only=False) if cache is not None and cache.exists() else {}
    todo = [k for k, i in enumerate(ids) if i not in stored]
    if todo:
        chgnet = chgnet or load_chgnet()
        for n_done, k in enumerate(progress(todo) if progress else todo, 1):
            stored[ids[k]] = mlip_prior(graphs[k], chgnet)
            if cache is not None and (n_done % 50 == 0 or n_done == len(todo)):
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                torch.save(stored, tmp)
                tmp.replace(cache)
    for g, i in zip(graphs, ids, strict=True):
        g.atom_prior, g.force_prior = stored[i]
