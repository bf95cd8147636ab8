"""Bringing DFT results into the store: ShakeNBreak folders, VASP outputs, extxyz.

Ingested relaxations are ordinary ``kind="relaxation"`` rows with ``fidelity="dft"``, next to a
host row and a defect row, so everything that works on a search (``summarise``, ``show``,
grouping into minima) works on DFT results too, and ``evaluate`` can set one against the other.

ShakeNBreak layout (one folder per defect and charge, e.g. ``Mg_O_+1/``)::

    Mg_O_+1/Bond_Distortion_-30.0%/{POSCAR, CONTCAR, vasprun.xml(.gz), OUTCAR(.gz)}
    Mg_O_+1/Unperturbed/...  Rattled/...  Dimer/...
    Mg_O_+1/Mg_O_+1.yaml                  final energies (eV) of each trial
    Mg_O_+1/distortion_metadata.json      defect site (``unique_site``) and distorted atoms

Folders ending ``_High_Energy`` were abandoned by ShakeNBreak and are skipped.
``Bond_Distortion_0.0%`` is stored as ``Rattled`` (a rattle with no bond distortion), the name
defectml gives that trial.

Each row keeps the relaxation's frames (positions, energy, forces, stress, cell) where the
output has them, its level of theory (``--theory``, else the extxyz ``functional``/``encut``,
else the folder's INCAR) and a status read from the output: ``converged`` when the last ionic
step's largest force is below ``fmax``, ``unconverged`` otherwise; a relaxation with no forces
at all (a CONTCAR and a ShakeNBreak energy) cannot be checked and is stored as converged with
``convergence`` saying so.

The defect-agnostic readers this builds on (VASP outputs, ShakeNBreak energies and folder names,
level of theory) live in :mod:`defectml.core.readers` and are re-exported here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read

from defectml.core.readers import (
    CHARGE_FOLDER,
    TRIAL_FOLDER,
    dft_theory,
    normalise_trial_name,
    read_snb_energies,
    read_trajectory,
    read_vasp_relaxation,
)
from defectml.core.relax import CONVERGED, UNCONVERGED
from defectml.errors import InputError
from defectml.records import DefectRecord, HostRecord, RelaxationRecord, Trajectory, trial_key
from defectml.search.defects import DEFECT_SPEC, guess_oxidation_states
from defectml.store import ResultStore, content_key
from defectml.structure_io import read_structure, to_atoms, to_structure

# The generic readers live on the ground floor (:mod:`defectml.core.readers`); re-exported here so
# ``from defectml.dft.ingest import read_snb_energies`` (and the others) keeps working.
__all__ = [
    "CHARGE_FOLDER", "TRIAL_FOLDER", "IngestReport", "dft_status", "dft_theory", "ingest_relaxation",
    "ingest_snb_folder", "normalise_trial_name", "read_snb_energies", "read_vasp_relaxation",
]


@dataclass
class IngestReport:
    """What an ingest stored and what it skipped (with reasons)."""

    stored: int = 0
    skipped: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    unchecked: int = 0  # stored without forces: convergence could not be read
    unconverged: int = 0


def dft_status(final: Atoms, fmax: float) -> tuple[str, str]:
    """(status, note) of a DFT relaxation from its last frame's forces."""
    forces = final.calc.results.get("forces") if final.calc is not None else None
    if forces is None:
        return CONVERGED, "not checked: no forces in the DFT output (energy from the ShakeNBreak yaml)"
    f = float(np.sqrt((np.asarray(forces) ** 2).sum(axis=1)).max())
    if f <= fmax:
        return CONVERGED, f"max force {f:.3f} eV/Å at the last ionic step (threshold {fmax})"
    return UNCONVERGED, f"max force {f:.3f} eV/Å > {fmax} at the last ionic step"


def _trajectory(frames: list[Atoms]) -> Trajectory | None:
    if not frames or any(f.calc is None or "energy" not in f.calc.results for f in frames):
        return None
    return Trajectory.from_frames(frames)


def _distortion(name: str) -> float | None:
    if name == "Rattled":
        return 0.0
    m = re.match(r"Bond_Distortion_(-?\d+(\.\d+)?)%", name)
    return float(m.group(1)) / 100 if m else None


