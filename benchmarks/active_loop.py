"""The active loop against real DFT: Mg_O in MgO, replayed; trust-score calibration; a live run.

Parts (each cached under --work, so a killed run resumes; results merge into one file):

* ``mgo``: the loop with the replay oracle on ``../shared/data/snb-mgo-mg_o`` (ShakeNBreak +
  VASP, 216-atom cell, charges 0..+4), one loop per charge state. Round 0 is CHGNet relaxing
  ShakeNBreak's own starting structures (its POSCARs), so the replay oracle's answers are the
  DFT relaxations of exactly those trials. Per charge: DFT relaxations until the DFT ground state
  (the truth's lowest minimum, by its member trials) is among the answers, for the loop (counted
  at the end of the round that found it), the plain ML shortlist (no learning: ``shortlist``'s
  rule on round 0), a random order (the exact mean position of the first ground-state trial in a
  random permutation, (N+1)/(G+1)) and the full search (N, every trial ShakeNBreak kept);
* ``calibration``: a committee fine-tuned on GaN Mg_Ga frames (``defect-dft``), scored on the
  held-out V_N and bulk frames: Spearman rho between each frame's force spread and its real
  force error (and energy spread vs energy error within each relaxation);
* ``live``: one end-to-end loop with a live oracle, GFN1-xTB through tblite (a stand-in for DFT,
  named as such) on a small cell, to show the loop with a real calculation.

    python benchmarks/active_loop.py mgo [--charges 0,1,2,3,4] [--threads N] [--committee 2 --epochs 10]
    python benchmarks/active_loop.py calibration
    python benchmarks/active_loop.py live

Writes benchmarks/results/active_loop.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


# --- MgO, replayed ------------------------------------------------------------------------------
def _label(q: int) -> str:
    return f"Mg_O_{q:+d}" if q else "Mg_O_0"


def mgo_charge(q: int, work: Path, threads: int | None, log, **loop) -> dict:
    """One charge state: the search from ShakeNBreak's POSCARs, the loop replayed, the baselines."""
    from pymatgen.core import Structure

    from defectml import ResultStore, SearchSettings, search, summarise
    from defectml.dft.agreement import Geometry
    from defectml.dft.ingest import ingest_snb_folder
    from defectml.dft.loop import LoopSettings, run_loop
    from defectml.dft.oracle import ReplayOracle
    from defectml.dft.shortlist import select
    from defectml.search.summary import defect_context

    data = DATA / "snb-mgo-mg_o"
    label = _label(q)
    cache = work / label / "result.json"
    if cache.exists():
        return json.loads(cache.read_text())
    truth = ResultStore(work / "truth.db")
    if truth.count(kind="relaxation") == 0:
        ingest_snb_folder(truth, data)
    dft = {s.label: s for s in summarise(truth, fidelity="dft")}[label]
    gs = dft.minima[0]
    all_trials = sorted(t.name for t in dft.trials)
    # round 0: CHGNet relaxes ShakeNBreak's own POSCARs (search --trials-from), so the replay's
    # answers are the DFT relaxations of exactly the starts the loop sends (--dft-start trial)
    t0 = time.perf_counter()
    host = Structure.from_file(data / "MgO_bulk_relaxed_CONTCAR")
    res = search(host, "Mg_O", [q], out=work / label / "run", progress=False,
                 settings=SearchSettings(model="chgnet", trials_from=str(data), relax_host=False,
                                         threads=threads))
    round0_s = time.perf_counter() - t0
    store = ResultStore(work / label / "run" / "results.db")
    ml = next(x for x in summarise(store, res.settings_key) if x.label == label)
    log(f"{label}: round 0 ({len(ml.trials)} trials, {round0_s:.0f} s): "
        + "; ".join(f"{m.label} {m.delta_e:+.3f} eV ({len(m.trials)})" for m in ml.minima))
    ctx = defect_context(truth, dft.defect_key)
    geo = Geometry.of(ctx.bulk, ctx.oxidation_states, dft.trials[0].site, dft.trials[0].defect_index)
    short_trials = [m.trial for m in select(ml)]

    s = LoopSettings.from_options({"threads": threads, "dft_start": "trial", **loop})
    t0 = time.perf_counter()
    result = run_loop(store, res.settings_key, ReplayOracle(data), s, work / label / "loop", only={label},
                      log=log)
    loop_s = time.perf_counter() - t0
    d = result.defects[label]
    ans = d["answer"]
    # the answer is DFT's ground state when it is one of the truth's ground-state trials (its DFT end
    # point is theirs: the replay answers exactly those) and forms the same new bonds
    found = ans is not None and ans["trial"] in gs.trials and \
        sorted(tuple(b[:2]) for b in ans["bonds"]) == sorted(tuple(b[:2]) for b in geo.bonds(gs.atoms))
    n, g = len(all_trials), len(set(gs.trials) & set(all_trials))
    doc = {
        "charge": q, "label": label,
        "dft_gs": {"delta_e_eV": round(gs.delta_e, 4), "label": gs.label, "trials": sorted(gs.trials)},
        "round0_minima": [{"delta_e_eV": round(m.delta_e, 4), "label": m.label, "trials": m.trials}
                          for m in ml.minima],
        "loop_found_gs": bool(found),
        "loop_answer": ans,
        "loop_dft_relaxations": d["dft_relaxations"],
        "model_reproduces_dft": d["model_reproduces_dft"],
        "loop_defect_status": d["status"],
        "loop_status": result.status, "loop_reason": result.reason,
        "loop_rounds": [{"round": rd["round"], "picks": (rd.get("picks") or {}).get(label, []),
                         "start": rd.get("starts", {}).get(label),
                         "fits": [{"attempt": f["attempt"], "epochs": f["epochs"],
                                   "reproduces": f["reproduces"].get(label, {}).get("ok"),
                                   "why": f["reproduces"].get(label, {}).get("reason")}
                                  for f in rd.get("fits", [])],
                         "assessment": rd.get("items", {}).get(label, {}).get("reason"),
                         "minima": [(m["label"], m["delta_e_eV"], m["visited"], m["trust"]["force"])
                                    for m in rd.get("items", {}).get(label, {}).get("minima", [])],
                         "training": rd.get("training"), "relax_seconds": rd.get("relax_seconds")}
                        for rd in result.rounds],
        "loop_final_minima": d["final_minima"],
        "full_search_dft_relaxations": n,
        "shortlist_trials": short_trials,
        "shortlist_found_gs": bool(set(gs.trials) & set(short_trials)),
        "shortlist_dft_relaxations": len(short_trials),
        "random_dft_relaxations_mean": round((n + 1) / (g + 1), 3),
        "seconds": {"round0": round(round0_s, 1), "loop": round(loop_s, 1)},
        "settings": asdict(s),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(doc, indent=2, default=str))
    return doc


