"""Charge states: a charge-aware CHGNet against charge-blind models, on real charged-defect DFT.

Parts (each cached under --work, so a killed run resumes; results merge into one file):

* ``gan``: GaN Mg_Ga (−2..+1) and V_N (−1..+2), PBEsol, 32 atoms (``defect-dft/GaN``).
  Leave one charge state out: for every charged state q of a defect, a charge-aware CHGNet is
  fine-tuned on all GaN frames except that state's, then predicts E(q) − E(0) at the DFT end
  structures of q and 0. The transition levels from those energies (the neutral state's DFT
  energy plus the predicted differences) are compared with the levels from the DFT energies, with
  the same point-charge correction (pymatgen-analysis-defects' Freysoldt lattice term). The
  charge-blind comparison: CHGNet as shipped, whose E(q) − E(0) is the geometry's alone (a
  charge-blind fine-tune has no energy for a charge state it never saw: it has one anchor per
  charge state). Also, for scale, a charge-aware model trained on every charge state (in sample).
* ``mgo``: MgO Mg_O (0..+4), PBEsol, 216 atoms (``defect-dft/MgO``): charge-aware and
  charge-blind fine-tunes on every charge state but +2 (frames subsampled: CPU time); energy MAE
  per charge state of E − E(neutral anchor) on frames not trained on (every +2 frame; the frames
  between the training frames of the other states).

    python benchmarks/charge_states.py gan [--epochs 8] [--threads 1]
    python benchmarks/charge_states.py mgo [--epochs 3] [--per-relaxation 4] (no stress: CPU time)

Writes benchmarks/results/charge_states.{json,md}. Validation for early stopping is the training
set itself (fixed epochs): the held-out charge state is never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "defect-dft"
RESULTS = ROOT / "benchmarks" / "results"
#: GaN's static dielectric constant, the average of ε⊥ 9.5 and ε∥ 10.4 (experiment; PBEsol is close).
GAN_DIELECTRIC = 9.8
#: GaN's band gap: levels are reported inside 0..3.5 eV of the VBM (experimental 3.5 eV).
GAN_GAP = 3.5


def _family(frame) -> str:
    from defectml.train.finetune import defect_family

    return defect_family(frame)


def _finetune(train, work: Path, name: str, epochs: int, threads: int | None, charge_aware: bool, log,
              batch_size: int = 4, stress_weight: float = 0.1):
    """A fine-tune on ``train`` (validated on itself: fixed epochs), cached by name."""
    from ase.io import write

    from defectml.models import load_model
    from defectml.train.finetune import FinetuneSettings, finetune

    out = work / f"{name}_e{epochs}.pth.tar"  # (its settings are fixed here; the epochs vary)
    if not out.is_file():
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"{name}_e{epochs}.extxyz"
        write(path, train)
        s = FinetuneSettings(epochs=epochs, lr=1e-4, energy_weight=10.0, batch_size=batch_size,
                             patience=epochs, charge_aware=charge_aware, threads=threads,
                             stress_weight=stress_weight)
        t0 = time.perf_counter()
        finetune(path, path, out, s, log=lambda m: log(f"{name}: {m}"))
        log(f"{name}: {time.perf_counter() - t0:.0f} s")
    return load_model(str(out), threads=threads)


def _read(host: str) -> list:
    """A host's defect-dft frames, charges as plain ints."""
    from ase.io import read

    frames = read(DATA / f"{host}.extxyz.gz", ":")
    for f in frames:
        f.info["charge"] = int(f.info["charge"])
    return frames


def _energy(model, frame, charge: int) -> float:
    from defectml.structure_io import bare_atoms, with_charge

    return float(model.batch()([with_charge(bare_atoms(frame), charge)])[0][0])


def _levels(energies: dict[int, float], cell, name: str) -> list[dict]:
    from defectml.thermo.levels import (
        ChargeState,
        formation_lines,
        point_charge_correction,
        transition_levels,
    )

    states = [ChargeState(q, e, point_charge_correction(cell, q, GAN_DIELECTRIC))
              for q, e in energies.items()]
    # μ, E_bulk and the VBM shift every level of a defect alike with the model as with DFT: the
    # comparison needs none of them (the data hold no VBM: levels are on the raw eigenvalue-free
    # scale with E_VBM = 0, the same for both)
    lines = formation_lines(name, states, 0.0, {}, {}, 0.0)
    return [{"label": lv.label, "q": lv.q, "q_next": lv.q_next, "fermi_level_eV": round(lv.fermi_level, 4)}
            for lv in transition_levels(lines, 1e3, lower=-1e3)]