def _site_from_metadata(folder: Path, defect: str) -> np.ndarray | None:
    for meta in (folder / "distortion_metadata.json", folder.parent / "distortion_metadata.json"):
        if meta.exists():
            doc = json.loads(meta.read_text())
            entry = (doc.get("defects") or {}).get(defect)
            if entry and entry.get("unique_site") is not None:
                return np.asarray(entry["unique_site"], dtype=float)
    return None


def _find_host(folder: Path) -> Path | None:
    for base in (folder, folder.parent, folder.parent.parent):
        for f in sorted(base.glob("*bulk*")):
            if f.is_file():
                return f
    return None


def _defect_index(atoms: Atoms, frac_site: np.ndarray, kind: str) -> tuple[np.ndarray, int | None]:
    """Cartesian site and the defect atom's index (``None`` for a vacancy)."""
    cart = frac_site @ atoms.cell.array
    if kind == "vacancy":
        return cart, None
    frac = atoms.get_scaled_positions() - frac_site
    frac -= np.round(frac)
    dist = np.linalg.norm(frac @ atoms.cell.array, axis=1)
    return cart, int(np.argmin(dist))


def ingest_snb_folder(
    store: ResultStore, folder: Path, host_file: Path | None = None, source: str | None = None,
    theory: str | None = None, fmax: float = 0.05,
) -> IngestReport:
    """Store one ShakeNBreak defect folder (or a folder of them) as DFT relaxations.

    Args:
        store: Where to write.
        folder: ``<defect>_<charge>/`` or a folder containing several.
        host_file: The bulk host (default: a ``*bulk*`` file beside or above the folders).
        source: Label of this data set (default: the folder path).
        theory: Level of theory (default: read from the outputs or INCAR, see the module).
        fmax: Largest force (eV/Å) of a converged relaxation's last step.

    Raises:
        InputError: if no ShakeNBreak folder, host or defect site can be found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    charge_folders = [folder] if CHARGE_FOLDER.match(folder.name) and any(
        TRIAL_FOLDER.match(p.name) for p in folder.iterdir()) else sorted(
        p for p in folder.iterdir() if p.is_dir() and CHARGE_FOLDER.match(p.name))
    if not charge_folders:
        raise InputError(f"no ShakeNBreak defect folders (<defect>_<charge>/) in {folder}")
    host_path = host_file or _find_host(folder)
    if host_path is None:
        raise InputError(f"no bulk host found near {folder}: pass --host BULK_STRUCTURE")
    host = read_structure(host_path)
    oxi = guess_oxidation_states(host)
    host_atoms = to_atoms(host)
    source = source or str(folder.resolve())
    host_key = content_key("dft-host", source, str(host_path))
    store.add(HostRecord(host_atoms, None, host_key, "dft", oxi, theory or "dft",
                         {"source": str(host_path)}))
    settings_key = content_key("dft", source)
    report = IngestReport()
    for cf in charge_folders:
        _ingest_charge_folder(store, cf, host_atoms, host_key, settings_key, report, theory, fmax)
    return report


def _ingest_charge_folder(store, cf: Path, host_atoms, host_key, settings_key, report, theory, fmax):
    m = CHARGE_FOLDER.match(cf.name)
    name, charge = m["name"], int(m["charge"])
    spec = DEFECT_SPEC.match(name)
    kind = "vacancy" if spec and spec["vac"] else "interstitial" if spec and spec["int"] else (
        "substitution")
    frac_site = _site_from_metadata(cf, name)
    yaml_files = list(cf.glob("*.yaml"))
    energies = read_snb_energies(yaml_files[0]) if yaml_files else {}
    trial_dirs = sorted(p for p in cf.iterdir() if p.is_dir() and TRIAL_FOLDER.match(p.name))
    unperturbed = cf / "Unperturbed" / "POSCAR"
    reference = read(unperturbed, format="vasp") if unperturbed.exists() else None
    if frac_site is None or reference is None:
        report.skipped.append(f"{cf.name}: no distortion_metadata.json site or Unperturbed/POSCAR")
        return
    site, index = _defect_index(reference, frac_site, kind)
    sc = np.rint(np.linalg.solve(host_atoms.cell.array.T, reference.cell.array.T).T).astype(int)
    defect_key = content_key("dft-defect", host_key, cf.name)
    store.add(DefectRecord(reference, defect_key, host_key, name, site, index, sc, kind,
                           {"source": str(cf)}))
    done = store.done_trial_keys(settings_key)
    for td in trial_dirs:
        trial = normalise_trial_name(td.name)
        tkey = trial_key(settings_key, defect_key, charge, trial)
        if tkey in done:
            continue
        frames, initial = read_vasp_relaxation(td)
        if not frames:
            report.skipped.append(f"{cf.name}/{td.name}: no CONTCAR/vasprun.xml/OUTCAR")
            continue
        final = frames[-1]
        energy = energies.get(trial)
        if energy is None and final.calc is not None:
            energy = float(final.get_potential_energy())
        if energy is None:
            report.skipped.append(f"{cf.name}/{td.name}: no energy in the yaml or VASP outputs")
            continue
        _store_dft(store, report, frames, initial, energy, theory, fmax, td, name, defect_key, charge,
                   trial, tkey, settings_key, site, index)
    report.defects.append(cf.name)


def _store_dft(store, report, frames, initial, energy, theory, fmax, path: Path, name, defect_key,
               charge, trial, tkey, settings_key, site, index) -> None:
    """One DFT relaxation as a record: frames, level of theory, status from the output."""
    final = frames[-1]
    forces = final.calc.results.get("forces") if final.calc is not None else None
    status, note = dft_status(final, fmax)
    report.unchecked += forces is None
    report.unconverged += status != CONVERGED
    store.add(RelaxationRecord(
        final, energy, forces, "dft", dft_theory(frames, path if path.is_dir() else None, theory), name,
        defect_key, charge, trial, tkey, settings_key, status, "dft", len(frames), site, index,
        trajectory=_trajectory(frames), distortion=_distortion(trial),
        extra={"reason": "" if status == CONVERGED else note, "convergence": note, "source": str(path),
               "initial_positions": (initial or frames[0]).positions},
    ))
    report.stored += 1


def ingest_relaxation(
    store: ResultStore,
    path: Path,
    defect: str,
    charge: int,
    host_file: Path,
    site: list[float],
    trial: str | None = None,
    theory: str | None = None,
    fmax: float = 0.05,
) -> IngestReport:
    """Store one DFT relaxation: an extxyz trajectory or a VASP folder (vasprun/OUTCAR/CONTCAR).

    The last frame is the relaxed structure; all frames are kept as its trajectory (energies,
    forces, stress, cells). ``site`` is the defect site in fractional coordinates of the cell;
    ``theory`` and ``fmax`` as in :func:`ingest_snb_folder`.
    """
    path = Path(path)
    if path.is_dir():
        frames, initial = read_vasp_relaxation(path)
    elif path.is_file():
        frames, initial = read_trajectory(path), None
    else:
        raise InputError(f"not found: {path}")
    if not frames or frames[-1].calc is None:
        raise InputError(f"no relaxation with energies in {path}")
    spec = DEFECT_SPEC.match(defect)
    if spec is None:
        raise InputError(f"cannot parse defect {defect!r}: use v_X, A_B or X_i")
    host_atoms = to_atoms(read_structure(host_file))
    source = str(path.resolve())
    host_key = content_key("dft-host", str(Path(host_file).resolve()))
    store.add(HostRecord(host_atoms, None, host_key, "dft",
                         guess_oxidation_states(to_structure(host_atoms)), theory or "dft"))
    kind = "vacancy" if spec["vac"] else "interstitial" if spec["int"] else "substitution"
    first = initial or frames[0]
    cart, index = _defect_index(first, np.asarray(site, dtype=float), kind)
    sc = np.rint(np.linalg.solve(host_atoms.cell.array.T, first.cell.array.T).T).astype(int)
    defect_key = content_key("dft-defect", host_key, defect, charge)
    store.add(DefectRecord(first, defect_key, host_key, defect, cart, index, sc, kind))
    settings_key = content_key("dft", host_key)
    final = frames[-1]
    name = trial or str(final.info.get("trial", path.stem if path.is_file() else path.name))
    tkey = content_key(settings_key, defect_key, charge, name)
    if tkey in store.done_trial_keys(settings_key):
        return IngestReport(skipped=[f"{name}: already stored"])
    report = IngestReport(defects=[f"{defect}_{charge}"])
    _store_dft(store, report, frames, first, float(final.get_potential_energy()), theory, fmax,
               Path(source), defect, defect_key, charge, name, tkey, settings_key, cart, index)
    return report
