"""Charge states together: formation energies, transition levels, the charge-neutral Fermi level.

Formation energy against the Fermi level for every charge state, the thermodynamic transition
levels, and the self-consistent Fermi level with the concentrations under charge neutrality.

The glue around pymatgen-analysis-defects' machinery: its lattice (point-charge) correction
(``perform_es_corr``, Freysoldt's isolated Gaussian charge in a dielectric, the Makov-Payne
leading term for a point charge) for model energies, which carry no electrostatic potentials;
its lower envelope and transition points of the formation-energy lines. What is here: the
lines from a set of charge-state energies, the Fermi-level solver with band carriers from
effective masses, and the diagram.

Energies: ``E_f(q, E_F) = E_defect(q) − E_bulk − Σ n_i μ_i + q (E_VBM + E_F) + E_corr(q)`` with
``E_F`` from the valence-band maximum (:func:`defectml.thermo.formation.formation_energy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ase.units import kB

from defectml.errors import DefectMLError, InputError
from defectml.thermo.formation import CM3_PER_A3, formation_energy


@dataclass(frozen=True)
class ChargeState:
    """One charge state of a defect: its supercell energy and finite-size correction (eV)."""

    charge: int
    energy: float
    correction: float = 0.0


@dataclass(frozen=True)
class Level:
    """A thermodynamic transition level ε(q/q′), in eV above the VBM."""

    defect: str
    q: int
    q_next: int
    fermi_level: float

    @property
    def label(self) -> str:
        """``ε(q/q′)``."""
        return f"ε({self.q:+d}/{self.q_next:+d})"


@dataclass
class DefectLines:
    """A defect's formation-energy lines: ``E_f(q, E_F) = intercept_q + q·E_F``.

    Attributes:
        name: The defect.
        intercepts: Formation energy at E_F = 0 (the VBM) per charge state (eV).
        sites_per_cm3: Sites the defect can occupy per cm³ (for concentrations).
        degeneracy: Degeneracy factor per charge state (1 if not given).
    """

    name: str
    intercepts: dict[int, float]
    sites_per_cm3: float = 0.0
    degeneracy: dict[int, float] = field(default_factory=dict)

    def energy(self, q: int, fermi_level: float) -> float:
        """Formation energy of charge state ``q`` at this Fermi level (eV)."""
        return self.intercepts[q] + q * fermi_level

    def lowest(self, fermi_level: float) -> tuple[int, float]:
        """The stable charge state at this Fermi level and its formation energy."""
        return min(((q, self.energy(q, fermi_level)) for q in self.intercepts), key=lambda t: t[1])


def point_charge_correction(cell: np.ndarray, charge: int, dielectric: float) -> float:
    """Lattice correction of a charged supercell (eV, to add).

    pymatgen-analysis-defects' Freysoldt ``perform_es_corr``: a Gaussian model charge in a
    dielectric; for a point-like charge, the Makov-Payne ``q² α / 2εL``.

    Raises:
        InputError: a non-positive dielectric constant.
    """
    if charge == 0:
        return 0.0
    if not dielectric or dielectric <= 0:
        raise InputError(f"a charged correction needs a positive dielectric constant, got {dielectric!r}; "
                         "give --dielectric (the static one: ε∞ + ε_ionic)")
    from pymatgen.analysis.defects.corrections.freysoldt import QModel, perform_es_corr
    from pymatgen.core import Lattice

    lattice = Lattice(np.asarray(cell, float))
    return float(perform_es_corr(lattice, float(charge), float(dielectric), QModel()))


def formation_lines(name: str, states: list[ChargeState], e_bulk: float, exchanged: dict[str, int],
                    mu: dict[str, float], vbm: float = 0.0, sites_per_cm3: float = 0.0,
                    degeneracy: dict[int, float] | None = None) -> DefectLines:
    """The lines of one defect from its charge states' energies (each corrected by its own term)."""
    if not states:
        raise DefectMLError(f"{name}: no charge state to draw")
    charges = [s.charge for s in states]
    if len(set(charges)) != len(charges):
        raise InputError(f"{name}: charge state(s) given twice: {sorted(charges)}")
    intercepts = {s.charge: formation_energy(s.energy, e_bulk, exchanged, mu, s.charge, vbm, 0.0,
                                             s.correction) for s in states}
    return DefectLines(name, intercepts, sites_per_cm3, dict(degeneracy or {}))


def transition_levels(lines: DefectLines, gap: float, lower: float = 0.0) -> list[Level]:
    """The thermodynamic transition levels between ``lower`` and ``gap`` (by default: in the gap).

    The lower envelope and its crossings are pymatgen-analysis-defects'.
    """
    from pymatgen.analysis.defects.thermo import get_lower_envelope

    pairs = [(float(q), float(b)) for q, b in lines.intercepts.items()]
    if len(pairs) == 1:
        return []
    # the most positive charge first (pymatgen's order is not that for every input)
    envelope = sorted((tuple(x) for x in get_lower_envelope(pairs)), key=lambda mb: -mb[0])
    out = []
    for (q, b), (q_next, b_next) in zip(envelope[:-1], envelope[1:], strict=True):
        x = (b_next - b) / (q - q_next)  # where q·x + b = q_next·x + b_next
        if lower <= x <= gap:
            out.append(Level(lines.name, int(round(q)), int(round(q_next)), float(x)))
    return out