# --- calibration --------------------------------------------------------------------------------
def calibration(work: Path, threads: int | None, log, members: int = 3) -> dict:
    """Committee on GaN Mg_Ga, scored on held-out GaN V_N and bulk frames."""
    from ase.io import read, write

    from defectml.train.committee import Committee, calibration, spread, train_committee
    from defectml.train.finetune import FinetuneSettings

    cache = work / "calibration.json"
    if cache.exists():
        return json.loads(cache.read_text())
    frames = read(DATA / "defect-dft" / "GaN.extxyz.gz", ":")
    train = [f for f in frames if str(f.info.get("defect", "")).startswith("Mg_Ga")]
    test = [f for f in frames if not str(f.info.get("defect", "")).startswith("Mg_Ga")]
    work.mkdir(parents=True, exist_ok=True)
    write(work / "gan_train.extxyz", train, format="extxyz")
    write(work / "gan_test.extxyz", test, format="extxyz")
    s = FinetuneSettings(base="chgnet", epochs=10, lr=3e-4, energy_weight=10.0, patience=3, threads=threads)
    t0 = time.perf_counter()
    paths = train_committee(work / "gan_train.extxyz", work / "gan_train.extxyz", work / "gan_committee",
                            s, members, log=log)
    train_s = time.perf_counter() - t0
    committee = Committee.load(paths, threads=threads)
    preds = committee.predictions(test)
    trust = spread(preds)
    lead = preds[0]
    f_err = [float(np.abs(np.asarray(p[1]) - f.get_forces()).mean()) for p, f in zip(lead, test, strict=True)]
    by_run: dict[str, list[int]] = {}
    for i, f in enumerate(test):
        by_run.setdefault(str(f.info.get("run_id", "?")), []).append(i)
    e_err, e_spread = [], []
    for idx in by_run.values():  # relative energies within one relaxation (anchor-free)
        pe = np.array([lead[i][0] for i in idx])
        de = np.array([test[i].get_potential_energy() for i in idx])
        err = np.abs((pe - pe.mean()) - (de - de.mean()))
        e_err += err.tolist()
        e_spread += [trust[i].energy for i in idx]
    doc = {
        "train": f"GaN Mg_Ga frames ({len(train)}), {members} members (bootstrap of relaxations)",
        "test": f"GaN V_N and bulk frames ({len(test)}), never trained on",
        "force": calibration([t.force for t in trust], f_err),
        "energy_within_relaxation": calibration(e_spread, e_err),
        "force_spread_eV_A": {"median": float(np.median([t.force for t in trust])),
                              "max": float(np.max([t.force for t in trust]))},
        "force_mae_eV_A": {"median": float(np.median(f_err)), "max": float(np.max(f_err))},
        "train_seconds": round(train_s, 1),
    }
    cache.write_text(json.dumps(doc, indent=2))
    return doc


