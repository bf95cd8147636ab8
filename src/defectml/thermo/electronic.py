"""Electronic entropy in the fixed density-of-states approximation (paper Eq. 7-10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.units import _hbar, _k, _me, kB

from defectml.errors import DefectMLError


def fermi_dirac(energies: np.ndarray, fermi_level: float, temperature: float) -> np.ndarray:
    """Occupation f(E, T) (Eq. 8)."""
    x = (np.asarray(energies, float) - fermi_level) / (kB * temperature)
    return 0.5 * (1.0 - np.tanh(0.5 * x))  # overflow-free form of 1/(exp(x)+1)


def electronic_entropy(
    energies: np.ndarray,
    dos: np.ndarray,
    fermi_level: float,
    temperature: float,
    spin_polarised: bool = True,
) -> float:
    """S_el = -gamma k_B int D(E) [f ln f + (1-f) ln(1-f)] dE (eV/K, Eq. 7).

    Args:
        energies: Energy grid (eV).
        dos: States per eV on that grid (per spin channel summed for ``spin_polarised``).
        fermi_level: Fermi level (eV, same reference).
        temperature: T (K).
        spin_polarised: gamma = 1 if the DOS counts both spins, 2 if it is per spin.
    """
    if temperature <= 0:
        return 0.0
    f = np.clip(fermi_dirac(energies, fermi_level, temperature), 1e-300, 1 - 1e-16)
    integrand = np.asarray(dos, float) * (f * np.log(f) + (1 - f) * np.log1p(-f))
    gamma = 1.0 if spin_polarised else 2.0
    return float(-gamma * kB * np.trapezoid(integrand, energies))


def effective_dos(temperature: float, effective_mass: float = 1.0) -> float:
    """N_c = 2 (2 pi m* k T / h^2)^(3/2) in cm^-3 (Eq. 10); ``effective_mass`` in m_e."""
    h = 2 * np.pi * _hbar
    return float(2 * (2 * np.pi * effective_mass * _me * _k * temperature / h**2) ** 1.5 * 1e-6)


def band_fermi_level(
    cbm: float, temperature: float, carriers_cm3: float = 1e15, effective_mass: float = 1.0
) -> float:
    """Fermi level of n extra carriers in a parabolic band: E_F = E_CBM + kT ln(n/N_c) (Eq. 9)."""
    return float(cbm + kB * temperature * np.log(carriers_cm3 / effective_dos(temperature, effective_mass)))


def read_dos(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A two-column text DOS (energy in eV, states/eV); extra columns (spin channels) are summed."""
    try:
        data = np.loadtxt(path, comments="#", ndmin=2)
    except (OSError, ValueError) as exc:
        raise DefectMLError(f"cannot read DOS file {path}: {exc}") from None
    if data.shape[1] < 2 or len(data) < 3:
        raise DefectMLError(f"DOS file {path} needs >= 3 rows of 'energy dos [dos_down]'")
    order = np.argsort(data[:, 0])
    return data[order, 0], data[order, 1:].sum(axis=1)