def gan(work: Path, epochs: int, threads: int | None, log) -> dict:

    from defectml.models import load_model

    cache = work / "gan.json"
    if cache.exists():
        return json.loads(cache.read_text())
    frames = _read("GaN")
    last = {}
    for f in frames:  # each (defect, charge) is one relaxation here; its last step is the end point
        if f.info.get("is_last_step") and f.info["defect"] != "bulk":
            last[(_family(f), f.info["charge"])] = f
    families = sorted({k[0] for k in last})
    base = load_model("chgnet", threads=threads)
    all_aware = _finetune(frames, work, "gan_all_charges", epochs, threads, True, log)
    doc: dict = {"dielectric": GAN_DIELECTRIC, "gap_eV": GAN_GAP, "epochs": epochs, "defects": {}}
    errors = {"aware_held_out": [], "blind": [], "aware_in_sample": []}
    for fam in families:
        charges = sorted(q for (f, q) in last if f == fam)
        e_dft = {q: float(last[(fam, q)].get_potential_energy()) for q in charges}
        e0 = e_dft[0]
        pred = {"aware_held_out": {0: e0}, "blind": {0: e0}, "aware_in_sample": {0: e0}}
        for q in charges:
            if q == 0:
                continue
            end_q, end_0 = last[(fam, q)], last[(fam, 0)]
            train = [f for f in frames if not (_family(f) == fam and f.info["charge"] == q)]
            loo = _finetune(train, work, f"gan_{fam}_without_{q:+d}", epochs, threads, True, log)
            for key, model in (("aware_held_out", loo), ("blind", base), ("aware_in_sample", all_aware)):
                pred[key][q] = e0 + _energy(model, end_q, q) - _energy(model, end_0, 0)
        cell = last[(fam, 0)].cell.array
        dft_levels = _levels(e_dft, cell, fam)
        entry = {"charges": charges, "dft_levels": dft_levels,
                 "delta_e_vs_neutral_eV": {"dft": {f"{q:+d}": round(e_dft[q] - e0, 4) for q in charges}}}
        for key, energies in pred.items():
            lv = _levels(energies, cell, fam)
            entry[f"{key}_levels"] = lv
            entry["delta_e_vs_neutral_eV"][key] = {f"{q:+d}": round(energies[q] - e0, 4) for q in charges}
            dft_by = {(x["q"], x["q_next"]): x["fermi_level_eV"] for x in dft_levels}
            for x in lv:  # a level present in both
                if (x["q"], x["q_next"]) in dft_by:
                    errors[key].append(abs(x["fermi_level_eV"] - dft_by[(x["q"], x["q_next"])]))
            entry[f"{key}_same_levels"] = [(x["q"], x["q_next"]) for x in lv] == \
                [(x["q"], x["q_next"]) for x in dft_levels]
        doc["defects"][fam] = entry
        log(f"{fam}: DFT levels {[(x['label'], x['fermi_level_eV']) for x in dft_levels]}; held-out "
            f"{[(x['label'], x['fermi_level_eV']) for x in entry['aware_held_out_levels']]}")
    doc["gan_levels_max_abs_error_eV"] = {k: (round(max(v), 4) if v else None) for k, v in errors.items()}
    doc["gan_levels_mean_abs_error_eV"] = {k: (round(float(np.mean(v)), 4) if v else None)
                                           for k, v in errors.items()}
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(doc, indent=2))
    return doc


