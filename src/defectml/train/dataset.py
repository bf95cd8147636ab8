"""Defect datasets for fine-tuning: frames with energy, forces and stress, sampled, cleaned, split.

Sources → relaxations (:class:`FrameSet`: the frames of one relaxation with its labels) →
:func:`clean` → :func:`sample` → :func:`split` → extxyz files (:func:`write_extxyz`).

Sources:

* extxyz files (``../shared/data/defect-dft/*.extxyz.gz``): frames grouped into relaxations by
  ``info["run_id"]`` (one file, one relaxation without it);
* a defectml store: every relaxation row's per-frame trajectory (ML or DFT rows);
* VASP outputs: a folder with ``vasprun.xml`` or ``OUTCAR`` (gzipped too), or a tree of them.

Every written frame carries, in ``info``: ``energy``/``forces``/``stress`` (as ASE's single-point
results and as ``REF_*`` for MACE-style trainers), ``charge`` (supercell charge), ``functional``
(the level of theory; its fidelity), ``host``, ``defect``, ``defect_group`` (the defect without
charge or site index, for grouped splits), ``run_id`` (the relaxation) and ``ionic_step``.

Sampling follows the seed paper (Mosquera-Lois et al., Methods): ``even`` takes evenly spaced
frames of each relaxation (their "MS", 10 by default, which beat DIRECT at equal size);
``direct`` is DIRECT (standardise a model descriptor, PCA keeping components of eigenvalue > 1
weighted by their explained variance, BIRCH into N clusters, the frame nearest each centre);
``fps`` is farthest-point sampling on the same descriptor; ``all`` keeps every frame.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from defectml.errors import InputError
from defectml.settings import FromOptions

SAMPLERS = ("all", "even", "fps", "direct")
SPLIT_BY = ("relaxation", "defect", "host")
SPLITS = ("train", "val", "test")


@dataclass
class FrameSet:
    """The frames of one relaxation, with what they are.

    Attributes:
        run_id: Identifies the relaxation.
        host: Host name (e.g. ``ZnS``).
        defect: Defect name as the source gives it (``vac_2_S_1``; ``bulk`` for the host).
        charge: Supercell charge.
        functional: Level of theory (``HSE06``, ``vasp PBEsol encut=500``, a model key ...).
        frames: ASE atoms with single-point energy, forces (and stress where known), in order.
        source: Where they came from.
    """

    run_id: str
    host: str
    defect: str
    charge: int
    functional: str
    frames: list[Atoms]
    source: str = ""

    @property
    def is_bulk(self) -> bool:
        """A host (bulk) relaxation rather than a defect."""
        return self.defect == "bulk"

    @property
    def defect_group(self) -> str:
        """The defect without charge or site index: ``vac_2_S_1`` → ``vac_S``, ``Mg_Ga_-1`` → ``Mg_Ga``.

        Groups keep near-duplicates (the same defect in several charges, or at symmetry-equivalent
        sites such as ZnS's Al_i 26/27/29) on one side of a split.
        """
        name = re.sub(r"_[+-]?\d+$", "", self.defect)
        return re.sub(r"^(vac|sub|inter|int)_\d+_", r"\1_", name)

    def group(self, by: str) -> str:
        """The split group of this relaxation (``relaxation``, ``defect`` or ``host``)."""
        if by == "relaxation":
            return self.run_id
        if by == "defect":
            return f"{self.host}/{self.defect_group}"
        return self.host


# --- reading -----------------------------------------------------------------------------------
def _frame(atoms: Atoms, where: str) -> Atoms:
    """A copy with its single-point results (energy and forces are required)."""
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    for key in ("energy", "forces", "stress"):
        if key not in results and f"REF_{key}" in atoms.info:
            results[key] = atoms.info[f"REF_{key}"]
        if key not in results and f"REF_{key}" in atoms.arrays:
            results[key] = atoms.arrays[f"REF_{key}"]
    missing = [k for k in ("energy", "forces") if results.get(k) is None]
    if missing:
        raise InputError(f"{where}: a frame without {' and '.join(missing)}; every frame needs both")
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    out.info = {k: v for k, v in atoms.info.items() if not k.startswith("REF_")}
    keep = {k: results[k] for k in ("energy", "forces", "stress") if results.get(k) is not None}
    out.calc = SinglePointCalculator(out, **keep)
    return out


def _check_consistent(fs: FrameSet) -> None:
    first = fs.frames[0]
    for i, f in enumerate(fs.frames[1:], 1):
        if len(f) != len(first) or not np.array_equal(f.numbers, first.numbers):
            raise InputError(f"{fs.source}: relaxation {fs.run_id} mixes structures (frame {i} has other "
                             "atoms than frame 0); one relaxation must keep its atoms")


def read_extxyz(path: str | Path) -> list[FrameSet]:
    """Relaxations of an extxyz file, grouped by ``info["run_id"]`` (in file order)."""
    from defectml.core.readers import read_trajectory

    path = Path(path)
    frames = read_trajectory(path)
    if not frames:
        raise InputError(f"{path}: no frames")
    groups: dict[str, list[Atoms]] = {}
    for i, a in enumerate(frames):
        groups.setdefault(str(a.info.get("run_id", path.name)), []).append(_frame(a, f"{path} frame {i}"))
    out = []
    for run_id, fr in groups.items():
        fr.sort(key=lambda a: int(a.info.get("ionic_step", 0)))
        info = fr[0].info
        host = str(info.get("host", path.name.split(".")[0]))
        fs = FrameSet(run_id, host, str(info.get("defect", "unknown")), int(info.get("charge", 0)),
                      str(info.get("functional", "unknown")), fr, str(path))
        _check_consistent(fs)
        out.append(fs)
    return out


def read_store(target: str | Path, fidelity: str | None = None, run: str | None = None) -> list[FrameSet]:
    """Relaxations of a defectml store: each row's trajectory (its last frame if it has none).

    Args:
        target: The store (a results.db, its folder, or a database URL).
        fidelity: ``mlip`` or ``dft`` rows only (default both).
        run: Only this run (settings key).
    """
    from defectml.records import Trajectory
    from defectml.store import ResultStore, is_url

    p = Path(target)
    store = ResultStore(target if is_url(str(target)) or not p.is_dir() else p / "results.db")
    query = {"kind": "relaxation"}
    if fidelity:
        query["fidelity"] = fidelity
    if run:
        query["settings_key"] = run
    hosts: dict[str, str] = {}
    out = []
    for row in store.select(**query):
        defect_row = store.first(kind="defect", defect_key=row.defect_key)
        host_key = defect_row.host_key if defect_row is not None else ""
        if host_key not in hosts:
            host_row = store.first(kind="host", host_key=host_key)
            hosts[host_key] = (host_row.toatoms().get_chemical_formula("metal", empirical=True)
                               if host_row is not None else "unknown")
        if "trajectory" in row.data:
            traj = Trajectory.from_data(row.data["trajectory"], cell=row.cell)
            if traj.forces is None:
                continue  # energies only (an old store): nothing to fit forces on
            frames = [traj.frame(i, row.numbers, row.pbc) for i in range(len(traj))]
        elif row.get("energy") is not None and row.get("forces") is not None:
            a = row.toatoms()
            frames = [_frame(a, f"{store.target} row {row.id}")]
        else:
            continue
        for i, f in enumerate(frames):
            f.info.update(ionic_step=i)
        out.append(FrameSet(row.trial_key, hosts[host_key], f"{row.defect}_{int(row.charge_state)}",
                            int(row.charge_state), str(row.get("theory") or row.get("model")), frames,
                            f"{store.target} row {row.id}"))
    if not out:
        raise InputError(f"{store.target}: no relaxation with per-frame energies and forces"
                         + (f" (fidelity {fidelity})" if fidelity else ""))
    return out


def read_vasp(folder: str | Path, charge: int | None, host: str | None = None,
              defect: str | None = None, functional: str | None = None) -> list[FrameSet]:
    """VASP relaxations: ``folder`` itself, or every folder below it with a vasprun.xml/OUTCAR.

    Raises:
        InputError: no VASP output, or no ``charge`` (VASP outputs do not say it plainly).
    """
    from defectml.core.readers import VASP_OUTPUTS, dft_theory, read_vasp_relaxation

    folder = Path(folder)
    dirs = sorted({p.parent for n in VASP_OUTPUTS for p in folder.rglob(n)})
    if not dirs:
        raise InputError(f"no vasprun.xml or OUTCAR under {folder}")
    if charge is None:
        raise InputError(f"{folder}: VASP outputs need --charge (the supercell charge of these relaxations)")
    out = []
    for d in dirs:
        frames, _ = read_vasp_relaxation(d)
        frames = [_frame(f, str(d)) for f in frames]
        if not frames:
            continue
        run_id = hashlib.sha1(str(d.resolve()).encode()).hexdigest()[:8]
        fs = FrameSet(run_id, host or folder.name, defect or d.name, charge,
                      dft_theory(frames, d, functional), frames, str(d))
        _check_consistent(fs)
        out.append(fs)
    return out


def read_source(path: str | Path, **vasp) -> list[FrameSet]:
    """Any source: extxyz file, store (results.db or its folder), or VASP output folder(s)."""
    p = Path(path)
    name = p.name.lower()
    if "://" in str(path) or name.endswith(".db") or (p.is_dir() and (p / "results.db").exists()):
        return read_store(path)
    if p.is_file() and re.search(r"\.(ext)?xyz(\.gz)?$", name):
        return read_extxyz(p)
    if p.is_dir():
        return read_vasp(p, **vasp)
    raise InputError(f"not a dataset source: {path} (an extxyz file, a defectml store or VASP outputs)")


# --- cleaning and sampling ---------------------------------------------------------------------
@dataclass
class CleanReport:
    """What :func:`clean` dropped."""

    above_window: int = 0
    absurd_forces: int = 0
    empty_relaxations: int = 0


def clean(sets: list[FrameSet], energy_window: float = 5.0, max_force: float = 50.0
          ) -> tuple[list[FrameSet], CleanReport]:
    """Drop frames far above their relaxation's lowest, and frames with absurd forces.

    ``energy_window`` (eV) over the relaxation's lowest frame; ``max_force`` (eV/Å) on any atom: a
    broken step, not physics.
    """
    report = CleanReport()
    out = []
    for fs in sets:
        e_min = min(f.get_potential_energy() for f in fs.frames)
        kept = []
        for f in fs.frames:
            if f.get_potential_energy() - e_min > energy_window:
                report.above_window += 1
            elif np.linalg.norm(f.get_forces(), axis=1).max() > max_force:
                report.absurd_forces += 1
            else:
                kept.append(f)
        if kept:
            out.append(FrameSet(fs.run_id, fs.host, fs.defect, fs.charge, fs.functional, kept, fs.source))
        else:
            report.empty_relaxations += 1
    return out, report


def evenly_spaced(n_frames: int, n: int) -> list[int]:
    """``n`` evenly spaced indices of ``n_frames`` (first and last included; all when fewer)."""
    if n_frames <= n:
        return list(range(n_frames))
    return sorted({int(round(x)) for x in np.linspace(0, n_frames - 1, n)})


def farthest_points(x: np.ndarray, n: int, start: int = 0) -> list[int]:
    """Greedy farthest-point sampling of ``n`` rows of ``x`` (Euclidean), from row ``start``."""
    n = min(n, len(x))
    chosen = [start]
    d = np.linalg.norm(x - x[start], axis=1)
    while len(chosen) < n:
        i = int(np.argmax(d))
        chosen.append(i)
        d = np.minimum(d, np.linalg.norm(x - x[i], axis=1))
    return sorted(chosen)


def direct_sample(x: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """DIRECT sampling of ``n`` rows of the descriptors ``x``.

    Standardise, PCA (components of eigenvalue > 1, weighted by explained variance), BIRCH into
    ``n`` clusters, and the row nearest each cluster's centre.
    """
    from sklearn.cluster import Birch
    from sklearn.decomposition import PCA

    n = min(n, len(x))
    z = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 1e-12, x.std(axis=0), 1.0)
    pca = PCA(random_state=seed).fit(z)
    keep = max(1, int((pca.explained_variance_ > 1.0).sum()))
    y = pca.transform(z)[:, :keep] * pca.explained_variance_ratio_[:keep]
    labels = Birch(n_clusters=n, threshold=1e-6).fit_predict(y)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        centre = y[members].mean(axis=0)
        chosen.append(int(members[np.argmin(np.linalg.norm(y[members] - centre, axis=1))]))
    return sorted(chosen)


def bare_structures(frames: list[Atoms]):
    """The frames as pymatgen structures with nothing but species, positions and cell."""
    from defectml.structure_io import to_structure

    return [to_structure(Atoms(f.numbers, f.positions, cell=f.cell, pbc=True)) for f in frames]


def atom_chunks(frames: list, max_atoms: int = 256) -> list[list[int]]:
    """Indices of ``frames`` in consecutive chunks of at most ``max_atoms`` atoms (one frame at least).

    Batching by atoms, not frames, bounds memory: CHGNet needs ~1.6 GB for one 216-atom MgO cell
    (66 096 three-body angles: its second O shell, 2.98 Å, is inside the 3 Å bond cutoff).
    """
    chunks: list[list[int]] = []
    size = 0
    for i, f in enumerate(frames):
        if not chunks or size + len(f) > max_atoms:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += len(f)
    return chunks


def chgnet_descriptors(frames: list[Atoms], model: str = "chgnet") -> np.ndarray:
    """One vector per frame: the CHGNet crystal feature (its pooled atom features)."""
    from defectml.models import load_model

    net = load_model(model).calculator.model
    feats = []
    for idx in atom_chunks(frames):
        preds = net.predict_structure(bare_structures([frames[i] for i in idx]), task="e",
                                      return_crystal_feas=True, batch_size=len(idx))
        feats += [p["crystal_fea"] for p in (preds if isinstance(preds, list) else [preds])]
    return np.array(feats)


def sample(sets: list[FrameSet], method: str = "even", per_relaxation: int = 10, total: int | None = None,
           descriptor: Callable[[list[Atoms]], np.ndarray] = chgnet_descriptors, seed: int = 0
           ) -> list[FrameSet]:
    """Pick the frames to train on.

    ``all``; ``even``: ``per_relaxation`` from each; ``fps`` / ``direct``: over the whole set,
    ``total`` frames (default ``per_relaxation`` × relaxations, for a like-for-like size). Frames
    keep their order within a relaxation; a relaxation left with no frame is dropped.
    """
    if method not in SAMPLERS:
        raise InputError(f"unknown sampling {method!r}: use {', '.join(SAMPLERS)}")
    if per_relaxation < 1 or (total is not None and total < 1):
        raise InputError("the number of frames to sample must be at least 1")
    if method == "all":
        return sets
    if method == "even":
        picks = {id(fs): evenly_spaced(len(fs.frames), per_relaxation) for fs in sets}
    else:
        flat = [(fs, i) for fs in sets for i in range(len(fs.frames))]
        x = descriptor([fs.frames[i] for fs, i in flat])
        n = total or per_relaxation * len(sets)
        rows = farthest_points(x, n) if method == "fps" else direct_sample(x, n, seed)
        picks = {}
        for r in rows:
            fs, i = flat[r]
            picks.setdefault(id(fs), []).append(i)
    out = []
    for fs in sets:
        idx = sorted(picks.get(id(fs), []))
        if idx:
            out.append(FrameSet(fs.run_id, fs.host, fs.defect, fs.charge, fs.functional,
                                [fs.frames[i] for i in idx], fs.source))
    return out


# --- splits ------------------------------------------------------------------------------------
def parse_fractions(text: str) -> tuple[float, ...]:
    """``--fractions``: train,val,test shares."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--fractions must be three numbers like 0.8,0.1,0.1, not {text!r}") from None


