"""Run the free-energy terms for the defects of a finished search (the store is the input)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.build import make_supercell

from defectml.errors import DefectMLError
from defectml.models import Model, ModelRef, check_key, load_model
from defectml.models.ref import check_moved
from defectml.search.landscape import local_symmetry
from defectml.search.summary import charge_label, summarise
from defectml.store import ResultStore
from defectml.thermo.freeenergy import ThermoResult, ThermoSettings, exchanged_atoms, formation_free_energy
from defectml.thermo.reference import elemental_mu


def search_model_ref(summary, override: str | None = None) -> ModelRef | str:
    """Which model continues a search's work, checked but not loaded.

    Exactly the search's own: its stored reference, refused if the weights changed since or are
    gone. ``override`` (``--model``) points it at a moved or renamed weights file and is
    accepted only with the stored content key (:func:`~defectml.models.ref.check_moved`). A
    store that records no reference (written before model references, or DFT) gives the
    override, or the stored model name.

    Raises:
        ModelError: the stored model is gone or changed, or ``override`` is another model.
    """
    if summary.model_ref is None:  # a store written before model references: by name
        return override or summary.model
    if override:
        return check_moved(summary.model_ref, override)
    return check_key(summary.model_ref)


def search_model(summary, override: str | None = None) -> Model:
    """The model to continue a search's work with (see :func:`search_model_ref`), loaded."""
    return load_model(search_model_ref(summary, override))


def _thermo_summaries(store: ResultStore, run: str | None, defect: str | None, charge: int | None) -> list:
    """The search's summaries of ``defect`` in ``charge`` (``None``: all).

    Raises:
        DefectMLError: none match.
    """
    summaries = [
        s
        for s in summarise(store, run, fidelity="mlip")
        if (defect is None or s.defect == defect) and (charge is None or s.charge == charge)
    ]
    if not summaries:
        raise DefectMLError(
            f"no search results for {defect or 'any defect'}"
            f"{'' if charge is None else f' in charge state {charge:+d}'} in {store.target}"
        )
    return summaries


def _missing_mu(given: dict[str, float], elements, m: Model, log: Callable[[str], None]) -> dict[str, float]:
    """``given`` chemical potentials plus, for each of ``elements`` missing, the model's element-rich limit.

    Args:
        given: Chemical potentials given (eV/atom); not changed.
        elements: Elements exchanged with the reservoirs.
        m: The search's model (its relaxed elemental phases).
        log: Says each limit taken.
    """
    mu = dict(given)
    for el in elements:
        if el not in mu:
            mu[el] = elemental_mu(el, m.calculator)
            log(
                f"mu_{el} = {mu[el]:.3f} eV/atom: {el}-rich limit from {m.name}'s relaxed elemental "
                "phase (give --mu for other conditions)"
            )
    return mu


def _supercell_site_symmetry(defect_atoms, row, defect: str, log: Callable[[str], None]) -> str:
    """The site's symmetry in the unrelaxed defect supercell, with a note where it is lower.

    Orientational degeneracy compares like with like: the site's symmetry in the unrelaxed
    defect supercell (a supercell lattice can itself lower the primitive-cell site symmetry).
    """
    site_sym = local_symmetry(defect_atoms, np.asarray(row.data["site"]), row.data["defect_index"])
    if site_sym != row.data["site_symmetry"]:
        log(
            f"note: the {defect} supercell lowers the site symmetry {row.data['site_symmetry']} to "
            f"{site_sym}; orientational degeneracies are counted within the supercell"
        )
    return site_sym


def _thermo_one(store: ResultStore, s, m: Model, settings: ThermoSettings,
                log: Callable[[str], None]) -> ThermoResult:
    """g_f(T) of one defect in one charge state (``s``, a search summary) with model ``m``."""
    row = store.first(kind="defect", defect_key=s.defect_key)
    host_row = store.first(kind="host", host_key=row.host_key)
    host = host_row.toatoms()
    bulk = make_supercell(host, np.asarray(row.data["sc_matrix"]))
    e_bulk = float(host_row.energy) * len(bulk) / len(host)
    defect_atoms = row.toatoms()
    mu = _missing_mu(settings.mu, exchanged_atoms(defect_atoms, bulk), m, log)
    site_sym = _supercell_site_symmetry(defect_atoms, row, s.defect, log)
    st = ThermoSettings(**{**settings.__dict__, "mu": mu})
    return formation_free_energy(
        s,
        defect_atoms,
        bulk,
        e_bulk,
        site_symmetry=site_sym,
        multiplicity=float(row.data["multiplicity"]),
        cell_volume=float(host.get_volume()),
        calculator=m.calculator,
        model=f"{m.version} [{m.key}]",
        settings=st,
        store=store,
        log=log,
    )


