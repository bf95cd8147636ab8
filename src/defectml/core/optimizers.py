"""The optimisers the batched relaxer drives: each takes one step from forces it is given.

The relaxer evaluates every structure of a batch in one model call, then asks each structure's
optimiser for its next positions. ``fire`` is ASE's FIRE with its defaults (our own copy, tested
equal to ASE's); the others are ASE's own optimisers, handed the batch's energy and forces
through a :class:`~ase.calculators.singlepoint.SinglePointCalculator` at the current positions, so
that any ASE optimiser that asks only for the forces where the atoms are can run batched. ASE's
line-search optimisers (``BFGSLineSearch``, ``PreconLBFGS``) and ``FIRE2`` (which steps back
half a step and asks again) need the model elsewhere than where the atoms are: not batchable this
way, not offered.

``benchmarks/optimizers.py`` measures steps, time and the minima each reaches
(``benchmarks/results/optimizers.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from defectml.errors import InputError

MAXSTEP = 0.2  # Å: ASE's default largest move per step, for every optimiser here


@dataclass
class Fire:
    """ASE's FIRE (the defaults of ``ase.optimize.FIRE``) for one structure."""

    vel: np.ndarray | None = None
    dt: float = 0.1
    a: float = 0.1
    n_pos: int = 0

    def step(self, atoms: Atoms, energy: float, forces: np.ndarray) -> None:
        """Move ``atoms`` one FIRE step along ``forces``."""
        if self.vel is None:
            self.vel = np.zeros_like(forces)
        else:
            vf = np.vdot(forces, self.vel)
            if vf > 0.0:
                self.vel = (1.0 - self.a) * self.vel + self.a * forces / np.sqrt(
                    np.vdot(forces, forces)) * np.sqrt(np.vdot(self.vel, self.vel))
                if self.n_pos > 5:
                    self.dt = min(self.dt * 1.1, 1.0)
                    self.a *= 0.99
                self.n_pos += 1
            else:
                self.vel[:] = 0.0
                self.a = 0.1
                self.dt *= 0.5
                self.n_pos = 0
        self.vel += self.dt * forces
        dr = self.dt * self.vel
        norm = np.sqrt(np.vdot(dr, dr))
        if norm > MAXSTEP:
            dr *= MAXSTEP / norm
        atoms.set_positions(atoms.positions + dr)  # through the atoms' constraints, as ASE's FIRE


class AseStep:
    """One of ASE's optimisers, made on the first step, fed the given energy and forces."""

    def __init__(self, make: Callable[[Atoms], object]):
        self.make = make
        self.opt = None

    def step(self, atoms: Atoms, energy: float, forces: np.ndarray) -> None:
        """Move ``atoms`` one step of the ASE optimiser."""
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        try:
            if self.opt is None:
                self.opt = self.make(atoms)
            self.opt.step()
        finally:
            atoms.calc = None


def _lbfgs(atoms: Atoms):
    from ase.optimize import LBFGS

    return LBFGS(atoms, logfile=None, maxstep=MAXSTEP)


def _bfgs(atoms: Atoms):
    from ase.optimize import BFGS

    return BFGS(atoms, logfile=None, maxstep=MAXSTEP)


def _precon_fire(atoms: Atoms):
    from ase.optimize.precon import Exp, PreconFIRE

    # mu fixed: estimating it asks the model for forces at displaced positions (not batchable)
    return PreconFIRE(atoms, logfile=None, maxmove=MAXSTEP, precon=Exp(mu=PRECON_MU), use_armijo=False)


PRECON_MU = 1.0  # eV/Å²: the Exp preconditioner's energy scale (see benchmarks/optimizers.py)

#: The default: no other optimiser here took fewer steps on every host measured (benchmarks/optimizers.py).
DEFAULT_OPTIMIZER = "fire"
_ASE = {"lbfgs": _lbfgs, "bfgs": _bfgs, "precon-fire": _precon_fire}
OPTIMIZERS = ("fire", *_ASE)


def make_optimizer(name: str):
    """A fresh optimiser state for one structure (``step(atoms, energy, forces)``).

    Raises:
        InputError: an unknown name.
    """
    if name == "fire":
        return Fire()
    if name not in _ASE:
        raise InputError(f"unknown optimiser {name!r}: use one of {', '.join(OPTIMIZERS)}")
    return AseStep(_ASE[name])
