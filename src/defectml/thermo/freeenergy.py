"""g_f(T) and concentrations of one defect from the minima of a search, term by term.

    g_f,i(T) = u_f,i + f_vib,i(T) - kT ln(Omega_spin,i Omega_orient,i) - T s_el,i(T)

for every configuration (minimum) i, then the configurational sum (Eq. 11-13 and 15-16). The
harmonic route takes f_vib from phonopy (quasi-harmonic optional); the anharmonic route adds the
thermodynamic-integration correction [F_TI - F_harm,classical] of defect minus scaled bulk.
Expensive terms (phonons, TI) are cached in the run's store, so a rerun recomputes nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.units import kB

from defectml.errors import DefectMLError
from defectml.records import ThermoRecord
from defectml.search.summary import DefectSummary
from defectml.settings import FromOptions
from defectml.store import ResultStore, content_key
from defectml.thermo import vibrations as vib
from defectml.thermo.configurational import configurational_entropy, populations
from defectml.thermo.degeneracy import orientational_degeneracy, spin_degeneracy
from defectml.thermo.formation import Configuration, concentration, effective_formation_energy
from defectml.thermo.formation import formation_energy as u_formation
from defectml.thermo.integration import frenkel_ladd, model_evaluator


@dataclass
class ThermoSettings(FromOptions):
    """What to compute (``defectml thermo``'s options are named for these fields).

    Attributes:
        temperatures: T grid (K).
        mu: Chemical potentials (eV/atom) of the exchanged elements.
        window: Configurations within this energy of the lowest minimum (eV) are included.
        vibrations: ``none``, ``harmonic`` or ``qha``.
        displacement: Phonopy displacement (A).
        symprec: Phonopy symmetry tolerance (after a symmetry-kept relaxation).
        mesh: q-mesh for the supercell free energies.
        ti: Run thermodynamic integration (anharmonic route) for the ground state and the bulk.
        ti_t0, ti_t1: Frenkel-Ladd temperature and reversible-scaling end temperature (K).
        ti_repeats, ti_switch_steps, ti_equilibration, ti_timestep: TI run lengths.
        charge_terms: ``vbm``, ``fermi_level``, ``correction`` (eV) for charged defects.
        electronic: Entropy of the defect minus the bulk, as a function T -> s_el (eV/K).
    """

    temperatures: np.ndarray = field(default_factory=lambda: np.arange(300.0, 1201.0, 50.0))
    mu: dict[str, float] = field(default_factory=dict)
    window: float = 0.5
    vibrations: str = "harmonic"
    displacement: float = 0.01
    symprec: float = 1e-4
    mesh: tuple[int, int, int] = (4, 4, 4)
    ti: bool = False
    ti_t0: float = 300.0
    ti_t1: float | None = None
    ti_repeats: int = 4
    ti_switch_steps: int = 1000
    ti_equilibration: int = 200
    ti_timestep: float = 2.0
    charge_terms: dict[str, float] = field(default_factory=dict)
    electronic: Callable[[float], float] | None = None

    def validate(self) -> None:
        """Raise DefectMLError for impossible settings."""
        t = np.asarray(self.temperatures, float)
        if len(t) == 0 or np.any(t <= 0):
            raise DefectMLError("temperatures must be positive (K)")
        if self.vibrations not in ("none", "harmonic", "qha"):
            raise DefectMLError(f"--vib must be none, harmonic or qha, not {self.vibrations!r}")
        if self.ti and self.vibrations == "none":
            raise DefectMLError("the anharmonic (TI) route corrects the harmonic one: use --vib harmonic")


@dataclass
class ConfigTerms:
    """All terms of one configuration on the T grid (eV unless noted)."""

    name: str
    label: str
    energy: float
    u_f: float
    spin: int
    orientational: float
    symmetry: str
    f_vib: np.ndarray
    g_f: np.ndarray
    f_vib_anh: np.ndarray | None = None
    g_f_anh: np.ndarray | None = None
    vib_info: dict = field(default_factory=dict)


@dataclass
class ThermoResult:
    """Formation free energy of one defect in one charge state."""

    label: str
    model: str
    temperatures: np.ndarray
    configs: list[ConfigTerms]
    populations: np.ndarray  # (n_configs, n_T)
    s_conf: np.ndarray  # eV/K
    s_el: np.ndarray  # eV/K
    g_f: np.ndarray  # effective (Eq. 16), harmonic route
    concentration: np.ndarray  # cm^-3, harmonic route
    g_f_anh: np.ndarray | None
    concentration_anh: np.ndarray | None
    bulk: dict
    ti: dict
    timings: dict
    notes: list[str]

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""

        def arr(x):
            return None if x is None else np.asarray(x, float).round(8).tolist()

        return {
            "defect": self.label,
            "model": self.model,
            "temperatures_K": arr(self.temperatures),
            "g_f_eV": arr(self.g_f),
            "concentration_cm3": arr(self.concentration),
            "g_f_anharmonic_eV": arr(self.g_f_anh),
            "concentration_anharmonic_cm3": arr(self.concentration_anh),
            "minus_T_s_conf_eV": arr(-self.temperatures * self.s_conf),
            "minus_T_s_el_eV": arr(-self.temperatures * self.s_el),
            "configurations": [
                {
                    "name": c.name,
                    "label": c.label,
                    "symmetry": c.symmetry,
                    "energy_eV": c.energy,
                    "u_f_eV": c.u_f,
                    "spin_degeneracy": c.spin,
                    "orientational_degeneracy": c.orientational,
                    "f_vib_eV": arr(c.f_vib),
                    "g_f_eV": arr(c.g_f),
                    "f_vib_anharmonic_eV": arr(c.f_vib_anh),
                    "g_f_anharmonic_eV": arr(c.g_f_anh),
                    "population": arr(p),
                    "vibrations": c.vib_info,
                }
                for c, p in zip(self.configs, self.populations, strict=True)
            ],
            "bulk": self.bulk,
            "thermodynamic_integration": self.ti,
            "timings_s": self.timings,
            "notes": self.notes,
        }


def exchanged_atoms(defect: Atoms, bulk: Atoms) -> dict[str, int]:
    """Atoms added (+) / removed (-) per element between the bulk and the defect supercell."""
    d, b = Counter(defect.get_chemical_symbols()), Counter(bulk.get_chemical_symbols())
    return {el: d[el] - b[el] for el in sorted(set(d) | set(b)) if d[el] != b[el]}


class _Cache:
    """Expensive results (phonons, TI) in the run's store, keyed by what determines them."""

    def __init__(self, store: ResultStore | None):
        self.store = store

    def get(self, key: str) -> dict | None:
        if self.store is None:
            return None
        row = self.store.first(kind="thermo", thermo_key=key)
        return dict(row.data) if row is not None else None

    def put(self, key: str, atoms: Atoms, data: dict) -> None:
        if self.store is not None:
            self.store.add(ThermoRecord(atoms, key, data))


def _vibrations(
    atoms: Atoms, calc: Calculator, model: str, s: ThermoSettings, cache: _Cache, log: Callable[[str], None]
) -> dict:
    """Harmonic (+QHA) free energies of one supercell, cached: relaxed with symmetry kept first."""
    t = np.asarray(s.temperatures, float)
    key = content_key(
        "vib",
        s.vibrations,
        atoms.positions.round(5),
        atoms.cell[:].round(5),
        atoms.get_chemical_symbols(),
        model,
        s.displacement,
        s.symprec,
        s.mesh,
        t,
    )
    hit = cache.get(key)
    if hit is not None:
        return hit
    t0 = time.perf_counter()
    relaxed = vib.relax_symmetric(atoms, calc)
    res = vib.harmonic(relaxed, calc, t, displacement=s.displacement, symprec=s.symprec, mesh=s.mesh)
    out = res.to_dict()
    out["gamma_frequencies_THz"] = res.gamma_frequencies.tolist()
    relaxed.calc = calc
    out["energy_symmetric_eV"] = float(relaxed.get_potential_energy())
    relaxed.calc = None
    out["positions"] = relaxed.positions.tolist()
    if s.vibrations == "qha":
        q = vib.quasi_harmonic(relaxed, calc, t, displacement=s.displacement, symprec=s.symprec, mesh=s.mesh)
        out["qha"] = q.to_dict()
        # F_vib(T) at the quasi-harmonic volume, relative to the static energy at the start volume
        out["free_energy_eV"] = (q.free_energy - out["energy_symmetric_eV"]).tolist()
    out["wall_s"] = time.perf_counter() - t0
    for w in res.warnings:
        log(f"warning ({len(atoms)} atoms): {w}")
    cache.put(key, relaxed, out)
    return out


def _ti(atoms: Atoms, calc: Calculator, model: str, s: ThermoSettings, cache: _Cache, seed: int) -> dict:
    key = content_key(
        "ti",
        atoms.positions.round(5),
        atoms.cell[:].round(5),
        atoms.get_chemical_symbols(),
        model,
        s.ti_t0,
        s.ti_t1,
        s.ti_repeats,
        s.ti_switch_steps,
        s.ti_equilibration,
        s.ti_timestep,
        seed,
    )
    hit = cache.get(key)
    if hit is not None:
        return hit
    t0 = time.perf_counter()
    res = frenkel_ladd(
        atoms,
        model_evaluator(atoms, calc),
        s.ti_t0,
        t_final=s.ti_t1,
        repeats=s.ti_repeats,
        equilibration=s.ti_equilibration,
        switch_steps=s.ti_switch_steps,
        timestep=s.ti_timestep,
        seed=seed,
    )
    out = res.to_dict()
    out["wall_s"] = time.perf_counter() - t0
    cache.put(key, atoms, out)
    return out


def _ti_free_energy(ti: dict, temperatures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F_TI and its error on the grid (NaN outside the TI range)."""
    t = np.asarray(temperatures, float)
    if ti["temperatures_K"]:
        tt, ff, ee = (np.array(ti[k]) for k in ("temperatures_K", "free_energy_T_eV", "error_T_eV"))
        o = np.argsort(tt)
        inside = (t >= tt.min() - 1e-6) & (t <= tt.max() + 1e-6)
        f = np.where(inside, np.interp(t, tt[o], ff[o]), np.nan)
        return f, np.where(inside, np.interp(t, tt[o], ee[o]), np.nan)
    f = np.where(np.isclose(t, ti["T0_K"]), ti["free_energy_eV"], np.nan)
    return f, np.where(np.isclose(t, ti["T0_K"]), ti["error_eV"], np.nan)


def formation_free_energy(
    summary: DefectSummary,
    defect_atoms: Atoms,
    bulk: Atoms,
    e_bulk: float,
    *,
    site_symmetry: str,
    multiplicity: float,
    cell_volume: float,
    calculator: Calculator,
    model: str,
    settings: ThermoSettings | None = None,
    store: ResultStore | None = None,
    log: Callable[[str], None] = print,
) -> ThermoResult:
    """Every term of g_f(T) for one defect/charge from its search minima.

    Args:
        summary: The search summary (its minima are the configurations).
        defect_atoms: The unrelaxed defect supercell (composition).
        bulk: The pristine supercell (relaxed host repeated).
        e_bulk: Its energy with the same model.
        site_symmetry: Point group of the defect site in the bulk (orientational degeneracy).
        multiplicity: Equivalent sites per host unit cell.
        cell_volume: Volume of that unit cell (A^3).
        calculator: The MLIP for phonons and TI.
        model: Its name (recorded with every vibrational result).
        settings: What to compute.
        store: Where expensive results are cached (the run's store).
        log: Progress messages.
    """
    s = settings or ThermoSettings()
    s.validate()
    if not summary.minima:
        raise DefectMLError(f"{summary.label} has no relaxed minima to build free energies from")
    t = np.asarray(s.temperatures, float)
    run = _Run(s, t, summary.label, summary.charge, exchanged_atoms(defect_atoms, bulk), e_bulk,
               len(defect_atoms), len(bulk), calculator, model, _Cache(store), log)
    if s.vibrations != "none":
        t1 = time.perf_counter()
        log(f"phonons of the bulk supercell ({run.n_bulk} atoms) with {model}")
        run.bulk_vib = _vibrations(bulk, calculator, model, s, run.cache, log)
        run.timings["vibrations_bulk"] = time.perf_counter() - t1
    s_el = np.array([s.electronic(x) for x in t]) if s.electronic else np.zeros_like(t)
    e0 = summary.minima[0].energy
    configs = [_config_terms(run, m, site_symmetry, s_el)
               for m in summary.minima if m.energy - e0 <= s.window]
    pops = np.array([populations(np.array([c.g_f[i] for c in configs]), ti) for i, ti in enumerate(t)]).T
    s_conf = np.array([configurational_entropy(pops[:, i]) for i in range(len(t))])
    conc = concentration([Configuration(c.name, multiplicity, c.g_f) for c in configs], t, cell_volume)
    g_eff = effective_formation_energy(conc, t, cell_volume, multiplicity)
    ti_info: dict = {}
    g_anh = conc_anh = None
    if s.ti:
        ti_info, g_anh, conc_anh = _anharmonic(
            configs[0], summary, bulk, calculator, model, s, run.cache, run.bulk_vib,
            run.vib_full[configs[0].name], configs, multiplicity, cell_volume, run.timings, log,
        )
    return ThermoResult(
        summary.label, model, t, configs, pops, s_conf, s_el, g_eff, conc, g_anh, conc_anh,
        {"energy_eV": e_bulk, "n_atoms": run.n_bulk, "vibrations": _brief(run.bulk_vib)},
        ti_info, run.timings, _notes(s, summary.charge, ti_info),
    )


@dataclass
class _Run:
    """What every configuration of one :func:`formation_free_energy` call is computed with."""

    settings: ThermoSettings
    temperatures: np.ndarray
    label: str
    charge: int
    exchanged: dict
    e_bulk: float
    n_defect: int
    n_bulk: int
    calculator: Calculator
    model: str
    cache: _Cache
    log: Callable[[str], None]
    bulk_vib: dict | None = None
    vib_full: dict[str, dict] = field(default_factory=dict)  # phonons per configuration, for TI
    timings: dict[str, float] = field(default_factory=dict)


def _config_terms(run: _Run, m, site_symmetry: str, s_el: np.ndarray) -> ConfigTerms:
    """g_f(T) of one minimum: u_f, its vibrations (when asked), spin and orientational degeneracy."""
    s, t = run.settings, run.temperatures
    terms = s.charge_terms
    u_f = u_formation(m.energy, run.e_bulk, run.exchanged, s.mu, run.charge, terms.get("vbm", 0.0),
                      terms.get("fermi_level", 0.0), terms.get("correction", 0.0))
    spin = spin_degeneracy(m.atoms, run.charge)
    orient = orientational_degeneracy(site_symmetry, m.symmetry)
    f_vib, info = np.zeros_like(t), {}
    if run.bulk_vib is not None:
        t1 = time.perf_counter()
        run.log(f"phonons of {run.label} {m.trial} ({run.n_defect} atoms) with {run.model}")
        dv = run.vib_full[m.trial] = _vibrations(m.atoms, run.calculator, run.model, s, run.cache, run.log)
        run.timings[f"vibrations_{m.trial}"] = time.perf_counter() - t1
        f_vib = vib.vibrational_formation_free_energy(
            np.array(dv["free_energy_eV"]), np.array(run.bulk_vib["free_energy_eV"]), run.n_defect, run.n_bulk
        )
        info = {k: dv[k]
                for k in ("n_displacements", "n_imaginary", "min_frequency_THz", "warnings", "wall_s")}
        info["model"] = run.model
    g = u_f + f_vib - kB * t * np.log(spin * orient) - t * s_el
    return ConfigTerms(m.trial, m.label, m.energy, u_f, spin, orient, m.symmetry, f_vib, g, vib_info=info)


def _notes(s: ThermoSettings, charge: int, ti_info: dict) -> list[str]:
    """What a reader of the result must know: the TI route and its convergence, the terms left out."""
    notes = []
    if s.ti:
        notes.append(
            "anharmonic route: TI correction computed for the ground state and applied to it; "
            "other configurations keep their harmonic terms"
        )
        for who in ("bulk", "defect"):
            d = ti_info[who]
            if d["dissipation_eV"] > max(0.1, 3 * d["error_eV"]):
                notes.append(
                    f"TI NOT CONVERGED ({who}): switching dissipates {d['dissipation_eV']:.2f} eV "
                    f"(error {d['error_eV']:.2f} eV); the anharmonic route is not reliable - "
                    "use longer switches (--ti-steps) or a smoother model"
                )
    if s.vibrations != "none":
        notes.append(
            "f_vib = F_vib(defect) - (N_defect/N_bulk) F_vib(bulk): exchanged atoms' reservoirs "
            "carry the host's mean vibrational free energy per atom"
        )
    if charge != 0 and not s.charge_terms:
        notes.append("charged state without --vbm/--fermi/--correction: the q(E_VBM+E_F)+E_corr term is 0")
    return notes


def _brief(v: dict | None) -> dict | None:
    if v is None:
        return None
    return {k: v[k] for k in ("n_displacements", "n_imaginary", "min_frequency_THz", "warnings", "wall_s")}


def _anharmonic(
    gs: ConfigTerms,
    summary,
    bulk,
    calc,
    model,
    s,
    cache,
    bulk_vib,
    gs_vib,
    configs,
    multiplicity,
    cell_volume,
    timings,
    log,
):
    """TI for the ground state and the bulk: the anharmonic correction to f_vib."""
    t = np.asarray(s.temperatures, float)
    gs_min = next(m for m in summary.minima if m.trial == gs.name)
    t1 = time.perf_counter()
    log(f"thermodynamic integration: bulk ({len(bulk)} atoms), {s.ti_repeats} repeats")
    ti_b = _ti(bulk, calc, model, s, cache, seed=1)
    timings["ti_bulk"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    log(f"thermodynamic integration: {summary.label} {gs.name}, {s.ti_repeats} repeats")
    ti_d = _ti(gs_min.atoms, calc, model, s, cache, seed=2)
    timings["ti_defect"] = time.perf_counter() - t1
    fd, ed = _ti_free_energy(ti_d, t)
    fb, eb = _ti_free_energy(ti_b, t)
    n_d, n_b = len(gs_min.atoms), len(bulk)

    # like-with-like: classical harmonic on the same supercell (Gamma), static energies removed
    def classical(v: dict) -> np.ndarray:
        return np.array(
            [v["energy_symmetric_eV"] + vib.classical_free_energy(v["gamma_frequencies_THz"], x) for x in t]
        )

    h_d, h_b = classical(gs_vib), classical(bulk_vib)
    correction = (fd - h_d) - n_d / n_b * (fb - h_b)
    error = np.sqrt(ed**2 + (n_d / n_b * eb) ** 2)
    gs.f_vib_anh = gs.f_vib + correction
    gs.g_f_anh = gs.g_f + correction
    for c in configs[1:]:
        c.g_f_anh = c.g_f
    cfgs = [Configuration(c.name, multiplicity, np.nan_to_num(c.g_f_anh, nan=np.inf)) for c in configs]
    with np.errstate(divide="ignore", invalid="ignore"):
        conc = concentration(cfgs, t, cell_volume)
        conc = np.where(np.isfinite(correction), conc, np.nan)
        g = np.where(
            np.isfinite(correction), effective_formation_energy(conc, t, cell_volume, multiplicity), np.nan
        )
    info = {
        "defect": ti_d,
        "bulk": ti_b,
        "anharmonic_correction_eV": correction.tolist(),
        "correction_error_eV": error.tolist(),
        "harmonic_classical_defect_eV": h_d.tolist(),
        "harmonic_classical_bulk_eV": h_b.tolist(),
    }
    return info, g, conc
