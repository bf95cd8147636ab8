"""The search on a held-out defect (ZnS V_S) with the base model and the fine-tuned ones.

    python benchmarks/finetune.py ...            # first: it writes the fine-tuned weights
    python benchmarks/finetune_search.py         # then: one V_S search per model

ZnS V_S (every charge state) was held out of fine-tuning in benchmarks/finetune.py, so this is
the search a user would run on a defect the model never saw. Host: the DFT data's own 64-atom
ZnS bulk cell (HSE06 lattice), reduced to its primitive cell; supercell by the search's defaults.
Charge-blind models: one search (charge 0) per model. Writes
benchmarks/results/finetune_search.{json,md}: per model, the minima (energy above the lowest,
bonds, which trials), and what changed against the base model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "defect-dft"


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench_finetune")
    p.add_argument("--models", default="chgnet,{work}/chgnet_standard.pth.tar,{work}/chgnet_replay.pth.tar,"
                                       "sevennet-mf-0,{work}/sevennet-mf-0_multihead.pth")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()

    from defectml.search.pipeline import SearchSettings, search
    from defectml.structure_io import to_structure
    from defectml.train.dataset import read_extxyz

    work = Path(a.work)
    bulk = next(fs for fs in read_extxyz(DATA / "ZnS.extxyz.gz") if fs.defect == "bulk").frames[0]
    host = to_structure(bulk).get_primitive_structure()
    previous = Path(a.out) / "finetune_search.json"  # searches of other models, kept
    results = json.loads(previous.read_text())["results"] if previous.is_file() else {}
    for spec in a.models.split(","):
        spec = spec.format(work=work)
        if "/" in spec and not Path(spec.split("@")[0]).is_file():
            print(f"skipping {spec}: not made yet (run benchmarks/finetune.py)", flush=True)
            continue
        name = Path(spec).name if "/" in spec else spec
        t0 = time.perf_counter()
        res = search(host, "v_S", [0], out=work / f"search_{name}", progress=False, log_fn=lambda m: None,
                     settings=SearchSettings(model=spec, threads=a.threads))
        summary = res.summaries[0].to_dict()
        results[name] = {"model": spec, "seconds": time.perf_counter() - t0, "n_trials": summary["n_trials"],
                         "n_converged": summary["n_converged"], "minima": summary["minima"]}
        print(f"{name}: {len(summary['minima'])} minima, "
              f"{[m['label'] for m in summary['minima']]}", flush=True)
        write(a, results)


def write(a, results: dict) -> None:
    """JSON and Markdown of the searches so far."""
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} torch threads",
           "host": "ZnS (defect-dft bulk cell, primitive)", "defect": "v_S", "charge": 0, "results": results}
    out = Path(a.out)
    (out / "finetune_search.json").write_text(json.dumps(doc, indent=2, default=float))
    lines = ["# Search on a held-out defect: ZnS V_S⁰, base vs fine-tuned models", "",
             f"Machine: {doc['machine']}. Rerun: `python benchmarks/finetune_search.py` after "
             "`benchmarks/finetune.py`. V_S (all charges) was held out of fine-tuning.", "",
             "| model | trials (converged) | minima | lowest minimum | others (ΔE eV: label) | s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        ms = r["minima"]
        others = "; ".join(f"{m['delta_e_eV']:+.3f}: {m['label']}" for m in ms[1:]) or "none"
        lowest = f"{ms[0]['label']} ({len(ms[0]['trials'])} trials)" if ms else "none"
        lines.append(f"| {name} | {r['n_trials']} ({r['n_converged']}) | {len(ms)} | {lowest} | {others} | "
                     f"{r['seconds']:.0f} |")
    (out / "finetune_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
