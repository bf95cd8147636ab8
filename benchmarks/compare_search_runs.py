"""Do two runs of benchmarks/cdte_vcd_search.py find the same minima? (a refactor's check)

    git worktree add /tmp/before <commit>
    (cd /tmp/before && PYTHONPATH=/tmp/before/src python benchmarks/cdte_vcd_search.py --out /tmp/b)
    python benchmarks/cdte_vcd_search.py
    python benchmarks/compare_search_runs.py /tmp/b/cdte_vcd_search.json \
        benchmarks/results/cdte_vcd_search.json --before-label <commit>

Per model: the minima (dE to 4 decimals, label, member trials) equal or not, FIRE steps and wall
time of each. Both runs must come from the same machine: floating-point differences between
machines can move a trial from one basin to another (README, "Reproducibility").
Writes benchmarks/results/cdte_vcd_search_before_after.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def minima(run: dict) -> list:
    return [(m["delta_e_eV"], m["label"], sorted(m["trials"])) for m in run["minima"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--before-label", default="before")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    before, after = (json.loads(Path(x).read_text()) for x in (a.before, a.after))
    rows = []
    for model, b in before["runs"].items():
        n = after["runs"].get(model)
        if n is None:
            continue
        rows.append({"model": model, "same_minima": minima(b) == minima(n),
                     "minima": len(n["minima"]), "fire_steps": [b["total_steps"], n["total_steps"]],
                     "wall_time_s": [b["wall_time_s"], n["wall_time_s"]]})
    doc = {"before": a.before_label, "machine": [before.get("machine"), after.get("machine")], "models": rows}
    out = Path(a.out)
    (out / "cdte_vcd_search_before_after.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# CdTe V_Cd^0 search: code at {a.before_label} vs now, same machine", "",
             f"Machine: {after.get('machine')}. Rerun: see `benchmarks/compare_search_runs.py`.", "",
             "| model | same minima (dE, label, trials) | minima | FIRE steps before / now "
             "| wall time (s) before / now |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {'yes' if r['same_minima'] else 'NO'} | {r['minima']} | "
              f"{r['fire_steps'][0]} / {r['fire_steps'][1]} | {r['wall_time_s'][0]} / {r['wall_time_s'][1]} |"
              for r in rows]
    (out / "cdte_vcd_search_before_after.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
