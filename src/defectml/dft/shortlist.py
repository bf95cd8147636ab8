"""Which minima go to DFT: the unique low-energy ones, plus the unperturbed one as a control."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import make_supercell

from defectml.errors import InputError
from defectml.search.landscape import Minimum
from defectml.search.summary import DefectSummary


def select(summary: DefectSummary, max_per_defect: int = 5, window: float = 0.5) -> list[Minimum]:
    """The minima of one defect and charge to relax with DFT.

    Args:
        summary: The defect's MLIP landscape.
        max_per_defect: At most this many minima from the energy window (lowest first).
        window: Keep minima within this many eV of the lowest.

    Returns:
        The chosen minima, lowest first; the minimum holding the ``Unperturbed`` trial is always
        appended as a control (so DFT can tell whether the reconstruction is real).
    """
    if max_per_defect < 1:
        raise InputError(f"--max-per-defect must be at least 1, got {max_per_defect}")
    if window < 0:
        raise InputError(f"--window must be non-negative, got {window}")
    if not summary.minima:
        return []
    lowest = summary.minima[0].energy
    chosen = [m for m in summary.minima if m.energy - lowest <= window][:max_per_defect]
    control = next((m for m in summary.minima if m.contains_unperturbed), None)
    if control is not None and control not in chosen:
        chosen.append(control)
    return chosen


#: The level of theory of each built-in DFT calculator (stored with every row it makes).
THEORY = {"gpaw": "gpaw lcao dzp PBE kpts=1x1x1 spinpol", "emt": "ase EMT (a stand-in for DFT, tests only)"}


def dft_calculator(name: str, charge: int = 0):
    """An ASE DFT calculator by name, for relaxing a shortlist directly.

    ``gpaw``: GPAW in LCAO mode (dzp basis, PBE, Γ-point, spin-polarised, cell charge set);
    ``emt``: ASE's EMT, a stand-in for tests. Anything else: pass a calculator object to
    :func:`relax_shortlist` instead.
    """
    if name == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if name == "gpaw":
        try:
            from gpaw import GPAW
        except ImportError:
            raise InputError("--calculator gpaw needs GPAW: pip install gpaw gpaw-data "
                             "(build needs libxc-dev libopenblas-dev libfftw3-dev)") from None
        return GPAW(mode="lcao", basis="dzp", xc="PBE", kpts=(1, 1, 1), spinpol=True,
                    charge=charge, txt=None)
    raise InputError(f"unknown DFT calculator {name!r}: use gpaw (or emt for tests)")


def relax_shortlist(store, summary: DefectSummary, chosen: list[Minimum], calculator_for,
                    label: str, *, fmax: float = 0.05, max_steps: int = 300,
                    theory: str | None = None) -> int:
    """Relax the chosen minima with a DFT calculator; store them as ``fidelity="dft"`` rows.

    Args:
        store: The search's store (the DFT rows join the same defect rows).
        summary: The defect's MLIP landscape (gives the defect key and site).
        chosen: The shortlisted minima.
        calculator_for: ``charge -> ASE calculator``.
        label: Names this DFT setup in the store (e.g. ``gpaw``).
        theory: Its level of theory (code, functional, key settings); default from ``label``.
        fmax: Force threshold (eV/Å).
        max_steps: Step limit.

    Returns:
        The number of relaxations run (already stored ones are skipped).
    """
    from defectml.core.relax import relax_one
    from defectml.records import RelaxationRecord, trial_key
    from defectml.store import content_key

    if not summary.trials:
        return 0
    # one DFT run per (DFT setup, search run): minima of two searches never share a DFT row
    settings_key = content_key("dft", label, fmax, max_steps, summary.settings_key)
    theory = theory or THEORY.get(label, label)
    done = store.done_trial_keys(settings_key)
    ran = 0
    for m in chosen:
        tkey = trial_key(settings_key, summary.defect_key, summary.charge, m.trial)
        if tkey in done:
            continue
        trial = next(t for t in summary.trials if t.name == m.trial)
        r = relax_one(m.atoms, calculator_for(summary.charge), fmax=fmax, max_steps=max_steps)
        store.add(RelaxationRecord(
            r.atoms, r.energy, r.forces, "dft", theory, summary.defect, summary.defect_key,
            summary.charge, m.trial, tkey, settings_key, r.status, label, r.steps, trial.site,
            trial.defect_index, trajectory=r.trajectory, distortion=trial.distortion,
            extra={"reason": r.reason, "seconds": r.seconds, "from_mlip_minimum": m.rank,
                   "mlip_run": summary.settings_key},
        ))
        ran += 1
    return ran


def dft_structures(store, summary: DefectSummary, chosen: list[Minimum], lattice: str = "input"
                   ) -> tuple[list[tuple[str, Atoms]], Atoms, str]:
    """The structures to write for DFT: (folder name, atoms) per chosen minimum, and the bulk.

    The minimum holding the ``Unperturbed`` trial is the control: it is written as that trial's
    own relaxed structure and named ``Unperturbed``. With ``lattice="input"`` every structure is
    put on the host lattice as it was given (the DFT one, not the MLIP's relaxed one: a
    formation energy needs the defect and bulk cells on one lattice), fractional coordinates kept.

    Returns:
        The named structures, the pristine supercell, and a note on the lattice used.
    """
    if lattice not in ("input", "model"):
        raise InputError(f"--lattice must be input or model, not {lattice!r}")
    defect_row = store.first(kind="defect", defect_key=summary.defect_key)
    host_row = store.first(kind="host", host_key=defect_row.host_key)
    sc = np.asarray(defect_row.data["sc_matrix"])
    host = host_row.toatoms()
    host.calc = None
    cell, note = None, f"the model's relaxed lattice ({summary.model})"
    if lattice == "input":
        given = host_row.data.get("input_cell")
        if given is None:
            note = "the model's relaxed lattice: this store lacks the input lattice (rerun the search)"
        elif not np.allclose(defect_row.cell, sc @ host.cell.array, atol=1e-3):
            note = "the model's relaxed lattice: the supercell is not the host cell times its matrix"
        else:
            host.set_cell(np.asarray(given), scale_atoms=True)
            cell, note = sc @ np.asarray(given), "the host lattice as given (input)"
    trials = {t.name: t for t in summary.trials}
    named = []
    for m in chosen:
        if m.contains_unperturbed and "Unperturbed" in trials:
            name, atoms = f"{m.rank:02d}_Unperturbed", trials["Unperturbed"].atoms
        else:
            name, atoms = f"{m.rank:02d}_{m.trial.replace('%', 'pc')}", m.atoms
        atoms = atoms.copy()
        atoms.calc = None
        if cell is not None:
            atoms.set_cell(cell, scale_atoms=True)
        named.append((name, atoms))
    return named, make_supercell(host, sc), note


@dataclass
class ShortlistRequest:
    """What ``defectml shortlist`` writes: where, for which codes, how many minima.

    ``calculator``: a DFT code to relax the chosen minima with here as well (e.g. ``gpaw``).
    """

    out: Path
    codes: list[str]
    overrides: dict = field(default_factory=dict)
    max_per_defect: int = 5
    window: float = 0.5
    lattice: str = "input"
    calculator: str | None = None
    dft_fmax: float = 0.05


def write_shortlist(store, summaries: list[DefectSummary], r: ShortlistRequest,
                    say: Callable[[str], None] = print) -> list[dict]:
    """Choose each landscape's minima for DFT, write their inputs and the pristine supercell(s).

    Writes ``r.out/<label>/<minimum>/`` (inputs of every code and the structure), one ``bulk``
    folder per distinct supercell (neutral), and ``r.out/shortlist.json`` (the returned document).
    With ``r.calculator`` the chosen minima are also relaxed here and stored as DFT rows.
    """
    from defectml.dft.inputs import write_inputs
    from defectml.structure_io import to_structure, write_structure

    doc, bulks = [], {}
    for s in summaries:
        chosen = select(s, r.max_per_defect, r.window)
        named, bulk, lattice = dft_structures(store, s, chosen, r.lattice)
        entry = {"defect": s.defect, "charge": s.charge, "n_trials": len(s.trials),
                 "n_minima": len(s.minima), "lattice": lattice, "shortlist": []}
        for m, (name, atoms) in zip(chosen, named, strict=True):
            folder = r.out / s.label / name
            write_inputs(atoms, s.charge, folder, r.codes, r.overrides)
            write_structure(to_structure(atoms), folder / "structure")
            entry["shortlist"].append({"rank": m.rank, "trial": m.trial, "label": m.label,
                                       "delta_e_eV": round(m.delta_e, 4) + 0.0, "folder": str(folder),
                                       "control": m.contains_unperturbed})
        bulks.setdefault(bulk.cell.array.round(6).tobytes(), (bulk, lattice))
        if r.calculator:
            entry["dft_relaxed"] = relax_shortlist(
                store, s, chosen, lambda q: dft_calculator(r.calculator, q), r.calculator, fmax=r.dft_fmax)
        doc.append(entry)
        n = len(chosen)
        say(f"{s.label}: {n} of {len(s.minima)} minima -> DFT "
            f"({n} relaxations instead of {len(s.trials)}: {1 - n / max(len(s.trials), 1):.0%} saved)")
    for i, (bulk, lattice) in enumerate(bulks.values()):  # the pristine supercell(s), neutral
        folder = r.out / ("bulk" if len(bulks) == 1 else f"bulk_{i}")
        write_inputs(bulk, 0, folder, r.codes, r.overrides)
        write_structure(to_structure(bulk), folder / "structure")
        say(f"bulk supercell ({len(bulk)} atoms, {lattice}) -> {folder}/")
    r.out.mkdir(parents=True, exist_ok=True)
    (r.out / "shortlist.json").write_text(json.dumps(doc, indent=2))
    return doc