@dataclass
class SplitSettings(FromOptions):
    """How frames are split (``defectml dataset``'s options; ``by`` is ``--split-by``).

    Attributes:
        by: Keep each ``relaxation``, ``defect`` (all its charges and equivalent sites) or ``host``
            on one side.
        fractions: Train, validation, test shares of the remaining groups (by frame count).
        hold_out: Groups put in the test split whatever the fractions: ``host:SrTiO3`` (its
            bulk frames too), ``defect:ZnS/vac_S`` (see :attr:`FrameSet.defect_group`),
            ``relaxation:<run_id>``.
        bulk: Where the hosts' bulk frames go: ``train`` (default), ``split`` (like any group)
            or ``drop``.
        seed: Shuffles the groups.
    """

    by: str = "defect"
    fractions: tuple[float, float, float] = field(default=(0.8, 0.1, 0.1),
                                                  metadata={"parse": parse_fractions})
    hold_out: tuple[str, ...] = ()
    bulk: str = "train"
    seed: int = 0

    OPTION_NAMES: ClassVar[dict[str, str]] = {"by": "split_by"}

    def __post_init__(self) -> None:
        self.fractions, self.hold_out = tuple(self.fractions), tuple(self.hold_out)

    def validate(self) -> None:
        """Raise ``InputError`` for impossible settings."""
        if self.by not in SPLIT_BY:
            raise InputError(f"--split-by must be one of {', '.join(SPLIT_BY)}, not {self.by!r}")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise InputError(
                f"--fractions must be three non-negative shares adding to 1, not {self.fractions}")
        if self.bulk not in ("train", "split", "drop"):
            raise InputError(f"--bulk must be train, split or drop, not {self.bulk!r}")
        for h in self.hold_out:
            kind, _, value = h.partition(":")
            if kind not in SPLIT_BY or not value:
                raise InputError(f"--hold-out {h!r}: use host:NAME, defect:HOST/DEFECT or relaxation:ID")


