"""Speed of the relaxation stage: the seed paper's way vs defectml's engines, same answer?

CdTe V_Cd^0 with CHGNet on CPU, default 15 trials, fmax 0.05 eV/A, for a 63-atom (2x2x2) and a
215-atom (3x3x3) cell. Variants, all timed in this one run (ratios, not absolute speeds):

  sequential   ASE FIRE, one trial after another, one model call per step, stock CHGNet
               calculator (the seed paper's way)
  sequential_ef  the same with defectml's calculator (no stress: one backward pass, not two)
  batched      all trials in one batch: one CHGNet call per step for every active trial, graphs
               from CHGNet's own converter (a pymatgen Structure, a neighbour search, the graph
               and line graph built anew for every structure on every step)
  batched_skin the same batch, graphs from defectml's SkinGraphConverter (straight from the
               Atoms; a skin neighbour list kept per batch slot, the graph rebuilt only when a
               pair crossed a cutoff): ``batch_fn(model, skin=1.0)``, opt-in
  workers2     two worker processes (one torch thread each), each loading the model
  workers2_batched  two workers, each relaxing half of the trials as one batch (the model's
               default batch function; the recorded results ran it with the skin graphs, then
               the default)
  early_stop   sequential, stopping trials that reach the basin of an already relaxed minimum

For each: wall time, ratio to sequential, model calls, FIRE steps, the trials whose FIRE step count
differs from the first variant's, and whether the lowest minimum is the sequential one (same bond
motif, energy within 1 meV/atom). ``--repeat N`` times every variant N times, interleaved (one
round of all variants, then the next), and reports the fastest (the machine may be shared).
``--profile-steps N`` profiles N FIRE steps of the batch with each batched variant's graphs and
says where a step's time goes. Writes benchmarks/results/search_speed.{json,md}.

    python benchmarks/search_speed.py [--sizes 63,215] [--variants sequential,batched,...]
        [--repeat 1] [--profile-steps 5]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from chgnet.model.dynamics import CHGNetCalculator
from pymatgen.core import Structure

from defectml.core.engine import Job, ModelSpec, run_jobs
from defectml.core.relax import relax_batched, relax_host, relax_one
from defectml.models import load_model
from defectml.models.chgnet import batch_fn
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


def run_size(min_length: float, variants: list[str], model, repeat: int = 1,
             profile_steps: int = 0) -> dict:
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
    runs = [(r, v) for r in range(repeat) for v in variants]  # interleaved rounds
    walls: dict[str, list[float]] = {}
    for round_, v in runs:
        batch = Counted(_batch_of(v, model))
        t0 = time.perf_counter()
        profile = cProfile.Profile() if v == "sequential" and round_ == 0 else None
        if profile:
            profile.enable()
        if v == "sequential":  # the stock CHGNet ASE calculator (energy, forces, stress, magmoms)
            stock = CHGNetCalculator(model=model.calculator.model)
            results = [relax_one(t.atoms, stock) for t in trials]
            calls = sum(r.steps + 1 for r in results)
        elif v == "sequential_ef":  # defectml's calculator: energy and forces only
            results = [relax_one(t.atoms, model.calculator) for t in trials]
            calls = sum(r.steps + 1 for r in results)
        elif v in ("batched", "batched_skin"):
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
        walls.setdefault(v, []).append(round(wall, 2))
        if round_ > 0:  # the same work again, for its time only (the answer is the first round's)
            if wall < out["variants"][v]["wall_s"]:
                out["variants"][v]["wall_s"] = round(wall, 2)
            print(natoms, v, f"round {round_ + 1}: {wall:.2f} s", flush=True)
            continue
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
        converter = getattr(batch.fn, "converter", None)
        if v == "batched_skin" and converter is not None:
            entry["skin_lists_built"] = converter.skin_builds
            entry["graph_topologies_built"] = converter.topology_builds
            entry["graphs"] = converter.graphs
        if reference is None:
            reference = (low, [r.steps for r in results])
        ref_low, ref_steps = reference
        entry["trials_with_other_fire_steps"] = sum(
            r.steps != s for r, s in zip(results, ref_steps, strict=True))
        entry["same_lowest_basin"] = bool(
            bond_signature(low.bonds) == bond_signature(ref_low.bonds)
            and abs(low.energy - ref_low.energy) / natoms < 1e-3)
        out["variants"][v] = entry
        print(natoms, v, json.dumps(entry), flush=True)
    ref_wall = out["variants"][variants[0]]["wall_s"]
    for v, entry in out["variants"].items():
        entry["walls_s"] = walls[v]
        entry["speedup_vs_sequential"] = round(ref_wall / entry["wall_s"], 2)
    if profile_steps:
        out["step_profile"] = {v: _profile_steps([t.atoms for t in trials], _batch_of(v, model),
                                                 profile_steps)
                               for v in ("batched", "batched_skin")}
    return out


def _batch_of(variant: str, model):
    """The batch function a variant relaxes with: CHGNet's own converter or the skin one."""
    if variant == "batched":
        return batch_fn(model.calculator.model, skin=None)
    if variant == "batched_skin":
        return batch_fn(model.calculator.model, skin=1.0)
    return model.batch()


