"""Harmonic and quasi-harmonic vibrational free energies with phonopy, forces from an MLIP.

Defect cells keep whatever point symmetry they have: :func:`relax_symmetric` relaxes with the
symmetry fixed (ASE ``FixSymmetry``) so phonopy, run at a tight ``symprec`` (1e-4), needs only the
symmetry-reduced displacements (23 instead of 378 for a 63-atom CdTe vacancy). Imaginary modes are
counted and reported with every result; phonopy leaves them out of the thermal sums, and so do we,
but never silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import _hbar, kB

from defectml.errors import DefectMLError

THZ_TO_EV = 2 * np.pi * _hbar * 1e12 / 1.602176634e-19
IMAGINARY_THZ = -0.05  # below this a mode counts as imaginary (acoustic noise sits above it)


@dataclass
class HarmonicResult:
    """Harmonic vibrations of one supercell.

    Attributes:
        n_atoms: Atoms in the supercell.
        n_displacements: Symmetry-reduced displacements phonopy needed.
        gamma_frequencies: Supercell Gamma-point frequencies (THz; negative = imaginary).
        temperatures: T grid (K).
        free_energy: Quantum harmonic free energy per supercell on the T grid (eV), q-mesh sum.
        entropy: Vibrational entropy per supercell (eV/K).
        n_imaginary: Imaginary modes at Gamma (besides the three acoustic ones).
        min_frequency: Most negative Gamma frequency (THz).
        mesh: q-mesh used for the thermal sums.
        displacement: Displacement amplitude (A).
    """

    n_atoms: int
    n_displacements: int
    gamma_frequencies: np.ndarray
    temperatures: np.ndarray
    free_energy: np.ndarray
    entropy: np.ndarray
    n_imaginary: int
    min_frequency: float
    mesh: tuple[int, int, int]
    displacement: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return {
            "n_atoms": self.n_atoms,
            "n_displacements": self.n_displacements,
            "n_imaginary": self.n_imaginary,
            "min_frequency_THz": round(self.min_frequency, 4),
            "mesh": list(self.mesh),
            "displacement_A": self.displacement,
            "temperatures_K": self.temperatures.tolist(),
            "free_energy_eV": self.free_energy.tolist(),
            "entropy_eV_K": self.entropy.tolist(),
            "warnings": self.warnings,
        }


def relax_symmetric(
    atoms: Atoms, calculator: Calculator, fmax: float = 0.005, max_steps: int = 400, symprec: float = 0.05
) -> Atoms:
    """Symmetrise within ``symprec`` and relax positions keeping that symmetry (fixed cell).

    ASE's BFGS through the one relaxer (:func:`~defectml.core.relax.relax_one`: its non-finite and
    too-close checks), with ``FixSymmetry`` held.

    Raises:
        DefectMLError: the relaxation failed (non-finite output, atoms too close, a model error).
    """
    from ase.constraints import FixSymmetry

    from defectml.core.relax import FAILED, relax_one

    work = atoms.copy()
    work.set_constraint(FixSymmetry(work, symprec=symprec, adjust_positions=True))
    r = relax_one(work, calculator, fmax=fmax, max_steps=max_steps, optimizer="bfgs")
    if r.status == FAILED:
        raise DefectMLError(f"symmetric relaxation failed: {r.reason}")
    out = r.atoms
    out.set_constraint()
    out.calc = None
    return out


def _phonopy(atoms: Atoms, displacement: float, symprec: float):
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=np.asarray(atoms.cell),
        scaled_positions=atoms.get_scaled_positions(),
    )
    ph = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int), primitive_matrix="P", symprec=symprec)
    ph.generate_displacements(distance=displacement)
    return ph


def force_sets(
    atoms: Atoms,
    calculator: Calculator,
    displacement: float = 0.01,
    symprec: float = 1e-4,
    progress: Callable | None = None,
):
    """A phonopy object with its force constants computed by ``calculator``."""
    ph = _phonopy(atoms, displacement, symprec)
    cells = ph.supercells_with_displacements
    sets = []
    it = progress(cells) if progress else cells
    for cell in it:
        work = Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True)
        work.calc = calculator
        f = np.asarray(work.get_forces())
        if not np.all(np.isfinite(f)):
            raise DefectMLError("the model returned non-finite forces for a displaced cell")
        sets.append(f - f.mean(axis=0))  # drift removal: forces must sum to zero
    ph.forces = np.array(sets)
    ph.produce_force_constants()
    ph.symmetrize_force_constants()
    return ph


def harmonic(
    atoms: Atoms,
    calculator: Calculator,
    temperatures: np.ndarray,
    *,
    displacement: float = 0.01,
    symprec: float = 1e-4,
    mesh: tuple[int, int, int] = (4, 4, 4),
    progress: Callable | None = None,
) -> HarmonicResult:
    """Harmonic free energy of a (relaxed) supercell, force constants from ``calculator``.

    The supercell is its own phonopy unit cell; the q-mesh samples its Brillouin zone (>= 4^3 for
    converged supercell free energies).
    """
    ph = force_sets(atoms, calculator, displacement, symprec, progress)
    return _result(ph, atoms, temperatures, mesh, displacement)


def _result(ph, atoms: Atoms, temperatures, mesh, displacement) -> HarmonicResult:
    t = np.asarray(temperatures, float)
    ph.run_qpoints([[0, 0, 0]])
    freqs = np.sort(np.asarray(ph.qpoints.frequencies)[0])
    non_acoustic = freqs[3:] if len(freqs) > 3 else freqs[:0]
    n_imag = int(np.sum(non_acoustic < IMAGINARY_THZ))
    ph.run_mesh(list(mesh), is_gamma_center=True)
    ph.run_thermal_properties(temperatures=t, cutoff_frequency=abs(IMAGINARY_THZ))
    tp = ph.thermal_properties
    warnings = []
    if n_imag:
        warnings.append(
            f"{n_imag} imaginary Gamma mode(s), lowest {freqs.min():.3f} THz: the "
            "structure is not a minimum of the model or the displacement is too large; "
            "these modes are left out of the free energy"
        )
    return HarmonicResult(
        len(atoms),
        len(ph.supercells_with_displacements),
        freqs,
        t,
        np.asarray(tp.free_energy) / 96.485332,  # kJ/mol per cell -> eV
        np.asarray(tp.entropy) / 96485.332,  # J/K/mol -> eV/K
        n_imag,
        float(freqs.min()),
        tuple(mesh),
        displacement,
        warnings,
    )


def classical_free_energy(frequencies_thz: np.ndarray, temperature: float) -> float:
    """Classical harmonic free energy kT sum ln(hbar w / kT) over the non-zero modes (eV).

    Used to compare like with like against (classical) MD thermodynamic integration on the same
    supercell: the anharmonic correction is F_TI - F_classical.
    """
    f = np.sort(np.asarray(frequencies_thz, float))[3:]
    f = f[f > abs(IMAGINARY_THZ)]
    return float(kB * temperature * np.sum(np.log(f * THZ_TO_EV / (kB * temperature))))


def quantum_free_energy(frequencies_thz: np.ndarray, temperature: float) -> float:
    """Quantum harmonic free energy sum [hw/2 + kT ln(1 - exp(-hw/kT))] over non-zero modes (eV)."""
    f = np.sort(np.asarray(frequencies_thz, float))[3:]
    e = f[f > abs(IMAGINARY_THZ)] * THZ_TO_EV
    return float(np.sum(e / 2 + kB * temperature * np.log1p(-np.exp(-e / (kB * temperature)))))


def smoothness(
    atoms: Atoms,
    calculator: Calculator,
    temperature: float,
    displacements: tuple[float, ...] = (0.01, 0.02, 0.04),
    symprec: float = 1e-4,
    mesh: tuple[int, int, int] = (2, 2, 2),
) -> dict:
    """Vibrational free energy at several displacement sizes: a smooth model gives the same answer.

    Returns the free energies (eV per supercell) and their spread; a spread above ~1 meV/atom
    flags a model whose phonons should not be trusted (CHGNet 0.3.0 on CdTe is one).
    """
    values = [
        float(
            harmonic(
                atoms, calculator, np.array([temperature]), displacement=d, symprec=symprec, mesh=mesh
            ).free_energy[0]
        )
        for d in displacements
    ]
    spread = max(values) - min(values)
    return {
        "temperature_K": temperature,
        "displacements_A": list(displacements),
        "free_energy_eV": values,
        "spread_eV": spread,
        "spread_meV_per_atom": 1e3 * spread / len(atoms),
        "smooth": bool(1e3 * spread / len(atoms) < 1.0),
    }


@dataclass
class QuasiHarmonicResult:
    """Quasi-harmonic scan: energies and free energies over volume, minimised at each T."""

    volumes: np.ndarray
    energies: np.ndarray
    temperatures: np.ndarray
    free_energy_v: np.ndarray  # (n_T, n_V) vibrational free energy
    free_energy: np.ndarray  # G(T) = min_V [E(V) + F_vib(V, T)] (eV)
    volume_t: np.ndarray  # equilibrium volume at each T
    n_imaginary: list[int]
    roughness: float  # max |second difference| of F_vib(V) at the highest T over its mean slope

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return {
            "volumes_A3": self.volumes.tolist(),
            "energies_eV": self.energies.tolist(),
            "temperatures_K": self.temperatures.tolist(),
            "free_energy_eV": self.free_energy.tolist(),
            "volume_A3": self.volume_t.tolist(),
            "n_imaginary": self.n_imaginary,
            "roughness": self.roughness,
        }


def quasi_harmonic(
    atoms: Atoms,
    calculator: Calculator,
    temperatures: np.ndarray,
    *,
    scales: np.ndarray | None = None,
    displacement: float = 0.01,
    symprec: float = 1e-4,
    mesh: tuple[int, int, int] = (4, 4, 4),
    relax: bool = True,
    progress: Callable | None = None,
) -> QuasiHarmonicResult:
    """Quasi-harmonic free energy: harmonic phonons on a volume scan, minimised over V at each T.

    Args:
        atoms: The relaxed supercell.
        calculator: The MLIP.
        temperatures: T grid (K).
        scales: Volume scale factors (default 0.94...1.06 in steps of 0.02; the paper uses
            0.90...1.10 in steps of 0.02).
        displacement: Phonopy displacement (A).
        symprec: Phonopy symmetry tolerance.
        mesh: q-mesh.
        relax: Relax positions (symmetry kept) at each volume.
        progress: Called with each scale factor when done.
    """
    t = np.asarray(temperatures, float)
    scales = np.arange(0.94, 1.0601, 0.02) if scales is None else np.asarray(scales, float)
    volumes, energies, fv, nimag = [], [], [], []
    for s in scales:
        work = atoms.copy()
        work.set_cell(atoms.cell * s ** (1 / 3), scale_atoms=True)
        if relax:
            work = relax_symmetric(work, calculator, fmax=0.005)
        work.calc = calculator
        energies.append(float(work.get_potential_energy()))
        work.calc = None
        res = harmonic(work, calculator, t, displacement=displacement, symprec=symprec, mesh=mesh)
        volumes.append(work.get_volume())
        fv.append(res.free_energy)
        nimag.append(res.n_imaginary)
        if progress:
            progress(s)
    v, e, fv = np.array(volumes), np.array(energies), np.array(fv).T  # fv: (n_T, n_V)
    g, vt = [], []
    fine = np.linspace(v.min(), v.max(), 401)
    for row in fv:
        coef = np.polyfit(v, e + row, 4)  # smooth fit of the total; minimum on a fine grid
        vals = np.polyval(coef, fine)
        i = int(np.argmin(vals))
        g.append(vals[i])
        vt.append(fine[i])
    second = np.abs(np.diff(fv[-1], 2))
    slope = np.abs(np.diff(fv[-1])).mean() or 1.0
    return QuasiHarmonicResult(v, e, t, fv, np.array(g), np.array(vt), nimag, float(second.max() / slope))


def vibrational_formation_free_energy(
    f_defect: np.ndarray, f_bulk: np.ndarray, n_defect: int, n_bulk: int
) -> np.ndarray:
    """f_vib = F_vib(defect) - (N_defect / N_bulk) F_vib(bulk).

    The exchanged atoms' reservoirs are given the host's mean vibrational free energy per atom
    (the usual approximation when the elemental phases' phonons are not computed).
    """
    return np.asarray(f_defect) - n_defect / n_bulk * np.asarray(f_bulk)


__all__ = [
    "HarmonicResult",
    "QuasiHarmonicResult",
    "classical_free_energy",
    "force_sets",
    "harmonic",
    "quantum_free_energy",
    "quasi_harmonic",
    "relax_symmetric",
    "smoothness",
    "vibrational_formation_free_energy",
]
