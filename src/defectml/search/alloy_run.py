"""An alloy search: one random supercell per composition, one search per local environment.

What ``defectml alloy`` runs and ``benchmarks/alloy_cdsete.py`` measures, in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pymatgen.core import Structure

from defectml.search.alloy import make_alloy
from defectml.search.distort import TrialSettings

log = logging.getLogger("defectml")

#: Pair distortions of an alloy search (every like-ion pair of the defect's neighbours): the
#: seed paper's compressions, where an alloy's mixed anion-anion bonds form.
DEFAULT_PAIR_DISTORTIONS = (-0.6, -0.5, -0.4, -0.3, -0.2)


def alloy_trials(trials: TrialSettings) -> TrialSettings:
    """An alloy search's trials: ``trials`` with every neighbour pair distorted.

    The pair distortions given, else :data:`DEFAULT_PAIR_DISTORTIONS`.
    """
    return replace(trials, all_pairs=True,
                   pair_distortions=trials.pair_distortions or DEFAULT_PAIR_DISTORTIONS)


def search_composition(host: Structure, substitute: tuple[str, str], x: float, defect, charges,
                       out: str | Path, settings, *, seed: int = 0, progress: bool = False,
                       log_fn: Callable[[str], None] = log.info, execution: dict | None = None):
    """Search one composition: make its random supercell (written as ``out/alloy``), then search it.

    ``settings``: the search's (``sites="environment"``: one defect per local environment); its
    ``min_length`` and ``max_atoms`` size the supercell too.

    Returns:
        ``(alloy, SearchResult)``.
    """
    from defectml.search.pipeline import search
    from defectml.structure_io import write_structure

    alloy = make_alloy(host, substitute, x, min_length=settings.min_length, max_atoms=settings.max_atoms,
                       seed=seed)
    out = Path(out)
    write_structure(alloy, out / "alloy")
    log_fn(f"x = {x:g}: {alloy.composition.formula} ({len(alloy)} atoms)")
    result = search(alloy, defect, charges, out=out, settings=settings, progress=progress, log_fn=log_fn,
                    **(execution or {}))
    return alloy, result