def split(sets: list[FrameSet], s: SplitSettings) -> dict[str, list[FrameSet]]:
    """Train/val/test with whole groups on one side.

    Raises:
        InputError: a hold-out matching nothing, or a split with a share but no frames.
    """
    s.validate()
    out: dict[str, list[FrameSet]] = {k: [] for k in SPLITS}
    held = set()
    for h in s.hold_out:
        kind, _, value = h.partition(":")
        # a held-out host is unseen whole (its bulk too); a held-out defect leaves its host's bulk
        hits = [fs for fs in sets if fs.group(kind) == value and (kind == "host" or not fs.is_bulk)]
        if not hits:
            known = sorted({fs.group(kind) for fs in sets if not fs.is_bulk})
            raise InputError(f"--hold-out {h}: no such {kind}; there are {', '.join(known)}")
        held |= {id(fs) for fs in hits}
    rest: dict[str, list[FrameSet]] = {}
    for fs in sets:
        if id(fs) in held:
            out["test"].append(fs)
        elif fs.is_bulk and s.bulk != "split":
            if s.bulk == "train":
                out["train"].append(fs)
        else:
            rest.setdefault(fs.group(s.by), []).append(fs)
    groups = sorted(rest)
    np.random.default_rng(s.seed).shuffle(groups)
    total = sum(len(f.frames) for g in groups for f in rest[g])
    targets = np.array(s.fractions) * total
    filled = np.zeros(3)
    for g in groups:  # each group to the split furthest below its share
        k = int(np.argmax(targets - filled))
        out[SPLITS[k]].extend(rest[g])
        filled[k] += sum(len(f.frames) for f in rest[g])
    for k, name in enumerate(SPLITS):
        if not out[name] and (s.fractions[k] > 0 or (name == "test" and s.hold_out)):
            raise InputError(f"the {name} split is empty: {len(groups)} {s.by} groups are too few for "
                             f"fractions {s.fractions}; split by a finer unit or give more data")
    return out