def fermi_dirac_half(eta: float) -> float:
    """The complete Fermi-Dirac integral F_{1/2}(η), normalised so that F → exp(η) for η ≪ 0."""
    from scipy.integrate import quad

    if eta < -30:
        return float(np.exp(eta))
    value, _ = quad(lambda x: np.sqrt(x) / (1.0 + np.exp(x - eta)), 0, max(50.0, eta + 50.0), limit=200)
    return float(2.0 / np.sqrt(np.pi) * value)


def effective_dos(mass: float, temperature: float) -> float:
    """Effective density of states of a parabolic band, ``2 (2π m* kT / h²)^{3/2}`` (cm⁻³)."""
    m_e, h, k = 9.1093837015e-31, 6.62607015e-34, 1.380649e-23
    return float(2.0 * (2 * np.pi * mass * m_e * k * temperature / h**2) ** 1.5 / 1e6)


@dataclass
class Neutrality:
    """The self-consistent Fermi level and what sets it."""

    fermi_level: float
    temperature: float
    electrons: float
    holes: float
    concentrations: dict[str, dict[int, float]]


def solve_fermi_level(defects: list[DefectLines], gap: float, temperature: float, *,
                      electron_mass: float = 1.0, hole_mass: float = 1.0,
                      dopants: float = 0.0) -> Neutrality:
    """The Fermi level at which defects, band carriers and fixed dopants are charge-neutral.

    ``dopants``: net fixed charge per cm³ (donors positive).

    Carriers from parabolic bands (effective masses in electron masses, Fermi-Dirac statistics);
    defect concentrations ``N g exp(−E_f/kT)`` per charge state at full equilibrium.
    """
    from scipy.optimize import brentq

    if gap <= 0 or temperature <= 0:
        raise InputError(f"the band gap and the temperature must be positive (got {gap} eV, {temperature} K)")
    kt = kB * temperature
    nc, nv = effective_dos(electron_mass, temperature), effective_dos(hole_mass, temperature)

    def parts(ef: float):
        n = nc * fermi_dirac_half((ef - gap) / kt)
        p = nv * fermi_dirac_half(-ef / kt)
        conc = {d.name: {q: d.sites_per_cm3 * d.degeneracy.get(q, 1.0)
                         * np.exp(-np.clip(d.energy(q, ef) / kt, -500, 700)) for q in d.intercepts}
                for d in defects}
        return n, p, conc

    def net(ef: float) -> float:
        n, p, conc = parts(ef)
        return p - n + dopants + sum(q * c for d in conc.values() for q, c in d.items())

    lo, hi = -1.0, gap + 1.0
    if np.sign(net(lo)) == np.sign(net(hi)):
        raise DefectMLError("no Fermi level in the gap (±1 eV) balances the charges; check the energies")
    ef = float(brentq(net, lo, hi, xtol=1e-6))
    n, p, conc = parts(ef)
    return Neutrality(ef, temperature, float(n), float(p),
                      {k: {q: float(c) for q, c in v.items()} for k, v in conc.items()})


def sites_per_cm3(multiplicity: float, cell_volume: float) -> float:
    """Defect sites per cm³ from the site count per host cell of volume ``cell_volume`` (Å³)."""
    return float(multiplicity / cell_volume * CM3_PER_A3)


def plot_diagram(defects: list[DefectLines], gap: float, path, *, fermi_level: float | None = None,
                 title: str = "") -> None:
    """The formation-energy diagram: each defect's lower envelope across the gap, levels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.linspace(0.0, gap, 400)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for d in defects:
        y = np.min([[d.energy(q, e) for e in x] for q in d.intercepts], axis=0)
        (line,) = ax.plot(x, y, lw=2, label=d.name)
        for lv in transition_levels(d, gap):
            ax.plot([lv.fermi_level], [d.energy(lv.q, lv.fermi_level)], "o", color=line.get_color(), ms=5)
            ax.annotate(f"{lv.q:+d}/{lv.q_next:+d}", (lv.fermi_level, d.energy(lv.q, lv.fermi_level)),
                        textcoords="offset points", xytext=(3, 5), fontsize=8, color=line.get_color())
    if fermi_level is not None:
        ax.axvline(fermi_level, color="0.4", ls="--", lw=1, label="Fermi level (neutrality)")
    ax.set_xlim(0, gap)
    ax.set_xlabel("Fermi level above the VBM (eV)")
    ax.set_ylabel("Formation energy (eV)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
