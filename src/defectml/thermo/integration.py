"""Anharmonic free energies by non-equilibrium thermodynamic integration, driven by an MLIP.

Two paths, as in calphy (Freitas et al., Comput. Mater. Sci. 2016; de Koning et al., PRL 1999):

1. **Frenkel-Ladd** at T0: switch H(lambda) = (1 - lambda) U_model + lambda U_Einstein from the
   model to an Einstein crystal and back; F_model(T0) = F_Einstein(T0) - (W_forward - W_backward)/2.
2. **Reversible scaling** from T0 to T1: at T0 scale the potential, H = lambda U_model with lambda
   from 1 to T0/T1, which samples the unscaled system at T = T0/lambda; then
   F(T) = F(T0)/lambda + (3N-3)/2 kT ln(lambda) + W(lambda)/lambda.

LAMMPS + calphy cannot drive our PyTorch MLIPs here (no LAMMPS plugin for CHGNet/SevenNet-0 in
this environment), so the integrator is ours: BAOAB Langevin dynamics (Leimkuhler & Matthews 2013)
with the centre of mass fixed exactly (forces and noise projected mass-weighted; ASE's own
``fixcm`` Langevin is documented as not sampling NVT exactly). Free energies are classical and
use one convention throughout: the 3N-3 non-COM degrees of freedom, so a harmonic crystal gives
kT sum_k ln(hbar w_k / kT) (:func:`harmonic_reference`); :func:`frenkel_ladd` on such a crystal
reproduces it within the error bar (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.units import kB

from defectml.errors import DefectMLError

HBAR = units._hbar * units.J * units.s  # eV * ASE time
Evaluate = Callable[[np.ndarray], tuple[float, np.ndarray]]


def switching(tau: np.ndarray) -> np.ndarray:
    """Smooth switching function lambda(tau), tau in [0, 1] (zero slope at both ends)."""
    t = np.asarray(tau, float)
    return t**5 * (70 * t**4 - 315 * t**3 + 540 * t**2 - 420 * t + 126)


def model_evaluator(atoms: Atoms, calculator: Calculator) -> Evaluate:
    """Positions -> (energy, forces) with ``calculator`` on a private copy of ``atoms``."""
    work = atoms.copy()
    work.calc = calculator

    def evaluate(positions: np.ndarray) -> tuple[float, np.ndarray]:
        work.positions = positions
        e = float(work.get_potential_energy())
        f = np.asarray(work.get_forces(), float)
        if not np.isfinite(e) or not np.all(np.isfinite(f)):
            raise DefectMLError("the model returned NaN during thermodynamic integration")
        return e, f

    return evaluate


class Integrator:
    """BAOAB Langevin dynamics at fixed centre of mass for H = a U_model + b U_Einstein.

    Args:
        atoms: Starting structure (its positions are the Einstein lattice sites).
        evaluate: positions -> (model energy, model forces).
        temperature: T (K).
        timestep: fs.
        friction: Langevin friction (1/fs).
        springs: Einstein spring constant per atom (eV/A^2); may be set later.
        seed: Random seed.
    """

    def __init__(
        self,
        atoms: Atoms,
        evaluate: Evaluate,
        temperature: float,
        timestep: float = 2.0,
        friction: float = 0.01,
        springs: np.ndarray | None = None,
        seed: int = 0,
    ):
        self.m = atoms.get_masses()[:, None]
        self.M = float(self.m.sum())
        self.r0 = atoms.positions.copy()
        self.x = atoms.positions.copy()
        self.evaluate = evaluate
        self.kT = kB * temperature
        self.dt = timestep * units.fs
        self.c = np.exp(-friction / units.fs * self.dt)
        self.rng = np.random.default_rng(seed)
        self.k = np.zeros(len(atoms)) if springs is None else np.asarray(springs, float)
        self.a, self.b = 1.0, 0.0
        self.v = self._project(self.rng.standard_normal(self.x.shape) * np.sqrt(self.kT / self.m))
        self._eval()

    def _project(self, v: np.ndarray) -> np.ndarray:
        return v - (self.m * v).sum(axis=0) / self.M

    def _eval(self) -> None:
        self.u_model, self.f_model = self.evaluate(self.x)
        d = self.x - self.r0
        self.u_einstein = float(0.5 * np.sum(self.k[:, None] * d * d))
        self.f_einstein = -self.k[:, None] * d
        self._mix()

    def _mix(self) -> None:
        f = self.a * self.f_model + self.b * self.f_einstein
        self.f = f - self.m * f.sum(axis=0) / self.M  # no net force on the centre of mass

    def set_weights(self, a: float, b: float) -> None:
        """Set H = a U_model + b U_Einstein (forces at the current positions are re-mixed)."""
        self.a, self.b = a, b
        self._mix()

    def step(self) -> None:
        """One BAOAB step."""
        self.v += 0.5 * self.dt * self.f / self.m
        self.x += 0.5 * self.dt * self.v
        noise = self.rng.standard_normal(self.x.shape) * np.sqrt((1 - self.c**2) * self.kT / self.m)
        self.v = self._project(self.c * self.v + noise)
        self.x += 0.5 * self.dt * self.v
        self._eval()
        self.v += 0.5 * self.dt * self.f / self.m

    def run(self, steps: int) -> None:
        """Plain dynamics at the current weights."""
        for _ in range(steps):
            self.step()

    def switch(
        self, schedule: np.ndarray, weights: Callable[[float], tuple[float, float]], du: Callable[[], float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Drive lambda along ``schedule``; return lambda and the cumulative work at each step.

        The work increment is dH/dlambda at fixed positions times the change of lambda.
        """
        work = np.zeros(len(schedule))
        for i in range(1, len(schedule)):
            work[i] = work[i - 1] + du() * (schedule[i] - schedule[i - 1])
            self.set_weights(*weights(schedule[i]))
            self.step()
        return np.asarray(schedule), work