# --- writing -----------------------------------------------------------------------------------
def labelled(fs: FrameSet) -> list[Atoms]:
    """The frames with every label in ``info`` (and ``REF_*`` copies of the targets)."""
    out = []
    for i, f in enumerate(fs.frames):
        a = f.copy()
        res = f.calc.results
        a.calc = SinglePointCalculator(a, **{k: res[k] for k in ("energy", "forces", "stress") if k in res})
        a.info.update(charge=fs.charge, functional=fs.functional, host=fs.host, defect=fs.defect,
                      defect_group=fs.defect_group, run_id=fs.run_id,
                      ionic_step=int(f.info.get("ionic_step", i)), source=fs.source,
                      REF_energy=float(res["energy"]))
        a.arrays["REF_forces"] = np.asarray(res["forces"], dtype=float)
        if "stress" in res:
            a.info["REF_stress"] = np.asarray(res["stress"], dtype=float)
        out.append(a)
    return out


def write_extxyz(path: Path, sets: Iterable[FrameSet]) -> str:
    """Write the frames atomically (a temporary file renamed into place); return its sha256."""
    from ase.io import write

    frames = [a for fs in sets for a in labelled(fs)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp, frames, format="extxyz")
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class DatasetReport:
    """What :func:`build_dataset` wrote."""

    files: dict[str, str] = field(default_factory=dict)  # split -> path
    sha256: dict[str, str] = field(default_factory=dict)
    counts: dict[str, dict] = field(default_factory=dict)
    cleaned: dict = field(default_factory=dict)