def gan_fit_only(work: Path, threads: int | None, log) -> dict:
    """The GaN levels from the charge energy's least-squares fit alone (no training), held out.

    For each charged state: a charge-aware copy of CHGNet whose charge energy
    (``q·Σx_Z a_Z + q²·Σx_Z b_Z``) is fitted, as ``finetune --charge-aware`` fits it before
    training, on every GaN frame but that state's; the embedding stays zero. Then E(q) − E(0) at
    the DFT end structures and the levels, as in :func:`gan`. On MgO the fit alone beat the
    trained model on the training frames: this asks whether it does on GaN's held-out states.
    """
    from defectml.models import load_model
    from defectml.models.chgnet import charge_aware_copy
    from defectml.train.finetune import anchored_energies, fit_charge_energy, predicted_energies

    cache = work / "gan_fit_only.json"
    if cache.exists():
        return json.loads(cache.read_text())
    frames = _read("GaN")
    last = {(_family(f), f.info["charge"]): f for f in frames
            if f.info.get("is_last_step") and f.info["defect"] != "bulk"}
    base = load_model("chgnet", threads=threads)
    predicted = predicted_energies(base, frames)  # the zero-charge-term copy predicts the same
    doc: dict = {"defects": {}}
    errors = []
    for fam in sorted({k[0] for k in last}):
        charges = sorted(q for (f, q) in last if f == fam)
        e_dft = {q: float(last[(fam, q)].get_potential_energy()) for q in charges}
        pred = {0: e_dft[0]}
        for q in charges:
            if q == 0:
                continue
            keep = [i for i, f in enumerate(frames) if not (_family(f) == fam and f.info["charge"] == q)]
            train = [frames[i] for i in keep]
            labels, _ = anchored_energies(train, predicted[keep], across_charges=True)
            model = charge_aware_copy(base)
            fit_charge_energy(model.calculator.model, train, labels - predicted[keep])
            pred[q] = e_dft[0] + _energy(model, last[(fam, q)], q) - _energy(model, last[(fam, 0)], 0)
        cell = last[(fam, 0)].cell.array
        dft_levels, lv = _levels(e_dft, cell, fam), _levels(pred, cell, fam)
        dft_by = {(x["q"], x["q_next"]): x["fermi_level_eV"] for x in dft_levels}
        errors += [abs(x["fermi_level_eV"] - dft_by[(x["q"], x["q_next"])]) for x in lv
                   if (x["q"], x["q_next"]) in dft_by]
        doc["defects"][fam] = {"levels": lv, "delta_e_vs_neutral_eV": {f"{q:+d}": round(pred[q] - e_dft[0], 4)
                                                                       for q in charges}}
        log(f"{fam} fit only: {[(x['label'], x['fermi_level_eV']) for x in lv]}")
    doc["levels_max_abs_error_eV"] = round(max(errors), 4) if errors else None
    doc["levels_mean_abs_error_eV"] = round(float(np.mean(errors)), 4) if errors else None
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(doc, indent=2))
    return doc


def mgo(work: Path, epochs: int, per_relaxation: int, threads: int | None, log, held_out: int = 2) -> dict:

    from defectml.models import load_model
    from defectml.train.finetune import anchored_energies, predicted_energies

    cache = work / "mgo.json"
    if cache.exists():
        return json.loads(cache.read_text())
    frames = _read("MgO")
    by_run: dict[str, list] = {}
    for f in frames:
        by_run.setdefault(f.info["run_id"], []).append(f)
    train, test = [], []
    for run in by_run.values():
        run.sort(key=lambda f: (f.info.get("segment", 0), f.info.get("ionic_step", 0)))
        if run[0].info["charge"] == held_out:
            test += run
            continue
        idx = set(np.linspace(0, len(run) - 1, min(per_relaxation, len(run))).round().astype(int).tolist())
        train += [f for i, f in enumerate(run) if i in idx]
        test += [f for i, f in enumerate(run) if i not in idx]
    log(f"MgO: {len(train)} training frames (charge {held_out:+d} held out), {len(test)} test frames")
    # one 216-atom cell per batch: CHGNet needs ~1.6 GB per cell (66 096 three-body angles); no
    # stress (its second backward pass made an epoch >10 min on one core)
    models = {"charge_aware": _finetune(train, work, "mgo_aware", epochs, threads, True, log, 1, 0.0),
              "charge_blind": _finetune(train, work, "mgo_blind", epochs, threads, False, log, 1, 0.0),
              "chgnet": load_model("chgnet", threads=threads)}
    doc: dict = {"held_out": held_out, "train_frames": len(train), "test_frames": len(test), "epochs": epochs,
                 "per_relaxation": per_relaxation, "mgo": {}}
    e_test = np.array([f.get_potential_energy() for f in test])
    for name, model in models.items():
        # the DFT scale of each model: the training anchors (neutral frames of the defect) as the
        # fine-tune used them; a charge state the model has no anchor for sits on the neutral one
        p_train = predicted_energies(model, train)
        _, shifts = anchored_energies(train, p_train, across_charges=True)
        shift = next(iter(v for k, v in shifts.items() if "/Mg_O" in k))
        p_test = predicted_energies(model, test)
        err = p_test - shift - e_test
        for q in sorted({f.info["charge"] for f in test}):
            idx = [i for i, f in enumerate(test) if f.info["charge"] == q]
            row = doc["mgo"].setdefault(str(q), {})
            row[f"energy_mae_{name}_eV"] = round(float(np.mean(np.abs(err[idx]))), 4)
            row["test_frames"] = len(idx)
        log(f"MgO {name}: "
            + ", ".join(f"{q}: {v[f'energy_mae_{name}_eV']:.3f}" for q, v in doc["mgo"].items()))
    for v in doc["mgo"].values():  # the names
        v["energy_mae_aware"] = v["energy_mae_charge_aware_eV"]
        v["energy_mae_blind"] = v["energy_mae_charge_blind_eV"]
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(doc, indent=2))
    return doc


