"""`defectml thermo | dynamics`: free energies, concentrations, MD of a minimum."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from defectml.cli.common import add_run_arg, messages, open_store, run_key
from defectml.errors import DefectMLError


def add_parsers(sub) -> None:
    """Add this area's commands to the ``defectml`` subparsers."""
    from defectml.thermo.freeenergy import ThermoSettings

    d = ThermoSettings()  # thermo's defaults (the help shows them)
    th = sub.add_parser(
        "thermo", help="formation free energies and concentrations vs temperature",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Every term of g_f(T) for the minima of a finished search: formation energy, "
                    "spin/orientational degeneracy, harmonic or quasi-harmonic vibrations (phonopy + the "
                    "MLIP), configurational entropy, optional electronic entropy from a DOS, and the "
                    "anharmonic route by thermodynamic integration (--ti).")
    th.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    th.add_argument("--T", dest="temperatures", default="300:1200:50",
                    help="temperatures (K): start:stop:step or a comma list")
    th.add_argument("--defect", default=None, help="only this defect (e.g. v_Cd)")
    th.add_argument("--charge", type=int, default=None, help="only this charge state")
    th.add_argument("--mu", default="",
                    help="chemical potentials, e.g. Cd=-1.2,Te=-3.1 (eV/atom); "
                    "missing ones: element-rich limit from the model")
    th.add_argument("--vibrations", "--vib", choices=("none", "harmonic", "qha"), default=d.vibrations,
                    help="vibrational free energy: none, harmonic phonons, or quasi-harmonic "
                         "(volume-dependent)")
    th.add_argument("--window", type=float, default=d.window,
                    help="configurations within this many eV of the lowest")
    th.add_argument("--mesh", type=int, default=d.mesh[0],
                    help="q-mesh n (n x n x n) for supercell free energies")
    th.add_argument("--displacement", type=float, default=d.displacement, help="phonopy displacement (Å)")
    th.add_argument("--model", default=None, metavar="FILE",
                    help="the search's weights file where it moved or was renamed (accepted only with the "
                         "search's content key; default: the search's model where it was)")
    th.add_argument("--ti", action="store_true", help="also the anharmonic route (thermodynamic integration)")
    th.add_argument("--ti-t0", type=float, default=d.ti_t0, help="Frenkel-Ladd temperature (K)")
    th.add_argument("--ti-t1", type=float, default=None, help="reversible scaling up to this T (K)")
    th.add_argument("--ti-repeats", type=int, default=d.ti_repeats, help="independent TI switches averaged")
    th.add_argument("--ti-switch-steps", "--ti-steps", type=int, default=d.ti_switch_steps,
                    help="MD steps per switch")
    th.add_argument("--vbm", type=float, default=None, help="host VBM (eV) for charged defects")
    th.add_argument("--fermi", type=float, default=None, help="Fermi level above the VBM (eV)")
    th.add_argument("--correction", type=float, default=None,
                    help="charge correction (eV); none: no correction")
    th.add_argument("--dos", default=None, help="defect minus bulk electronic entropy from DOS files: "
                    "DEFECT.dat:EF_DEFECT,BULK.dat:EF_BULK (energy, states/eV)")
    th.add_argument("--out", default=None, help="output folder (default RUN/thermo)")
    th.add_argument("--quiet", action="store_true", help="no progress messages")
    add_run_arg(th)

    lv = sub.add_parser(
        "levels", help="formation energy vs Fermi level, transition levels, the charge-neutral Fermi level",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Every charge state of every defect of a finished search (or its ingested DFT): "
                    "the lowest minimum's energy with a point-charge correction (pymatgen-analysis-defects' "
                    "Freysoldt lattice term), the formation-energy lines, the thermodynamic transition "
                    "levels, and the self-consistent Fermi level with the concentrations under charge "
                    "neutrality. Writes levels.json and levels.png.")
    lv.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    lv.add_argument("--gap", type=float, required=True, help="band gap (eV)")
    lv.add_argument("--vbm", type=float, default=0.0,
                    help="host VBM (eV, on the energies' scale): absolute levels need it")
    lv.add_argument("--dielectric", type=float, default=None,
                    help="static dielectric constant for the charge correction (0: no correction)")
    lv.add_argument("--mu", default="", help="chemical potentials, e.g. Ga=-3.6,N=-8.3 (eV/atom); "
                    "missing ones: element-rich limit from the model")
    lv.add_argument("--T", dest="temperature", type=float, default=300.0,
                    help="temperature of the charge-neutral Fermi level (K)")
    lv.add_argument("--electron-mass", type=float, default=1.0, help="conduction-band effective mass (m_e)")
    lv.add_argument("--hole-mass", type=float, default=1.0, help="valence-band effective mass (m_e)")
    lv.add_argument("--fidelity", choices=("mlip", "dft"), default="mlip",
                    help="energies of the ML search (mlip) or of the ingested DFT (dft)")
    lv.add_argument("--defect", default=None, help="only this defect")
    lv.add_argument("--bulk-energy", type=float, default=None,
                    help="pristine supercell energy (eV; default: the store's host energy)")
    lv.add_argument("--model", default=None, metavar="FILE",
                    help="the search's weights file where it moved (accepted only with the search's content "
                         "key), for missing chemical potentials and the model card (default: the search's)")
    lv.add_argument("--thermo", action="append", default=[], metavar="THERMO_JSON",
                    help="a `defectml thermo` output (thermo.json or its folder) of one charge state; "
                         "repeat per state: its finite-T free energy at --T joins that state's formation "
                         "energy, so the levels and the Fermi level are at that temperature")
    lv.add_argument("--out", default=None, help="output folder (default RUN/levels)")
    lv.add_argument("--quiet", "-q", action="store_true", help="no progress messages")
    add_run_arg(lv)

    dy = sub.add_parser("dynamics", help="MD of a defect minimum: hops, bonds, inherent structures, NEB",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Langevin MD (NVT, or NPT with --pressure) of a defect's lowest minimum "
                                    "with the MLIP, trajectory analysis (defect site and hops, neighbour "
                                    "distances, bond orientation), optional inherent-structure quenching and "
                                    "an NEB barrier + transition-state rate to another minimum.")
    dy.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    dy.add_argument("--defect", required=True, help="the defect whose lowest minimum is run (e.g. v_Cd)")
    dy.add_argument("--charge", type=int, default=0, help="its charge state")
    dy.add_argument("--T", dest="temperature", type=float, default=300.0, help="temperature (K)")
    dy.add_argument("--steps", type=int, default=2000, help="MD steps")
    dy.add_argument("--timestep", type=float, default=2.0, help="time step (fs)")
    dy.add_argument("--interval", type=int, default=20, help="steps between frames")
    dy.add_argument("--pressure", type=float, default=None, help="bar (NPT); default NVT")
    dy.add_argument("--quench", type=int, default=0, help="inherent structures from this many frames")
    dy.add_argument("--neb-to", type=int, default=None, help="NEB from minimum 0 to this minimum rank")
    dy.add_argument("--model", default=None, metavar="FILE",
                    help="the search's weights file where it moved or was renamed (accepted only with the "
                         "search's content key; default: the search's model where it was)")
    dy.add_argument("--seed", type=int, default=0, help="random seed of the velocities and thermostat")
    dy.add_argument("--out", default=None, help="output folder (default RUN/dynamics/<defect>)")
    dy.add_argument("--quiet", action="store_true", help="no progress messages")
    add_run_arg(dy)


