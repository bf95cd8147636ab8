"""Speed of the relaxation stage: the seed paper's way vs defectml's engines, same answer?

CdTe V_Cd^0 with CHGNet on CPU, default 15 trials, fmax 0.05 eV/A, for a 63-atom (2x2x2) and a
215-atom (3x3x3) cell. Variants, all timed in this one run (ratios, not absolute speeds):

  sequential   ASE FIRE, one trial after another, one model call per step, stock CHGNet
               calculator (the seed paper's way)
  sequential_ef  the same with defectml's calculator (no stress: one backward pass, not two)
  batched      all trials in one batch: one CHGNet call per step for every active trial
  workers2     two worker processes (one torch thread each), each loading the model
  workers2_batched  two workers, each relaxing half of the trials as one batch
  early_stop   sequential, stopping trials that reach the basin of an already relaxed minimum

For each: wall time, ratio to sequential, model calls, FIRE steps, and whether the lowest minimum
is the sequential one (same bond motif, energy within 1 meV/atom). Writes
benchmarks/results/search_speed.{json,md}.

    python benchmarks/search_speed.py [--sizes 63,215] [--variants sequential,batched,...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
import warnings
from pathlib import Path

import numpy as np
from chgnet.model.dynamics import CHGNetCalculator
from pymatgen.core import Structure

from defectml.core.engine import Job, ModelSpec, run_jobs
from defectml.core.relax import relax_batched, relax_host, relax_one
from defectml.models import load_model
from defectml.search import SearchSettings, plan
from defectml.search.defects import make_defects
from defectml.search.landscape import BasinWatch, RelaxedTrial, bond_signature, find_minima
from defectml.structure_io import to_atoms, to_structure

ROOT = Path(__file__).resolve().parents[1]
OXI = {"Cd": 2, "Te": -2}


class Counted:
    """Counts calls of a batch function (one per model forward pass)."""

    def __init__(self, fn):
        self.fn, self.calls, self.structures = fn, 0, 0

    def __call__(self, structures):
        self.calls += 1
        self.structures += len(structures)
        return self.fn(structures)


def _lowest(results, items, bulk):
    it = items[0]
    trials = [RelaxedTrial(t.name, r.status, r.energy, r.atoms, it.defect.site, None,
                           t.distortion, r.reason, r.steps, r.basin_of)
              for t, r in zip(it.trials, results, strict=True)]
    minima, _ = find_minima(trials, bulk=bulk, oxidation_states=OXI)
    return minima


def run_size(min_length: float, variants: list[str], model) -> dict:
    host = Structure.from_file(ROOT / "examples" / "CdTe.cif")
    relaxed, _ = relax_host(to_atoms(host.get_primitive_structure()), model.calculator)
    settings = SearchSettings(min_length=min_length)
    items = plan(to_structure(relaxed), "v_Cd", [0], settings)
    trials = items[0].trials
    (d,) = make_defects(to_structure(relaxed), "v_Cd", min_length=min_length)
    bulk = to_atoms(d.bulk_supercell)
    natoms = len(trials[0].atoms)
    out = {"natoms": natoms, "n_trials": len(trials), "variants": {}}
    reference = None
    for v in variants:
        batch = Counted(model.batch())
        t0 = time.perf_counter()
        profile = cProfile.Profile() if v == "sequential" else None
        if profile:
            profile.enable()
        if v == "sequential":  # the stock CHGNet ASE calculator (energy, forces, stress, magmoms)
            stock = CHGNetCalculator(model=model.calculator.model)
            results = [relax_one(t.atoms, stock) for t in trials]
            calls = sum(r.steps + 1 for r in results)
        elif v == "sequential_ef":  # defectml's calculator: energy and forces only
            results = [relax_one(t.atoms, model.calculator) for t in trials]
            calls = sum(r.steps + 1 for r in results)
        elif v == "batched":
            got = dict(relax_batched([t.atoms for t in trials], batch, max_batch=len(trials)))
            results = [got[i] for i in range(len(trials))]
            calls = batch.calls
        elif v in ("workers2", "workers2_batched"):
            jobs = [Job(t.atoms, tag=i) for i, t in enumerate(trials)]
            size = (len(jobs) + 1) // 2 if v == "workers2_batched" else 1
            got = {j.tag: r for j, r in run_jobs(jobs, ModelSpec("chgnet"), fmax=0.05,
                                                 max_steps=1500, workers=2, batch_size=size)}
            results = [got[i] for i in range(len(trials))]
            calls = sum(max(r.steps for r in results[i:i + size]) + 1  # one call per step
                        for i in range(0, len(results), size))
        elif v == "early_stop":
            species = tuple(sorted(set(trials[0].atoms.get_chemical_symbols())))
            watch = BasinWatch(species, np.asarray(items[0].defect.site), None)
            results = []
            for t in trials:
                r = relax_one(t.atoms, model.calculator, watch=watch)
                if r.status == "converged":
                    watch.add(t.name, r.atoms, r.energy)
                results.append(r)
            calls = sum(r.steps + 1 for r in results)
        else:
            raise SystemExit(f"unknown variant {v}")
        wall = time.perf_counter() - t0
        if profile:
            profile.disable()
            buf = io.StringIO()
            pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(8)
            out["sequential_profile_top"] = buf.getvalue().splitlines()[:30]
        minima = _lowest(results, items, bulk)
        low = minima[0]
        entry = {"wall_s": round(wall, 2), "model_calls": calls,
                 "fire_steps": int(sum(r.steps for r in results)),
                 "statuses": {s: sum(r.status == s for r in results)
                              for s in sorted({r.status for r in results})},
                 "n_minima": len(minima), "lowest_label": low.label,
                 "lowest_energy_eV": round(low.energy, 4)}
        if reference is None:
            reference = (low, wall)
        ref_low, ref_wall = reference
        entry["speedup_vs_sequential"] = round(ref_wall / wall, 2)
        entry["same_lowest_basin"] = bool(
            bond_signature(low.bonds) == bond_signature(ref_low.bonds)
            and abs(low.energy - ref_low.energy) / natoms < 1e-3)
        out["variants"][v] = entry
        print(natoms, v, json.dumps(entry), flush=True)
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="63,215")
    p.add_argument("--variants",
                   default="sequential,sequential_ef,batched,workers2,workers2_batched,early_stop")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    model = load_model("chgnet", threads=2)
    lengths = {"63": 10.0, "215": 15.0}
    doc = {"model": model.version, "machine_cores": 2, "cases": {}}
    for size in a.sizes.split(","):
        variants = a.variants.split(",")
        if size == "215":
            variants = [v for v in variants
                        if v in ("sequential", "sequential_ef", "batched", "workers2_batched")]
        doc["cases"][size] = run_size(lengths[size], variants, model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_speed.json").write_text(json.dumps(doc, indent=2))
    lines = ["# Relaxation speed, CdTe V_Cd^0, CHGNet, CPU (2 cores)", "",
             "Rerun: `python benchmarks/search_speed.py`. Ratios are from one run on one machine.",
             "", "| atoms | variant | wall (s) | speed-up | model calls | FIRE steps | minima | "
             "same lowest basin |", "|---|---|---|---|---|---|---|---|"]
    for case in doc["cases"].values():
        for v, e in case["variants"].items():
            lines.append(f"| {case['natoms']} | {v} | {e['wall_s']} | {e['speedup_vs_sequential']}x"
                         f" | {e['model_calls']} | {e['fire_steps']} | {e['n_minima']} | "
                         f"{e['same_lowest_basin']} |")
    prof = next((c.get("sequential_profile_top") for c in doc["cases"].values()
                 if c.get("sequential_profile_top")), None)
    if prof:
        lines += ["", "Where the sequential time goes (cProfile, top by own time):", "", "```",
                  *prof, "```"]
    (out / "search_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