#: the search's bond distortions for the MgO ground-state check (fewer than the default 12: CPU time)
MGO_SEARCH_DISTORTIONS = (-0.4, -0.2, 0.2, 0.4)


def mgo_search(work: Path, which: str, threads: int | None, log, off_centre: float | None = None) -> dict:
    """Search Mg_O 0..+4 with one of the ``mgo`` part's fine-tunes; set it against the DFT search.

    The host is the DFT's relaxed bulk cell (``relax_host=False``), so both searches share a
    lattice; trials: :data:`MGO_SEARCH_DISTORTIONS` + unperturbed + rattled, early stop on. With
    ``off_centre`` (Å): Unperturbed, Rattled and the three ``Off_Centre_k`` trials instead (the
    defect atom moved off its site; no bond distortions). ``gs_hit``: ``defectml evaluate``'s (a
    shortlisted minimum, 0.5 eV window, is the nearest to the DFT ground state in defect-site
    SOAP); ``lowest_is_gs``: the model's lowest minimum is.
    """
    import tempfile

    from defectml import ResultStore, SearchSettings, search, summarise
    from defectml.dft.evaluate import evaluate, to_dict
    from defectml.dft.ingest import ingest_snb_folder
    from defectml.search.distort import TrialSettings
    from defectml.structure_io import read_structure

    tag = f"{which}_offcentre" if off_centre else which
    cache = work / f"mgo_search_{tag}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    weights = work / f"mgo_{'aware' if which == 'charge_aware' else 'blind'}_e3.pth.tar"
    if not weights.exists():
        raise SystemExit(f"{weights} missing: run `python benchmarks/charge_states.py mgo` first")
    data = ROOT.parent / "shared" / "data" / "snb-mgo-mg_o"
    host = read_structure(data / "MgO_bulk_relaxed_CONTCAR")
    trials = TrialSettings(distortions=(), off_centre=off_centre) if off_centre else \
        TrialSettings(distortions=MGO_SEARCH_DISTORTIONS)
    settings = SearchSettings(model=str(weights), relax_host=False, threads=threads, early_stop=True,
                              trials=trials)
    t0 = time.perf_counter()
    result = search(host, "Mg_O", [0, 1, 2, 3, 4], out=work / f"mgo_search_{tag}", settings=settings)
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        dft_store = ResultStore(Path(tmp) / "results.db")
        ingest_snb_folder(dft_store, data)
        dft = summarise(dft_store, fidelity="dft")
    rows, _ = evaluate(result.summaries, dft)
    ev = to_dict(rows, {})
    doc: dict = {"model": which, "weights": weights.name, "wall_s": round(wall, 1),
                 "distortions": list(trials.distortions), "off_centre_A": off_centre,
                 "trials": sum(len(s.trials) for s in result.summaries), "charges": {}}
    dft_by_q = {s.charge: s for s in dft}
    ml_by_q = {s.charge: s for s in result.summaries}
    for row in ev["defects"]:
        q = row["charge"]
        ml = ml_by_q[q]
        lowest = _nearest_dft(ml, dft_by_q[q])
        doc["charges"][str(q)] = {
            "gs_hit": row["gs_hit"], "lowest_is_gs": lowest == 0,
            "ml_minima": [{"delta_e_eV": round(m.delta_e, 3), "label": m.label} for m in ml.minima],
            "dft_gs_delta_e_eV": row.get("dft_gs_delta_e"), "gs_rmsd_A": row.get("gs_rmsd")}
        log(f"MgO search {tag} q={q:+d}: gs_hit {row['gs_hit']}, lowest is the DFT GS {lowest == 0}; "
            f"minima {[(m.label, round(m.delta_e, 3)) for m in ml.minima]}")
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(doc, indent=2))
    return doc