# --- live ---------------------------------------------------------------------------------------
def live(work: Path, threads: int | None, log) -> dict:
    """A search and a loop with GFN1-xTB (tblite) as the oracle, on a small cell."""
    from pymatgen.core import Lattice, Structure

    from defectml import ResultStore, SearchSettings, search
    from defectml.dft.loop import LoopSettings, run_loop
    from defectml.dft.oracle import calculator_oracle
    from defectml.search.distort import TrialSettings

    cache = work / "live.json"
    if cache.exists():
        return json.loads(cache.read_text())
    host = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.21), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    t0 = time.perf_counter()
    res = search(host, "v_O", [0], out=work / "live", progress=False,
                 settings=SearchSettings(model="chgnet", min_length=8.0, relax_host=False, threads=threads,
                                         trials=TrialSettings(distortions=(-0.4, -0.2, 0.2, 0.4))))
    search_s = time.perf_counter() - t0
    store = ResultStore(work / "live" / "results.db")
    s = LoopSettings.from_options(dict(k=1, committee=2, epochs=10, max_rounds=3, threads=threads))
    t0 = time.perf_counter()
    r = run_loop(store, res.settings_key, calculator_oracle("xtb", max_steps=200), s, work / "live" / "loop",
                 log=log)
    doc = {"host": "MgO rock salt, conventional 2x2x2 (64 sites)", "defect": "v_O 0",
           "oracle": "tblite GFN1-xTB (a stand-in for DFT)", "search_seconds": round(search_s, 1),
           "loop_seconds": round(time.perf_counter() - t0, 1), "status": r.status, "reason": r.reason,
           "dft_relaxations": r.dft_relaxations,
           "rounds": [{"round": rd["round"], "picks": rd.get("picks"),
                       "oracle_seconds": rd.get("oracle_seconds"), "training": rd.get("training"),
                       "assessment": {k: v["reason"] for k, v in rd.get("items", {}).items()}}
                      for rd in r.rounds]}
    cache.write_text(json.dumps(doc, indent=2, default=str))
    return doc


# --- report -------------------------------------------------------------------------------------
def merge(part: str, value) -> dict:
    path = RESULTS / "active_loop.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    if part == "mgo":
        doc.setdefault("mgo", {}).update(value)
    else:
        doc[part] = value
    doc["machine"] = "2 CPU cores, no GPU; CHGNet 0.3.0 weights (chgnet 0.4.2)"
    path.write_text(json.dumps(doc, indent=2, default=str))
    (RESULTS / "active_loop.md").write_text(markdown(doc))
    return doc


