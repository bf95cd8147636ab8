"""Generic readers of DFT outputs: VASP relaxations, ASE trajectories, ShakeNBreak energies and names.

Defect-agnostic pieces every stage reads files with (``search/`` for trial folders, ``dft/`` for
ingest and the oracles, ``train/`` for data sets). Nothing here knows about defects or the store;
what does (defect sites, hosts, records) stays in :mod:`defectml.dft.ingest`.

* :func:`read_vasp_relaxation`: the ionic steps of a VASP folder (vasprun.xml, else OUTCAR, else
  CONTCAR) and its initial POSCAR.
* :func:`read_trajectory`: every frame of a file ASE reads (an extxyz trajectory, say).
* :func:`dft_theory`: the level of theory of a relaxation (given, frames' info, else the INCAR).
* :func:`read_snb_energies`: final energies of a ShakeNBreak ``<defect>.yaml`` by trial name.
* :func:`normalise_trial_name`, :data:`TRIAL_FOLDER`, :data:`CHARGE_FOLDER`: ShakeNBreak's folder
  names (``<defect>_<charge>/<trial>/``) and the trial names defectml gives them.
"""

from __future__ import annotations

import re
from pathlib import Path

from ase import Atoms
from ase.io import read

from defectml.errors import InputError

CHARGE_FOLDER = re.compile(r"^(?P<name>.+)_(?P<charge>[+-]?\d+)$")
"""A ShakeNBreak ``<defect>_<charge>`` folder name (groups ``name`` and ``charge``)."""

TRIAL_FOLDER = re.compile(r"^(Bond_Distortion_-?\d+(\.\d+)?%|Unperturbed|Rattled|Dimer)$")
"""A ShakeNBreak trial folder name (``_High_Energy`` folders do not match)."""

VASP_OUTPUTS = ("vasprun.xml", "vasprun.xml.gz", "OUTCAR", "OUTCAR.gz")
"""VASP outputs with ionic steps, in the order they are tried."""


def normalise_trial_name(folder: str) -> str:
    """ShakeNBreak folder name → defectml trial name (``Bond_Distortion_0.0%`` → ``Rattled``).

    Args:
        folder: A trial folder's name.

    Returns:
        The trial name defectml uses (the folder name unless it is the zero distortion).
    """
    return "Rattled" if folder in ("Bond_Distortion_0.0%", "Bond_Distortion_-0.0%") else folder


def read_snb_energies(path: Path) -> dict[str, float]:
    """Final energies of a ShakeNBreak ``<defect>.yaml``, keyed by defectml trial name.

    Args:
        path: The yaml file (``distortions`` by bond distortion, other trials at the top level).

    Returns:
        Energy (eV) of each trial, keyed as :func:`normalise_trial_name` names it.
    """
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    out: dict[str, float] = {}
    for key, value in (raw.get("distortions") or {}).items():
        if isinstance(key, int | float):
            name = normalise_trial_name(f"Bond_Distortion_{100 * float(key):.1f}%")
        else:
            name = normalise_trial_name(str(key))
        out[name] = float(value)
    for key, value in raw.items():
        if key != "distortions" and isinstance(value, int | float):
            out[normalise_trial_name(str(key))] = float(value)
    return out


def read_trajectory(path: Path) -> list[Atoms]:
    """Every frame of a file ASE can read (an extxyz trajectory, say), in file order.

    Args:
        path: The file.

    Returns:
        The frames, with whatever energies, forces and info the file holds.

    Raises:
        InputError: the file cannot be read.
    """
    try:
        return list(read(path, index=":"))
    except Exception as exc:  # noqa: BLE001 - ASE raises many kinds for a bad file
        raise InputError(f"cannot read {path}: {exc}") from None


def read_vasp_relaxation(folder: Path) -> tuple[list[Atoms], Atoms | None]:
    """Ionic steps (with energies, forces) and the initial structure of a VASP relaxation.

    Reads vasprun.xml, else OUTCAR (gzipped too); the final structure is CONTCAR when no
    trajectory is present.

    Args:
        folder: The relaxation's folder.

    Returns:
        ``(frames, initial)``: the ionic steps and the POSCAR (``None`` when absent);
        ``([], None)`` when the folder holds nothing readable.
    """
    folder = Path(folder)
    frames: list[Atoms] = []
    for name in VASP_OUTPUTS:
        f = folder / name
        if f.exists():
            try:
                frames = list(read(f, index=":"))
                break
            except Exception:  # noqa: BLE001, S112 - truncated outputs: try the next file
                continue
    initial = None
    for name in ("POSCAR", "POSCAR.gz"):
        if (folder / name).exists():
            initial = read(folder / name, format="vasp")
            break
    if not frames:
        for name in ("CONTCAR", "CONTCAR.gz"):
            f = folder / name
            if f.exists() and f.stat().st_size > 0:
                frames = [read(f, format="vasp")]
                break
    return frames, initial


def dft_theory(frames: list[Atoms], folder: Path | None = None, given: str | None = None) -> str:
    """The level of theory of a DFT relaxation: ``given``, else the frames' info, else the INCAR.

    Args:
        frames: The relaxation's frames (the last one's ``functional``, ``encut``, ``soc``,
            ``code`` info are read).
        folder: Where the relaxation ran: its INCAR (or its parent's) is read as a last resort.
        given: A level of theory stated by the user; returned as it is when set.

    Returns:
        A short label such as ``vasp PBE encut=520``.
    """
    if given:
        return given
    info = frames[-1].info if frames else {}
    if info.get("functional"):
        parts = [str(info.get("code", "vasp")).lower(), str(info["functional"])]
        if info.get("encut"):
            parts.append(f"encut={float(info['encut']):g}")
        if info.get("soc"):
            parts.append("soc")
        return " ".join(parts)
    for base in [folder, folder.parent if folder else None]:
        if base is not None and (base / "INCAR").is_file():
            return _theory_from_incar(base / "INCAR")
    return "vasp (functional not recorded: pass --theory)"


def _theory_from_incar(path: Path) -> str:
    """The level of theory an INCAR asks for (functional and cutoff)."""
    from pymatgen.io.vasp import Incar

    inc = Incar.from_file(path)
    if inc.get("LHFCALC"):
        screen = float(inc.get("HFSCREEN", 0.0))
        functional = "HSE06" if abs(screen - 0.2) < 1e-3 else "PBE0" if screen == 0 else (
            f"hybrid AEXX={inc.get('AEXX', 0.25)} HFSCREEN={screen}")
    elif inc.get("METAGGA"):
        functional = str(inc["METAGGA"])
    else:
        gga = str(inc.get("GGA", "PE")).upper()
        functional = {"PE": "PBE", "PS": "PBEsol", "RP": "RPBE", "91": "PW91"}.get(gga, f"GGA={gga}")
    encut = f" encut={float(inc['ENCUT']):g}" if inc.get("ENCUT") else ""
    return f"vasp {functional}{encut}"
