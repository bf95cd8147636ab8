"""From the store to per-defect summaries: the minima of every defect and charge state.

Used both at the end of a search and by ``defectml show``: the summary is always rebuilt from the
stored relaxations, so what is shown is exactly what is on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import make_supercell

from defectml.errors import StoreError
from defectml.search.fingerprint import SoapSettings
from defectml.search.landscape import (
    DEFAULT_MAX_RISE,
    DEFAULT_PHASE_CHANGE_DROP,
    DEFAULT_SOAP_THRESHOLD,
    Minimum,
    RelaxedTrial,
    find_minima,
)
from defectml.store import ResultStore
from defectml.structure_io import image_distance, with_charge

#: Default committee force spread (eV/Å) above which a minimum is flagged "untrusted"; a starting
#: value, see benchmarks/active_loop.py for its calibration on held-out DFT frames.
DEFAULT_THRESHOLD = 0.05


def charge_label(name: str, charge: int) -> str:
    """ShakeNBreak-style folder label: ``v_Cd_0``, ``v_Cd_-1``, ``Mg_O_+2``."""
    return f"{name}_{charge:+d}" if charge else f"{name}_0"


@dataclass
class DefectSummary:
    """The landscape of one defect in one charge state."""

    defect: str
    charge: int
    model: str
    trials: list[RelaxedTrial]
    minima: list[Minimum]
    quarantined: list[tuple[RelaxedTrial, str]] = field(default_factory=list)
    settings_key: str = ""
    model_ref: dict | None = None  # the stored ModelRef (None: ingested DFT, or an old store)
    defect_key: str = ""
    supercell: dict | None = None  # matrix, atoms, shortest periodic-image distance (Å)

    @property
    def label(self) -> str:
        """Folder label, e.g. ``v_Cd_0``."""
        return charge_label(self.defect, self.charge)

    def trust(self, minimum: Minimum) -> dict | None:
        """The committee spread on a minimum's representative relaxation (``None``: no committee)."""
        t = next((t.trust for t in self.trials if t.name == minimum.trial), None)
        return t if t and t.get("force") is not None else None

    def untrusted(self, minimum: Minimum, threshold: float | None = None) -> bool | None:
        """Whether a minimum's committee spread exceeds ``threshold`` (``None``: cannot say)."""
        t = self.trust(minimum)
        return None if t is None else t["force"] > (DEFAULT_THRESHOLD if threshold is None else threshold)

    def spread(self, minimum: Minimum) -> float:
        """Energy range (eV) of one minimum's relaxations (0 for one alone).

        Over its polished members where two or more are (:mod:`~defectml.search.polish`): the
        search's own threshold leaves convergence noise that is not the landscape's.
        """
        e = [t.energy for t in self.spread_members(minimum)]
        return float(max(e) - min(e)) if len(e) > 1 else 0.0

    def spread_members(self, minimum: Minimum) -> list[RelaxedTrial]:
        """The relaxations :meth:`spread` is taken over: the polished ones where two or more are."""
        names = set(minimum.trials)
        done = [t for t in self.trials
                if t.name in names and t.status == "converged" and t.energy is not None]
        polished = [t for t in done if t.polish_fmax is not None]
        return polished if len(polished) > 1 else done

    def polish_fmax(self, minimum: Minimum) -> float | None:
        """The force threshold (eV/Å) a minimum's representative was polished to (``None``: not)."""
        return next((t.polish_fmax for t in self.trials if t.name == minimum.trial), None)

    @property
    def scored(self) -> bool:
        """Whether a committee scored these relaxations."""
        return any(t.trust and t.trust.get("force") is not None for t in self.trials)

    def to_dict(self) -> dict:
        """JSON-ready summary (structures as file names are added by the report)."""
        return {
            "defect": self.defect,
            "charge": self.charge,
            "model": self.model,
            "supercell": self.supercell,
            "n_trials": len(self.trials),
            "n_converged": sum(t.status == "converged" for t in self.trials),
            "minima": [
                {
                    "rank": m.rank,
                    "delta_e_eV": round(m.delta_e, 4) + 0.0,
                    "energy_eV": round(m.energy, 4),
                    "energy_spread_eV": round(self.spread(m), 4),
                    "spread_over": [t.name for t in self.spread_members(m)],
                    "polish_fmax": self.polish_fmax(m),
                    "trial": m.trial,
                    "trials": m.trials,
                    "label": m.label,
                    "symmetry": m.symmetry,
                    "bonds": [{"pair": f"{a}-{b}", "length_A": d} for a, b, d in m.bonds],
                    "contains_unperturbed": m.contains_unperturbed,
                    "identity_change": m.identity_change or None,
                    "trust": self.trust(m),
                    "untrusted": self.untrusted(m),
                }
                for m in self.minima
            ],
            "quarantined": [{"trial": t.name, "reason": r} for t, r in self.quarantined],
        }