def markdown(doc: dict) -> str:
    lines = ["# The active loop (benchmarks/active_loop.py)", "",
             f"Machine: {doc.get('machine', '')}.", ""]
    old = doc.get("mgo_superseded")
    if old:
        lines += ["## Superseded: the replay answered by trial name (sessions 13-14)", "",
                  old["note"], ""]
    mgo = doc.get("mgo", {})
    if mgo:
        lines += ["## Mg_O in MgO, replay oracle (ShakeNBreak + VASP, 216 atoms), --dft-start trial", "",
                  "Round 0: CHGNet relaxes ShakeNBreak's own POSCARs (`search --trials-from`); the replay "
                  "answers only those starts. The loop's answer is DFT's lowest structure.", "",
                  "| q | DFT GS | round-0 minima | answer = DFT GS | model reproduces its DFT | loop DFT "
                  "relaxations | defect status | shortlist found (n) | random mean | full search |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for q in sorted(mgo, key=int):
            r = mgo[q]
            r0 = "; ".join(f"{m['label']} {m['delta_e_eV']:+.2f}" for m in r["round0_minima"])
            gs = r["dft_gs"]
            lines.append(f"| {int(q):+d} | {gs['label']} {gs['delta_e_eV']:+.2f} | {r0} | "
                         f"{r['loop_found_gs']} | {r['model_reproduces_dft']} | "
                         f"{r['loop_dft_relaxations']} | "
                         f"{r['loop_defect_status']} | {r['shortlist_found_gs']} "
                         f"({r['shortlist_dft_relaxations']}) | {r['random_dft_relaxations_mean']} | "
                         f"{r['full_search_dft_relaxations']} |")
        lines += [""]
        for q in sorted(mgo, key=int):
            r = mgo[q]
            lines.append(f"- {r['label']}: loop {r['loop_status']} ({r['loop_reason']}); "
                         f"{r['seconds']['round0']:.0f} s round 0, {r['seconds']['loop']:.0f} s loop")
            for rd in r["loop_rounds"]:
                mins = "; ".join(f"{lab} {de:+.3f} {v}" + (f" spread {sp:.3f}" if sp is not None else "")
                                 for lab, de, v, sp in rd["minima"])
                fits = ", ".join(f"fit {f['attempt'] + 1} ({f['epochs']} ep): {f['reproduces']}"
                                 for f in rd["fits"])
                lines.append(f"  - round {rd['round']}: asked {', '.join(rd['picks']) or '-'} (from the "
                             f"{rd['start']}); {fits}; minima after: {mins}; {rd['assessment']}")
        lines.append("")
    cal = doc.get("calibration")
    if cal:
        ew = cal["energy_within_relaxation"]
        lines += ["## Trust score calibration (GaN, held-out frames)", "",
                  f"{cal['train']}; tested on {cal['test']}.", "",
                  f"- force spread vs force error per frame: Spearman {_f(cal['force']['spearman'])}, "
                  f"Pearson {_f(cal['force']['pearson'])} (n = {cal['force']['n']})",
                  f"- energy spread vs relative-energy error within relaxations: Spearman "
                  f"{_f(ew['spearman'])} (n = {ew['n']})",
                  f"- median force spread {cal['force_spread_eV_A']['median'] * 1000:.1f} meV/Å; "
                  f"median force error {cal['force_mae_eV_A']['median'] * 1000:.0f} meV/Å", ""]
    lv = doc.get("live")
    if lv:
        lines += ["## A live loop", "", f"{lv['defect']} in {lv['host']}, oracle {lv['oracle']}: "
                  f"{lv['status']} after {lv['dft_relaxations']} oracle relaxations ({lv['reason']}); "
                  f"search {lv['search_seconds']:.0f} s, loop {lv['loop_seconds']:.0f} s.", ""]
        for rd in lv["rounds"]:
            lines.append(f"- round {rd['round']}: asked {rd['picks']}; "
                         f"oracle {rd['oracle_seconds'] or 0:.0f} s; {rd['assessment']}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["mgo", "calibration", "live"])
    p.add_argument("--charges", default="0,1,2,3,4")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_active_loop"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--committee", type=int, default=2,
                   help="loop committee size (2 here, 3 by default: CPU time on 216-atom cells)")
    p.add_argument("--epochs", type=int, default=10, help="loop fine-tuning epochs per round (20 by default)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if a.part == "mgo":
        for q in [int(x) for x in a.charges.split(",")]:
            doc = mgo_charge(q, work / "mgo", a.threads, log, committee=a.committee, epochs=a.epochs)
            merge("mgo", {str(q): doc})
            log(f"{doc['label']}: loop found GS {doc['loop_found_gs']} after "
                f"{doc['loop_dft_relaxations']} (stopped after {doc['loop_dft_relaxations_until_stop']}); "
                f"shortlist {doc['shortlist_found_gs']}")
    elif a.part == "calibration":
        merge("calibration", calibration(work, a.threads, log))
    else:
        merge("live", live(work, a.threads, log))
    print((RESULTS / "active_loop.md").read_text())


if __name__ == "__main__":
    main()