def thermo_from_store(
    store: ResultStore,
    settings: ThermoSettings,
    *,
    defect: str | None = None,
    charge: int | None = None,
    model: str | None = None,
    run: str | None = None,
    log: Callable[[str], None] = print,
) -> list[ThermoResult]:
    """g_f(T) of every (or the selected) defect/charge of the search in ``store``.

    Missing chemical potentials are taken as the element-rich limit of the model's own relaxed
    elemental phase (ASE reference state), and said so. ``run``: the search's settings key
    (default: the only run in the store).
    """
    summaries = _thermo_summaries(store, run, defect, charge)
    m = search_model(summaries[0], model)
    return [_thermo_one(store, s, m, settings, log) for s in summaries]


def dynamics_from_store(
    store: ResultStore,
    *,
    defect: str,
    charge: int,
    temperature: float,
    steps: int,
    timestep: float = 2.0,
    interval: int = 20,
    pressure_bar: float | None = None,
    quench: int = 0,
    neb_to: int | None = None,
    model: str | None = None,
    seed: int = 0,
    run: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """MD of a defect's lowest minimum with trajectory analysis; optional inherent structures and NEB.

    Args:
        store: The search's store.
        defect: Which defect (e.g. ``v_Cd``).
        charge: Its charge state.
        temperature: K.
        steps: MD steps.
        timestep: fs.
        interval: Steps between saved frames.
        pressure_bar: NPT at this pressure (default NVT).
        quench: Quench this many evenly spaced frames to their minima (inherent structures).
        neb_to: Rank of a second minimum: NEB barrier and TST rate from the lowest one to it.
        model: MLIP (default: the search's).
        seed: MD random seed.
        run: The search's settings key (default: the only run in the store).
        log: Progress messages.
    """
    from defectml.thermo import dynamics as dyn

    found = [s for s in summarise(store, run, fidelity="mlip") if s.defect == defect and s.charge == charge]
    if not found:
        raise DefectMLError(f"no search results for {defect} in charge state {charge:+d} in {store.target}")
    s = found[0]
    row = store.first(kind="defect", defect_key=s.defect_key)
    host_row = store.first(kind="host", host_key=row.host_key)
    bulk = make_supercell(host_row.toatoms(), np.asarray(row.data["sc_matrix"]))
    m = search_model(s, model)
    gs = s.minima[0]
    kind, index = row.data["kind"], row.data["defect_index"]
    if neb_to is not None and not 0 < neb_to < len(s.minima):
        raise DefectMLError(f"{s.label} has minima 0..{len(s.minima) - 1}; --neb-to {neb_to} is not one")
    log(f"MD of {s.label} {gs.trial} at {temperature:g} K, {steps} steps of {timestep:g} fs with {m.name}")
    frames = dyn.run_md(
        gs.atoms,
        m.calculator,
        temperature,
        steps,
        timestep=timestep,
        interval=interval,
        pressure_bar=pressure_bar,
        seed=seed,
    )
    out: dict = {
        "defect": s.label,
        "model": f"{m.version} [{m.key}]",
        "temperature_K": temperature,
        "steps": steps,
        "timestep_fs": timestep,
        "ensemble": "NPT" if pressure_bar is not None else "NVT",
        "analysis": dyn.analyse_trajectory(frames, bulk, kind, index),
    }
    out["frames"] = frames
    if quench:
        out["inherent_structures"] = _inherent_structures(frames, quench, s, bulk, kind, index, m.calculator,
                                                          log)
    if neb_to is not None:
        log(f"NEB from minimum 0 to minimum {neb_to}")
        out["neb"] = _neb_rate(gs.atoms, s.minima[neb_to].atoms, m.calculator, temperature)
    return out


def _inherent_structures(frames: list, quench: int, s, bulk, kind: str, index, calculator, log) -> dict:
    """``quench`` evenly spaced MD frames quenched and matched to the search's minima."""
    from defectml.thermo import dynamics as dyn

    pick = frames[:: max(1, len(frames) // quench)][:quench]
    centres = [dyn.defect_centre(f, bulk, kind, index) for f in pick]
    ref_centres = [dyn.defect_centre(mi.atoms, bulk, kind, index) for mi in s.minima]
    log(f"quenching {len(pick)} frames (inherent structures)")
    found = dyn.inherent_structures(pick, calculator, [mi.atoms for mi in s.minima], ref_centres, centres)
    found["minima"] = [mi.label for mi in s.minima]
    return found


def _neb_rate(initial, final, calculator, temperature: float) -> dict:
    """The NEB barrier between two minima, its attempt frequency and transition-state-theory rate."""
    from defectml.thermo import dynamics as dyn

    res = dyn.neb(initial, final, calculator)
    direction = res.images[1].positions - res.images[0].positions
    nu = dyn.attempt_frequency(initial, direction, calculator)
    return {**res.to_dict(), "attempt_frequency_Hz": nu,
            "rate_per_s": dyn.tst_rate(res.barrier, nu, temperature)}


def levels_from_store(
    store: ResultStore,
    *,
    gap: float,
    vbm: float = 0.0,
    dielectric: float | None = None,
    mu: dict[str, float] | None = None,
    temperature: float = 300.0,
    electron_mass: float = 1.0,
    hole_mass: float = 1.0,
    fidelity: str = "mlip",
    defect: str | None = None,
    bulk_energy: float | None = None,
    model: str | None = None,
    run: str | None = None,
    free_energies: dict[str, float] | None = None,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Formation-energy lines, transition levels and the charge-neutral Fermi level of a store's defects.

    Each charge state's energy is its lowest minimum (of the ML search, or of the DFT rows with
    ``fidelity="dft"``), corrected by the point-charge term of its supercell. Missing chemical
    potentials: the element-rich limit of the model's elemental phase, as ``thermo`` does.
    ``bulk_energy``: the pristine supercell's energy (eV) where the store holds no host energy
    (an ingested ShakeNBreak folder has none) or another is wanted. ``free_energies``: finite-T
    terms (eV) by charge-state label (``v_Cd_0``, ``Mg_O_+2``; :func:`finite_t_terms` reads them
    from ``thermo``'s output), added to those states' formation energies: the levels and the Fermi
    level are then at that temperature. ``model`` (``--model``): the search's weights file where it
    moved (checked at once: its content key must be the stored one).

    Warnings (one line each, to ``warn``, default ``log``; also under ``"warnings"``): a charge-blind
    model (every charge state's energy from one surface: the levels are then the corrections'),
    and a charge-aware model used on a supercell of another size than its training cells'
    (:func:`~defectml.models.charged.cell_size_warning`).

    Returns:
        A JSON-ready document (per defect: charge states, energies, corrections, intercepts,
        levels; the Fermi level, carriers and concentrations; warnings) and the
        :class:`DefectLines` under ``"_lines"``.
    """
    summaries = [s for s in summarise(store, run, fidelity=fidelity)
                 if defect is None or s.defect == defect]
    _check_levels_input(summaries, store, fidelity, defect, dielectric, free_energies)
    chosen = search_model_ref(summaries[0], model) if model else None  # a wrong --model fails first
    by_defect: dict[str, list] = {}
    for s in summaries:
        if s.minima:
            by_defect.setdefault(s.defect, []).append(s)
    doc: dict = {"fidelity": fidelity, "gap_eV": gap, "vbm_eV": vbm, "dielectric": dielectric,
                 "temperature_K": temperature, "defects": {}, "warnings": []}

    def say(message: str) -> None:
        if message not in doc["warnings"]:
            doc["warnings"].append(message)
            (warn or (lambda m: log(f"warning: {m}")))(message)

    # the model's charge input (DFT energies carry their own charge: nothing to say)
    charge_input = ("", None, None)
    if fidelity == "mlip":
        charge_input = _charge_input(store, summaries[0], chosen)
    if charge_input[2] is False and any(s.charge for g in by_defect.values() for s in g):
        say(f"{charge_input[0]} has no charge input: every charge state's energy is the same neutral "
            "surface's (the states differ only in their trials), so the levels show the charge corrections "
            "and q·E_F, not the defect; use a charge-aware model (finetune --charge-aware) or DFT "
            "(--fidelity dft)")
    mus = _Mus(dict(mu or {}), chosen, log)
    lines = []
    for name, group in sorted(by_defect.items()):
        line, entry = _defect_levels(store, name, group, gap=gap, vbm=vbm, dielectric=dielectric,
                                     bulk_energy=bulk_energy, free_energies=free_energies or {}, mus=mus,
                                     charge_input=charge_input, say=say)
        lines.append(line)
        doc["defects"][name] = entry
    doc["mu"] = mus.mu
    if any(len(d.intercepts) > 1 or next(iter(d.intercepts)) != 0 for d in lines):
        doc["neutrality"] = _neutrality(lines, gap, temperature, electron_mass, hole_mass, log)
    doc["_lines"] = lines
    return doc


def _check_levels_input(summaries, store: ResultStore, fidelity: str, defect: str | None,
                        dielectric: float | None, free_energies: dict | None) -> None:
    """Refuse, in one line, what :func:`levels_from_store` cannot work from."""
    if not summaries:
        raise DefectMLError(f"no {fidelity} results for {defect or 'any defect'} in {store.target}")
    if any(s.charge for s in summaries) and dielectric is None:
        raise DefectMLError("charged states need a dielectric constant for their finite-size correction: "
                            "give --dielectric (static: ε∞ + ε_ionic), or --dielectric 0 for none")
    unmatched = sorted(set(free_energies or {}) - {charge_label(s.defect, s.charge) for s in summaries})
    if unmatched:
        have = ", ".join(sorted(charge_label(s.defect, s.charge) for s in summaries))
        raise DefectMLError(f"--thermo: {', '.join(unmatched)} match no charge state here ({have})")


@dataclass
class _Mus:
    """Chemical potentials: the given ones, the rest the model's element-rich limits as needed."""

    mu: dict[str, float]
    chosen: ModelRef | None
    log: Callable[[str], None]
    calculator: object = None

    def need(self, elements, summary) -> None:
        """Fill in every element of ``elements`` not given (the model loaded once, when first needed)."""
        for el in elements:
            if el in self.mu:
                continue
            if self.calculator is None:
                self.calculator = load_model(self.chosen or search_model_ref(summary)).calculator
            self.mu[el] = elemental_mu(el, self.calculator)
            self.log(f"mu_{el} = {self.mu[el]:.3f} eV/atom: {el}-rich limit from the model's relaxed "
                     "elemental phase (give --mu for other conditions)")


def _host_supercell_energy(store: ResultStore, row, bulk_energy: float | None):
    """The host, its defect supercell and that supercell's energy (given, else the stored host's)."""
    host_row = store.first(kind="host", host_key=row.host_key)
    host = host_row.toatoms()
    bulk = make_supercell(host, np.asarray(row.data["sc_matrix"]))
    if bulk_energy is not None:
        return host, bulk, float(bulk_energy)
    if host_row.get("energy") is not None:
        return host, bulk, float(host_row.energy) * len(bulk) / len(host)
    raise DefectMLError(f"{store.target} holds no energy of the host: give --bulk-energy (eV, the "
                        f"pristine {len(bulk)}-atom supercell at the same level of theory)")


def _defect_levels(store: ResultStore, name: str, group: list, *, gap: float, vbm: float,
                   dielectric: float | None, bulk_energy: float | None, free_energies: dict, mus: _Mus,
                   charge_input: tuple, say: Callable[[str], None]):
    """One defect's formation lines and its JSON entry (charge states, levels)."""
    from defectml.models.charged import cell_size, cell_size_warning
    from defectml.thermo.levels import (
        ChargeState,
        formation_lines,
        point_charge_correction,
        sites_per_cm3,
        transition_levels,
    )

    row = store.first(kind="defect", defect_key=group[0].defect_key)
    host, bulk, e_bulk = _host_supercell_energy(store, row, bulk_energy)
    exchanged = exchanged_atoms(row.toatoms(), bulk)
    mus.need(exchanged, group[0])
    states, extra = [], {}
    for s in sorted(group, key=lambda s: s.charge):
        corr = point_charge_correction(bulk.cell.array, s.charge, dielectric) if dielectric else 0.0
        extra[s.charge] = free_energies.get(charge_label(name, s.charge))
        states.append(ChargeState(s.charge, float(s.minima[0].energy) + (extra[s.charge] or 0.0), corr))
    label, card, aware = charge_input
    if aware and any(st.charge for st in states):
        top = max(states, key=lambda st: abs(st.charge))
        line = cell_size_warning(label, card, cell_size(bulk.cell),
                                 (top.charge, top.correction) if dielectric else None)
        if line:
            say(line)
    mult = float(row.data.get("multiplicity") or 1.0)
    d = formation_lines(name, states, e_bulk, exchanged, mus.mu, vbm,
                        sites_per_cm3(mult, float(host.get_volume())))
    labels = {g.charge: g.minima[0].label for g in group}
    entry = {
        "charge_states": {
            f"{st.charge:+d}": {"energy_eV": st.energy, "correction_eV": round(st.correction, 4),
                                "finite_t_eV": extra[st.charge],
                                "formation_energy_at_vbm_eV": round(d.intercepts[st.charge], 4),
                                "minimum": labels[st.charge]} for st in states},
        "exchanged": exchanged,
        "levels": [{"label": lv.label, "q": lv.q, "q_next": lv.q_next,
                    "fermi_level_eV": round(lv.fermi_level, 4)} for lv in transition_levels(d, gap)],
    }
    return d, entry


def _neutrality(lines: list, gap: float, temperature: float, electron_mass: float, hole_mass: float,
                log: Callable[[str], None]) -> dict:
    """The charge-neutral Fermi level, carriers and concentrations (or why there is none)."""
    from defectml.thermo.levels import solve_fermi_level

    try:
        sol = solve_fermi_level(lines, gap, temperature, electron_mass=electron_mass, hole_mass=hole_mass)
    except DefectMLError as exc:  # the levels stand without it
        log(f"no charge-neutral Fermi level: {exc} (is --vbm on the energies' scale?)")
        return {"error": str(exc)}
    return {"fermi_level_eV": round(sol.fermi_level, 4), "electrons_cm3": sol.electrons,
            "holes_cm3": sol.holes,
            "concentrations_cm3": {k: {f"{q:+d}": c for q, c in v.items()}
                                   for k, v in sol.concentrations.items()}}


def _charge_input(store: ResultStore, summary, chosen: ModelRef | str | None) -> tuple:
    """The search model's name, card and whether it reads the charge (``None``: cannot tell).

    The card is the one beside ``chosen`` (a moved file's new place) where given, else beside
    the stored file; the stored version string says "charge-aware" for a charge-aware CHGNet.
    """
    from defectml.errors import ModelError
    from defectml.models.charged import has_charge_input

    if not summary.model_ref:
        return summary.model, None, None
    stored = ModelRef.from_dict(summary.model_ref)
    try:
        card = (chosen if isinstance(chosen, ModelRef) else stored).card
    except ModelError:  # an unreadable card: the version string still tells
        card = None
    row = store.first(kind="relaxation", settings_key=summary.settings_key, defect_key=summary.defect_key)
    version = row.data.get("model_version") if row is not None else None
    return stored.label, card, has_charge_input(stored.family, card, version)


def finite_t_terms(paths: list[str | Path], temperature: float) -> dict[str, float]:
    """Finite-temperature terms of formation energies, from ``defectml thermo``'s ``thermo.json`` files.

    For each file (one defect in one charge state): its effective formation free energy at
    ``temperature`` (interpolated on its grid) less its lowest configuration's formation energy,
    i.e. what vibrations, degeneracies and configurations add at that temperature.

    Returns:
        ``{charge-state label: eV}`` (labels as ``thermo`` writes them, e.g. ``v_Cd_0``).
    """
    import json

    out = {}
    for path in paths:
        path = Path(path)
        path = path / "thermo.json" if path.is_dir() else path
        try:
            doc = json.loads(path.read_text())
            t, g = np.asarray(doc["temperatures_K"], float), np.asarray(doc["g_f_eV"], float)
            u = min(float(c["u_f_eV"]) for c in doc["configurations"])
            label = str(doc["defect"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DefectMLError(f"--thermo {path}: not a thermo.json of `defectml thermo` ({exc})") from None
        if not t.min() - 1e-9 <= temperature <= t.max() + 1e-9:
            raise DefectMLError(f"--thermo {path}: {label} has free energies for {t.min():g}-{t.max():g} K, "
                                f"not {temperature:g} K: rerun thermo with --T covering it")
        out[label] = float(np.interp(temperature, t, g)) - u
    return out
