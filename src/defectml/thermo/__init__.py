"""Finite-temperature defect thermodynamics (formation free energies and concentrations).

One module per term, all pure functions of energies, structures and frequencies:
``formation`` (u_f, concentrations, Eq. 15-16), ``degeneracy`` (spin, orientational),
``configurational`` (Eq. 11-13), ``electronic`` (fixed-DOS entropy, Eq. 7-10), ``vibrations``
(harmonic / quasi-harmonic with phonopy), ``integration`` (Frenkel-Ladd + reversible-scaling
thermodynamic integration), ``dynamics`` (MD analysis, NEB, rates, inherent structures) and
``freeenergy`` (assembles g_f(T) from the terms of the minima of a search).
"""

from defectml.thermo.configurational import configurational_entropy, populations
from defectml.thermo.degeneracy import orientational_degeneracy, point_group_order, spin_degeneracy
from defectml.thermo.formation import concentration, effective_formation_energy, formation_energy

__all__ = [
    "concentration",
    "configurational_entropy",
    "effective_formation_energy",
    "formation_energy",
    "orientational_degeneracy",
    "point_group_order",
    "populations",
    "spin_degeneracy",
]
