"""How far apart are relaxed trials of one minimum, and of different minima, in SOAP space?

Justifies the default SOAP cosine-distance threshold of the minima grouping. For a finished run
(a results.db) it reports, per defect and charge, the largest distance between trials that form
the same bonding motif and lie in one group at a tiny threshold, the smallest distance between
different motifs, and the number of minima found across a threshold grid.

    python benchmarks/soap_threshold.py                  # runs CdTe V_Cd^0 with chgnet-0.2.0 first
    python benchmarks/soap_threshold.py runs/cdte/results.db

Writes benchmarks/results/soap_threshold.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
from ase.build import make_supercell
from pymatgen.core import Structure

from defectml import ResultStore, SearchSettings, search
from defectml.search.fingerprint import cosine_distances, soap_fingerprints
from defectml.search.landscape import (
    DEFAULT_SOAP_THRESHOLD,
    bond_signature,
    find_minima,
    like_pair_distances,
    new_bonds,
    quarantine,
)
from defectml.search.summary import relaxed_trial_from_row

ROOT = Path(__file__).resolve().parents[1]
GRID = [0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05]


def analyse(db: Path) -> list[dict]:
    store = ResultStore(db)
    out = []
    rows = store.select(kind="relaxation")
    keys = sorted({(r.defect_key, r.charge_state, r.settings_key) for r in rows})
    for defect_key, charge, skey in keys:
        group = [r for r in rows if (r.defect_key, r.charge_state, r.settings_key)
                 == (defect_key, charge, skey)]
        drow = store.first(kind="defect", defect_key=defect_key)
        hrow = store.first(kind="host", host_key=drow.host_key)
        bulk = make_supercell(hrow.toatoms(), np.asarray(drow.data["sc_matrix"]))
        oxi = hrow.data["oxidation_states"]
        trials, _ = quarantine([relaxed_trial_from_row(r) for r in group])
        like = like_pair_distances(bulk)
        radius = 1.5 * min(like.values())
        sig = [bond_signature(new_bonds(t.atoms, t.centre(), t.defect_index, oxi, like, radius))
               for t in trials]
        fps = soap_fingerprints([t.atoms for t in trials], [t.centre() for t in trials])
        d = cosine_distances(fps)
        iu = np.triu_indices(len(trials), 1)
        same = [d[i, j] for i, j in zip(*iu, strict=True) if sig[i] == sig[j]]
        diff = [d[i, j] for i, j in zip(*iu, strict=True) if sig[i] != sig[j]]
        n_minima = {}
        for thr in GRID:
            minima, _ = find_minima(trials, bulk=bulk, oxidation_states=oxi, threshold=thr)
            n_minima[str(thr)] = len(minima)
        out.append({
            "defect": drow.defect, "charge": int(charge), "model": group[0].model,
            "n_trials": len(trials), "motifs": sorted({str(s) for s in sig}),
            "max_distance_same_motif": float(max(same)) if same else None,
            "min_distance_different_motif": float(min(diff)) if diff else None,
            "n_minima_vs_threshold": n_minima, "default_threshold": DEFAULT_SOAP_THRESHOLD,
        })
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("db", nargs="?", help="results.db of a finished run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(a.db) if a.db else None
        if db is None:
            host = Structure.from_file(ROOT / "examples" / "CdTe.cif")
            search(host, "v_Cd", [0], out=tmp, settings=SearchSettings(model="chgnet-0.2.0"),
                   progress=False)
            db = Path(tmp) / "results.db"
        result = analyse(db)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soap_threshold.json").write_text(json.dumps(result, indent=2))
    lines = ["# SOAP cosine distances between relaxed trials", "",
             "Rerun: `python benchmarks/soap_threshold.py [results.db]`.", "",
             "| defect | model | motifs | max d (same motif) | min d (different motifs) | "
             + " | ".join(f"n minima @ {t}" for t in GRID) + " |",
             "|---|---|---|---|---|" + "---|" * len(GRID)]
    for r in result:
        fmt = lambda x: f"{x:.2e}" if x is not None else "n/a"  # noqa: E731
        lines.append(f"| {r['defect']} {r['charge']:+d} | {r['model']} | {len(r['motifs'])} | "
                     f"{fmt(r['max_distance_same_motif'])} | "
                     f"{fmt(r['min_distance_different_motif'])} | "
                     + " | ".join(str(v) for v in r["n_minima_vs_threshold"].values()) + " |")
    (out / "soap_threshold.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
