"""Interstitial sites: defectml's generator against doped's DefectsGenerator, host by host.

For each host (zinc blende CdTe, ZnSe, GaAs; wurtzite GaN; rock-salt MgO), as given and as
relaxed by the model (what a search uses), the symmetry-distinct interstitial sites of
``make_defects`` and of doped's ``DefectsGenerator`` (no supercell search), each site described
by its point symmetry, multiplicity and first neighbour shell, and whether the two sets agree.
Also the count pymatgen-analysis-defects' Voronoi generator gives on the raw (unwrapped) relaxed
cell: the cause of the C3v site missing before ``defects.wrapped``. Site enumeration only.

    OMP_NUM_THREADS=1 python benchmarks/interstitial_sites.py [--model chgnet] [--no-relax]

Writes benchmarks/results/interstitial_sites.{json,md}. About 1 min on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
from ase.build import bulk
from pymatgen.core import Structure

from defectml.search.defects import make_defects, site_symmetry
from defectml.structure_io import read_structure, to_atoms, to_structure

ROOT = Path(__file__).resolve().parents[1]


def hosts() -> dict[str, Structure]:
    """The compared hosts at experimental lattice constants (primitive cells)."""
    out = {"CdTe": read_structure(ROOT / "examples" / "CdTe.cif").get_primitive_structure()}
    for name, kind, kw in (
        ("ZnSe", "zincblende", {"a": 5.668}),
        ("GaAs", "zincblende", {"a": 5.653}),
        ("GaN", "wurtzite", {"a": 3.189, "c": 5.185}),
        ("MgO", "rocksalt", {"a": 4.212}),
    ):
        out[name] = to_structure(bulk(name, kind, **kw))
    return out


def describe(host: Structure, cart: np.ndarray, multiplicity: int) -> str:
    """Point symmetry, multiplicity and first shell of an interstitial site, e.g. ``Td x1 [Se4]2.45``."""
    frac = host.lattice.get_fractional_coords(cart) % 1.0
    sym = site_symmetry(host, frac, "X")
    d = host.lattice.get_all_distances([frac], host.frac_coords)[0]
    nbrs = host.get_sites_in_sphere(host.lattice.get_cartesian_coords(frac), float(d.min()) * 1.05 + 0.3)
    shell = sorted(n.specie.symbol for n in nbrs if n.nn_distance < d.min() * 1.05)
    counts = "".join(f"{el}{shell.count(el)}" for el in sorted(set(shell)))
    return f"{sym} x{multiplicity} [{counts}]{d.min():.2f}"


def defectml_sites(host: Structure) -> list[str]:
    """Our sites (the first element's interstitials: the site set does not depend on the species)."""
    el = sorted(e.symbol for e in host.composition.elements)[0]
    found = make_defects(host, f"{el}_i", min_length=8.0)
    return sorted(describe(host, d.site, d.multiplicity) for d in found)


def doped_sites(host: Structure) -> list[str]:
    """doped's sites for the same element, placed in ``host``'s frame by Cartesian coordinates."""
    from doped.generation import DefectsGenerator

    el = sorted(e.symbol for e in host.composition.elements)[0]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        g = DefectsGenerator(host, generate_supercell=False, processes=1)
    return sorted(
        describe(host, np.asarray(d.site.coords), int(d.multiplicity))
        for d in g.defects.get("interstitials", [])
        if d.site.specie.symbol == el
    )


def raw_voronoi_count(host: Structure) -> int:
    """Sites pymatgen-analysis-defects' Voronoi generator finds on ``host`` exactly as given."""
    from pymatgen.analysis.defects.generators import VoronoiInterstitialGenerator

    el = sorted(e.symbol for e in host.composition.elements)[0]
    with contextlib.redirect_stdout(io.StringIO()):
        return len(list(VoronoiInterstitialGenerator().generate(host, [el])))


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="chgnet")
    p.add_argument("--no-relax", action="store_true", help="hosts as given only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    calc = None
    if not a.no_relax:
        from defectml.models import load_model

        model = load_model(a.model, threads=1)
        calc, model_name = model.calculator, model.version
    rows = []
    for name, host in hosts().items():
        variants = {"as given": host}
        if calc is not None:
            from defectml.core.relax import relax_host

            variants[f"relaxed ({a.model})"] = to_structure(relax_host(to_atoms(host), calc)[0])
        for variant, s in variants.items():
            t0 = time.perf_counter()
            ours = defectml_sites(s)
            t1 = time.perf_counter()
            theirs = doped_sites(s)
            t2 = time.perf_counter()
            rows.append({
                "host": name, "variant": variant, "defectml": ours, "doped": theirs, "agree": ours == theirs,
                "raw_voronoi_sites": raw_voronoi_count(s), "defectml_s": t1 - t0, "doped_s": t2 - t1,
                "min_frac_coord": float(s.frac_coords.min()),
            })
            print(rows[-1])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": None if calc is None else model_name, "rows": rows}
    (out / "interstitial_sites.json").write_text(json.dumps(doc, indent=2))
    md = [
        "# Interstitial sites: defectml vs doped",
        "",
        "Rerun: `OMP_NUM_THREADS=1 python benchmarks/interstitial_sites.py`. Each site: point symmetry, "
        "multiplicity per primitive cell, [first shell] and its distance (A). `raw` = sites of "
        "pymatgen-analysis-defects' Voronoi generator on the cell exactly as given (before "
        "`defects.wrapped`); `min c` = smallest fractional coordinate of the cell.",
        "",
        "| host | cell | defectml | doped | agree | raw | min c |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(f"| {r['host']} | {r['variant']} | {'; '.join(r['defectml'])} | {'; '.join(r['doped'])} | "
                  f"{'yes' if r['agree'] else '**no**'} | {r['raw_voronoi_sites']} | "
                  f"{r['min_frac_coord']:.1e} |")
    (out / "interstitial_sites.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