def einstein_free_energy(masses: np.ndarray, springs: np.ndarray, temperature: float) -> float:
    """Classical Einstein-crystal free energy with the centre of mass fixed (eV).

    Exact for the 3N-3 convention: the Einstein partition function restricted to a fixed centre
    of mass, with the same mass factors as :func:`harmonic_reference`.
    """
    m = np.asarray(masses, float)
    k = np.asarray(springs, float)
    kT = kB * temperature
    w2 = k / m  # (eV/A^2)/amu = 1/t^2 in ASE units
    n = len(m)
    log_q = (
        1.5 * np.sum(np.log(2 * np.pi * kT / w2))
        - 1.5 * np.log(2 * np.pi * kT * np.sum(m / m.sum() / w2))
        - 1.5 * (n - 1) * np.log(2 * np.pi * HBAR**2 / kT)
    )
    return float(-kT * log_q)


def harmonic_reference(hessian: np.ndarray, masses: np.ndarray, temperature: float) -> float:
    """Classical harmonic free energy kT sum ln(hbar w / kT) over the 3N-3 non-zero modes (eV)."""
    m = np.repeat(np.asarray(masses, float), 3)
    d = hessian / np.sqrt(np.outer(m, m))
    w2 = np.sort(np.linalg.eigvalsh(0.5 * (d + d.T)))[3:]
    if np.any(w2 <= 0):
        raise DefectMLError("the Hessian has imaginary modes: not a harmonic minimum")
    kT = kB * temperature
    return float(kT * np.sum(np.log(HBAR * np.sqrt(w2) / kT)))


@dataclass
class TIResult:
    """Free energies from repeated non-equilibrium TI runs.

    Attributes:
        temperature: T0 (K) of the Frenkel-Ladd path.
        free_energy: Mean F(T0) (eV, absolute: includes the model's static energy).
        error: Standard error of the mean over the repeats (eV).
        repeats: F(T0) of each repeat.
        dissipation: Mean (W_f + W_b)/2 of the switching (eV): large values mean switch slower.
        springs: Einstein spring constants per atom (eV/A^2).
        temperatures: Reversible-scaling temperatures (K), when run.
        free_energy_t: Mean F(T) on that grid.
        error_t: Standard error of F(T).
    """

    temperature: float
    free_energy: float
    error: float
    repeats: list[float]
    dissipation: float
    springs: np.ndarray
    temperatures: np.ndarray = field(default_factory=lambda: np.zeros(0))
    free_energy_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    error_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    settings: dict = field(default_factory=dict)

    def at(self, temperature: float) -> tuple[float, float]:
        """F and its error at ``temperature`` (interpolated on the reversible-scaling grid)."""
        if abs(temperature - self.temperature) < 1e-9 or not len(self.temperatures):
            if abs(temperature - self.temperature) > 1e-9:
                raise DefectMLError(f"TI was run at {self.temperature} K only")
            return self.free_energy, self.error
        lo, hi = self.temperatures.min(), self.temperatures.max()
        if not lo - 1e-6 <= temperature <= hi + 1e-6:
            raise DefectMLError(f"{temperature} K is outside the TI range {lo:.0f}-{hi:.0f} K")
        return (
            float(np.interp(temperature, self.temperatures, self.free_energy_t)),
            float(np.interp(temperature, self.temperatures, self.error_t)),
        )

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return {
            "T0_K": self.temperature,
            "free_energy_eV": self.free_energy,
            "error_eV": self.error,
            "repeats_eV": self.repeats,
            "dissipation_eV": self.dissipation,
            "springs_eV_A2": self.springs.tolist(),
            "temperatures_K": self.temperatures.tolist(),
            "free_energy_T_eV": self.free_energy_t.tolist(),
            "error_T_eV": self.error_t.tolist(),
            "settings": self.settings,
        }