def describe(sets: list[FrameSet]) -> dict:
    """Frame and relaxation counts, per host and defect group."""
    return {"frames": sum(len(f.frames) for f in sets), "relaxations": len(sets),
            "hosts": dict(Counter(fs.host for fs in sets for _ in fs.frames)),
            "defects": dict(Counter(f"{fs.host}/{fs.defect_group}" for fs in sets for _ in fs.frames))}


def build_dataset(sources: list[FrameSet], out: Path, *, method: str = "even", per_relaxation: int = 10,
                  total: int | None = None, energy_window: float = 5.0, max_force: float = 50.0,
                  splits: SplitSettings | None = None,
                  descriptor: Callable[[list[Atoms]], np.ndarray] = chgnet_descriptors) -> DatasetReport:
    """Clean, sample, split and write ``out/{train,val,test}.extxyz`` and ``out/dataset.json``.

    Splitting comes before sampling's output is written but after cleaning, and groups are whole
    relaxations, so a relaxation's frames never straddle two splits.
    """
    s = splits or SplitSettings()
    s.validate()
    cleaned, report = clean(sources, energy_window, max_force)
    if not cleaned:
        raise InputError("no frame is left after cleaning: widen --energy-window or --max-force")
    sampled = sample(cleaned, method, per_relaxation, total, descriptor, s.seed)
    parts = split(sampled, s)
    out.mkdir(parents=True, exist_ok=True)
    rep = DatasetReport(cleaned=report.__dict__)
    for name, sets in parts.items():
        if not sets:
            continue
        path = out / f"{name}.extxyz"
        rep.sha256[name] = write_extxyz(path, sets)
        rep.files[name] = str(path)
        rep.counts[name] = describe(sets)
    manifest = {"files": rep.files, "sha256": rep.sha256, "counts": rep.counts, "cleaned": rep.cleaned,
                "settings": {"sampling": method, "per_relaxation": per_relaxation, "total": total,
                             "energy_window_eV": energy_window, "max_force_eV_A": max_force,
                             "split_by": s.by, "fractions": list(s.fractions), "hold_out": list(s.hold_out),
                             "bulk": s.bulk, "seed": s.seed}}
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "dataset.json")
    return rep