@dataclass
class Run:
    """One run in a store: the relaxations made under one settings key."""

    key: str
    fidelity: str
    model: str
    defects: list[str]
    relaxations: int

    def describe(self) -> str:
        """One line for people."""
        return f"{self.key} ({self.model}; {', '.join(self.defects)}; {self.relaxations} relaxations)"


def list_runs(store: ResultStore, fidelity: str = "mlip") -> list[Run]:
    """Every run of this fidelity in ``store``, oldest first."""
    found: dict[str, Run] = {}
    for r in store.select(kind="relaxation", fidelity=fidelity):
        run = found.setdefault(r.settings_key, Run(r.settings_key, fidelity, r.model, [], 0))
        run.relaxations += 1
        label = charge_label(r.defect, int(r.charge_state))
        if label not in run.defects:
            run.defects.append(label)
    return list(found.values())


def choose_run(store: ResultStore, run: str | None = None, fidelity: str = "mlip",
               folder: Path | None = None) -> str:
    """The settings key of the run to work on, never "the latest".

    ``run`` (a key or a unique prefix of one) if given; else the only run of this fidelity; else
    the run that ``folder/summary.json`` names (the search that wrote the folder).

    Raises:
        StoreError: no such run, no run at all, or several with none named.
    """
    runs = list_runs(store, fidelity)
    if not runs:
        hint = "run 'defectml search' first" if fidelity == "mlip" else "ingest DFT results first"
        raise StoreError(f"no {fidelity} relaxations in {store.target}: {hint}")
    listing = "; ".join(r.describe() for r in runs)
    if run:
        hits = [r.key for r in runs if r.key.startswith(run)]
        if len(hits) != 1:
            what = "no" if not hits else "more than one"
            raise StoreError(f"{what} {fidelity} run matches --run {run} in {store.target}; runs: {listing}")
        return hits[0]
    if len(runs) == 1:
        return runs[0].key
    named = _named_run(folder) if folder is not None and fidelity == "mlip" else None
    if named in {r.key for r in runs}:
        return named
    raise StoreError(
        f"{store.target} holds {len(runs)} {fidelity} runs; choose one with --run KEY: {listing}"
    )


def _named_run(folder: Path) -> str | None:
    try:
        return json.loads((folder / "summary.json").read_text()).get("settings_key")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class DefectContext:
    """What every structure of one defect is judged against: its bulk cell, charges of ions, start."""

    defect_row: object
    bulk: Atoms
    oxidation_states: dict[str, int]
    reference: Atoms  # the unrelaxed defect supercell
    vacancy: bool


def defect_context(store: ResultStore, defect_key: str) -> DefectContext:
    """The stored defect's bulk supercell, oxidation states and unrelaxed cell."""
    defect_row = store.first(kind="defect", defect_key=defect_key)
    host_row = store.first(kind="host", host_key=defect_row.host_key) if defect_row else None
    if defect_row is None or host_row is None:
        raise StoreError(f"results database {store.target} lacks the defect/host of {defect_key}")
    bulk = make_supercell(host_row.toatoms(), np.asarray(defect_row.data["sc_matrix"]))
    return DefectContext(defect_row, bulk, dict(host_row.data["oxidation_states"]), defect_row.toatoms(),
                         defect_row.data.get("kind") == "vacancy")


