"""What one structure costs a batched model call in memory, and the per-model fit the batcher uses.

    python benchmarks/batch_memory.py            # CHGNet, CPU; ~10 min on 2 cores
    python benchmarks/batch_memory.py --part mgo  # 216-atom MgO trials batched within a budget

For each structure (vacancy supercells of CdTe and rocksalt MgO, 63 and 215 atoms, rattled), a
fresh process loads the model, makes one call on one structure (weights, caches, allocator warm),
then one call on ``n`` copies; the second call's peak resident memory above the first's, divided by
``n - 1``, is what one more structure in a batch costs. The per-structure cost is fitted as
``bytes = a * atoms + b * edges + c * angles`` (non-negative least squares; edges within the
model's atom-graph cutoff, angles from its bond graph: :func:`defectml.models.memory.graph_counts`)
and compared with the
coefficients :mod:`defectml.models.memory` holds (measured here, on CPU).

``--part mgo`` relaxes the ShakeNBreak trial POSCARs of Mg_O⁰ in 216-atom MgO
(``../shared/data/snb-mgo-mg_o``) for a few FIRE steps with ``run_jobs(batch_memory=...)``, the
engine the search uses: which batch sizes it ran, the process's peak resident memory against the
budget, and what one batch of every trial would have needed by the same estimate. A few steps
only: the memory of a step does not change as a relaxation goes on (the cells' graphs barely do).

Writes ``benchmarks/results/batch_memory{,_mgo}.{json,md}``. What it cannot show: GPU memory (the caching
allocator keeps more; the same counts drive it, the coefficients may differ), and other models
(SevenNet, MACE: no coefficients, so their batches are counted in structures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = [("CdTe", 2, 4), ("CdTe", 3, 3), ("MgO", 2, 3), ("MgO", 3, 2)]

PROBE = r"""
import json, os, resource, sys
import numpy as np
import torch
torch.set_num_threads(1)
from defectml.models import load_model
from defectml.models.memory import graph_counts
sys.path.insert(0, sys.argv[4])
from batch_memory import structure
atoms = structure(sys.argv[1], int(sys.argv[2]))
n = int(sys.argv[3])
model = load_model("chgnet", "cpu", 1)
fn = model.batch()
fn([atoms.copy()])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rng = np.random.default_rng(1)
batch = []
for _ in range(n):
    a = atoms.copy()
    a.positions += rng.normal(0, 0.02, a.positions.shape)
    batch.append(a)
fn(batch)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"atoms": len(atoms), **graph_counts(atoms, "chgnet"),
                  "per_structure_MB": (peak - base) / 1024 / (n - 1)}))
"""


def structure(host: str, rep: int):
    """A rattled vacancy supercell of CdTe (zinc blende) or MgO (rocksalt), conventional cell x rep."""
    from ase.build import bulk
    from ase.io import read

    prim = read(ROOT / "examples" / "CdTe.cif") if host == "CdTe" else bulk("MgO", "rocksalt", a=4.2,
                                                                            cubic=True)
    atoms = prim.repeat((rep, rep, rep))
    del atoms[0]
    atoms.positions += np.random.default_rng(0).normal(0, 0.1, atoms.positions.shape)
    return atoms


def measure(host: str, rep: int, n: int) -> dict:
    """One case in a fresh process (peak memory is per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, host, str(rep), str(n), str(ROOT / "benchmarks")],
                         capture_output=True, text=True, env=env, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"case": f"{host} x{rep} vacancy", "n": n, **row}