def _profile_steps(structures, fn, steps: int) -> dict:
    """cProfile of ``steps`` FIRE steps of the whole batch: seconds per part of a step."""
    fn(structures)  # a first call (imports, allocations) outside the profile
    counted = Counted(fn)
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    for _ in relax_batched(structures, counted, max_steps=steps, max_batch=len(structures)):
        pass
    profile.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)

    def cum(file_end: str, name: str, own: bool = False) -> float:
        return sum(v[2] if own else v[3] for (f, _, n), v in stats.items()
                   if f.replace("\\", "/").endswith(file_end) and n == name)

    backward = cum("~", "<method 'run_backward' of 'torch._C._EngineBase' objects>")
    model_fwd = cum("chgnet/model/model.py", "forward")  # CHGNet.forward, backward (forces) included
    predict = cum("chgnet/model/model.py", "predict_graph")
    graphs = cum("chgnet/graph/converter.py", "forward") + cum("pymatgen/io/ase.py", "get_structure") \
        + cum("defectml/models/chgnet_graph.py", "__call__")
    parts = {
        "pymatgen Structure (AseAtomsAdaptor)": cum("pymatgen/io/ase.py", "get_structure"),
        "neighbour search": cum("pymatgen/core/structure.py", "get_neighbor_list")
        + cum("defectml/models/chgnet_graph.py", "_build"),
        "graph (CHGNet's C make_graph / vectorised)": cum("chgnet/graph/converter.py", "_create_graph_fast")
        + cum("defectml/models/chgnet_graph.py", "_topology"),
        "line graph (CHGNet's Python)": cum("chgnet/graph/graph.py", "line_graph_adjacency_list"),
    }
    parts["rest of graph conversion"] = graphs - sum(parts.values())
    parts["model forward"] = model_fwd - backward
    parts["model backward (forces)"] = backward
    parts["predict_graph other"] = predict - model_fwd
    parts["min-distance check (relax.py, ASE neighbour list)"] = cum("defectml/core/relax.py",
                                                                       "closest_pair_below")
    evaluate = cum("defectml/models/chgnet.py", "evaluate")
    parts["batch_fn other"] = evaluate - predict - graphs
    parts["FIRE and the rest"] = wall - sum(parts.values())
    n = counted.structures
    return {"steps": steps, "structure_evaluations": n,
            "wall_s": round(wall, 2),
            "ms_per_structure_evaluation": {k: round(1000 * t / n, 2) for k, t in parts.items()}}


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="63,215")
    p.add_argument("--variants",
                   default="sequential,sequential_ef,batched,batched_skin,workers2,workers2_batched,"
                           "early_stop")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of the in-process variants (the workers use one each)")
    p.add_argument("--repeat", type=int, default=1, help="time every variant this many times")
    p.add_argument("--profile-steps", type=int, default=5,
                   help="profile this many FIRE steps of each batched variant (0: none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    a.command = "python benchmarks/search_speed.py" + "".join(f" {x}" for x in sys.argv[1:])
    model = load_model("chgnet", threads=a.threads)
    lengths = {"63": 10.0, "215": 15.0}
    doc = {"model": model.version, "machine_cores": 2, "torch_threads": a.threads, "repeat": a.repeat,
           "command": a.command, "cases": {}}
    for size in a.sizes.split(","):
        variants = a.variants.split(",")
        if size == "215":
            variants = [v for v in variants
                        if v in ("sequential", "sequential_ef", "batched", "batched_skin",
                                 "workers2_batched")]
        doc["cases"][size] = run_size(lengths[size], variants, model, a.repeat, a.profile_steps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search_speed.json").write_text(json.dumps(doc, indent=2))
    lines = ["# Relaxation speed, CdTe V_Cd^0, CHGNet, CPU (2 cores)", "",
             f"Rerun: `{a.command}`. Ratios are from one run on one machine"
             + (f", the fastest of {a.repeat} interleaved rounds" if a.repeat > 1 else "")
             + f"; {a.threads} torch thread(s) in process.",
             "", "| atoms | variant | wall (s) | speed-up | model calls | FIRE steps | trials with "
             "other FIRE steps | minima | same lowest basin |", "|---|---|---|---|---|---|---|---|---|"]
    for case in doc["cases"].values():
        for v, e in case["variants"].items():
            lines.append(f"| {case['natoms']} | {v} | {e['wall_s']} | {e['speedup_vs_sequential']}x"
                         f" | {e['model_calls']} | {e['fire_steps']} | "
                         f"{e['trials_with_other_fire_steps']} | {e['n_minima']} | "
                         f"{e['same_lowest_basin']} |")
    for case in doc["cases"].values():
        e = case["variants"].get("batched_skin")
        if e and "graphs" in e:
            lines += ["", f"{case['natoms']} atoms, batched_skin: {e['graphs']} graphs from "
                      f"{e['skin_lists_built']} skin neighbour lists; the graph's topology rebuilt "
                      f"{e['graph_topologies_built']} times (a pair crossed a cutoff), reused otherwise."]
    for case in doc["cases"].values():
        prof = case.get("step_profile")
        if not prof:
            continue
        names = list(next(iter(prof.values()))["ms_per_structure_evaluation"])
        lines += ["", f"Where a batched step's time goes, {case['natoms']} atoms (cProfile of "
                  f"{next(iter(prof.values()))['steps']} FIRE steps of all {case['n_trials']} trials; "
                  "ms per structure per step, profiler overhead included):", "",
                  "| part | " + " | ".join(prof) + " |", "|---|" + "---|" * len(prof)]
        for k in names:
            lines.append(f"| {k} | " + " | ".join(str(p["ms_per_structure_evaluation"][k])
                                                 for p in prof.values()) + " |")
        lines.append("| total | " + " | ".join(
            str(round(sum(p["ms_per_structure_evaluation"].values()), 2)) for p in prof.values()) + " |")
    prof = next((c.get("sequential_profile_top") for c in doc["cases"].values()
                 if c.get("sequential_profile_top")), None)
    if prof:
        lines += ["", "Where the sequential time goes (cProfile, top by own time):", "", "```",
                  *prof, "```"]
    (out / "search_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
