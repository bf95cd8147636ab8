"""The search pipeline: host → defects → trials → relaxations (stored) → minima.

:func:`plan` turns a host and a defect request into :class:`DefectCharge` work items with their
trials (no model needed: ``defectml generate`` stops there). :func:`search` adds the model:
relaxes the host, relaxes every trial not already in the store, writing each result the moment
it finishes, and summarises the landscape from the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from pymatgen.core import Structure

from defectml.core.engine import Job, ModelSpec, run_jobs
from defectml.core.optimizers import DEFAULT_OPTIMIZER, OPTIMIZERS
from defectml.core.relax import CONVERGED, RelaxationFailure, relax_host
from defectml.errors import InputError, ModelError, UntrustedPrediction
from defectml.models import Model, ModelRef, load_model, wrap_calculator
from defectml.models.model import default_threads
from defectml.records import DefectRecord, HostRecord, RelaxationRecord, trial_key
from defectml.search.defects import (
    Defect,
    bulk_nn_distance,
    defects_from_objects,
    guess_oxidation_states,
    host_of,
    make_defects,
    object_kind,
    parse_defect_specs,
    parse_oxi,
    resolve_defects,
)
from defectml.search.distort import Trial, TrialSettings, make_trials, number_of_distorted_neighbours
from defectml.search.fingerprint import SoapSettings
from defectml.search.landscape import (
    DEFAULT_MAX_RISE,
    DEFAULT_PHASE_CHANGE_DROP,
    DEFAULT_SOAP_THRESHOLD,
    BasinWatch,
)
from defectml.search.polish import DEFAULT_POLISH_FMAX, DEFAULT_POLISH_MEMBERS, polish_minima
from defectml.search.summary import DefectSummary, charge_label, summarise
from defectml.settings import FromOptions
from defectml.store import ResultStore, content_key, is_url
from defectml.structure_io import check_host, image_distance, to_atoms, to_structure, with_charge

log = logging.getLogger("defectml")


@dataclass
class SearchSettings(FromOptions):
    """Everything that decides a search's results (and so keys them in the store).

    Built from options by :meth:`from_options`: each field from the option of its name, the
    trial settings from theirs (``--distortions``, ``--dimer``, ...) and SOAP's from ``--soap-*``.

    Attributes:
        model: Built-in name, weights file (``[family:]PATH[@HEAD]``) or :class:`ModelRef`
            (ignored when a calculator is passed).
        device: ``cpu`` or ``cuda``.
        threads: Torch threads (default: the cores other processes leave free).
        fmax: Force threshold (eV/Å) of the FIRE relaxations.
        max_steps: Step limit of each relaxation.
        min_length: Minimum distance (Å) between periodic images of the defect.
        max_atoms: Largest supercell accepted.
        force_diagonal: Only diagonal supercell matrices.
        relax_host: Relax the host cell with the model first (symmetry kept).
        oxidation_states: Overrides of the guessed oxidation states.
        trials: Trial generation settings.
        soap: SOAP settings for telling minima apart.
        soap_threshold: Cosine distance below which two relaxed trials are the same minimum.
        max_drop: Quarantine relaxations this far (eV) below the median as phase changes.
        max_rise: Quarantine relaxations this far (eV) above the Unperturbed one (the median
            where there is none) as broken, high-energy structures.
        early_stop: Stop a relaxation once it has reached the basin of an already relaxed
            minimum (same defect-site SOAP within the threshold, energy within 0.05 eV).
        sites: ``symmetry`` (inequivalent sites of an ordered host, in a new supercell) or
            ``environment`` (one site per local chemical environment of the cell as given,
            for alloys and disordered hosts).
        env_shells: Neighbour shells that define an environment.
        pre_relax: A trained direct predictor (``defectml predictor train``) that moves every
            trial to its predicted relaxed positions before the MLIP relaxation.
        trials_from: A ShakeNBreak folder whose trial POSCARs are the trials, exactly as they are
            (:mod:`~defectml.search.snb_trials`); its cells are the supercells, so the supercell
            and trial settings do not apply.
        optimizer: How every relaxation steps (:data:`~defectml.core.optimizers.OPTIMIZERS`);
            part of the key unless ``fire``, the default (old runs keep their keys).
        polish_fmax: Continue what the ranking rests on to this force threshold (eV/Å) before
            ranking (:mod:`~defectml.search.polish`); 0 ranks on the search's own energies. Not
            part of the key: a continuation is a row of its own, the relaxations stay as they are.
        polish_members: Relaxations continued per minimum: the lowest, the highest, then the
            next lowest (0: all).
    """

    model: str | ModelRef = "chgnet"
    device: str = "cpu"
    threads: int | None = None
    fmax: float = 0.05
    max_steps: int = 1500
    min_length: float = 10.0
    max_atoms: int = 500
    force_diagonal: bool = False
    relax_host: bool = True
    oxidation_states: dict[str, int] | None = field(default=None, metadata={"parse": parse_oxi})
    trials: TrialSettings = field(default_factory=TrialSettings, metadata={"options": ""})
    soap: SoapSettings = field(default_factory=SoapSettings,
                               metadata={"options": SoapSettings.OPTIONS_PREFIX})
    soap_threshold: float = DEFAULT_SOAP_THRESHOLD
    max_drop: float = DEFAULT_PHASE_CHANGE_DROP
    max_rise: float = DEFAULT_MAX_RISE
    early_stop: bool = False
    sites: str = "symmetry"
    env_shells: int = 1
    pre_relax: str | None = None
    trials_from: str | None = None
    optimizer: str = DEFAULT_OPTIMIZER
    polish_fmax: float = DEFAULT_POLISH_FMAX
    polish_members: int = DEFAULT_POLISH_MEMBERS

    def validate(self) -> None:
        """Raise ``InputError`` for out-of-range numbers."""
        if self.fmax <= 0:
            raise InputError(f"fmax must be positive, got {self.fmax}")
        if self.max_steps < 1:
            raise InputError(f"max steps must be at least 1, got {self.max_steps}")
        if self.polish_fmax < 0 or (self.polish_fmax and self.polish_fmax >= self.fmax):
            raise InputError(f"polish fmax must lie below fmax ({self.fmax} eV/Å), or be 0 to rank on "
                             f"the search's own energies; got {self.polish_fmax}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimiser {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.polish_members < 0:
            raise InputError(f"polish members must be 0 (all) or more, got {self.polish_members}")
        if not 0 <= self.soap_threshold < 2:
            raise InputError(f"SOAP threshold must be in [0, 2), got {self.soap_threshold}")
        if not self.max_rise > 0:
            raise InputError(f"max rise must be positive (eV above the unperturbed relaxation), "
                             f"got {self.max_rise}")
        if any(abs(f) >= 1 for f in self.trials.distortions):
            raise InputError("bond distortions must lie strictly between -1 and 1")
        if self.sites not in ("symmetry", "environment"):
            raise InputError(f"sites must be 'symmetry' or 'environment', got {self.sites!r}")
        if self.trials_from and self.sites == "environment":
            raise InputError("--trials-from takes the folder's own cells and sites: "
                             "not with sites=\"environment\"")

    def key(self, model_key: str, host_key: str) -> str:
        """The run's key: the host's and the model's keys and every setting that changes results.

        Trials from a folder (``trials_from``) are a run of their own, whatever the folder's path:
        their POSCARs' content keys each defect and so each relaxation (:func:`defect_store_key`),
        and the supercell and trial settings, which they do not use, are left out.
        """
        if self.trials_from:
            return content_key(
                host_key, model_key, self.fmax, self.max_steps, self.relax_host, self.oxidation_states,
                "trials_from",
                *(["early_stop", self.soap_threshold] if self.early_stop else []),
                *(["pre_relax", _file_key(self.pre_relax)] if self.pre_relax else []),
                *(["optimizer", self.optimizer] if self.optimizer != DEFAULT_OPTIMIZER else []),
            )
        return content_key(
            host_key, model_key, self.fmax, self.max_steps, self.min_length, self.max_atoms,
            self.force_diagonal, self.relax_host, self.oxidation_states, self.trials.as_dict(),
            *(["early_stop", self.soap_threshold] if self.early_stop else []),
            *(["environment", self.env_shells] if self.sites == "environment" else []),
            *(["pre_relax", _file_key(self.pre_relax)] if self.pre_relax else []),
            *(["optimizer", self.optimizer] if self.optimizer != DEFAULT_OPTIMIZER else []),
        )


def _file_key(spec: str) -> str:
    """Content hash of a predictor checkpoint, or of each of a comma-separated ensemble's."""
    import hashlib

    h = hashlib.sha256()
    for path in [p.strip() for p in spec.split(",") if p.strip()]:
        try:
            h.update(Path(path).read_bytes())
        except OSError as exc:
            raise InputError(f"cannot read predictor {path}: {exc.strerror}") from None
    return h.hexdigest()[:16]