def _temperatures(text: str) -> np.ndarray:
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            return np.arange(start, stop + step / 2, step)
        return np.array([float(x) for x in text.split(",")])
    except ValueError:
        raise DefectMLError(f"--T must be start:stop:step or a comma list, not {text!r}") from None


def _key_values(text: str, what: str) -> dict[str, float]:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise DefectMLError(f"{what} must look like Cd=-1.2,Te=-3.1, not {text!r}") from None
    return out


def _electronic(text: str | None):
    if not text:
        return None
    from defectml.thermo.electronic import electronic_entropy, read_dos

    try:
        (fd, efd), (fb, efb) = (p.rsplit(":", 1) for p in text.split(","))
        efd, efb = float(efd), float(efb)
    except ValueError:
        raise DefectMLError("--dos must be DEFECT.dat:EF,BULK.dat:EF") from None
    (ed, dd), (eb, db) = read_dos(fd), read_dos(fb)
    return lambda t: electronic_entropy(ed, dd, efd, t) - electronic_entropy(eb, db, efb, t)


def cmd_thermo(a: argparse.Namespace) -> int:
    """`defectml thermo`: formation free energies and concentrations vs T."""
    from defectml.thermo.freeenergy import ThermoSettings
    from defectml.thermo.from_store import thermo_from_store
    from defectml.thermo.report import table, write

    store = open_store(a.run)
    t = _temperatures(a.temperatures)  # here, not in argparse: a bad value is one line and exit 2
    charge_terms = {k: v for k, v in (("vbm", a.vbm), ("fermi_level", a.fermi),
                                      ("correction", a.correction)) if v is not None}
    settings = ThermoSettings.from_options(a, temperatures=t, mu=_key_values(a.mu, "--mu"),
                                           mesh=(a.mesh,) * 3, charge_terms=charge_terms,
                                           electronic=_electronic(a.dos))
    results = thermo_from_store(store, settings, defect=a.defect, charge=a.charge, model=a.model,
                                run=run_key(store, a.run, a.run_key), log=messages(a.quiet))
    base = Path(a.out) if a.out else (Path(a.run) if Path(a.run).is_dir() else Path(".")) / "thermo"
    for r in results:
        write(r, base / r.label)
        print(f"# {r.label} ({r.model})")
        print(table(r, every=max(1, len(t) // 10)), end="")
        for note in r.notes:
            print(f"note: {note}")
    print(f"written to {base}/", file=sys.stderr)
    return 0


def cmd_levels(a: argparse.Namespace) -> int:
    """`defectml levels`: transition levels and the charge-neutral Fermi level."""
    from defectml.structure_io import write_json
    from defectml.thermo.from_store import finite_t_terms, levels_from_store
    from defectml.thermo.levels import plot_diagram

    free = finite_t_terms(a.thermo, a.temperature) if a.thermo else None
    store = open_store(a.run)
    doc = levels_from_store(
        store, gap=a.gap, vbm=a.vbm, dielectric=a.dielectric, mu=_key_values(a.mu, "--mu"),
        temperature=a.temperature, electron_mass=a.electron_mass, hole_mass=a.hole_mass,
        fidelity=a.fidelity, defect=a.defect, bulk_energy=a.bulk_energy, model=a.model,
        run=run_key(store, a.run, a.run_key, a.fidelity), free_energies=free, log=messages(a.quiet),
        warn=lambda m: print(f"warning: {m}", file=sys.stderr))  # warnings even with --quiet
    lines = doc.pop("_lines")
    base = Path(a.out) if a.out else (Path(a.run) if Path(a.run).is_dir() else Path(".")) / "levels"
    base.mkdir(parents=True, exist_ok=True)
    write_json(base / "levels.json", doc)
    ef = doc.get("neutrality", {}).get("fermi_level_eV")  # none where it could not be solved
    corrected = f"ε = {a.dielectric:g}" if a.dielectric else "uncorrected"
    plot_diagram(lines, a.gap, base / "levels.png", fermi_level=ef,
                 title=f"{a.fidelity} energies, {corrected}")
    for name, d in doc["defects"].items():
        states = ", ".join(f"{q}: {s['formation_energy_at_vbm_eV']:.2f} eV"
                           for q, s in d["charge_states"].items())
        print(f"{name}  E_f at the VBM  {states}")
        for level in d["levels"]:
            print(f"  {level['label']:<10} {level['fermi_level_eV']:.3f} eV above the VBM")
        if not d["levels"]:
            print("  no transition level inside the gap")
    if ef is not None:
        print(f"charge-neutral Fermi level at {a.temperature:g} K: {ef:.3f} eV above the VBM")
    print(f"written to {base}/ (levels.json, levels.png)", file=sys.stderr)
    return 0


def cmd_dynamics(a: argparse.Namespace) -> int:
    """`defectml dynamics`: MD + analysis (+ inherent structures, NEB) of a defect minimum."""
    from ase.io import write

    from defectml.search.summary import charge_label
    from defectml.thermo.from_store import dynamics_from_store

    if a.steps < 1 or a.temperature <= 0 or a.timestep <= 0:
        raise DefectMLError("--steps, --T and --timestep must be positive")
    store = open_store(a.run)
    res = dynamics_from_store(store, defect=a.defect, charge=a.charge, temperature=a.temperature,
                              steps=a.steps, timestep=a.timestep, interval=a.interval,
                              pressure_bar=a.pressure, quench=a.quench, neb_to=a.neb_to, model=a.model,
                              seed=a.seed, run=run_key(store, a.run, a.run_key), log=messages(a.quiet))
    base = (Path(a.out) if a.out else (Path(a.run) if Path(a.run).is_dir() else Path("."))
            / "dynamics" / charge_label(a.defect, a.charge))
    base.mkdir(parents=True, exist_ok=True)
    write(base / "trajectory.extxyz", res.pop("frames"))
    (base / "dynamics.json").write_text(json.dumps(res, indent=2, default=float))
    an = res["analysis"]
    print(f"{res['defect']}: {len(an['time_fs'])} frames, {an['n_hops']} site changes, "
          f"bonded fraction {an['bonded_fraction']:.2f}")
    if "inherent_structures" in res:
        pops = res["inherent_structures"]["populations"]
        print("inherent structures: " + ", ".join(
            f"{'unknown' if int(k) < 0 else k}: {v:.2f}" for k, v in pops.items()))
    if "neb" in res:
        n = res["neb"]
        print(f"NEB barrier {n['barrier_eV']:.3f} eV (reverse {n['reverse_barrier_eV']:.3f}), "
              f"nu {n['attempt_frequency_Hz']:.2e} Hz, rate {n['rate_per_s']:.2e} /s at {a.temperature:g} K")
    print(f"written to {base}/", file=sys.stderr)
    return 0