def spring_constants(
    atoms: Atoms,
    evaluate: Evaluate,
    temperature: float,
    steps: int = 400,
    timestep: float = 2.0,
    seed: int = 0,
) -> np.ndarray:
    """Einstein spring constants k = 3 kT / <|dr|^2> per species, from MD with the model."""
    md = Integrator(atoms, evaluate, temperature, timestep, seed=seed)
    md.run(steps // 4)
    msd = np.zeros(len(atoms))
    for _ in range(steps):
        md.step()
        msd += np.sum((md.x - md.r0) ** 2, axis=1)
    msd /= steps
    symbols = np.array(atoms.get_chemical_symbols())
    k = np.zeros(len(atoms))
    for s in set(symbols):
        sel = symbols == s
        k[sel] = 3 * kB * temperature / max(msd[sel].mean(), 1e-6)
    return k


def frenkel_ladd(
    atoms: Atoms,
    evaluate: Evaluate,
    temperature: float,
    *,
    t_final: float | None = None,
    repeats: int = 4,
    equilibration: int = 200,
    switch_steps: int = 1000,
    timestep: float = 2.0,
    friction: float = 0.01,
    springs: np.ndarray | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TIResult:
    """Absolute free energy F(T0) by Frenkel-Ladd switching, optionally F(T) up to ``t_final``.

    Args:
        atoms: The relaxed structure (its positions are the Einstein sites).
        evaluate: positions -> (energy, forces) of the model (see :func:`model_evaluator`).
        temperature: T0 (K).
        t_final: Run reversible scaling from T0 to this temperature too.
        repeats: Independent repeats (mean and standard error).
        equilibration: Steps before each switch.
        switch_steps: Steps per switch (longer = less dissipation).
        timestep: fs.
        friction: Langevin friction (1/fs).
        springs: Einstein spring constants per atom (default: from the model's MSD at T0).
        seed: Base random seed (repeat i uses seed + i).
        progress: Called with the repeat index after each repeat.
    """
    if repeats < 2:
        raise DefectMLError("thermodynamic integration needs >= 2 repeats for an error bar")
    k = spring_constants(atoms, evaluate, temperature, seed=seed + 997) if springs is None else springs
    f_einstein = einstein_free_energy(atoms.get_masses(), k, temperature)
    lam = switching(np.linspace(0, 1, switch_steps + 1))
    values, dissipation, curves = [], [], []
    for r in range(repeats):
        md = Integrator(atoms, evaluate, temperature, timestep, friction, k, seed=seed + r)
        md.run(equilibration)
        du = lambda md=md: md.u_einstein - md.u_model  # noqa: E731
        _, w_f = md.switch(lam, lambda x: (1 - x, x), du)
        md.run(equilibration)
        _, w_b = md.switch(lam[::-1], lambda x: (1 - x, x), du)
        f0 = f_einstein - 0.5 * (w_f[-1] - w_b[-1])
        values.append(f0)
        dissipation.append(0.5 * (w_f[-1] + w_b[-1]))
        if t_final is not None:
            curves.append(
                _reversible_scaling(
                    atoms,
                    evaluate,
                    temperature,
                    t_final,
                    f0,
                    equilibration,
                    switch_steps,
                    timestep,
                    friction,
                    seed + 7919 + r,
                )
            )
        if progress:
            progress(r)
    v = np.array(values)
    result = TIResult(
        temperature,
        float(v.mean()),
        float(v.std(ddof=1) / np.sqrt(len(v))),
        v.tolist(),
        float(np.mean(dissipation)),
        np.asarray(k),
        settings={
            "repeats": repeats,
            "equilibration_steps": equilibration,
            "switch_steps": switch_steps,
            "timestep_fs": timestep,
            "friction_per_fs": friction,
            "t_final": t_final,
        },
    )
    if curves:
        temps = curves[0][0]
        f = np.array([c[1] for c in curves])
        result.temperatures = temps
        result.free_energy_t = f.mean(axis=0)
        result.error_t = f.std(axis=0, ddof=1) / np.sqrt(len(f))
    return result


def _reversible_scaling(
    atoms, evaluate, t0, t1, f0, equilibration, switch_steps, timestep, friction, seed, points: int = 41
):
    """One forward/backward reversible-scaling run: F(T) on a grid from t0 to t1."""
    lam_end = t0 / t1
    lam = 1 + (lam_end - 1) * switching(np.linspace(0, 1, switch_steps + 1))
    md = Integrator(atoms, evaluate, t0, timestep, friction, seed=seed)
    md.run(equilibration)
    du = lambda: md.u_model  # noqa: E731
    lf, w_f = md.switch(lam, lambda x: (x, 0.0), du)
    md.run(equilibration)
    lb, w_b = md.switch(lam[::-1], lambda x: (x, 0.0), du)
    grid = np.linspace(1.0, lam_end, points)
    order_f = np.argsort(lf)
    wf = np.interp(grid, lf[order_f], w_f[order_f])  # work 1 -> lambda, forward
    order_b = np.argsort(lb)
    wb_to = np.interp(grid, lb[order_b], w_b[order_b])  # work lam_end -> lambda, backward
    wb = w_b[-1] - wb_to  # work lambda -> 1 along the backward path
    w = 0.5 * (wf - wb)
    n = len(atoms)
    temps = t0 / grid
    f = f0 / grid + 1.5 * (n - 1) * kB * temps * np.log(grid) + w / grid
    return temps, f