MAX_PREDICTED_MOVE = 5.0  # A: beyond every DFT move in the 2DMD training pairs (at most 4.1 A)


def pre_relax_trials(items: list[DefectCharge], checkpoint: str, log_fn=log.info) -> None:
    """Move every trial to the direct predictor's relaxed positions (in place)."""
    from defectml.predictor.predict import predict_relaxed
    from defectml.predictor.train import load_predictor

    model = load_predictor(checkpoint)
    n, kept = 0, []
    for it in items:
        pristine = to_atoms(it.defect.bulk_supercell)
        reference = to_atoms(it.defect.supercell)
        for t in it.trials:
            try:
                t.atoms = predict_relaxed(
                    model, t.atoms, pristine, reference=reference, max_move=MAX_PREDICTED_MOVE
                )
                n += 1
            except UntrustedPrediction as exc:  # relax this trial as generated
                kept.append(f"{it.label} {t.name} ({exc})")
    log_fn(f"pre-relaxed {n} trials with the direct predictor {checkpoint}")
    if kept:
        log_fn(f"kept {len(kept)} trials as generated: " + "; ".join(kept))


@dataclass
class DefectCharge:
    """One defect in one charge state, with its trial structures.

    ``source``: content key of the POSCARs its trials were read from (``trials_from``), ``None``
    for generated trials; ``notes``: what reading them found worth saying.
    """

    defect: Defect
    charge: int
    trials: list[Trial]
    dropped: list[str]
    source: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Folder label, e.g. ``v_Cd_0``."""
        return charge_label(self.defect.name, self.charge)


def defect_store_key(host_key: str, item: DefectCharge, min_length: float) -> str:
    """Store key of an item's defect row (and so of its relaxations, :func:`~defectml.records.trial_key`).

    Trials read from a folder are keyed by its POSCARs' content (``item.source``) instead of the
    supercell settings: a changed POSCAR is a new defect row, relaxed anew.
    """
    d = item.defect
    if item.source is not None:
        return content_key(host_key, d.name, d.sc_matrix, "trials_from", item.source)
    return content_key(host_key, d.name, d.sc_matrix, min_length)


@dataclass
class SearchResult:
    """What a search produced: one summary per defect and charge state."""

    summaries: list[DefectSummary]
    model: str
    model_version: str
    settings_key: str
    relaxed: int
    skipped: int
    seconds: float
    dropped: dict[str, list[str]] = field(default_factory=dict)


def _charges_for(defect: Defect, charges: list[int] | None) -> list[int]:
    chosen = list(charges) if charges is not None else list(defect.default_charges)
    for q in chosen:
        defect.check_charge(q)
    return chosen


def plan(
    host: Structure,
    defects: str | Sequence = "all",
    charges: list[int] | None = None,
    settings: SearchSettings | None = None,
    reference: Structure | None = None,
) -> list[DefectCharge]:
    """Defects, charge states and trials for ``host`` (no model involved).

    ``defects``: a spec (``v_Cd,Se_Te``, ``all``) or pymatgen-analysis-defects / doped ``Defect``
    objects, whose sites are taken in the frame of ``reference`` (the host as given; ``host``
    may be it relaxed), see :func:`~defectml.search.defects.defects_from_objects`.

    Raises:
        InputError: for impossible defect specs, charges or supercell requests.
    """
    s = settings or SearchSettings()
    if s.trials_from:
        return _folder_plan(host, defects, charges, s)
    if not isinstance(defects, str):
        if s.sites == "environment":
            raise InputError("defect objects sit on the host's own sites: not with sites=\"environment\"")
        found = defects_from_objects(
            host, list(defects), reference=reference, oxidation_states=s.oxidation_states,
            min_length=s.min_length, max_atoms=s.max_atoms, force_diagonal=s.force_diagonal,
        )
    elif s.sites == "environment":
        from defectml.search.alloy import environment_defects

        found = environment_defects(
            host, defects, oxidation_states=s.oxidation_states, shells=s.env_shells,
            min_length=s.min_length, max_atoms=s.max_atoms,
        )
    else:
        found = make_defects(
            host, defects, oxidation_states=s.oxidation_states, min_length=s.min_length,
            max_atoms=s.max_atoms, force_diagonal=s.force_diagonal,
        )
    nn = bulk_nn_distance(host)
    items = []
    for d in found:
        for q in _charges_for(d, charges):
            n = number_of_distorted_neighbours(d.excess_electrons(q))
            trials, dropped = make_trials(
                to_atoms(d.supercell), d.site, defect_index=d.defect_index, n_distorted=n,
                bulk_nn_distance=nn, is_vacancy=d.kind == "vacancy", settings=s.trials,
                label=charge_label(d.name, q),
            )
            items.append(DefectCharge(d, q, trials, dropped))
    return items


def _folder_plan(host: Structure, defects, charges: list[int] | None,
                 s: SearchSettings) -> list[DefectCharge]:
    """The plan of a ``trials_from`` search: the folder's POSCARs, for the defects and charges named."""
    from defectml.search.snb_trials import read_trials_folder

    if not isinstance(defects, str) or defects.lower().endswith(".json"):
        raise InputError("--trials-from takes the folder's defects: name them (e.g. --defect Mg_O) or "
                         "give --defect all, not defect objects")
    found = read_trials_folder(s.trials_from, host, defects, charges, s.oxidation_states)
    return [DefectCharge(f.defect, f.charge, f.trials, f.skipped, source=f.key, notes=f.notes)
            for f in found]


