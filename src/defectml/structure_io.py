"""Reading host structures and writing relaxed ones, with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from defectml.errors import InputError


def to_structure(obj: Structure | Atoms) -> Structure:
    """Return a pymatgen ``Structure`` for a pymatgen ``Structure`` or a periodic ASE ``Atoms``."""
    if isinstance(obj, Structure):
        return obj.copy()
    if isinstance(obj, Atoms):
        if not all(obj.pbc) or obj.cell.rank != 3:
            raise InputError("the ASE Atoms must be periodic in 3D with a full cell")
        return AseAtomsAdaptor.get_structure(obj)
    raise InputError(f"expected a pymatgen Structure or an ASE Atoms, got {type(obj).__name__}")


def to_atoms(structure: Structure) -> Atoms:
    """Return an ASE ``Atoms`` copy of a pymatgen ``Structure`` (oxidation states dropped)."""
    s = structure.copy()
    s.remove_oxidation_states()
    return AseAtomsAdaptor.get_atoms(s)


def read_structure(path: str | Path) -> Structure:
    """Read a crystal structure from any format pymatgen or ASE can read.

    Args:
        path: CIF, POSCAR/CONTCAR, extxyz, or any other file ASE/pymatgen understand.

    Returns:
        The structure as a pymatgen ``Structure``.

    Raises:
        InputError: if the file is missing, empty, unreadable or holds no periodic 3D structure.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"structure file not found: {p}")
    if p.is_dir():
        raise InputError(f"expected a structure file, got a folder: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"structure file is empty: {p}")
    errors: list[str] = []
    try:
        structure = Structure.from_file(p)
    except Exception as exc:  # noqa: BLE001 - pymatgen raises many types for bad files
        errors.append(f"pymatgen: {exc}")
        try:
            from ase.io import read

            structure = to_structure(read(p))
        except Exception as exc2:  # noqa: BLE001
            errors.append(f"ASE: {exc2}")
            detail = "; ".join(e.splitlines()[0][:120] for e in errors if e)
            raise InputError(f"cannot read a crystal structure from {p} ({detail})") from None
    if len(structure) == 0:
        raise InputError(f"structure file holds no atoms: {p}")
    if structure.volume < 1e-3:
        raise InputError(f"structure in {p} has a degenerate cell (volume ~0)")
    return structure


#: Two host atoms closer than this (Å) are one site written twice, not a crystal (the shortest
#: real bond, H-H in H2, is 0.74 Å; in solids no pair comes near 0.5 Å).
MIN_HOST_DISTANCE = 0.5


def check_host(structure: Structure, where: str = "the host") -> None:
    """Refuse a host with overlapping atoms (a duplicated site, a bad CIF or supercell).

    Raises:
        InputError: naming the closest pair and its distance.
    """
    if len(structure) < 2:
        return
    d = structure.distance_matrix
    np.fill_diagonal(d, np.inf)
    i, j = np.unravel_index(np.argmin(d), d.shape)
    if d[i, j] < MIN_HOST_DISTANCE:
        raise InputError(
            f"{where} has overlapping atoms: {structure[i].specie} {i} and {structure[j].specie} {j} are "
            f"{d[i, j]:.2f} Å apart (below {MIN_HOST_DISTANCE} Å: a site written twice?); fix the structure"
        )


def image_distance(cell) -> float:
    """The shortest distance (Å) between a point and its periodic images in ``cell``."""
    import itertools

    m = np.asarray(cell, dtype=float)
    shifts = [n for n in itertools.product(range(-2, 3), repeat=3) if any(n)]
    return float(min(np.linalg.norm(np.asarray(n) @ m) for n in shifts))


def write_structure(structure: Structure, stem: Path) -> list[Path]:
    """Write ``structure`` as ``<stem>.cif`` and ``<stem>.vasp`` (POSCAR) and return the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    s = structure.copy()
    s.remove_oxidation_states()
    cif, poscar = stem.with_suffix(".cif"), stem.with_suffix(".vasp")
    s.to(filename=str(cif), fmt="cif")
    s.to(filename=str(poscar), fmt="poscar")
    return [cif, poscar]


def bare_atoms(atoms: Atoms) -> Atoms:
    """Species, positions, cell and periodicity only, plus the total charge where it is given.

    What a model is asked about: no calculator, no labels; ``info["charge"]`` is kept because a
    charge-aware model reads it.
    """
    out = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    if "charge" in atoms.info:
        out.info["charge"] = int(round(float(atoms.info["charge"])))
    return out


def with_charge(atoms: Atoms, charge: int) -> Atoms:
    """A copy of ``atoms`` that carries its cell's total charge in ``info["charge"]`` (ASE's way)."""
    out = atoms.copy()
    out.info["charge"] = int(charge)
    return out


def write_atomic(path: Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A killed process leaves the old file or the new one, never half of one (resumes read them).
    """
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(path: Path, doc) -> Path:
    """Write ``doc`` as indented JSON, atomically (numpy scalars as numbers, paths as text)."""
    import json

    def default(obj):
        return str(obj) if isinstance(obj, Path) else float(obj)

    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2, default=default)))


def write_frames(path: Path, frames: list[Atoms]) -> Path:
    """Write frames (with their single-point results) as extxyz, atomically."""
    from ase.io import write

    return write_atomic(path, lambda tmp: write(tmp, frames, format="extxyz"))


def minimum_image(atoms: Atoms, vectors: np.ndarray) -> np.ndarray:
    """Minimum-image versions of Cartesian ``vectors`` (Å) in the cell of ``atoms``."""
    cell = atoms.cell.array
    frac = np.linalg.solve(cell.T, np.atleast_2d(np.asarray(vectors, float)).T).T
    return (frac - np.round(frac)) @ cell
