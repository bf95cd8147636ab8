"""Chemical potentials: the element-rich limit from the MLIP's own elemental phase."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator
from ase.data import atomic_numbers, reference_states

from defectml.errors import DefectMLError

_CRYSTALS = {"fcc", "bcc", "hcp", "diamond", "sc"}


def elemental_reference(element: str) -> Atoms:
    """ASE's reference state of ``element`` (crystal or diatomic molecule in a 15 A box)."""
    state = reference_states[atomic_numbers[element]] if element in atomic_numbers else None
    if not state:
        raise DefectMLError(f"no reference state for {element}: give --mu {element}=<eV/atom>")
    if state["symmetry"] in _CRYSTALS:
        return bulk(element)
    if state["symmetry"] == "diatom":
        m = Atoms(f"{element}2", positions=[[0, 0, 0], [0, 0, state["d"]]], cell=[15, 15.5, 16], pbc=True)
        m.center()
        return m
    raise DefectMLError(
        f"{element}'s reference state ({state['symmetry']}) is not built here: give --mu {element}=<eV/atom>"
    )


def elemental_mu(element: str, calculator: Calculator, fmax: float = 0.01, steps: int = 300) -> float:
    """Energy per atom of the relaxed elemental reference with ``calculator`` (element-rich limit)."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms = elemental_reference(element)
    atoms.calc = calculator
    is_molecule = reference_states[atomic_numbers[element]]["symmetry"] == "diatom"
    target = atoms if is_molecule else FrechetCellFilter(atoms)
    FIRE(target, logfile=None).run(fmax=fmax, steps=steps)
    e = float(atoms.get_potential_energy()) / len(atoms)
    if not np.isfinite(e):
        raise DefectMLError(f"the model gave a non-finite energy for elemental {element}")
    return e
