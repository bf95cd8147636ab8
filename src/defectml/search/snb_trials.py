"""Trials from a ShakeNBreak folder: its trial POSCARs as a search's starting structures.

The layout ShakeNBreak and doped write (``defectml generate`` writes it too)::

    SNB_DIR/distortion_metadata.json               (or one in each <defect>_<q>/)
    SNB_DIR/<defect>_<q>/Unperturbed/POSCAR
    SNB_DIR/<defect>_<q>/Bond_Distortion_X%/POSCAR  (Bond_Distortion_0.0% is the Rattled trial)
    SNB_DIR/<defect>_<q>/Rattled/POSCAR, Dimer/POSCAR

Each POSCAR is one trial exactly as read (same atoms, order and cell; positions not wrapped), so
a replay of that folder's DFT answers for the very structures the search relaxed. Trials keep the
names the replay oracle answers to (:func:`~defectml.core.readers.normalise_trial_name`:
``Bond_Distortion_0.0%`` → ``Rattled``). Folders ending ``_High_Energy`` were abandoned by
ShakeNBreak, which has no energy for them, so there is nothing to replay: they are left out, as
are folders of any other name, each with a note.

The defect supercell is the reference POSCAR's cell (``Unperturbed``, else the first trial). The
defect site is the metadata's ``unique_site`` (fractional, ShakeNBreak's) or ``site`` (Cartesian,
``defectml generate``'s); the defect atom is the atom of the added species at that site.
ShakeNBreak's ``distorted_atoms`` are 0-based in its current versions and 1-based site numbers in
older ones: see :func:`distorted_indices` for how the two are told apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import spglib
from ase import Atoms
from pymatgen.core import Element, Structure

from defectml.core.readers import CHARGE_FOLDER, TRIAL_FOLDER, normalise_trial_name
from defectml.errors import InputError
from defectml.search.defects import (
    Defect,
    _foreign_oxi,
    default_charge_states,
    guess_oxidation_states,
    site_symmetry,
)
from defectml.search.distort import Trial
from defectml.store import content_key
from defectml.structure_io import minimum_image, to_structure

#: ``v_X``, ``A_B`` or ``X_i``, with any tag (doped's ``v_Cd_Td_Te2.83``, ``Te_i_C3v``).
DEFECT_NAME = re.compile(
    r"^(?:v_(?P<vac>[A-Z][a-z]?)|(?P<sub>[A-Z][a-z]?)_(?P<host>[A-Z][a-z]?)"
    r"|(?P<int>[A-Z][a-z]?)_i)(?:_(?P<tag>.+))?$"
)
ABANDONED = "_High_Energy"
SITE_TOLERANCE = 0.7  # Å: furthest the defect atom may sit from the metadata's site (a rattle moves it)
CENTRE_TOLERANCE = 0.1  # Å: how well the distorted atoms' displacements must agree on their centre


@dataclass
class FolderTrials:
    """The trials of one ``<defect>_<q>/`` folder.

    Attributes:
        defect: The defect in the folder's own supercell (the reference POSCAR's cell).
        charge: The charge state.
        trials: One per trial POSCAR, exactly as read.
        key: Content key of every trial's structure (keys the defect and its relaxations).
        folder: The ``<defect>_<q>/`` folder.
        skipped: Trial folders left out, each with why.
        notes: What the user should know about the folder's trials.
    """

    defect: Defect
    charge: int
    trials: list[Trial]
    key: str
    folder: Path
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def defect_kind(name: str, elements: list[str], where: str) -> tuple[str, str | None, str | None]:
    """Kind, added and removed element of a defect name (``Mg_O``, ``v_Cd_Td``, ``Te_i_C3v``).

    Args:
        name: The defect name (a folder's, without the charge).
        elements: The host's elements.
        where: What the error names (the folder or option).

    Returns:
        ``(kind, added, removed)``: kind ``vacancy``, ``substitution`` or ``interstitial``; the
        element added (``None`` for a vacancy) and the host element removed (``None`` for an
        interstitial).

    Raises:
        InputError: a name of another form, an unknown element, or a removed element the host
            does not have.
    """
    m = DEFECT_NAME.match(name)
    if m is None:
        raise InputError(f"{where}: cannot tell what defect {name!r} is: name it v_X (vacancy), A_B "
                         "(A on a B site) or X_i (interstitial), with an optional _tag")
    for el in (m["vac"], m["sub"], m["host"], m["int"]):
        if el is None:
            continue
        try:
            Element(el)
        except ValueError:
            raise InputError(f"{where}: unknown element {el!r} in defect {name!r}") from None
    removed = m["vac"] or m["host"]
    if removed is not None and removed not in elements:
        raise InputError(f"{where}: cannot make {name}: {removed} is not in the host (elements {elements})")
    if m["sub"] is not None and m["sub"] == m["host"]:
        raise InputError(f"{where}: cannot make {name}: an element cannot substitute itself")
    if m["vac"]:
        return "vacancy", None, m["vac"]
    if m["sub"]:
        return "substitution", m["sub"], m["host"]
    return "interstitial", m["int"], None


def charge_folders(root: Path) -> list[tuple[str, int, Path]]:
    """``(defect name, charge, folder)`` of every ``<defect>_<q>/`` folder in ``root`` (or ``root`` itself).

    Raises:
        InputError: ``root`` is no folder, or holds no such folder.
    """
    if not root.is_dir():
        raise InputError(f"--trials-from {root}: not a folder")
    own = CHARGE_FOLDER.match(root.name)
    if own and any(p.is_dir() and TRIAL_FOLDER.match(p.name) for p in root.iterdir()):
        return [(own["name"], int(own["charge"]), root)]
    found = []
    for p in root.iterdir():
        m = CHARGE_FOLDER.match(p.name)
        if m and p.is_dir():
            found.append((m["name"], int(m["charge"]), p))
    if not found:
        raise InputError(f"--trials-from {root}: no ShakeNBreak defect folders (<defect>_<charge>/) in it")
    return sorted(found, key=lambda f: (f[0], f[1]))


def select_folders(
    found: list[tuple[str, int, Path]], defects: str, charges: list[int] | None,
    elements: list[str], root: Path,
) -> list[tuple[str, int, Path]]:
    """The folders ``--defect`` and ``--charge`` name (``all`` and ``None``: every one).

    Raises:
        InputError: a defect the host cannot have, or one (or a charge) no folder holds.
    """
    parts = [p.strip() for p in defects.split(",") if p.strip()]
    if not parts:
        raise InputError("no defect given: use e.g. --defect Mg_O, or --defect all")
    wanted = None if any(p.lower() == "all" for p in parts) else parts
    names = sorted({name for name, _, _ in found})
    for name in wanted or []:
        defect_kind(name, elements, f"--defect {name}")
        if name not in names:
            raise InputError(f"--trials-from {root}: no {name}_<charge>/ folder "
                             f"(defects there: {', '.join(names)})")
    chosen = [f for f in found if wanted is None or f[0] in wanted]
    if charges is not None:
        have = sorted({q for _, q, _ in chosen})
        missing = [q for q in charges if q not in have]
        if missing:
            raise InputError(f"--trials-from {root}: no folder for charge {missing[0]:+d} "
                             f"(charges there: {', '.join(f'{q:+d}' if q else '0' for q in have)})")
        chosen = [f for f in chosen if f[1] in charges]
    return chosen


def _trial_order(name: str) -> tuple:
    """The search's own order: Unperturbed, Rattled, bond distortions by value, Dimer, the rest."""
    first = {"Unperturbed": 0, "Rattled": 1}
    if name in first:
        return (first[name], 0.0, name)
    value = trial_distortion(name)
    if value is not None:
        return (2, value, name)
    return (3 if name == "Dimer" else 4, 0.0, name)


def trial_distortion(name: str) -> float | None:
    """Bond-distortion factor of a trial name: ``Bond_Distortion_-40.0%`` → -0.4, ``Rattled`` → 0.0."""
    if name == "Rattled":
        return 0.0
    m = re.match(r"^Bond_Distortion_(-?\d+(?:\.\d+)?)%", name)
    return float(m.group(1)) / 100 if m else None


def trial_folders(folder: Path, listed: Iterable[str] = ()) -> tuple[dict[str, Path], list[str]]:
    """The trial POSCARs of one ``<defect>_<q>/`` folder by trial name, and the folders left out.

    Args:
        folder: The ``<defect>_<q>/`` folder.
        listed: Trial names the metadata lists besides ShakeNBreak's (``defectml generate``'s).

    Returns:
        ``{trial name: POSCAR}`` in the search's order, and ``"folder: why"`` per folder left out.

    Raises:
        InputError: no trial POSCAR at all, or two folders that are the same trial.
    """
    listed = set(listed)
    trials: dict[str, Path] = {}
    skipped = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            continue
        if p.name.endswith(ABANDONED):
            skipped.append(f"{p.name}: abandoned by ShakeNBreak (no DFT energy to replay)")
            continue
        if not (TRIAL_FOLDER.match(p.name) or p.name in listed):
            skipped.append(f"{p.name}: not a trial folder name")
            continue
        if not (p / "POSCAR").is_file():
            skipped.append(f"{p.name}: no POSCAR")
            continue
        name = normalise_trial_name(p.name)
        if name in trials:
            raise InputError(f"{folder}: {trials[name].parent.name}/ and {p.name}/ are both the {name} "
                             "trial; keep one")
        trials[name] = p / "POSCAR"
    if not trials:
        raise InputError(f"{folder}: no trial POSCARs (<trial>/POSCAR) in it")
    return {n: trials[n] for n in sorted(trials, key=_trial_order)}, skipped


def read_poscar(path: Path) -> Atoms:
    """A POSCAR as ASE reads it (positions as written, not wrapped).

    Raises:
        InputError: an unreadable file.
    """
    from ase.io import read

    try:
        return read(path, format="vasp")
    except Exception as exc:  # noqa: BLE001 - ASE raises many kinds for a bad POSCAR
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def load_metadata(folder: Path) -> tuple[dict, Path]:
    """``distortion_metadata.json`` of a ``<defect>_<q>/`` folder (its own, else its parent's).

    Raises:
        InputError: none there, or unreadable.
    """
    for path in (folder / "distortion_metadata.json", folder.parent / "distortion_metadata.json"):
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read {path}: {exc}") from None
            if not isinstance(doc, dict):
                raise InputError(f"{path}: not a ShakeNBreak distortion_metadata.json (no mapping)")
            return doc, path
    raise InputError(f"{folder}: no distortion_metadata.json in it or in {folder.parent}")


def _is_ours(meta: dict, name: str) -> bool:
    """Whether ``meta`` is ``defectml generate``'s metadata of defect ``name``."""
    return meta.get("defect") == name and "site" in meta and "trials" in meta


def metadata_site(meta: dict, name: str, cell: np.ndarray, where: Path) -> np.ndarray:
    """Cartesian defect site the metadata gives for defect ``name`` in a cell ``cell``.

    Raises:
        InputError: the metadata has no site for ``name``.
    """
    if _is_ours(meta, name):
        return np.asarray(meta["site"], dtype=float)
    entry = (meta.get("defects") or {}).get(name) or {}
    if entry.get("unique_site") is None:
        raise InputError(f"{where}: no defect site for {name} (defects.{name}.unique_site)")
    return np.asarray(entry["unique_site"], dtype=float) @ cell


def defect_atom(reference: Atoms, site: np.ndarray, kind: str, added: str | None, where: Path) -> int | None:
    """Index of the defect atom: the ``added`` atom at ``site`` (``None`` for a vacancy).

    Raises:
        InputError: no such atom near the site, or (vacancy) an atom on the vacant site.
    """
    dist = np.linalg.norm(minimum_image(reference, reference.positions - site), axis=1)
    symbols = reference.get_chemical_symbols()
    if kind == "vacancy":
        j = int(np.argmin(dist))
        if dist[j] < 0.5:
            raise InputError(f"{where}: the vacancy site of the metadata holds an atom ({symbols[j]} "
                             f"{j}, {dist[j]:.2f} Å away)")
        return None
    ours = [i for i, s in enumerate(symbols) if s == added]
    j = min(ours, key=lambda i: dist[i]) if ours else int(np.argmin(dist))
    if not ours or dist[j] > SITE_TOLERANCE:
        raise InputError(f"{where}: no {added} atom within {SITE_TOLERANCE} Å of the metadata's defect "
                         f"site (closest atom: {symbols[j]} {j}, {dist[j]:.2f} Å)")
    return j


def supercell_of(primitive: Structure, cell: np.ndarray, where: Path) -> np.ndarray:
    """Integer matrix M with ``cell`` = M × the host's primitive cell.

    Raises:
        InputError: ``cell`` is no supercell of the host (another crystal, strain or orientation).
    """
    m = cell @ np.linalg.inv(primitive.lattice.matrix)
    rounded = np.rint(m)
    if np.abs(m - rounded).max() > 0.1 or round(abs(np.linalg.det(rounded))) < 1:
        raise InputError(f"{where}: its cell is no supercell of the host "
                         f"{primitive.composition.reduced_formula} (another lattice constant or "
                         "orientation?): give the host these trials were made from")
    return rounded.astype(int)


def host_supercell(reference: Atoms, kind: str, index: int | None, site: np.ndarray,
                   removed: str | None) -> Structure:
    """The reference supercell without its defect (a vacancy's atom appended last)."""
    bulk = to_structure(reference)
    if kind == "vacancy":
        bulk.append(removed, site, coords_are_cartesian=True)
    elif kind == "substitution":
        bulk.replace(index, removed)
    else:
        bulk.remove_sites([index])
    return bulk


def site_multiplicity(bulk: Structure, frac: np.ndarray, cells: int, index: int | None = None,
                      symprec: float = 0.01) -> int:
    """Equivalent sites per primitive host cell of the point ``frac`` of the pristine supercell ``bulk``.

    Args:
        bulk: The pristine supercell.
        frac: The site (fractional).
        cells: Primitive cells in ``bulk``.
        index: The atom of ``bulk`` on the site (vacancy, substitution); ``None``: an empty site.
        symprec: spglib's tolerance (Å).
    """
    lattice = bulk.lattice.matrix
    data = spglib.get_symmetry_dataset((lattice, bulk.frac_coords, bulk.atomic_numbers), symprec=symprec)
    if data is None:
        return 1
    if index is not None:
        orbit = int(np.sum(data.equivalent_atoms == data.equivalent_atoms[index]))
    else:
        images = np.einsum("nij,j->ni", data.rotations, frac) + data.translations
        unique: list[np.ndarray] = []
        for p in images % 1.0:
            d = np.asarray(unique) - p if unique else np.empty((0, 3))
            d -= np.round(d)
            if not (np.linalg.norm(d @ lattice, axis=1) < 0.05).any():
                unique.append(p)
        orbit = len(unique)
    return max(1, round(orbit / cells))


def _listed_atoms(entries) -> list[tuple[int, str | None]]:
    """ShakeNBreak's ``distorted_atoms`` (``[[index, "O"], ...]`` or ``[index, ...]``)."""
    out = []
    for x in entries or []:
        out.append((int(x[0]), str(x[1])) if isinstance(x, list | tuple) else (int(x), None))
    return out


def _common_centre(reference: Atoms, trial: Atoms, factor: float, indices: list[int],
                   anchors: np.ndarray) -> np.ndarray | None:
    """The centre the ``indices`` atoms were distorted about, if they agree on one at an anchor."""
    if len(trial) != len(reference) or abs(factor) < 1e-6:
        return None
    delta = minimum_image(reference, trial.positions[indices] - reference.positions[indices])
    centres = reference.positions[indices] - delta / factor
    spread = np.linalg.norm(minimum_image(reference, centres - centres[0]), axis=1).max()
    near = np.linalg.norm(minimum_image(reference, anchors - centres[0]), axis=1).min()
    return centres[0] if spread <= CENTRE_TOLERANCE and near <= CENTRE_TOLERANCE else None


def distorted_indices(entries, reference: Atoms, distorted: list[tuple[float, Atoms]],
                      anchors: np.ndarray, where: Path) -> tuple[tuple[int, ...], np.ndarray | None]:
    """0-based indices of the atoms ShakeNBreak's bond distortions moved, and their centre.

    ShakeNBreak writes them 0-based (current versions) or as 1-based site numbers (older ones).
    Its distortion moves each of them radially about one centre, r' = c + (1 + d)(r − c), and its
    rattle leaves them (and the centre atom) alone, so in a trial of distortion d every listed atom
    implies the same centre c = r − Δ/d, on an atom or on the site. The convention under which they
    do is taken; with nothing to tell by (no Unperturbed or no bond distortion), the current one.

    Args:
        entries: The metadata's ``distorted_atoms`` of one charge state.
        reference: The Unperturbed POSCAR (or, with ``distorted`` empty, any trial's).
        distorted: ``(factor, atoms)`` of the bond-distortion trials.
        anchors: Where the centre may be (Cartesian): the atoms and the defect site.
        where: The metadata file (for the error).

    Returns:
        The indices and the centre (``None`` when it could not be told).

    Raises:
        InputError: the listed atoms are no atoms of the POSCARs under either convention.
    """
    listed = _listed_atoms(entries)
    if not listed:
        return (), None
    symbols = reference.get_chemical_symbols()
    valid = [o for o in (0, 1) if all(0 <= i - o < len(symbols) and el in (None, symbols[i - o])
                                      for i, el in listed)]
    if not valid:
        raise InputError(f"{where}: its distorted_atoms {[i for i, _ in listed]} are not atoms of "
                         "the POSCARs")
    strongest = max(distorted, key=lambda t: abs(t[0]), default=None)
    for offset in valid:
        indices = [i - offset for i, _ in listed]
        centre = None if strongest is None else _common_centre(reference, strongest[1], strongest[0],
                                                               indices, anchors)
        if centre is not None:
            return tuple(indices), centre
    return tuple(i - valid[0] for i, _ in listed), None


def _check_atoms(atoms: Atoms, reference: Atoms, path: Path, ref_path: Path) -> None:
    if atoms.get_chemical_symbols() != reference.get_chemical_symbols():
        raise InputError(f"{path}: its atoms (species or order) are not those of {ref_path}")


def _check_count(reference: Atoms, primitive: Structure, sc: np.ndarray, kind: str, name: str,
                 where: Path) -> None:
    change = {"vacancy": -1, "interstitial": 1}.get(kind, 0)
    expected = len(primitive) * round(abs(np.linalg.det(sc))) + change
    if len(reference) != expected:
        raise InputError(f"{where}: {len(reference)} atoms, but a {name} supercell of this host with that "
                         f"cell has {expected}")


def place_defect(name: str, reference: Atoms, ref_path: Path, meta: dict, meta_path: Path,
                 primitive: Structure, oxi: dict[str, int]) -> Defect:
    """The defect ``name`` in the reference POSCAR's own supercell, its site from the metadata.

    Raises:
        InputError: a cell that is no supercell of the host, atoms that are not the host with
            this defect, or no defect atom at the metadata's site.
    """
    elements = sorted({sp.symbol for sp in primitive.composition.elements})
    kind, added, removed = defect_kind(name, elements, str(ref_path.parent.parent))
    cell = reference.cell.array
    sc = supercell_of(primitive, cell, ref_path)
    _check_count(reference, primitive, sc, kind, name, ref_path)
    site = metadata_site(meta, name, cell, meta_path)
    index = defect_atom(reference, site, kind, added, meta_path)
    if index is not None:
        site = reference.positions[index].copy()
    bulk = host_supercell(reference, kind, index, site, removed)
    cells = round(abs(np.linalg.det(sc)))
    if bulk.composition != primitive.composition * cells:
        raise InputError(f"{ref_path}: {reference.get_chemical_formula()} is not the host with one {name}")
    frac = bulk.lattice.get_fractional_coords(site)
    old = oxi[removed] if removed else 0
    new = 0 if added is None else oxi.get(added, _foreign_oxi(added, old))
    return Defect(
        name=name, kind=kind, added=added, removed=removed, oxi_change=new - old,
        multiplicity=site_multiplicity(bulk, frac, cells, len(bulk) - 1 if kind == "vacancy" else index),
        site_symmetry=site_symmetry(bulk, frac, added if kind != "vacancy" else None),
        supercell=to_structure(reference), bulk_supercell=bulk, site=site, defect_index=index,
        sc_matrix=sc, default_charges=default_charge_states(new - old),
    )


def _snb_trials(atoms: dict[str, Atoms], paths: dict[str, Path], meta: dict, meta_path: Path,
                defect: Defect, charge: int, label: str) -> tuple[list[Trial], list[str]]:
    """Trials of ShakeNBreak's metadata, and a note where its distortions miss the defect site."""
    charges = ((meta.get("defects") or {}).get(defect.name) or {}).get("charges") or {}
    entry = charges.get(str(charge)) or charges.get(f"{charge:+d}") or {}
    reference = next(iter(atoms.values()))  # the Unperturbed one where there is one
    bonds = [(trial_distortion(t), a) for t, a in atoms.items() if trial_distortion(t)]
    moved, centre = distorted_indices(entry.get("distorted_atoms"), reference,
                                      bonds if "Unperturbed" in atoms else [],
                                      np.vstack([reference.positions, defect.site]), meta_path)
    notes = []
    off = np.linalg.norm(minimum_image(reference, centre - defect.site)) if centre is not None else 0.0
    if off > 0.5:
        j = int(np.argmin(np.linalg.norm(minimum_image(reference, reference.positions - centre), axis=1)))
        notes.append(f"{label}: ShakeNBreak's bond distortions are centred on atom {j} "
                     f"({reference[j].symbol}), {off:.2f} Å from the defect site (atom "
                     f"{defect.defect_index}): its trials distort another atom's bonds")
    trials = [Trial(t, a, seed=0, distortion=trial_distortion(t),
                    distorted_indices=moved if trial_distortion(t) else (), source=str(paths[t]))
              for t, a in atoms.items()]
    return trials, notes


def _generated_trials(atoms: dict[str, Atoms], paths: dict[str, Path], meta: dict) -> list[Trial]:
    """Trials of ``defectml generate``'s metadata (its seeds, distortions and distorted atoms)."""
    info = meta["trials"]
    return [Trial(t, a, seed=int(info.get(t, {}).get("seed") or 0),
                  distortion=info.get(t, {}).get("distortion"),
                  distorted_indices=tuple(info.get(t, {}).get("distorted_indices") or ()),
                  source=str(paths[t])) for t, a in atoms.items()]


def read_folder(
    name: str, charge: int, folder: Path, primitive: Structure, oxi: dict[str, int],
) -> FolderTrials:
    """One ``<defect>_<q>/`` folder's trials, its defect placed in the reference POSCAR.

    Args:
        name: The defect name (the folder's).
        charge: The charge state (the folder's).
        folder: The folder.
        primitive: The host's primitive cell.
        oxi: The host's oxidation states.

    Raises:
        InputError: see the module; every message names the file or folder.
    """
    elements = sorted({sp.symbol for sp in primitive.composition.elements})
    defect_kind(name, elements, str(folder))
    meta, meta_path = load_metadata(folder)
    ours = _is_ours(meta, name)
    paths, skipped = trial_folders(folder, meta.get("trials", {}) if ours else ())
    atoms = {t: read_poscar(p) for t, p in paths.items()}
    ref_name = "Unperturbed" if "Unperturbed" in atoms else next(iter(atoms))
    for t, a in atoms.items():
        _check_atoms(a, atoms[ref_name], paths[t], paths[ref_name])
    defect = place_defect(name, atoms[ref_name], paths[ref_name], meta, meta_path, primitive, oxi)
    defect.check_charge(charge)
    if ours:
        trials, notes = _generated_trials(atoms, paths, meta), []
    else:
        trials, notes = _snb_trials(atoms, paths, meta, meta_path, defect, charge, folder.name)
    key = content_key(name, [(t, structure_key(a)) for t, a in atoms.items()])
    return FolderTrials(defect, charge, trials, key, folder, skipped, notes)


def structure_key(atoms: Atoms) -> str:
    """Content key of a structure: species, cell and positions (a POSCAR's content)."""
    return content_key(atoms.get_chemical_symbols(), atoms.cell.array, atoms.positions)


def read_trials_folder(
    root: str | Path,
    host: Structure,
    defects: str = "all",
    charges: list[int] | None = None,
    oxidation_states: dict[str, int] | None = None,
) -> list[FolderTrials]:
    """Every ``<defect>_<q>/`` folder's trials (those ``defects`` and ``charges`` name).

    Args:
        root: The ShakeNBreak folder (or one ``<defect>_<q>/`` folder).
        host: The host crystal the trials were made from.
        defects: Comma-separated defect names (the folders'), or ``all``.
        charges: Charge states to take (``None``: every folder's).
        oxidation_states: Overrides of the host's guessed oxidation states.

    Raises:
        InputError: a missing folder, POSCAR or metadata, a defect the host cannot have, or
            POSCARs that are not this host with that defect; the message names the path.
    """
    root = Path(root)
    primitive = host.get_primitive_structure()
    primitive.remove_oxidation_states()
    elements = sorted({sp.symbol for sp in primitive.composition.elements})
    oxi = guess_oxidation_states(primitive, oxidation_states)
    chosen = select_folders(charge_folders(root), defects, charges, elements, root)
    return [read_folder(name, q, folder, primitive, oxi) for name, q, folder in chosen]