def mgo_gs_relax(work: Path, which: str, threads: int | None, log) -> dict:
    """Is DFT's ground state a minimum of the model, and below its Oh minimum? Per charge state.

    Relaxes ShakeNBreak's DFT ground state (``groundstate_POSCAR``, C3v/C2v, Mg 1.2–1.4 Å off the
    O site) and DFT's relaxed ``Unperturbed`` structure (Oh) with the model at that charge:
    the RMSD of the first to where DFT has it (and its largest atom displacement: one Mg moving
    back to the site is 1.3 Å there, 0.09 Å of RMSD), and the model's energy of it minus its Oh energy
    (DFT: −1.0 to −1.4 eV). Tells a landscape that lacks the basin from a search that misses it.
    """
    from ase.io import read

    from defectml.core.relax import relax_one
    from defectml.models import load_model
    from defectml.train.metrics import rmsd

    cache = work / f"mgo_gs_relax_{which}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    weights = work / f"mgo_{'aware' if which == 'charge_aware' else 'blind'}_e3.pth.tar"
    model = load_model(str(weights), threads=threads)
    data = ROOT.parent / "shared" / "data" / "snb-mgo-mg_o"
    out = {}
    for q in range(5):
        folder = data / f"Mg_O_{q:+d}" if q else data / "Mg_O_0"
        ends = {}
        for name, path in (("gs", folder / "groundstate_POSCAR"), ("oh", folder / "Unperturbed" / "CONTCAR")):
            atoms = read(path)
            atoms.info["charge"] = q
            r = relax_one(atoms, model.calculator, fmax=0.05, max_steps=400)
            ends[name] = (r, atoms)
        gs, gs_start = ends["gs"]
        oh = ends["oh"][0]
        d = gs.atoms.get_scaled_positions() - gs_start.get_scaled_positions()
        d -= np.round(d)
        moved = float(np.linalg.norm(d @ gs_start.cell.array, axis=1).max())
        row = {"gs_rmsd_to_dft_A": round(rmsd(gs.atoms, gs_start), 3),
               "gs_max_displacement_A": round(moved, 3),
               "model_gs_minus_oh_eV": round(gs.energy - oh.energy, 3),
               "gs_steps": gs.steps, "oh_steps": oh.steps}
        out[str(q)] = row
        log(f"MgO {which} q={q:+d}: DFT ground state relaxed by the model: {row}")
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=2))
    return out


def _nearest_dft(ml, dft) -> int | None:
    """Index of the DFT minimum nearest (defect-site SOAP) to the model's lowest minimum."""
    from defectml.dft.evaluate import _centre
    from defectml.search.fingerprint import cosine_distances, soap_fingerprints

    if not ml.minima or not dft.minima:
        return None
    structures = [ml.minima[0].atoms] + [m.atoms for m in dft.minima]
    centres = [_centre(ml, ml.minima[0])] + [_centre(dft, m) for m in dft.minima]
    d = cosine_distances(soap_fingerprints(structures, centres, None))
    return int(d[0, 1:].argmin())


