"""What the store holds, one typed record per row kind, and the schema version they make.

Rows are written only through :meth:`ResultStore.add <defectml.store.ResultStore.add>` from
these records, so every relaxation, ML or DFT, carries the same fields:

* ``fidelity``: ``mlip`` or ``dft`` (which rows a search, ``show`` or ``evaluate`` works on);
* ``theory``: the level of theory: the model key for ML rows (``chgnet-d14ab7c0f093efe6``), the
  code, functional and key settings for DFT rows (``vasp PBEsol encut=520``);
* ``charge_state``, ``status`` (read from the DFT output for DFT rows, never assumed), and a
  per-frame :class:`Trajectory` (positions, energy, forces, stress where known, cell).

Beside the relaxations: ``kind="polish"`` rows, a relaxation continued to a tighter force
threshold for the ranking (:class:`PolishRecord`; older code ignores them).

Schema versions: 1 (defectml ≤ 0.1, no version stamp: no ``theory``, no model keys, DFT
trajectories without forces or cells); 2 (this module). A version-1 store is migrated in place
when a writer opens it (its rows gain ``theory``; nothing is dropped); a newer version than this
code knows is refused with a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

SCHEMA_VERSION = 2


def trial_key(settings_key: str, defect_key: str, charge: int, trial: str) -> str:
    """The key of one trial's relaxation under one run's settings (search, ingest, shortlist, loop)."""
    from defectml.store import content_key

    return content_key(settings_key, defect_key, charge, trial)


@dataclass
class Trajectory:
    """The frames of one relaxation: what fine-tuning and the active loop learn from.

    Attributes:
        positions: (n, N, 3) Å.
        energies: (n,) eV.
        forces: (n, N, 3) eV/Å, or ``None`` where the source has none.
        cells: (n, 3, 3) Å.
        stresses: (n, 6) eV/Å³ (ASE's Voigt order and sign), or ``None``.
    """

    positions: np.ndarray
    energies: np.ndarray
    forces: np.ndarray | None
    cells: np.ndarray
    stresses: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.energies)

    @classmethod
    def from_frames(cls, frames: list[Atoms]) -> Trajectory:
        """From ASE frames with single-point results (e.g. read from vasprun.xml or extxyz)."""
        def result(f: Atoms, name: str):
            return f.calc.results.get(name) if f.calc is not None else None

        forces = [result(f, "forces") for f in frames]
        stresses = [result(f, "stress") for f in frames]
        return cls(
            positions=np.array([f.positions for f in frames]),
            energies=np.array([float(f.get_potential_energy()) for f in frames]),
            forces=np.array(forces) if all(x is not None for x in forces) else None,
            cells=np.array([f.cell.array for f in frames]),
            stresses=(np.array([np.asarray(s).reshape(-1)[:6] if np.size(s) == 6 else _voigt(s)
                                for s in stresses]) if all(s is not None for s in stresses) else None),
        )

    def to_data(self) -> dict[str, Any]:
        """The row's ``data`` entry (float32 positions/forces/stresses keep stores small)."""
        d: dict[str, Any] = {"positions": self.positions.astype(np.float32), "energies": self.energies,
                             "cells": self.cells}
        if self.forces is not None:
            d["forces"] = self.forces.astype(np.float32)
        if self.stresses is not None:
            d["stresses"] = self.stresses.astype(np.float32)
        return d

    @classmethod
    def from_data(cls, d: dict[str, Any], cell: np.ndarray | None = None) -> Trajectory:
        """Inverse of :meth:`to_data`; a version-1 entry (no cells) takes the row's ``cell``."""
        pos = np.asarray(d["positions"], dtype=float)
        cells = d.get("cells")
        if cells is None:
            cells = np.repeat(np.asarray(cell, dtype=float)[None], len(pos), axis=0)
        forces, stresses = d.get("forces"), d.get("stresses")
        return cls(pos, np.asarray(d["energies"], dtype=float),
                   None if forces is None else np.asarray(forces, dtype=float),
                   np.asarray(cells, dtype=float),
                   None if stresses is None else np.asarray(stresses, dtype=float))

    def frame(self, i: int, numbers: np.ndarray, pbc=True) -> Atoms:
        """Frame ``i`` as ASE atoms with its energy, forces and stress."""
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=numbers, positions=self.positions[i], cell=self.cells[i], pbc=pbc)
        results = {"energy": float(self.energies[i])}
        if self.forces is not None:
            results["forces"] = self.forces[i]
        if self.stresses is not None:
            results["stress"] = self.stresses[i]
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms


def _voigt(stress) -> np.ndarray:
    s = np.asarray(stress, dtype=float).reshape(3, 3)
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


@dataclass
class HostRecord:
    """The (relaxed) host cell: ``kind="host"``."""

    atoms: Atoms
    energy: float | None
    host_key: str
    model: str  # the model's name, or "dft"
    oxidation_states: dict[str, int]
    theory: str
    extra: dict[str, Any] = field(default_factory=dict)  # model_version, model_ref, source

    def row(self) -> tuple[dict, dict]:
        """(key-value pairs, data) of the row."""
        return ({"kind": "host", "host_key": self.host_key, "model": self.model, "theory": self.theory},
                {"oxidation_states": self.oxidation_states, **self.extra})


