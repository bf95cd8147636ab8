"""ASE's effective-medium potential (Al, Cu, Ag, Au, Ni, Pd, Pt): fast, for tests and demos."""

from __future__ import annotations

from defectml.models.model import Model
from defectml.models.ref import ModelRef


def load(ref: ModelRef) -> Model:
    """ASE's EMT calculator."""
    import ase
    from ase.calculators.emt import EMT, parameters

    return Model("emt", f"ase {ase.__version__} EMT", EMT(), ref, frozenset(parameters))