def summarise(
    store: ResultStore,
    settings_key: str | None = None,
    *,
    soap: SoapSettings | None = None,
    threshold: float = DEFAULT_SOAP_THRESHOLD,
    max_drop: float = DEFAULT_PHASE_CHANGE_DROP,
    only: set[tuple[str, int]] | None = None,
    fidelity: str = "mlip",
    max_rise: float = DEFAULT_MAX_RISE,
    polished: bool = True,
) -> list[DefectSummary]:
    """Summaries of every (defect, charge) relaxed under ``settings_key`` (default: the only run).

    Args:
        store: The results store.
        settings_key: Which run settings to summarise.
        soap: SOAP settings for grouping.
        threshold: SOAP cosine-distance threshold.
        max_drop: Phase-change quarantine threshold (eV).
        only: Restrict to these ``(defect_key, charge)`` pairs.
        fidelity: ``mlip`` (searches) or ``dft`` (ingested or DFT-relaxed results).
        max_rise: High-energy quarantine threshold (eV above the unperturbed relaxation).
        polished: Use the relaxations' continuations to a tighter force threshold where stored
            (:mod:`~defectml.search.polish`); ``False``: the relaxations' own end points.
    """
    from defectml.search.polish import polished_rows

    key = settings_key or choose_run(store, None, fidelity)
    rows = store.select(kind="relaxation", settings_key=key, fidelity=fidelity)
    polished = polished_rows(store.select(kind="polish", settings_key=key)) if polished else {}
    groups: dict[tuple[str, int], list] = {}
    for r in rows:
        groups.setdefault((r.defect_key, int(r.charge_state)), []).append(r)
    summaries = []
    for (defect_key, charge), group in groups.items():
        if only is not None and (defect_key, charge) not in only:
            continue
        ctx = defect_context(store, defect_key)
        defect_row = ctx.defect_row
        trials = [relaxed_trial_from_row(r, polished.get(r.trial_key))
                  for r in sorted(group, key=lambda r: r.id)]
        minima, bad = find_minima(
            trials, bulk=ctx.bulk, oxidation_states=ctx.oxidation_states,
            threshold=threshold, soap=soap, max_drop=max_drop, reference=ctx.reference,
            vacancy=ctx.vacancy, max_rise=max_rise,
        )
        cell = defect_row.toatoms().cell
        supercell = {"matrix": np.asarray(defect_row.data["sc_matrix"]).tolist(),
                     "atoms": int(defect_row.natoms),
                     "min_image_distance_A": round(image_distance(cell), 3)}
        summaries.append(
            DefectSummary(defect_row.defect, charge, group[0].model, trials, minima, bad, key,
                          group[0].data.get("model_ref"), defect_key, supercell)
        )
    summaries.sort(key=lambda s: (s.defect, s.charge))
    return summaries


def relaxed_trial_from_row(row, polish=None) -> RelaxedTrial:
    """A :class:`RelaxedTrial` from a stored relaxation row (its ``polish`` row's end point if given)."""
    end = polish if polish is not None else row
    return RelaxedTrial(
        name=row.trial,
        status=row.status,
        energy=end.get("energy"),
        atoms=with_charge(end.toatoms(), int(row.charge_state)),
        site=np.asarray(row.data["site"]),
        defect_index=row.data.get("defect_index"),
        distortion=row.get("distortion"),
        reason=row.data.get("reason", ""),
        steps=int(row.steps),
        basin_of=row.data.get("basin_of"),
        trust=row.data.get("trust"),
        polish_fmax=None if polish is None else float(polish.polish_fmax),
        search_energy=None if polish is None else row.get("energy"),
    )


def trial_start(row, or_end: bool = False) -> Atoms | None:
    """The unrelaxed structure of a stored relaxation (its recorded starting positions).

    ``None`` where none was recorded (an ingested DFT row), or the relaxed structure with ``or_end``.
    """
    atoms = row.toatoms()
    atoms.calc = None
    start = row.data.get("initial_positions")
    if start is None:
        return atoms if or_end else None
    atoms.positions = np.asarray(start, dtype=float)
    return atoms
