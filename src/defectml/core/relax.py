"""Relaxing structures with an interatomic potential, and catching relaxations that go wrong.

One relaxer: :func:`relax_batched` runs ASE's FIRE (same defaults, tested equal) on a batch of
structures with one model call per step for all of them, checks every step (non-finite output,
atoms too close, an optional early-stop watch) and records every frame; the atoms' own constraints
(``FixSymmetry``, ``FixAtoms``) hold, as in ASE's optimisers. :func:`relax_one` is the
batch of one, so a result never depends on the executor or the batch size it ran with. It knows
nothing of defects or trials: "relax these N structures" → one :class:`Relaxation` each, yielded
as each finishes so the caller can store it at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.neighborlist import neighbor_list
from ase.optimize import FIRE

from defectml.core.optimizers import DEFAULT_OPTIMIZER, make_optimizer
from defectml.errors import InputError
from defectml.models.model import BatchFn, calculator_batch_fn
from defectml.records import Trajectory
from defectml.settings import FromOptions

CONVERGED = "converged"
UNCONVERGED = "unconverged"
FAILED = "failed"
IN_BASIN = "in_basin"  # stopped early: reached the basin of an already relaxed minimum


@dataclass(frozen=True)
class RelaxSettings(FromOptions):
    """How a set of relaxations runs.

    Attributes:
        fmax: Force threshold (eV/Å).
        max_steps: Step limit of each relaxation.
        batch_size: Structures relaxed together (one model call per step for all of them).
        early_stop: Stop a relaxation once it reaches the basin of one already relaxed (the
            caller's watch decides what a basin is).
    """

    fmax: float = 0.05
    max_steps: int = 1500
    batch_size: int = 1
    early_stop: bool = False

    def validate(self) -> None:
        """Raise ``InputError`` for values no relaxation can run with."""
        if self.fmax <= 0 or self.max_steps < 1 or self.batch_size < 1:
            raise InputError(f"fmax must be positive, and max steps and the batch size at least 1; got "
                             f"{self.fmax}, {self.max_steps} and {self.batch_size}")


@dataclass
class Relaxation:
    """The outcome of one relaxation.

    Attributes:
        atoms: The final structure (last good geometry if the relaxation failed).
        energy: Final total energy (eV), ``None`` if never evaluated finitely.
        forces: Final forces (eV/Å), ``None`` if unavailable.
        steps: Optimiser steps taken.
        status: ``converged``, ``unconverged`` (step limit hit) or ``failed``.
        reason: Why it failed, did not converge or was stopped (empty when converged).
        seconds: Wall time.
        basin_of: For ``in_basin``: the name of the relaxed trial whose basin it reached.
        trajectory: Every evaluated frame (positions, energy, forces, cell), when recorded.
    """

    atoms: Atoms
    energy: float | None
    forces: np.ndarray | None
    steps: int
    status: str
    reason: str = ""
    seconds: float = 0.0
    basin_of: str | None = None
    trajectory: Trajectory | None = None


class RelaxationFailure(Exception):
    """Raised inside an optimisation when the geometry or the model output is unphysical."""


def closest_pair_below(atoms: Atoms, cutoff: float) -> float | None:
    """Shortest interatomic distance if it is below ``cutoff`` Å, else ``None``."""
    if len(atoms) < 2:
        return None
    d = neighbor_list("d", atoms, cutoff)
    return float(d.min()) if len(d) else None


def relax_one(
    atoms: Atoms,
    calculator: Calculator,
    *,
    fmax: float = 0.05,
    max_steps: int = 1500,
    min_distance: float = 0.5,
    watch: Callable[[Atoms, float, int], str | None] | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
) -> Relaxation:
    """Relax one structure at fixed cell with FIRE until max force < ``fmax`` (eV/Å).

    The batch of one of :func:`relax_batched`: the same optimiser, checks and records.
    Never raises for a bad relaxation: failures come back with ``status="failed"`` and a reason.

    Args:
        atoms: Starting structure.
        calculator: ASE calculator.
        fmax: Force threshold (eV/Å).
        max_steps: Step limit.
        min_distance: Atoms closer than this (Å) fail the relaxation.
        watch: Optional early stop: called as ``watch(atoms, energy, step)`` before each step;
            a returned name stops the relaxation with status ``in_basin`` (it has reached the
            basin of that already relaxed trial, so finishing it would add nothing).
        optimizer: One of :data:`~defectml.core.optimizers.OPTIMIZERS`.
    """
    ((_, result),) = relax_batched([atoms], calculator_batch_fn(calculator), fmax=fmax,
                                   max_steps=max_steps, min_distance=min_distance, max_batch=1,
                                   watches=[watch], optimizer=optimizer)
    return result


def _failed(atoms: Atoms, steps: int, reason: str, start: float,
            trajectory: Trajectory | None = None) -> Relaxation:
    final = atoms.copy()
    final.calc = None
    return Relaxation(final, None, None, steps, FAILED, reason, time.perf_counter() - start,
                      trajectory=trajectory)


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


@dataclass
class _State:
    """One structure of a batch: its atoms, its optimiser's state, its recorded frames."""

    index: int
    atoms: Atoms
    start: float
    optimizer: object
    watch: Callable[[Atoms, float, int], str | None] | None = None
    frames: list = field(default_factory=list)  # (positions, energy, forces) per evaluation
    steps: int = 0
    last_good: np.ndarray | None = None
    memory: float = 0.0  # estimated bytes in a batched call (0: not estimated)

    def record(self, energy: float, forces: np.ndarray) -> None:
        self.frames.append((self.atoms.positions.copy(), float(energy), np.array(forces)))

    def trajectory(self) -> Trajectory | None:
        if not self.frames:
            return None
        pos, energies, forces = zip(*self.frames, strict=True)
        cell = self.atoms.cell.array
        return Trajectory(np.array(pos), np.array(energies), np.array(forces),
                          np.repeat(cell[None], len(pos), axis=0))

    def step(self, energy: float, forces: np.ndarray) -> None:
        self.optimizer.step(self.atoms, energy, forces)
        self.steps += 1


def relax_batched(
    structures: Iterable[Atoms],
    batch_fn: BatchFn,
    *,
    fmax: float = 0.05,
    max_steps: int = 1500,
    min_distance: float = 0.5,
    max_batch: int = 16,
    watches: list | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
    max_memory: float | None = None,
    memory_fn: Callable[[Atoms], float | None] | None = None,
) -> Iterator[tuple[int, Relaxation]]:
    """Relax many structures together: one ``batch_fn`` call per optimisation step for all.

    One optimiser state per structure (``optimizer``, :mod:`~defectml.core.optimizers`; FIRE
    with ASE's defaults unless asked); finished structures leave the batch and waiting ones enter
    (in flight), up to ``max_batch`` at a time and, with ``max_memory``, while the batch's
    estimated memory (``memory_fn``, bytes per structure, e.g. :meth:`Model.memory
    <defectml.models.model.Model.memory>`) stays within it; a structure larger than the budget
    runs alone. ``watches``: one early-stop check per structure (or ``None``), see
    :func:`relax_one`.

    Yields:
        ``(input index, Relaxation)`` as each finishes (not in input order).
    """
    make_optimizer(optimizer)  # an unknown name fails before any work
    structures = list(structures)
    watches = list(watches) if watches is not None else [None] * len(structures)
    costs = [_memory(a, max_memory, memory_fn) for a in structures]
    waiting = list(zip(range(len(structures)), structures, watches, costs, strict=True))[::-1]
    active: list[_State] = []
    while waiting or active:
        while waiting and _admits(active, waiting[-1][3], max_batch, max_memory):
            i, a, w, cost = waiting.pop()
            st = _State(i, a.copy(), time.perf_counter(), make_optimizer(optimizer), watch=w, memory=cost)
            st.atoms.calc = None
            st.last_good = st.atoms.positions.copy()
            d = closest_pair_below(st.atoms, min_distance)
            if d is not None:
                yield i, _failed(st.atoms, 0, f"atoms {d:.2f} Å apart (< {min_distance} Å) "
                                 "at the start", st.start)
                continue
            active.append(st)
        if not active:
            continue
        try:
            results = batch_fn([st.atoms for st in active])
        except Exception as exc:  # noqa: BLE001 - fall back to one by one to isolate the culprit
            results = []
            for st in active:
                try:
                    results.append(batch_fn([st.atoms])[0])
                except Exception as one:  # noqa: BLE001
                    results.append(one if isinstance(one, Exception) else exc)
        still = []
        for st, res in zip(active, results, strict=True):
            done = _advance(st, res, fmax, max_steps, min_distance)
            if done is None:
                still.append(st)
            else:
                yield st.index, done
        active = still


def _memory(atoms: Atoms, max_memory: float | None, memory_fn) -> float:
    """A structure's estimated bytes in a batched call (0 when batches are not filled by memory)."""
    if max_memory is None or memory_fn is None:
        return 0.0
    return float(memory_fn(atoms) or 0.0)


def _admits(active: list[_State], cost: float, max_batch: int, max_memory: float | None) -> bool:
    """Whether a waiting structure of ``cost`` bytes may join the batch (an empty one takes any)."""
    if len(active) >= max_batch:
        return False
    if not active or max_memory is None:
        return True
    return sum(st.memory for st in active) + cost <= max_memory


def constrained_forces(atoms: Atoms, forces: np.ndarray) -> np.ndarray:
    """``forces`` as ``atoms``' constraints (``FixSymmetry``, ``FixAtoms``, ...) leave them.

    What convergence is judged on and what the optimiser steps along, as ASE's optimisers do; the
    positions they move to are adjusted by the same constraints (``Atoms.set_positions``).
    """
    if not atoms.constraints:
        return forces
    out = np.array(forces, dtype=float)
    for c in atoms.constraints:
        c.adjust_forces(atoms, out)
    return out


def _advance(st: _State, res, fmax: float, max_steps: int, min_distance: float):
    """Check one structure of the batch, then step it; a :class:`Relaxation` when finished."""
    if isinstance(res, Exception):
        return _failed_at(st, f"model error: {type(res).__name__}: {res}")
    energy, forces = res
    if not np.isfinite(energy):
        return _failed_at(st, "non-finite energy (NaN/inf)")
    if not np.all(np.isfinite(forces)):
        return _failed_at(st, "non-finite forces (NaN/inf)")
    d = closest_pair_below(st.atoms, min_distance)
    if d is not None:
        return _failed_at(st, f"atoms {d:.2f} Å apart (< {min_distance} Å)")
    st.last_good = st.atoms.positions.copy()
    st.record(energy, forces)  # the model's own forces: what a trajectory's frames are labelled with
    forces = constrained_forces(st.atoms, forces)
    fmax_now = float(np.sqrt((forces**2).sum(axis=1)).max())
    if fmax_now < fmax or st.steps >= max_steps:
        converged = fmax_now < fmax
        reason = "" if converged else f"max force above {fmax} eV/Å after {max_steps} steps"
        return Relaxation(st.atoms.copy(), float(energy), np.array(forces), st.steps,
                          CONVERGED if converged else UNCONVERGED, reason,
                          time.perf_counter() - st.start, trajectory=st.trajectory())
    if st.watch is not None and st.steps > 0:
        basin = st.watch(st.atoms, float(energy), st.steps)
        if basin is not None:
            return Relaxation(st.atoms.copy(), float(energy), np.array(forces), st.steps, IN_BASIN,
                              f"stopped at step {st.steps}: in the basin of {basin}",
                              time.perf_counter() - st.start, basin_of=basin,
                              trajectory=st.trajectory())
    st.step(float(energy), forces)
    return None


def _failed_at(st: _State, reason: str) -> Relaxation:
    atoms = st.atoms.copy()
    atoms.positions[:] = st.last_good
    return _failed(atoms, st.steps, reason, st.start, st.trajectory())