@dataclass
class DefectRecord:
    """An unrelaxed defect supercell: ``kind="defect"``."""

    atoms: Atoms
    defect_key: str
    host_key: str
    name: str
    site: np.ndarray
    defect_index: int | None
    sc_matrix: np.ndarray
    kind: str
    extra: dict[str, Any] = field(default_factory=dict)  # multiplicity, site_symmetry, source, ...

    def row(self) -> tuple[dict, dict]:
        """(key-value pairs, data) of the row."""
        return ({"kind": "defect", "defect_key": self.defect_key, "host_key": self.host_key,
                 "defect": self.name},
                {"site": self.site, "defect_index": self.defect_index, "sc_matrix": self.sc_matrix,
                 "kind": self.kind, **self.extra})


@dataclass
class RelaxationRecord:
    """One finished relaxation, ML or DFT: ``kind="relaxation"``.

    Attributes:
        atoms: Final structure.
        energy: Final energy (eV) or ``None`` (failed).
        forces: Final forces or ``None``.
        fidelity: ``mlip`` or ``dft``.
        theory: Level of theory (model key, or DFT code + functional + settings).
        defect: Defect name.
        defect_key: Its defect row's key.
        charge: Supercell charge.
        trial: Trial name.
        trial_key: Content key of this relaxation.
        settings_key: The run it belongs to.
        status: ``converged``, ``unconverged``, ``failed`` or ``in_basin``.
        model: The model's name (``dft`` or the DFT setup's label for DFT rows).
        steps: Ionic steps.
        site: Cartesian defect site.
        defect_index: Index of the defect atom (``None`` for a vacancy).
        trajectory: Per-frame data, when known.
        model_key: The model's content key (ML rows).
        seed: Rattle seed of the trial.
        distortion: Bond distortion of the trial.
        extra: Anything else for ``data`` (reason, initial positions, source, timings, ...).
    """

    atoms: Atoms
    energy: float | None
    forces: np.ndarray | None
    fidelity: str
    theory: str
    defect: str
    defect_key: str
    charge: int
    trial: str
    trial_key: str
    settings_key: str
    status: str
    model: str
    steps: int
    site: np.ndarray
    defect_index: int | None
    trajectory: Trajectory | None = None
    model_key: str | None = None
    seed: int | None = None
    distortion: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> tuple[dict, dict]:
        """(key-value pairs, data) of the row."""
        kvp = {"kind": "relaxation", "fidelity": self.fidelity, "theory": self.theory,
               "defect": self.defect, "defect_key": self.defect_key, "charge_state": int(self.charge),
               "trial": self.trial, "trial_key": self.trial_key, "settings_key": self.settings_key,
               "status": self.status, "model": self.model, "steps": int(self.steps),
               "model_key": self.model_key, "seed": self.seed, "distortion": self.distortion}
        data = {"site": self.site, "defect_index": self.defect_index, **self.extra}
        if self.trajectory is not None:
            data["trajectory"] = self.trajectory.to_data()
        return kvp, data


@dataclass
class PolishRecord:
    """One relaxation continued from its end point to a tighter force threshold: ``kind="polish"``.

    The relaxation it continues keeps its row (nothing is overwritten); a summary ranks the
    polished energy and structure in its place (:mod:`defectml.search.polish`).

    Attributes:
        atoms: Final structure.
        energy: Final energy (eV) or ``None`` (failed).
        forces: Final forces or ``None``.
        trial_key: The polished relaxation's key.
        settings_key: The run it belongs to.
        fmax: The tighter force threshold (eV/Å).
        status: ``converged``, ``unconverged`` or ``failed``.
        steps: Steps taken from the relaxation's end point.
        model_key: The model's content key.
        extra: ``seconds``, ``reason``, ``start_energy`` (the relaxation's own energy).
    """

    atoms: Atoms
    energy: float | None
    forces: np.ndarray | None
    trial_key: str
    settings_key: str
    fmax: float
    status: str
    steps: int
    model_key: str
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> tuple[dict, dict]:
        """(key-value pairs, data) of the row."""
        return ({"kind": "polish", "trial_key": self.trial_key, "settings_key": self.settings_key,
                 "polish_fmax": float(self.fmax), "status": self.status, "steps": int(self.steps),
                 "model_key": self.model_key}, dict(self.extra))


@dataclass
class ThermoRecord:
    """A cached expensive thermodynamic result (phonons, TI): ``kind="thermo"``."""

    atoms: Atoms
    thermo_key: str
    result: dict[str, Any]

    def row(self) -> tuple[dict, dict]:
        """(key-value pairs, data) of the row."""
        return {"kind": "thermo", "thermo_key": self.thermo_key}, dict(self.result)


Record = HostRecord | DefectRecord | RelaxationRecord | PolishRecord | ThermoRecord