def merge(part: str, value: dict) -> dict:
    path = RESULTS / "charge_states.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    if part == "mgo-search":
        for which, res in value.items():
            doc.setdefault("mgo_search", {})[which] = {k: v for k, v in res.items()
                                                       if k not in ("charges", "gs_relax")}
            for q, r in res["charges"].items():
                row = doc.setdefault("mgo", {}).setdefault(q, {})
                for k, v in res.get("gs_relax", {}).get(q, {}).items():
                    row[f"{which}_{k}"] = v
                row = doc.setdefault("mgo", {}).setdefault(q, {})
                row[f"{which}_found_gs"] = r["gs_hit"]
                row[f"{which}_lowest_is_gs"] = r["lowest_is_gs"]
                row[f"{which}_minima"] = r["ml_minima"]
                de = r["dft_gs_delta_e_eV"]
                row["dft_gs_delta_e_eV"] = None if de is None else round(de, 3)
        ref = RESULTS / "dft_reference.json"  # CHGNet as shipped, the full default search
        if ref.exists():
            for d in json.loads(ref.read_text())["defects"]:
                doc["mgo"].setdefault(str(d["charge"]), {})["chgnet_found_gs"] = d["gs_hit"]
    elif part == "gan-fit":
        doc.setdefault("gan", {})["fit_only_held_out"] = value
    elif part == "gan":
        doc["gan"] = {**value, **({"fit_only_held_out": doc["gan"]["fit_only_held_out"]}
                                  if "fit_only_held_out" in doc.get("gan", {}) else {})}
        doc["gan_levels_max_abs_error_eV"] = value["gan_levels_max_abs_error_eV"]["aware_held_out"]
    else:
        doc["mgo_details"] = {k: v for k, v in value.items() if k != "mgo"}
        for q, row in value["mgo"].items():
            doc.setdefault("mgo", {}).setdefault(q, {}).update(row)
    doc["machine"] = "2 CPU cores (one used), no GPU; CHGNet 0.3.0 weights (chgnet 0.4.2)"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    (RESULTS / "charge_states.md").write_text(markdown(doc))
    return doc


def _search_label(name: str, v: dict) -> str:
    trials = f"distortions {v['distortions']}" if v["distortions"] else ""
    if v.get("off_centre_A"):
        trials += f"Off_Centre {v['off_centre_A']} Å"
    return f"{name}: {v['trials']} trials ({trials} + Unperturbed, Rattled; early stop), {v['wall_s']:.0f} s"


def _fmt_levels(levels: list[dict]) -> str:
    return ", ".join(f"{x['label']} {x['fermi_level_eV']:.2f}" for x in levels) or "none"


