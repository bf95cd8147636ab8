"""Minima out to the tools people already use: ShakeNBreak folders and DefectEntry JSON.

* :func:`write_snb_folders`: ShakeNBreak's layout, one folder per defect and charge
  (``Mg_O_+1/``) with ``Bond_Distortion_X%/{POSCAR,CONTCAR}`` (``Rattled`` as
  ``Bond_Distortion_0.0%``), ``Unperturbed/`` and ``Dimer/``, the energies in ``Mg_O_+1.yaml``
  (``distortions: {-0.3: E, ...}``, ``Unperturbed: E``, ``Dimer: E``) and
  ``distortion_metadata.json`` (site and distortions), as ``snb-analyse``/``snb-plot`` and
  ``defectml ingest`` read them. The energies are the MLIP's, and the yaml says which model.
* :func:`defect_entry`: a pymatgen-analysis-defects ``DefectEntry`` (the class doped's extends)
  for a minimum: the ``Defect`` in the host's unit cell (rebuilt from the store's site and
  supercell matrix), the relaxed supercell as a ``ComputedStructureEntry`` with the model's
  energy, and the defect's fractional position in the supercell.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from defectml.errors import InputError
from defectml.search.defects import DEFECT_SPEC
from defectml.search.summary import DefectSummary


def snb_folder_name(trial: str) -> str:
    """ShakeNBreak's folder name of a trial (``Rattled`` → ``Bond_Distortion_0.0%``)."""
    return "Bond_Distortion_0.0%" if trial == "Rattled" else trial


def write_snb_folders(summaries: list[DefectSummary], out: Path, starts: dict | None = None) -> list[Path]:
    """Every relaxed trial in ShakeNBreak's layout (see the module). Returns the defect folders.

    Args:
        summaries: The landscapes.
        out: Where the ``<defect>_<charge>/`` folders go.
        starts: ``{(label, trial): Atoms}`` starting structures, written as each POSCAR.
    """
    import yaml
    from ase.io import write

    folders = []
    for s in summaries:
        folder = out / s.label
        distortions: dict[float, float] = {}
        others: dict[str, float] = {}
        for t in s.trials:
            if t.energy is None or t.status != "converged":
                continue  # failed, unconverged, or stopped early in a basin: not a finished relaxation
            sub = folder / snb_folder_name(t.name)
            sub.mkdir(parents=True, exist_ok=True)
            write(sub / "CONTCAR", t.atoms, format="vasp", direct=True, sort=False)
            start = (starts or {}).get((s.label, t.name))
            if start is not None:
                write(sub / "POSCAR", start, format="vasp", direct=True, sort=False)
            if t.name == "Rattled":
                distortions[0.0] = float(t.energy)
            elif t.name.startswith("Bond_Distortion_") and t.distortion is not None:
                distortions[round(float(t.distortion), 4)] = float(t.energy)
            else:
                others[t.name] = float(t.energy)
        doc = {"distortions": dict(sorted(distortions.items())), **others}
        (folder / f"{s.label}.yaml").write_text(
            f"# energies (eV) from {s.model} (an MLIP), not DFT; written by defectml\n"
            + yaml.safe_dump(doc, sort_keys=False))
        cell = s.trials[0].atoms.cell.array
        site = np.linalg.solve(cell.T, np.asarray(s.trials[0].site, dtype=float))
        meta = {"distortion_parameters": {"bond_distortions": sorted(distortions)},
                "defects": {s.defect: {"charges": {str(s.charge): {}},
                                       "unique_site": np.round(site, 8).tolist()}},
                "model": s.model}
        (folder / "distortion_metadata.json").write_text(json.dumps(meta, indent=2))
        folders.append(folder)
    return folders


def _unit_cell_defect(store, summary: DefectSummary):
    """The pymatgen-analysis-defects ``Defect`` of a summary, in the host's unit cell."""
    from pymatgen.analysis.defects.core import Interstitial, Substitution, Vacancy
    from pymatgen.core import PeriodicSite

    from defectml.structure_io import to_structure

    defect_row = store.first(kind="defect", defect_key=summary.defect_key)
    host_row = store.first(kind="host", host_key=defect_row.host_key)
    host = to_structure(host_row.toatoms())
    sc = np.asarray(defect_row.data["sc_matrix"], dtype=float)
    sc_cell = np.asarray(defect_row.cell)
    frac_sc = np.linalg.solve(sc_cell.T, np.asarray(defect_row.data["site"], dtype=float))
    frac = np.mod(frac_sc @ sc, 1.0)
    spec = DEFECT_SPEC.match(summary.defect)
    if spec is None:
        raise InputError(f"cannot export {summary.defect}: not a v_X, A_B or X_i defect name")
    if spec["vac"]:
        nearest = min(host, key=lambda site: site.distance_and_image_from_frac_coords(frac)[0])
        return Vacancy(host, PeriodicSite(nearest.specie, frac, host.lattice)), frac_sc
    element = spec["sub"] or spec["int"]
    kind = Substitution if spec["sub"] else Interstitial
    return kind(host, PeriodicSite(element, frac, host.lattice)), frac_sc


def defect_entry(store, summary: DefectSummary, rank: int = 0):
    """A pymatgen-analysis-defects ``DefectEntry`` for one minimum (the lowest by default).

    The energy is the model's; ``entry_id`` names the run, the minimum and the model.
    """
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    from defectml.structure_io import to_structure

    if not summary.minima:
        raise InputError(f"{summary.label} has no minimum to export")
    m = summary.minima[rank]
    defect, frac_sc = _unit_cell_defect(store, summary)
    structure = to_structure(m.atoms)
    entry = ComputedStructureEntry(structure, float(m.energy),
                                   data={"model": summary.model, "trial": m.trial, "label": m.label,
                                         "delta_e_eV": m.delta_e})
    from pymatgen.analysis.defects.thermo import DefectEntry

    return DefectEntry(defect=defect, charge_state=summary.charge, sc_entry=entry,
                       sc_defect_frac_coords=tuple(float(x) for x in np.mod(frac_sc, 1.0)),
                       entry_id=f"defectml:{summary.settings_key}:{summary.label}:{m.trial}")


def write_defect_entries(store, summaries: list[DefectSummary], out: Path) -> list[Path]:
    """One ``<defect>_<charge>.json`` DefectEntry (its lowest minimum) per defect and charge."""
    from monty.serialization import dumpfn

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in summaries:
        if not s.minima:
            continue
        path = out / f"{s.label}.json"
        dumpfn(defect_entry(store, s), path)
        paths.append(path)
    return paths