def _matrix_text(m) -> str:
    m = np.asarray(m, dtype=int)
    if np.count_nonzero(m - np.diag(np.diagonal(m))) == 0:
        return "x".join(str(v) for v in np.diagonal(m))
    return "[" + ", ".join("[" + " ".join(str(v) for v in row) + "]" for row in m) + "]"


def _threads_note(s: SearchSettings, model: Model, execution: dict) -> str:
    if model.ref.family in ("calculator", "emt") or s.device != "cpu":
        return ""
    import torch

    from defectml.models.model import busy_cores

    workers = execution.get("workers", 1)
    n = torch.get_num_threads() if workers == 1 else (s.threads or default_threads(workers))
    how = "--threads" if s.threads else f"default: the free cores, {busy_cores():.1f} busy"
    return f" on {n} torch thread(s)" + (f" x {workers} workers" if workers > 1 else "") + f" ({how})"


def describe_plan(items: list[DefectCharge], model_name: str, threads: str = "") -> str:
    """What a search is about to do: defects x charges x trials, and each supercell."""
    by_defect: dict[str, list[DefectCharge]] = {}
    for it in items:
        by_defect.setdefault(it.defect.name, []).append(it)
    n = sum(len(it.trials) for it in items)
    lines = [f"plan: {len(by_defect)} defect(s), {len(items)} defect charge state(s), {n} relaxation(s) "
             f"with {model_name}{threads}"]
    for name, its in by_defect.items():
        d = its[0].defect
        charges = ",".join(f"{it.charge:+d}" if it.charge else "0" for it in its)
        trials = "/".join(sorted({str(len(it.trials)) for it in its}))
        lines.append(f"  {name}: charges {charges}; {trials} trials each; supercell "
                     f"{_matrix_text(d.sc_matrix)} ({len(d.supercell)} atoms, periodic images "
                     f"{image_distance(d.supercell.lattice.matrix):.2f} Å apart)")
    return "\n".join(lines)