def markdown(doc: dict) -> str:
    lines = ["# Charge states (benchmarks/charge_states.py)", "", f"Machine: {doc.get('machine', '')}.", ""]
    g = doc.get("gan")
    if g:
        lines += [f"## GaN transition levels (ε = {g['dielectric']}; eV above a shared E_VBM = 0)", "",
                  "Each charged state's E(q) − E(0) at the DFT end structures; *held out*: predicted by a "
                  "charge-aware CHGNet fine-tuned without that charge state; *in sample*: one trained on "
                  f"all; *blind*: CHGNet as shipped. {g['epochs']} epochs each.", "",
                  "| defect | DFT | charge-aware, held out | charge-aware, in sample | charge-blind |",
                  "|---|---|---|---|---|"]
        for fam, e in g["defects"].items():
            cells = [_fmt_levels(e[k]) for k in ("dft_levels", "aware_held_out_levels",
                                                  "aware_in_sample_levels", "blind_levels")]
            lines.append(f"| {fam} | " + " | ".join(cells) + " |")
        lines += ["", "E(q) − E(0) (eV):", "", "| defect | q | DFT | held out | in sample | blind |",
                  "|---|---|---|---|---|---|"]
        for fam, e in g["defects"].items():
            d = e["delta_e_vs_neutral_eV"]
            for q in d["dft"]:
                if q != "+0":
                    lines.append(f"| {fam} | {q} | {d['dft'][q]:+.3f} | {d['aware_held_out'][q]:+.3f} | "
                                 f"{d['aware_in_sample'][q]:+.3f} | {d['blind'][q]:+.3f} |")
        m, a = g["gan_levels_max_abs_error_eV"], g["gan_levels_mean_abs_error_eV"]
        lines += ["", "Level error vs DFT (levels present in both; eV): "
                  + "; ".join(f"{k}: max {m[k]}, mean {a[k]}" for k in m), ""]
        fit = g.get("fit_only_held_out")
        if fit:
            per = "; ".join(f"{fam} {_fmt_levels(e['levels'])}" for fam, e in fit["defects"].items())
            lines += ["Charge energy's least-squares fit alone, no training (held out as above; "
                      f"`gan-fit`): {per}; error max {fit['levels_max_abs_error_eV']}, mean "
                      f"{fit['levels_mean_abs_error_eV']} eV.", ""]
    if doc.get("mgo"):
        d = doc["mgo_details"]
        lines += [f"## MgO Mg_O energies, charge {d['held_out']:+d} held out", "",
                  f"{d['train_frames']} training frames ({d['per_relaxation']} per relaxation), "
                  f"{d['epochs']} epochs; MAE of the energy on the DFT scale of each model's neutral anchor, "
                  "on frames not trained on (eV per 216-atom cell).", "",
                  "| q | test frames | charge-aware | charge-blind fine-tuned | CHGNet |",
                  "|---|---|---|---|---|"]
        for q, v in sorted(doc["mgo"].items(), key=lambda t: int(t[0])):
            lines.append(f"| {int(q):+d} | {v['test_frames']} | {v['energy_mae_charge_aware_eV']:.3f} | "
                         f"{v['energy_mae_charge_blind_eV']:.3f} | {v['energy_mae_chgnet_eV']:.3f} |")
        lines.append("")
    if doc.get("mgo_search"):
        lines += ["## MgO Mg_O: does a search with each model find DFT's ground state?", "",
                  "`defectml evaluate`'s ground-state hit (a shortlisted minimum, 0.5 eV window, is the "
                  "nearest to DFT's lowest in defect-site SOAP) and whether the model's lowest minimum is "
                  "it. DFT's ground state: Mg 1.2–1.4 Å off the O site (C3v; C2v at +4), 1.0–1.4 eV below "
                  "Oh. Searches: " + "; ".join(_search_label(k, v) for k, v in doc["mgo_search"].items())
                  + ".", "",
                  "| q | " + " | ".join(f"{k}: GS hit / lowest" for k in doc["mgo_search"])
                  + " | CHGNet as shipped, default search: GS hit (dft_reference.json)"
                  + " | DFT GS relaxed by the aware model: moved (Å), E − E(Oh) (eV) |",
                  "|---|" + "---|" * (len(doc["mgo_search"]) + 2)]
        for q, v in sorted(doc["mgo"].items(), key=lambda t: int(t[0])):
            cells = [f"{v.get(f'{k}_found_gs')} / {v.get(f'{k}_lowest_is_gs')}" for k in doc["mgo_search"]]
            cells.append(str(v.get("chgnet_found_gs")))
            moved = v.get("charge_aware_gs_max_displacement_A")
            de = v.get("charge_aware_model_gs_minus_oh_eV")
            relax = f"{moved}, {de} (DFT {v.get('dft_gs_delta_e_eV')})"
            lines.append(f"| {int(q):+d} | " + " | ".join(cells) + f" | {relax} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["gan", "gan-fit", "mgo", "mgo-search"])
    p.add_argument("--off-centre", type=float, default=None,
                   help="mgo-search: Unperturbed, Rattled and Off_Centre trials of this many Å instead")
    p.add_argument("--model", choices=["charge_aware", "charge_blind", "both"], default="both",
                   help="mgo-search: which fine-tune searches (run the two in two processes)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_charge_states"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (gan 8, mgo 3)")
    p.add_argument("--per-relaxation", type=int, default=4, help="mgo: training frames per relaxation")
    a = p.parse_args()
    work = Path(a.work)

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if a.part == "gan":
        merge("gan", gan(work, a.epochs or 8, a.threads, log))
    elif a.part == "gan-fit":
        merge("gan-fit", gan_fit_only(work, a.threads, log))
    elif a.part == "mgo":
        merge("mgo", mgo(work, a.epochs or 3, a.per_relaxation, a.threads, log))
    else:
        which = ["charge_aware", "charge_blind"] if a.model == "both" else [a.model]
        found = {}
        for w in which:
            tag = f"{w}_offcentre" if a.off_centre else w
            found[tag] = mgo_search(work, w, a.threads, log, a.off_centre)
            found[tag]["gs_relax"] = mgo_gs_relax(work, w, a.threads, log)
        merge("mgo-search", found)
    print((RESULTS / "charge_states.md").read_text())


if __name__ == "__main__":
    main()
