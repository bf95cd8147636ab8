"""Relaxing structures with an interatomic potential, and catching relaxations that go wrong.

The core is a pure function, :func:`relax_structures`: "relax these N structures with this
calculator" → one :class:`Relaxation` per structure, yielded as each finishes so the caller can
store it at once. It knows nothing of defects or trials; a batched engine can replace it without
touching anything upstream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.neighborlist import neighbor_list
from ase.optimize import FIRE

CONVERGED = "converged"
UNCONVERGED = "unconverged"
FAILED = "failed"


@dataclass
class Relaxation:
    """The outcome of one relaxation.

    Attributes:
        atoms: The final structure (last good geometry if the relaxation failed).
        energy: Final total energy (eV), ``None`` if never evaluated finitely.
        forces: Final forces (eV/Å), ``None`` if unavailable.
        steps: Optimiser steps taken.
        status: ``converged``, ``unconverged`` (step limit hit) or ``failed``.
        reason: Why it failed or did not converge (empty when converged).
        seconds: Wall time.
    """

    atoms: Atoms
    energy: float | None
    forces: np.ndarray | None
    steps: int
    status: str
    reason: str = ""
    seconds: float = 0.0


class RelaxationFailure(Exception):
    """Raised inside an optimisation when the geometry or the model output is unphysical."""


def closest_pair_below(atoms: Atoms, cutoff: float) -> float | None:
    """Shortest interatomic distance if it is below ``cutoff`` Å, else ``None``."""
    if len(atoms) < 2:
        return None
    d = neighbor_list("d", atoms, cutoff)
    return float(d.min()) if len(d) else None


def _guard(atoms: Atoms, min_distance: float) -> None:
    """Raise :class:`RelaxationFailure` on non-finite output or atoms too close."""
    results = atoms.calc.results if atoms.calc is not None else {}
    energy = results.get("energy")
    forces = results.get("forces")
    if energy is not None and not np.isfinite(energy):
        raise RelaxationFailure("non-finite energy (NaN/inf)")
    if forces is not None and not np.all(np.isfinite(forces)):
        raise RelaxationFailure("non-finite forces (NaN/inf)")
    if not np.all(np.isfinite(atoms.positions)):
        raise RelaxationFailure("non-finite positions")
    d = closest_pair_below(atoms, min_distance)
    if d is not None:
        raise RelaxationFailure(f"atoms {d:.2f} Å apart (< {min_distance} Å)")


def relax_one(
    atoms: Atoms,
    calculator: Calculator,
    *,
    fmax: float = 0.05,
    max_steps: int = 1500,
    min_distance: float = 0.5,
) -> Relaxation:
    """Relax one structure at fixed cell with FIRE until max force < ``fmax`` (eV/Å).

    Never raises for a bad relaxation: failures come back with ``status="failed"`` and a reason.
    """
    start = time.perf_counter()
    work = atoms.copy()
    work.calc = calculator
    last_good = work.copy()
    opt = FIRE(work, logfile=None)

    def check() -> None:
        _guard(work, min_distance)
        last_good.positions[:] = work.positions

    opt.attach(check, interval=1)
    try:
        d = closest_pair_below(work, min_distance)
        if d is not None:
            raise RelaxationFailure(f"atoms {d:.2f} Å apart (< {min_distance} Å) at the start")
        converged = bool(opt.run(fmax=fmax, steps=max_steps))
        _guard(work, min_distance)
        energy = float(work.get_potential_energy())
        forces = np.array(work.get_forces())
    except RelaxationFailure as exc:
        return _failed(last_good, opt.nsteps, str(exc), start)
    except Exception as exc:  # noqa: BLE001 - a model crash must not kill the search
        return _failed(last_good, opt.nsteps, f"model error: {type(exc).__name__}: {exc}", start)
    final = work.copy()
    final.calc = None
    status = CONVERGED if converged else UNCONVERGED
    reason = "" if converged else f"max force above {fmax} eV/Å after {max_steps} steps"
    return Relaxation(final, energy, forces, opt.nsteps, status, reason, time.perf_counter() - start)


def _failed(atoms: Atoms, steps: int, reason: str, start: float) -> Relaxation:
    final = atoms.copy()
    final.calc = None
    return Relaxation(final, None, None, steps, FAILED, reason, time.perf_counter() - start)


def relax_structures(
    structures: Iterable[Atoms],
    calculator: Calculator,
    *,
    fmax: float = 0.05,
    max_steps: int = 1500,
    min_distance: float = 0.5,
) -> Iterator[Relaxation]:
    """Relax each structure in turn; yield each :class:`Relaxation` as soon as it is done."""
    for atoms in structures:
        yield relax_one(
            atoms, calculator, fmax=fmax, max_steps=max_steps, min_distance=min_distance
        )


def relax_host(atoms: Atoms, calculator: Calculator, fmax: float = 0.01, max_steps: int = 500):
    """Relax a bulk host's cell and positions, keeping its space-group symmetry.

    Returns:
        ``(relaxed_atoms, energy)``; the energy is that of the relaxed cell given.
    """
    from ase.constraints import FixSymmetry
    from ase.filters import FrechetCellFilter

    work = atoms.copy()
    work.calc = calculator
    work.set_constraint(FixSymmetry(work, symprec=1e-3))
    opt = FIRE(FrechetCellFilter(work), logfile=None)
    opt.run(fmax=fmax, steps=max_steps)
    energy = float(work.get_potential_energy())
    if not np.isfinite(energy):
        raise RelaxationFailure("host relaxation gave a non-finite energy")
    work.set_constraint()
    out = work.copy()
    out.calc = None
    return out, energy