def mgo_batched(out: Path, budget_gb: float, steps: int) -> None:
    """Mg_O⁰ trials (216 atoms) relaxed ``steps`` FIRE steps with batches filled by memory."""
    import resource

    import torch
    from ase.io import read

    from defectml.core.engine import Job, ModelSpec, run_jobs
    from defectml.models import load_model

    torch.set_num_threads(1)
    folder = ROOT.parent / "shared" / "data" / "snb-mgo-mg_o" / "Mg_O_0"
    trials = sorted(p.parent.name for p in folder.glob("*/POSCAR") if "High_Energy" not in str(p))
    jobs = [Job(read(folder / t / "POSCAR"), tag=t) for t in trials]
    model = load_model("chgnet", "cpu", 1)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sizes, inner = [], model.batch_fn
    model.batch_fn = lambda batch: (sizes.append(len(batch)), inner(batch))[1]
    model.batch_fn([jobs[0].atoms.copy()])  # warm: what every call needs besides its structures
    sizes.clear()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    each = [model.memory(j.atoms) for j in jobs]
    done = list(run_jobs(jobs, ModelSpec(model.ref), fmax=1e-6, max_steps=steps, model=model,
                         batch_memory=budget_gb * 2**30))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    doc = {"trials": trials, "atoms": len(jobs[0].atoms), "steps": steps, "budget_GB": budget_gb,
           "estimate_per_trial_GB": [e / 2**30 for e in each], "batch_sizes": sizes,
           "loaded_GB": loaded / 2**30, "after_warm_call_GB": base / 2**30, "peak_GB": peak / 2**30,
           "peak_above_loaded_GB": (peak - loaded) / 2**30,
           "one_batch_of_all_estimate_GB": sum(each) / 2**30,
           "relaxed": len(done), "failed": sum(r.status == "failed" for _, r in done)}
    (out / "batch_memory_mgo.json").write_text(json.dumps(doc, indent=2))
    lines = ["# 216-atom MgO trials batched by memory (CHGNet, CPU, one process)", "",
             "Rerun: `python benchmarks/batch_memory.py --part mgo`.", "",
             f"- {len(jobs)} Mg_O⁰ trial POSCARs ({doc['atoms']} atoms), {steps} FIRE steps each, "
             f"budget {budget_gb:g} GB (`--batch-memory {budget_gb:g}`).",
             f"- Estimate per trial: {min(each) / 2**30:.2f}–{max(each) / 2**30:.2f} GB; one batch of all "
             f"{len(jobs)} would need {doc['one_batch_of_all_estimate_GB']:.1f} GB by the same estimate "
             "(this machine has 23 GB).",
             f"- Batch sizes the engine ran (calls): {sorted(set(sizes))}, {len(sizes)} calls.",
             f"- Peak resident memory {doc['peak_GB']:.1f} GB: {doc['peak_above_loaded_GB']:.1f} GB above "
             f"the loaded model ({doc['loaded_GB']:.1f} GB), against the budget of {budget_gb:g} GB, which "
             "counts the batch's structures, not the model.",
             f"- Relaxations returned: {doc['relaxed']} ({doc['failed']} failed).", "",
             "Not shown: whole relaxations (a few steps suffice for memory), GPU memory."]
    (out / "batch_memory_mgo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--part", choices=("fit", "mgo"), default="fit")
    p.add_argument("--budget", type=float, default=10.0, help="mgo: GB")
    p.add_argument("--steps", type=int, default=3, help="mgo: FIRE steps per trial")
    a = p.parse_args()
    if a.part == "mgo":
        Path(a.out).mkdir(parents=True, exist_ok=True)
        mgo_batched(Path(a.out), a.budget, a.steps)
        return
    from scipy.optimize import nnls

    from defectml.models.memory import COEFFICIENTS, structure_bytes

    rows = [measure(*c) for c in CASES]
    x = np.array([[r["atoms"], r["edges"], r["angles"]] for r in rows], float)
    y = np.array([r["per_structure_MB"] for r in rows]) * 2**20
    fit, _ = nnls(x, y)  # non-negative: no structure frees memory by having more atoms
    for r in rows:
        r["fit_MB"] = float(np.dot(fit, [r["atoms"], r["edges"], r["angles"]])) / 2**20
        r["held_MB"] = structure_bytes(r, "chgnet") / 2**20
    doc = {"model": "chgnet", "device": "cpu", "rows": rows,
           "fit_bytes_per": dict(zip(("atom", "edge", "angle"), map(float, fit), strict=True)),
           "held_bytes_per": COEFFICIENTS["chgnet"]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_memory.json").write_text(json.dumps(doc, indent=2))
    lines = ["# Memory of one more structure in a batched CHGNet call (CPU)", "",
             "Rerun: `python benchmarks/batch_memory.py`. Peak resident memory of a call on n copies "
             "above a call on one, per extra copy; fitted as a*atoms + b*edges + c*angles.", "",
             "| structure | atoms | edges | angles | measured (MB) | this fit (MB) | batcher's (MB) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['atoms']} | {r['edges']} | {r['angles']} | {r['per_structure_MB']:.0f} | "
              f"{r['fit_MB']:.0f} | {r['held_MB']:.0f} |" for r in rows]
    f = doc["fit_bytes_per"]
    lines += ["", f"This fit: {f['atom']:.0f} B per atom, {f['edge']:.0f} B per edge, {f['angle']:.0f} B "
              f"per angle. The batcher's (`defectml.models.memory.COEFFICIENTS`): "
              f"{json.dumps(COEFFICIENTS['chgnet'])}.", "",
              "Not shown: GPU memory; models other than CHGNet (their batches are counted in structures)."]
    (out / "batch_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