def _foreign_elements(defects: str | Sequence, host: Structure) -> set[str]:
    """Elements the defect request adds to the host."""
    if not isinstance(defects, str):
        return {obj.site.specie.symbol for obj in defects if object_kind(obj) != "vacancy"}
    out = set()
    for spec in parse_defect_specs(defects, host):
        if spec is not None:
            out |= {e for e in (spec["sub"], spec["int"]) if e}
    return out


def _host(store: ResultStore, host: Structure, model: Model, s: SearchSettings, log_fn):
    """The relaxed host (from the store if already done) and its key."""
    primitive = host.copy() if s.sites == "environment" else host.get_primitive_structure()
    primitive.remove_oxidation_states()
    oxi = guess_oxidation_states(primitive, s.oxidation_states)
    host_key = content_key(
        primitive.lattice.matrix, [sp.symbol for sp in primitive.species], primitive.frac_coords,
        model.key, s.relax_host, oxi,
    )
    row = store.first(kind="host", host_key=host_key)
    if row is not None:
        return to_structure(row.toatoms()), host_key
    formula = primitive.composition.reduced_formula
    others = sorted({to_structure(r.toatoms()).composition.reduced_formula
                     for r in store.select(kind="host")} - {formula})
    if others:
        log_fn(f"warning: {store.target} already holds the host(s) {', '.join(others)}; this run adds "
               f"{formula} (choose another --out to keep them apart)")
    atoms = to_atoms(primitive)
    try:
        if s.relax_host:
            log_fn(f"relaxing the host {primitive.composition.reduced_formula} with {model.name}")
            atoms, energy = relax_host(atoms, model.calculator)
        else:
            atoms.calc = model.calculator
            energy = float(atoms.get_potential_energy())
            atoms.calc = None
    except RelaxationFailure as exc:
        raise ModelError(f"host relaxation with {model.name} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the model itself crashed on the host
        raise ModelError(f"host relaxation with {model.name} failed: the model raised "
                         f"{type(exc).__name__}: {exc}") from None
    store.add(HostRecord(atoms, energy, host_key, model.name, oxi, model.key,
                         {"model_version": model.version, "model_ref": model.ref.to_dict(),
                          "input_cell": primitive.lattice.matrix}))
    return to_structure(atoms), host_key


def search(
    host: Structure | Atoms,
    defects: str | Sequence = "all",
    charges: list[int] | None = None,
    *,
    out: str | Path = "runs/defectml",
    db: str | None = None,
    settings: SearchSettings | None = None,
    calculator: Calculator | None = None,
    progress: bool = True,
    log_fn: Callable[[str], None] = log.info,
    workers: int = 1,
    executor: str = "local",
    scheduler: str | None = None,
    batch_size: int | None = None,
    batch_memory_gb: float | None = None,
) -> SearchResult:
    """Search the low-energy structures of point defects in ``host``.

    Args:
        host: The host crystal (pymatgen ``Structure`` or ASE ``Atoms``).
        defects: ``v_Cd``, ``Se_Te``, ``Te_i``, comma-separated, or ``all``; or
            pymatgen-analysis-defects / doped ``Vacancy``/``Substitution``/``Interstitial``
            objects, ``DefectEntry`` objects, a doped ``DefectsGenerator``, or a JSON file of any
            of them (:func:`~defectml.search.defects.resolve_defects`). Objects bring their own
            host cell (the one they were made on), which must be ``host``'s crystal.
        charges: Charge states (default: each defect's default charges).
        out: Output folder; the store is ``<out>/results.db`` unless ``db`` is given.
        db: A database path or URL (e.g. ``postgresql://user:pw@host/db``) for the store.
        settings: Search settings.
        calculator: Any ASE calculator, used instead of ``settings.model``.
        progress: Show a progress bar.
        log_fn: Where progress messages go.
        workers: Worker processes (local pool, or Dask LocalCluster workers).
        executor: ``local`` (this process, or a process pool when workers > 1) or ``dask``.
        scheduler: A Dask scheduler address; none starts a LocalCluster.
        batch_size: Trials relaxed together (one model call per step for all; in a pool: per task
            sent to a worker); ``None``: one, or with ``batch_memory_gb`` as many as fit.
        batch_memory_gb: Fill the batch while the model's estimated memory of it stays within this
            many GB (:mod:`defectml.models.memory`; CHGNet, one process): trials of any size batch
            without running out of memory.

    Returns:
        The per-defect summaries (also written to the store as raw relaxations).

    Raises:
        DefectMLError: for bad input; finished relaxations are already stored when it is raised.
    """
    t0 = time.perf_counter()
    s = settings or SearchSettings()
    s.validate()
    structure = to_structure(host)
    check_host(structure)
    defects = resolve_defects(defects)
    if not isinstance(defects, str):  # objects: their sites are in their own structure's frame
        structure = host_of(defects, structure)
        log_fn(f"host: the cell the {len(defects)} defect object(s) were made on "
               f"({structure.composition.reduced_formula}, {len(structure)} atoms)")
    if s.trials_from:  # the folder's POSCARs read and checked before any work
        host_elements = {sp.symbol for sp in structure.composition.elements}
        foreign = {el for it in plan(structure, defects, charges, s)
                   for el in it.defect.supercell.symbol_set} - host_elements
    else:
        foreign = _foreign_elements(defects, structure)  # also validates the defect specs early
        # defects, charges and supercell sizes checked on the host as given, before any work (the
        # model's host relaxation changes the lattice by a little, not what is possible)
        plan(structure, defects, charges, s, reference=structure)
    model = wrap_calculator(calculator) if calculator is not None else load_model(
        s.model, s.device, s.threads
    )
    model.check_elements({sp.symbol for sp in structure.composition.elements} | foreign)
    target = db or Path(out) / "results.db"
    made = [] if is_url(target) else [p for p in (Path(out), Path(target)) if not p.exists()]
    if not is_url(target):
        _check_out(Path(out))
    store = ResultStore(target)
    store.lock()  # one writer at a time: a second search into this store is refused here
    try:
        return _search(store, structure, defects, charges, s, model, progress, log_fn,
                       {"workers": workers, "executor": executor, "scheduler": scheduler,
                        "batch_size": batch_size,
                        "batch_memory": None if batch_memory_gb is None else batch_memory_gb * 2**30}, t0)
    except BaseException:
        _remove_if_empty(store, made)  # only as the store's writer: a refused second one touches nothing
        raise
    finally:
        store.unlock()


def _remove_if_empty(store: ResultStore, made: list[Path]) -> None:
    """A run that failed before storing anything leaves nothing behind that it made."""
    try:
        if store.count() > 0:
            return
    except Exception:  # noqa: BLE001 - an unreadable store is not ours to delete
        return
    for path in reversed(made):  # the database (and its lock file) first, then the folder
        if path.suffix == ".db":
            for p in (path, path.with_name(path.name + ".lock")):
                p.unlink(missing_ok=True)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def charges_outside(model: Model, charges: set[int]) -> tuple[list[int], str] | None:
    """A charge-aware model's charges outside the range its card says it was trained on, and that range."""
    trained = (model.card or {}).get("charges") if model.charge_aware else None
    if not trained:
        return None
    lo, hi = min(trained), max(trained)
    out = sorted(q for q in charges if not lo <= q <= hi)
    return (out, f"{lo:+d}..{hi:+d}") if out else None


def _search(store, structure, defects, charges, s, model: Model, progress, log_fn, execution,
            t0) -> SearchResult:
    relaxed_host, host_key = _host(store, structure, model, s, log_fn)
    items = plan(relaxed_host, defects, charges, s, reference=structure)
    if s.trials_from:
        left_out = [f"{it.label}/{note}" for it in items for note in it.dropped]
        log_fn(f"trials from {s.trials_from}: {sum(len(it.trials) for it in items)} POSCARs as they are"
               + (f"; left out: {'; '.join(left_out)}" if left_out else ""))
        for note in (n for it in items for n in it.notes):
            log_fn(f"note: {note}")
    log_fn(describe_plan(items, model.name, _threads_note(s, model, execution)))
    if s.pre_relax:
        pre_relax_trials(items, s.pre_relax, log_fn)
    if any(it.charge != 0 for it in items) and not model.charge_aware:
        log_fn(
            f"note: {model.name} has no charge input; charged states differ only in their trial "
            "distortions (energies are those of the neutral electron count)"
        )
    outside = charges_outside(model, {it.charge for it in items})
    if outside:
        log_fn(f"warning: {model.name} learned charges {outside[1]}; charge(s) "
               f"{', '.join(f'{q:+d}' for q in outside[0])} lie outside that range (extrapolated)")
    skey = s.key(model.key, host_key)
    done = store.done_trial_keys(skey)
    pending = []
    wanted = set()
    for it in items:
        defect_key = defect_store_key(host_key, it, s.min_length)
        wanted.add((defect_key, it.charge))
        d = it.defect
        store.add(DefectRecord(to_atoms(d.supercell), defect_key, host_key, d.name, d.site,
                               d.defect_index, d.sc_matrix, d.kind,
                               {"multiplicity": d.multiplicity, "site_symmetry": d.site_symmetry,
                                "oxi_change": d.oxi_change}))
        for t in it.trials:
            tkey = trial_key(skey, defect_key, it.charge, t.name)
            if tkey not in done:
                pending.append((it, defect_key, t, tkey))
    skipped = sum(len(it.trials) for it in items) - len(pending)
    if skipped:
        log_fn(f"resuming: {skipped} relaxations already in the store, {len(pending)} to do")
    spec = ModelSpec(model.ref, s.device, s.threads,
                     model.calculator if model.ref.family == "calculator" else None)
    _relax_pending(store, pending, model, spec, s, skey, progress, execution, log_fn)

    def landscapes():
        return summarise(store, skey, soap=s.soap, threshold=s.soap_threshold, max_drop=s.max_drop,
                         only=wanted, max_rise=s.max_rise, polished=bool(s.polish_fmax))

    summaries = landscapes()
    if s.polish_fmax and polish_minima(store, summaries, model, spec, fmax=s.polish_fmax,
                                       members=s.polish_members, max_steps=s.max_steps,
                                       optimizer=s.optimizer,
                                       execution=execution, progress=progress, log_fn=log_fn).relaxations:
        summaries = landscapes()
    return SearchResult(
        summaries, model.name, model.version, skey, len(pending), skipped,
        time.perf_counter() - t0, {it.label: it.dropped for it in items if it.dropped},
    )


def _check_out(out: Path) -> None:
    """Fail early, and clearly, on an output folder that cannot be made or written."""
    from defectml.errors import StoreError

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    probe = out / ".write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"output folder {out} is not writable: {exc.strerror or exc}") from None


def _watches(store, pending, s: SearchSettings, skey: str) -> dict:
    """One early-stop watch per (defect, charge), seeded with minima already in the store."""
    watches: dict[tuple[str, int], BasinWatch] = {}
    if not s.early_stop:
        return watches
    for it, defect_key, _, _ in pending:
        key = (defect_key, it.charge)
        if key in watches:
            continue
        species = tuple(sorted(set(it.defect.supercell.symbol_set)))
        w = BasinWatch(species, np.asarray(it.defect.site), it.defect.defect_index, s.soap,
                       s.soap_threshold)
        for row in store.select(kind="relaxation", settings_key=skey, defect_key=defect_key,
                                charge_state=it.charge, status=CONVERGED):
            w.add(row.trial, row.toatoms(), row.energy)
        watches[key] = w
    return watches


def _relax_pending(store, pending, model: Model, spec: ModelSpec, s: SearchSettings, skey: str,
                   progress: bool, execution: dict, log_fn: Callable[[str], None] = log.info):
    """Relax the pending trials on the chosen executor, storing each result as it finishes."""
    from tqdm.auto import tqdm

    watches = _watches(store, pending, s, skey)
    jobs = [Job(with_charge(t.atoms, it.charge), tag=(it, defect_key, t, tkey),
                watch=watches.get((defect_key, it.charge)))
            for it, defect_key, t, tkey in pending]
    bar = tqdm(total=len(jobs), disable=not progress or not jobs, unit="trial", desc="relaxing")
    pace = Pace()
    results = run_jobs(jobs, spec, fmax=s.fmax, max_steps=s.max_steps, model=model, optimizer=s.optimizer,
                       **execution)
    for job, r in results:
        it, defect_key, t, tkey = job.tag
        store.add(RelaxationRecord(
            r.atoms, r.energy, r.forces, "mlip", model.key, it.defect.name, defect_key, it.charge,
            t.name, tkey, skey, r.status, model.name, r.steps, it.defect.site, it.defect.defect_index,
            trajectory=r.trajectory, model_key=model.key, seed=t.seed, distortion=t.distortion,
            extra={"initial_positions": t.atoms.positions, "distorted_indices": list(t.distorted_indices),
                   "reason": r.reason, "model_version": model.version, "model_ref": model.ref.to_dict(),
                   "seconds": r.seconds, "fmax": s.fmax, "max_steps": s.max_steps, "basin_of": r.basin_of,
                   "optimizer": s.optimizer,
                   **({"source": t.source} if t.source else {})},
        ))
        if job.watch is not None and r.status == CONVERGED:
            job.watch.add(t.name, r.atoms, r.energy)
        bar.set_postfix_str(f"{it.label} {t.name}", refresh=False)
        bar.update(1)
        if bar.n == 1 and len(jobs) > 1:
            left = r.seconds * (len(jobs) - 1) / max(1, execution.get("workers", 1))
            with tqdm.external_write_mode():
                log_fn(f"first relaxation: {r.steps} steps in {r.seconds:.0f} s; the other "
                       f"{len(jobs) - 1} may take about {_duration(left)} at that pace")
        note = pace.add(r.seconds, r.steps, len(r.atoms))
        if note:
            with tqdm.external_write_mode():
                log_fn(note)
    bar.close()


@dataclass
class Pace:
    """Watches seconds per step and atom; says once when relaxations become abnormally slow.

    Torch threads that outnumber the free cores (another job started beside this one) slow a
    step down tens of times without an error; the message names the remedy.
    """

    factor: float = 5.0
    min_steps: int = 5
    best: float | None = None
    warned: bool = False

    def add(self, seconds: float, steps: int, atoms: int) -> str | None:
        """Record one relaxation; the warning text when it ran ``factor`` times slower."""
        if steps < self.min_steps or seconds <= 0:
            return None
        pace = seconds / steps / max(atoms, 1)
        if self.best is None or pace < self.best:
            self.best = pace
            return None
        if self.warned or pace < self.factor * self.best:
            return None
        self.warned = True
        import torch

        from defectml.models.model import busy_cores

        return (f"warning: relaxations are now {pace / self.best:.0f}x slower per step than the fastest so "
                f"far ({seconds / steps:.2f} s/step); the CPU is shared ({busy_cores():.1f} cores busy, "
                f"{torch.get_num_threads()} torch threads here): pass --threads 1 (or fewer --workers), "
                "or stop the other job; finished relaxations are saved, a rerun resumes")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
