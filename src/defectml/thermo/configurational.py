"""Configurational (structural) entropy over the metastable minima (paper Eq. 11-13)."""

from __future__ import annotations

import numpy as np
from ase.units import kB


def populations(
    energies: np.ndarray,
    temperature: float,
    degeneracy: np.ndarray | None = None,
    vib_free_energy: np.ndarray | None = None,
) -> np.ndarray:
    """Boltzmann populations of configurations (Eq. 12-13).

    Args:
        energies: Internal energies U_i (eV).
        temperature: T (K).
        degeneracy: Omega_i (spin x orientational x ...; default 1).
        vib_free_energy: Vibrational free energies F_vib,i (eV), added to U_i when given.
    """
    u = np.asarray(energies, float)
    g = u + (np.asarray(vib_free_energy, float) if vib_free_energy is not None else 0.0)
    omega = np.ones_like(u) if degeneracy is None else np.asarray(degeneracy, float)
    if temperature <= 0:
        p = (g == g.min()).astype(float) * omega
        return p / p.sum()
    w = omega * np.exp(-(g - g.min()) / (kB * temperature))
    return w / w.sum()


def configurational_entropy(p: np.ndarray) -> float:
    """S_conf = -k_B sum_i p_i ln p_i (eV/K, Eq. 11)."""
    p = np.asarray(p, float)
    p = p[p > 0]
    return float(-kB * np.sum(p * np.log(p)))


def inherent_structure_entropy(
    temperatures: np.ndarray, mean_energy: np.ndarray, s0: float = 0.0
) -> np.ndarray:
    """Configurational entropy from inherent structures (paper Eq. 14).

    S_conf(T) = S_conf(T0) + int_{T0}^{T} (1/T') d<e_IS>/dT' dT', with <e_IS>(T) the mean energy of
    MD frames quenched to their minima (:func:`defectml.thermo.dynamics.inherent_structures`) at each
    temperature; the integral is done on the given grid (trapezoid on a spline-free derivative).

    Args:
        temperatures: Increasing temperatures (K), T0 first.
        mean_energy: Mean inherent-structure energy at each temperature (eV).
        s0: S_conf at T0 (eV/K; 0 when only the ground state is populated there).
    """
    t = np.asarray(temperatures, float)
    e = np.asarray(mean_energy, float)
    if len(t) < 2 or np.any(np.diff(t) <= 0):
        raise ValueError("need at least two increasing temperatures")
    de_dt = np.gradient(e, t)
    integrand = de_dt / t
    steps = 0.5 * (integrand[1:] + integrand[:-1]) * np.diff(t)
    return s0 + np.concatenate([[0.0], np.cumsum(steps)])
