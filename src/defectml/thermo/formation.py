"""Formation energies and equilibrium concentrations (paper Eq. 2, 4, 15, 16)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase.units import kB

from defectml.errors import DefectMLError

CM3_PER_A3 = 1e24


def formation_energy(
    e_defect: float,
    e_bulk: float,
    exchanged: dict[str, int],
    mu: dict[str, float],
    charge: int = 0,
    vbm: float = 0.0,
    fermi_level: float = 0.0,
    correction: float = 0.0,
) -> float:
    """u_f = E_defect - E_bulk - sum_i n_i mu_i + q (E_VBM + E_F) + E_corr (eV).

    Args:
        e_defect: Energy of the defect supercell.
        e_bulk: Energy of the pristine supercell of the same size.
        exchanged: Atoms added (+) or removed (-) per element, e.g. ``{"Cd": -1}`` for V_Cd.
        mu: Chemical potential (absolute, eV/atom) of every exchanged element.
        charge: Charge state q.
        vbm: Valence-band maximum of the host (eV, same reference as the energies).
        fermi_level: Fermi level above the VBM (eV).
        correction: Finite-size charge correction (eV).
    """
    missing = [el for el, n in exchanged.items() if n and el not in mu]
    if missing:
        raise DefectMLError(
            f"no chemical potential for {', '.join(missing)}; give --mu {missing[0]}=<eV/atom>"
        )
    return float(
        e_defect
        - e_bulk
        - sum(n * mu[el] for el, n in exchanged.items())
        + charge * (vbm + fermi_level)
        + correction
    )


@dataclass
class Configuration:
    """One configuration of a defect at a fixed site: its formation free energy and sites.

    Attributes:
        name: Label of the configuration (minimum).
        sites_per_cell: Symmetry-equivalent sites N_i per host unit cell of volume ``volume``.
        g_f: Formation free energy at each temperature (eV), degeneracy terms included.
    """

    name: str
    sites_per_cell: float
    g_f: np.ndarray


def concentration(configs: list[Configuration], temperatures: np.ndarray, volume: float) -> np.ndarray:
    """Total concentration c(T) = sum_i N_i/V exp(-g_f,i/kT) in cm^-3 (Eq. 4 and 15).

    Args:
        configs: Configurations with g_f on the ``temperatures`` grid.
        temperatures: T (K).
        volume: Host unit-cell volume (A^3) the site counts refer to.
    """
    t = np.asarray(temperatures, float)
    if volume <= 0:
        raise DefectMLError(f"unit-cell volume must be positive, got {volume}")
    c = np.zeros_like(t)
    for cfg in configs:
        c += cfg.sites_per_cell / volume * np.exp(-np.asarray(cfg.g_f) / (kB * t))
    return c * CM3_PER_A3


def effective_formation_energy(
    c: np.ndarray, temperatures: np.ndarray, volume: float, sites_per_cell: float
) -> np.ndarray:
    """g_f,eff = -kT ln(c V / N) with N the ground state's site count (Eq. 16)."""
    t = np.asarray(temperatures, float)
    return -kB * t * np.log(np.asarray(c) / CM3_PER_A3 * volume / sites_per_cell)
