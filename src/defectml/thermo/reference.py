"""Chemical potentials: the element-rich limit from the MLIP's own elemental phase."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator
from ase.data import atomic_numbers, reference_states

from defectml.errors import DefectMLError

_CRYSTALS = {"fcc", "bcc", "hcp", "diamond", "sc"}

# Trigonal (A8, P3_121) Se and Te: helical chains, 3 atoms per cell; a, c (A) and the chain
# coordinate x (experimental). ASE lists them as "hcp" without a basis, which it cannot build.
_TRIGONAL = {"Se": (4.366, 4.954, 0.2254), "Te": (4.457, 5.929, 0.2636)}


def trigonal_chain(element: str) -> Atoms:
    """The trigonal (A8) ground state of Se or Te."""
    if element not in _TRIGONAL:
        raise DefectMLError(f"no trigonal structure for {element} (only {', '.join(_TRIGONAL)})")
    a, c, x = _TRIGONAL[element]
    cell = [[a, 0.0, 0.0], [-a / 2, a * np.sqrt(3) / 2, 0.0], [0.0, 0.0, c]]
    frac = np.mod([[x, 0.0, 1 / 3], [0.0, x, 2 / 3], [-x, -x, 0.0]], 1.0)
    return Atoms(f"{element}3", scaled_positions=frac, cell=cell, pbc=True)


def elemental_reference(element: str) -> Atoms:
    """Reference state of ``element``: ASE's crystal, trigonal Se/Te, or a diatomic molecule in a box."""
    if element in _TRIGONAL:
        return trigonal_chain(element)
    state = reference_states[atomic_numbers[element]] if element in atomic_numbers else None
    if not state:
        raise DefectMLError(f"no reference state for {element}: give --mu {element}=<eV/atom>")
    if state["symmetry"] in _CRYSTALS:
        try:
            return bulk(element)
        except ValueError:  # a crystal ASE names but cannot build (no basis)
            raise DefectMLError(
                f"{element}'s reference crystal ({state['symmetry']}) is not built here: give --mu "
                f"{element}=<eV/atom>"
            ) from None
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
