"""Command-line interface: ``defectml search | generate | show``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from defectml.distort import DEFAULT_DISTORTIONS, TrialSettings
from defectml.errors import DefectMLError, InputError
from defectml.fingerprint import SoapSettings
from defectml.landscape import DEFAULT_PHASE_CHANGE_DROP, DEFAULT_SOAP_THRESHOLD

EPILOG = """examples:
  defectml search examples/CdTe.cif --defect v_Cd --charge 0 --out runs/cdte
  defectml search host.cif --defect all --out runs/all          # every native defect, default charges
  defectml generate examples/CdTe.cif --defect v_Cd --charge 0,-1 --out trials/   # for DFT elsewhere
  defectml show runs/cdte
  defectml shortlist runs/cdte --window 0.5                 # DFT inputs for the unique minima
  defectml ingest snb_folders/ --out runs/dft               # ShakeNBreak/VASP results in
  defectml evaluate runs/cdte --dft runs/dft                # surrogate vs DFT metrics
"""


def _parse_charges(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        if ":" in text:
            lo, hi = (int(x) for x in text.split(":"))
            return list(range(min(lo, hi), max(lo, hi) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"cannot parse --charge {text!r}: use 0, -2,-1,0 or -2:0") from None


def _parse_distortions(text: str | None) -> tuple[float, ...]:
    if text is None:
        return DEFAULT_DISTORTIONS
    try:
        if text.count(":") == 2:
            lo, hi, step = (float(x) for x in text.split(":"))
            n = int(round((hi - lo) / step)) + 1
            values = [round(lo + i * step, 6) for i in range(n)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except (ValueError, ZeroDivisionError):
        raise InputError(f"cannot parse --distortions {text!r}: use -0.6:0.6:0.1 or -0.4,0.4") from None
    return tuple(v for v in values if abs(v) > 1e-9)


def _parse_oxi(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        try:
            el, val = part.split("=")
            out[el.strip()] = int(val)
        except ValueError:
            raise InputError(f"cannot parse --oxi {part!r}: use e.g. Cd=2,Te=-2") from None
    return out


def _add_structure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("structure", help="host crystal: CIF, POSCAR, extxyz or any ASE/pymatgen format")
    p.add_argument("--defect", default="all",
                   help="v_Cd (vacancy), Se_Te (Se on a Te site), Cd_i or Te_i_C3v "
                        "(interstitial), comma-separated, or 'all' (default)")
    p.add_argument("--charge", default=None,
                   help="charge state(s): 0, -2,-1,0 or -2:0 (default: each defect's defaults)")
    p.add_argument("--oxi", default=None, help="oxidation-state overrides, e.g. Cd=2,Te=-2")
    g = p.add_argument_group("supercell")
    g.add_argument("--min-length", type=float, default=10.0,
                   help="minimum distance between periodic images of the defect, Å (10)")
    g.add_argument("--max-atoms", type=int, default=500, help="largest supercell allowed (500)")
    g.add_argument("--diagonal", action="store_true", help="only diagonal supercell matrices")
    t = p.add_argument_group("trials")
    t.add_argument("--distortions", default=None,
                   help="bond-distortion factors: -0.6:0.6:0.1 (default) or a list -0.4,-0.2,0.2")
    t.add_argument("--rattle-stdev", type=float, default=None,
                   help="rattle standard deviation, Å (default 10%% of the bulk bond length)")
    t.add_argument("--dimer-distance", type=float, default=2.0,
                   help="bond length of the vacancy Dimer trial, Å (2.0)")
    t.add_argument("--no-dimer", action="store_true", help="no Dimer trial")
    t.add_argument("--no-rattled", action="store_true", help="no rattle-only trial")
    t.add_argument("--all-pairs", action="store_true",
                   help="also distort every other combination of first-shell neighbours (alloys)")
    t.add_argument("--pair-distortions", default=None,
                   help="factors for the --all-pairs trials (default: the --distortions)")
    t.add_argument("--seed", type=int, default=42, help="base random seed (42)")
    t.add_argument("--sites", choices=("symmetry", "environment"), default="symmetry",
                   help="symmetry: inequivalent sites of an ordered host (default); environment: "
                        "one site per local chemical environment of the cell as given (alloys)")
    t.add_argument("--shells", type=int, default=1,
                   help="neighbour shells that define an environment (1)")


def _trial_settings(a: argparse.Namespace) -> TrialSettings:
    return TrialSettings(
        distortions=_parse_distortions(a.distortions), rattle_stdev=a.rattle_stdev,
        dimer_distance=a.dimer_distance, dimer=not a.no_dimer, rattled=not a.no_rattled,
        all_pairs=a.all_pairs, seed=a.seed,
        pair_distortions=_parse_distortions(a.pair_distortions) if a.pair_distortions else None,
    )


def _add_search_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--db", default=None,
                   help="results database: SQLite path or postgresql:// URL (OUT/results.db)")
    m = s.add_argument_group("model and relaxation")
    m.add_argument("--model", default="chgnet",
                   help="chgnet (default), sevennet-0, sevennet-mf-0, emt, or a MACE .model path")
    m.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    m.add_argument("--threads", type=int, default=None, help="torch threads (all cores)")
    m.add_argument("--fmax", type=float, default=0.05, help="force threshold, eV/Å (0.05)")
    m.add_argument("--max-steps", type=int, default=1500, help="FIRE step limit (1500)")
    m.add_argument("--no-relax-host", action="store_true",
                   help="use the host cell as given instead of relaxing it with the model")
    m.add_argument("--pre-relax", default=None, metavar="MODEL.pt",
                   help="move every trial to a trained direct predictor's relaxed positions first "
                        "(a,b.pt: the average of an ensemble)")
    m.add_argument("--early-stop", action="store_true",
                   help="stop a relaxation once it reaches the basin of an already relaxed "
                        "minimum (same defect-site SOAP, energy within 0.05 eV)")
    x = s.add_argument_group("execution")
    x.add_argument("--workers", type=int, default=1,
                   help="worker processes (1: this process); torch threads are split among them")
    x.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local process pool (default) or Dask distributed")
    x.add_argument("--scheduler", default=None,
                   help="Dask scheduler address, e.g. tcp://head:8786 (default: a LocalCluster)")
    x.add_argument("--batch-size", type=int, default=1, help="trials per task (1)")


def _search_settings(a: argparse.Namespace, **over):
    from defectml.search import SearchSettings

    kw = dict(
        model=a.model, device=a.device, threads=a.threads, fmax=a.fmax, max_steps=a.max_steps,
        min_length=a.min_length, max_atoms=a.max_atoms, force_diagonal=a.diagonal,
        relax_host=not a.no_relax_host, oxidation_states=_parse_oxi(a.oxi),
        trials=_trial_settings(a), soap=_soap(a), soap_threshold=a.soap_threshold,
        max_drop=a.max_drop, early_stop=a.early_stop, pre_relax=a.pre_relax, sites=a.sites,
        env_shells=a.shells,
    )
    kw.update(over)
    return SearchSettings(**kw)


def _execution(a: argparse.Namespace) -> dict:
    return {"workers": a.workers, "executor": a.executor, "scheduler": a.scheduler,
            "batch_size": a.batch_size}


def _add_run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", dest="run_key", default=None, metavar="KEY",
                   help="which run in the store (a settings key or a unique prefix; default: the only "
                        "one, or the one this folder's summary.json names)")


def _add_analysis_args(p: argparse.ArgumentParser) -> None:
    _add_run_arg(p)
    g = p.add_argument_group("telling minima apart")
    g.add_argument("--soap-threshold", type=float, default=DEFAULT_SOAP_THRESHOLD,
                   help=f"SOAP cosine distance below which two relaxed trials are one minimum "
                        f"({DEFAULT_SOAP_THRESHOLD})")
    g.add_argument("--soap-rcut", type=float, default=5.0, help="SOAP cutoff, Å (5)")
    g.add_argument("--soap-nmax", type=int, default=10, help="SOAP radial basis size (10)")
    g.add_argument("--soap-lmax", type=int, default=10, help="SOAP max angular degree (10)")
    g.add_argument("--soap-sigma", type=float, default=1.0, help="SOAP Gaussian width, Å (1.0)")
    g.add_argument("--max-drop", type=float, default=DEFAULT_PHASE_CHANGE_DROP,
                   help="quarantine relaxations this many eV below the median as phase changes "
                        f"({DEFAULT_PHASE_CHANGE_DROP})")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of a table")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")


def _soap(a: argparse.Namespace) -> SoapSettings:
    return SoapSettings(r_cut=a.soap_rcut, n_max=a.soap_nmax, l_max=a.soap_lmax, sigma=a.soap_sigma)


def build_parser() -> argparse.ArgumentParser:
    """The ``defectml`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="defectml",
        description="Find the ground-state and metastable structures of point defects with a "
                    "machine-learned interatomic potential (default CHGNet, runs offline).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "search", help="distort, relax with an MLIP, and rank the unique minima of each defect",
        description="Generate defects and distorted trials, relax every trial with an MLIP, "
                    "group the relaxed structures by a SOAP fingerprint of the defect site and "
                    "rank the unique minima. Every relaxation is saved at once in "
                    "OUT/results.db; rerunning the same command resumes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_structure_args(s)
    s.add_argument("--out", default="runs/defectml", help="output folder (runs/defectml)")
    _add_search_args(s)
    _add_analysis_args(s)

    al = sub.add_parser(
        "alloy", help="defects in random alloys: one search per composition and local environment",
        description="Build random-substitution supercells (seeded) for each fraction x, group the "
                    "defect sites by their neighbour-shell chemistry, and search one site per "
                    "environment with bond distortions on every pair of first-shell neighbours "
                    "(--pair-distortions, -0.6..-0.2 by default) plus the standard trials.",
    )
    _add_structure_args(al)
    al.add_argument("--substitute", required=True, help="OLD:NEW, e.g. Te:Se")
    al.add_argument("--x", default="0.25,0.5,0.75", help="fractions of OLD replaced (0.25,0.5,0.75)")
    al.add_argument("--alloy-seed", type=int, default=0, help="seed of the random substitution (0)")
    al.add_argument("--out", default="runs/alloy", help="output folder (runs/alloy)")
    _add_search_args(al)
    _add_analysis_args(al)

    g = sub.add_parser(
        "generate", help="write the trial structures only (POSCARs), e.g. to run DFT elsewhere",
        description="Write every trial structure as OUT/<defect>_<charge>/<trial>/POSCAR, in "
                    "ShakeNBreak's folder layout, with distortion_metadata.json. No model used.",
    )
    _add_structure_args(g)
    g.add_argument("--out", default="trials", help="output folder (trials)")
    g.add_argument("--quiet", "-q", action="store_true", help="no messages")

    sl = sub.add_parser(
        "shortlist", help="pick the unique low-energy minima and write DFT inputs for them",
        description="From a finished search, pick the minima within --window eV of the lowest "
                    "(at most --max-per-defect), plus the unperturbed minimum as a control, "
                    "and write VASP, Quantum ESPRESSO and CP2K inputs for each.",
    )
    sl.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    sl.add_argument("--max-per-defect", type=int, default=5, help="minima per defect (5)")
    sl.add_argument("--window", type=float, default=0.5, help="energy window, eV (0.5)")
    sl.add_argument("--codes", default="vasp,qe,cp2k", help="vasp,qe,cp2k (all by default)")
    sl.add_argument("--overrides", default=None,
                    help="YAML file: {vasp: {INCAR tags}, qe: {namelist: {...}}, cp2k: {cutoff: ..}}")
    sl.add_argument("--out", default=None, help="where to write inputs (RUN/dft)")
    sl.add_argument("--calculator", default=None,
                    help="also relax the shortlist here with this DFT code (gpaw; emt for tests) "
                         "and store the results as fidelity=dft")
    sl.add_argument("--dft-fmax", type=float, default=0.05, help="force threshold for --calculator")
    _add_analysis_args(sl)

    ing = sub.add_parser(
        "ingest", help="store DFT results (ShakeNBreak folders, VASP outputs, extxyz)",
        description="Read DFT relaxations into a results database as fidelity='dft' rows: a "
                    "ShakeNBreak folder (<defect>_<charge>/<trial>/CONTCAR + <defect>.yaml), a "
                    "folder of them, or one relaxation (VASP folder or extxyz) with --defect, "
                    "--charge and --site.",
    )
    ing.add_argument("path", help="ShakeNBreak folder(s), VASP folder or extxyz file")
    ing.add_argument("--out", required=True, help="folder of the results database")
    ing.add_argument("--db", default=None, help="database path or URL (OUT/results.db)")
    ing.add_argument("--host", default=None, help="bulk host structure (found as *bulk* if omitted)")
    ing.add_argument("--defect", default=None, help="defect name, for a single relaxation")
    ing.add_argument("--charge", default=None, help="charge, for a single relaxation")
    ing.add_argument("--site", default=None, help="defect site, fractional x,y,z (single relaxation)")
    ing.add_argument("--trial", default=None, help="trial name (single relaxation)")
    ing.add_argument("--theory", default=None,
                     help="level of theory, e.g. 'vasp PBEsol encut=520' (default: from the extxyz "
                          "info or the INCAR)")
    ing.add_argument("--fmax", type=float, default=0.05,
                     help="largest force (eV/Å) at the last ionic step of a converged relaxation (0.05)")
    ing.add_argument("--quiet", "-q", action="store_true", help="no messages")

    ev = sub.add_parser(
        "evaluate", help="MLIP search vs DFT: ground-state hits, DFT savings, energy errors",
        description="Set a search against DFT results for the same defects (ingested or "
                    "DFT-relaxed): ground-state hit, DFT relaxations saved, energy MAEs, "
                    "Spearman correlation, ground-state RMSD; table, JSON and parity plot.",
    )
    ev.add_argument("run", help="the search (folder, results.db or URL)")
    ev.add_argument("--dft", default=None, help="the DFT results (default: the same store)")
    ev.add_argument("--dft-run", default=None, metavar="KEY",
                    help="which DFT run (settings key or prefix; default: the only one)")
    ev.add_argument("--max-per-defect", type=int, default=5, help="shortlist size (5)")
    ev.add_argument("--window", type=float, default=0.5, help="shortlist energy window, eV (0.5)")
    ev.add_argument("--out", default=None, help="where to write evaluation.json/.png (RUN)")
    _add_analysis_args(ev)

    sh = sub.add_parser("show", help="re-print the summary of a finished (or partial) search",
                        description="Rebuild the minima table from the results database.")
    sh.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    sh.add_argument("--fidelity", choices=("auto", "mlip", "dft"), default="auto",
                    help="which results: MLIP searches, DFT, or auto (MLIP if any, else DFT)")
    _add_analysis_args(sh)
    th = sub.add_parser(
        "thermo", help="formation free energies and concentrations vs temperature",
        description="Every term of g_f(T) for the minima of a finished search: formation energy, "
                    "spin/orientational degeneracy, harmonic or quasi-harmonic vibrations (phonopy + the "
                    "MLIP), configurational entropy, optional electronic entropy from a DOS, and the "
                    "anharmonic route by thermodynamic integration (--ti).")
    th.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    th.add_argument("--T", dest="temperatures", default="300:1200:50",
                    help="temperatures: start:stop:step or a comma list (K)")
    th.add_argument("--defect", default=None, help="only this defect (e.g. v_Cd)")
    th.add_argument("--charge", type=int, default=None, help="only this charge state")
    th.add_argument("--mu", default="", help="chemical potentials, e.g. Cd=-1.2,Te=-3.1 (eV/atom); "
                    "missing ones: element-rich limit from the model")
    th.add_argument("--vib", choices=("none", "harmonic", "qha"), default="harmonic")
    th.add_argument("--window", type=float, default=0.5, help="configurations within this of the lowest (eV)")
    th.add_argument("--mesh", type=int, default=4, help="q-mesh n (n x n x n) for supercell free energies")
    th.add_argument("--displacement", type=float, default=0.01, help="phonopy displacement (A)")
    th.add_argument("--model", default=None, help="MLIP for phonons/TI (default: the search's model)")
    th.add_argument("--ti", action="store_true", help="also the anharmonic route (thermodynamic integration)")
    th.add_argument("--ti-t0", type=float, default=300.0, help="Frenkel-Ladd temperature (K)")
    th.add_argument("--ti-t1", type=float, default=None, help="reversible scaling up to this T (K)")
    th.add_argument("--ti-repeats", type=int, default=4)
    th.add_argument("--ti-steps", type=int, default=1000, help="MD steps per switch")
    th.add_argument("--vbm", type=float, default=None, help="host VBM (eV) for charged defects")
    th.add_argument("--fermi", type=float, default=None, help="Fermi level above the VBM (eV)")
    th.add_argument("--correction", type=float, default=None, help="charge correction (eV)")
    th.add_argument("--dos", default=None, help="defect minus bulk electronic entropy from DOS files: "
                    "DEFECT.dat:EF_DEFECT,BULK.dat:EF_BULK (energy, states/eV)")
    th.add_argument("--out", default=None, help="output folder (default RUN/thermo)")
    th.add_argument("--quiet", action="store_true")
    _add_run_arg(th)
    dy = sub.add_parser("dynamics", help="MD of a defect minimum: hops, bonds, inherent structures, NEB",
                        description="Langevin MD (NVT, or NPT with --pressure) of a defect's lowest minimum "
                                    "with the MLIP, trajectory analysis (defect site and hops, neighbour "
                                    "distances, bond orientation), optional inherent-structure quenching and "
                                    "an NEB barrier + transition-state rate to another minimum.")
    dy.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    dy.add_argument("--defect", required=True)
    dy.add_argument("--charge", type=int, default=0)
    dy.add_argument("--T", dest="temperature", type=float, default=300.0, help="K")
    dy.add_argument("--steps", type=int, default=2000)
    dy.add_argument("--timestep", type=float, default=2.0, help="fs")
    dy.add_argument("--interval", type=int, default=20, help="steps between frames")
    dy.add_argument("--pressure", type=float, default=None, help="bar (NPT); default NVT")
    dy.add_argument("--quench", type=int, default=0, help="inherent structures from this many frames")
    dy.add_argument("--neb-to", type=int, default=None, help="NEB from minimum 0 to this minimum rank")
    dy.add_argument("--model", default=None)
    dy.add_argument("--seed", type=int, default=0)
    dy.add_argument("--out", default=None, help="output folder (default RUN/dynamics/<defect>)")
    dy.add_argument("--quiet", action="store_true")
    _add_run_arg(dy)
    pr = sub.add_parser("predictor", help="direct relaxed-structure predictor: train, predict, evaluate",
                        description="A defect-aware equivariant graph network mapping unrelaxed defect "
                                    "structures to relaxed coordinates in one pass.")
    psub = pr.add_subparsers(dest="predictor_command", required=True)
    pt = psub.add_parser("train", help="train on the 2DMD pairs (checkpoints resume)")
    pt.add_argument("--data", default="../shared/data/2dmd-high-density-pairs.tar.gz",
                    help="the 2DMD tarball or its unpacked folder")
    pt.add_argument("--out", default="runs/predictor",
                    help="folder for model.pt, its log and the graph cache")
    pt.add_argument("--materials", default="all", help="comma list of MoS2,WSe2,hBN,GaSe,InSe,BP or all")
    pt.add_argument("--per-material", action="store_true",
                    help="one model per material (OUT/<material>/model.pt) instead of one joint model")
    pt.add_argument("--epochs", type=int, default=20)
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--lr", type=float, default=2e-3)
    pt.add_argument("--features", type=int, default=32)
    pt.add_argument("--layers", type=int, default=3)
    pt.add_argument("--cutoff", type=float, default=5.0, help="graph cutoff (A)")
    pt.add_argument("--limit", type=int, default=None, help="first N training pairs per material")
    pt.add_argument("--device", default="cpu", help="cpu or cuda")
    pt.add_argument("--threads", type=int, default=None)
    pt.add_argument("--noise", type=float, default=0.0,
                    help="input-noise regulariser: Gaussian width (A) of a random shift of the input atoms")
    pt.add_argument("--compile", action="store_true",
                    help="torch.compile the training step (about 2x faster on CPU after ~1 min of compiling)")
    pt.add_argument("--init-from", default=None,
                    help="start from this checkpoint's weights with a fresh schedule (fine-tuning)")
    pt.add_argument("--seed", type=int, default=0,
                    help="random seed (initial weights, batch order); seeds make an ensemble")
    pt.add_argument("--seeds", type=int, default=1,
                    help="train N models (seeds --seed..--seed+N-1: model.pt, model_s1.pt, ...), an ensemble")
    pt.add_argument("--local-weight", type=float, default=0.0,
                    help="extra loss weight of atoms within 3 A of a defect site (the A3 metric's atoms)")
    pt.add_argument("--ema", type=float, default=0.0,
                    help="keep a moving average of the weights (decay per step, e.g. 0.999) as the model")
    pt.add_argument("--virtual-node", action="store_true",
                    help="a global node: every layer mixes each structure's mean features into its atoms")
    pt.add_argument("--norm", action="store_true",
                    help="LayerNorm on the scalar features each layer's MLPs read (stabler off-distribution)")
    pt.add_argument("--interpolate", type=float, default=0.0,
                    help="fraction of training inputs moved a random part of the way to the relaxed "
                         "structure (lets `--passes 2` refine a prediction)")
    pp = psub.add_parser("predict", help="predict the relaxed structure of an unrelaxed defect cell")
    pp.add_argument("model", help="model.pt from `defectml predictor train`; a,b,c.pt averages an ensemble")
    pp.add_argument("structure", help="unrelaxed defect supercell (CIF, POSCAR, extxyz, ...)")
    pp.add_argument("--pristine", required=True, help="the pristine supercell (or unit cell) of the host")
    pp.add_argument("-o", "--output", default=None, help="output file (default: <structure>_predicted.cif)")
    pp.add_argument("--passes", type=int, default=1,
                    help="apply the model N times, each on its last prediction (for --interpolate models)")
    pe = psub.add_parser("evaluate", help="coordinate MAE on the 2DMD test split vs the Dummy baseline")
    pe.add_argument("model", help="model.pt, or the folder of a --per-material run (all of "
                    "<material>/model*.pt, the seeds, averaged); a comma-separated list averages an ensemble")
    pe.add_argument("--data", default="../shared/data/2dmd-high-density-pairs.tar.gz")
    pe.add_argument("--out", default="runs/predictor")
    pe.add_argument("--materials", default="all")
    pe.add_argument("--passes", type=int, default=1,
                    help="apply the model N times, each on its last prediction (for --interpolate models)")
    return parser


def _say(quiet: bool):
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    return say


def cmd_search(a: argparse.Namespace) -> int:
    """`defectml search`: run the search and write the outputs."""
    from defectml.report import table, write_outputs
    from defectml.search import search
    from defectml.structure_io import read_structure

    host = read_structure(a.structure)
    say = _say(a.quiet)
    result = search(
        host, a.defect, _parse_charges(a.charge), out=a.out, db=a.db, settings=_search_settings(a),
        progress=not a.quiet, log_fn=say, **_execution(a),
    )
    extra = {
        "structure": str(a.structure), "model": result.model, "model_version": result.model_version,
        "settings_key": result.settings_key, "relaxed_this_run": result.relaxed,
        "skipped_already_done": result.skipped, "wall_time_s": round(result.seconds, 1),
        "dropped_trials": result.dropped,
    }
    doc = write_outputs(result.summaries, Path(a.out), extra)
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        print(table(result.summaries), end="")
        say(f"{result.relaxed} relaxed, {result.skipped} already done, "
            f"{result.seconds:.0f} s; results in {a.out}/ (summary.json, results.db)")
    return 0


def cmd_alloy(a: argparse.Namespace) -> int:
    """`defectml alloy`: random alloys, one search per composition, per local environment."""
    import dataclasses

    from defectml.alloy import make_alloy, parse_substitution
    from defectml.alloy_report import alloy_rows, alloy_table, plot_alloy
    from defectml.report import write_outputs
    from defectml.search import search
    from defectml.structure_io import read_structure, write_structure

    host = read_structure(a.structure)
    substitute = parse_substitution(a.substitute)
    try:
        fractions = [float(v) for v in a.x.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"cannot parse --x {a.x!r}: use e.g. 0.25,0.5") from None
    trials = _trial_settings(a)
    trials = dataclasses.replace(trials, all_pairs=True,
                                 pair_distortions=trials.pair_distortions
                                 or (-0.6, -0.5, -0.4, -0.3, -0.2))
    settings = _search_settings(a, sites="environment", trials=trials)
    say = _say(a.quiet)
    out = Path(a.out)
    rows = []
    for x in fractions:
        alloy = make_alloy(host, substitute, x, min_length=a.min_length, max_atoms=a.max_atoms,
                           seed=a.alloy_seed)
        folder = out / f"x_{x:g}"
        write_structure(alloy, folder / "alloy")
        say(f"x = {x:g}: {alloy.composition.formula} ({len(alloy)} atoms)")
        result = search(alloy, a.defect, _parse_charges(a.charge), out=folder, settings=settings,
                        progress=not a.quiet, log_fn=say, **_execution(a))
        write_outputs(result.summaries, folder, {"x": x, "model": result.model_version})
        rows += alloy_rows(x, result)
    (out / "alloy_summary.json").write_text(json.dumps(rows, indent=2))
    plot_alloy(rows, out / "energy_vs_environment.png")
    text = alloy_table(rows)
    (out / "alloy_summary.txt").write_text(text)
    print(json.dumps(rows, indent=2) if a.json else text, end="")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    """`defectml generate`: write trial POSCARs in ShakeNBreak's layout."""
    from defectml.search import SearchSettings, plan
    from defectml.structure_io import read_structure, to_structure

    host = read_structure(a.structure)
    settings = SearchSettings(
        min_length=a.min_length, max_atoms=a.max_atoms, force_diagonal=a.diagonal,
        oxidation_states=_parse_oxi(a.oxi), trials=_trial_settings(a), sites=a.sites,
        env_shells=a.shells,
    )
    items = plan(host, a.defect, _parse_charges(a.charge), settings)
    out = Path(a.out)
    say = _say(a.quiet)
    for it in items:
        folder = out / it.label
        meta = {"defect": it.defect.name, "charge": it.charge, "site": it.defect.site.tolist(),
                "defect_index": it.defect.defect_index, "trials": {}, "dropped": it.dropped}
        for t in it.trials:
            (folder / t.name).mkdir(parents=True, exist_ok=True)
            to_structure(t.atoms).to(filename=str(folder / t.name / "POSCAR"), fmt="poscar")
            meta["trials"][t.name] = {"seed": t.seed, "distortion": t.distortion,
                                      "distorted_indices": list(t.distorted_indices)}
        (folder / "distortion_metadata.json").write_text(json.dumps(meta, indent=2))
        say(f"{it.label}: {len(it.trials)} trials -> {folder}/")
    return 0


def _open_store(target: str):
    from defectml.store import ResultStore, is_url

    if not is_url(target):
        p = Path(target)
        target = p / "results.db" if p.is_dir() else p
        if not Path(target).exists():
            raise InputError(f"no results database at {target}")
    return ResultStore(target)


def _run_folder(target: str) -> Path:
    p = Path(target)
    return p if p.is_dir() else p.parent


def _run_key(store, target: str, key: str | None, fidelity: str = "mlip") -> str:
    """The run to work on: ``key``, else the only one, else the one the folder's summary names."""
    from defectml.store import is_url
    from defectml.summary import choose_run

    return choose_run(store, key, fidelity, None if is_url(target) else _run_folder(target))


def cmd_shortlist(a: argparse.Namespace) -> int:
    """`defectml shortlist`: choose minima for DFT and write their inputs."""
    from defectml.dft_inputs import load_overrides, write_inputs
    from defectml.shortlist import dft_calculator, relax_shortlist, select
    from defectml.structure_io import to_structure, write_structure
    from defectml.summary import summarise

    store = _open_store(a.run)
    summaries = summarise(store, _run_key(store, a.run, a.run_key), soap=_soap(a), threshold=a.soap_threshold,
                          max_drop=a.max_drop)
    overrides = load_overrides(a.overrides)
    codes = [c.strip() for c in a.codes.split(",") if c.strip()]
    out = Path(a.out) if a.out else _run_folder(a.run) / "dft"
    if a.calculator:
        dft_calculator(a.calculator)  # an unknown or missing code fails before any work
    doc = []
    for s in summaries:
        chosen = select(s, a.max_per_defect, a.window)
        entry = {"defect": s.defect, "charge": s.charge, "n_trials": len(s.trials),
                 "n_minima": len(s.minima), "shortlist": []}
        for m in chosen:
            folder = out / s.label / f"{m.rank:02d}_{m.trial.replace('%', 'pc')}"
            write_inputs(m.atoms, s.charge, folder, codes, overrides)
            write_structure(to_structure(m.atoms), folder / "structure")
            entry["shortlist"].append({"rank": m.rank, "trial": m.trial, "label": m.label,
                                       "delta_e_eV": round(m.delta_e, 4), "folder": str(folder),
                                       "control": m.contains_unperturbed and m.rank != 0})
        if a.calculator:
            ran = relax_shortlist(store, s, chosen, lambda q: dft_calculator(a.calculator, q),
                                  a.calculator, fmax=a.dft_fmax)
            entry["dft_relaxed"] = ran
        doc.append(entry)
        n = len(chosen)
        print(f"{s.label}: {n} of {len(s.minima)} minima -> DFT "
              f"({n} relaxations instead of {len(s.trials)}: {1 - n / max(len(s.trials), 1):.0%} saved)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "shortlist.json").write_text(json.dumps(doc, indent=2))
    if a.json:
        print(json.dumps(doc, indent=2))
    return 0


def cmd_ingest(a: argparse.Namespace) -> int:
    """`defectml ingest`: read DFT results into the store."""
    from defectml.ingest import ingest_relaxation, ingest_snb_folder
    from defectml.store import ResultStore

    out = Path(a.out)
    store = ResultStore(a.db or out / "results.db")
    path = Path(a.path)
    if a.defect is not None:
        if a.charge is None or a.site is None or a.host is None:
            raise InputError("a single relaxation needs --defect, --charge, --site x,y,z and --host")
        try:
            site = [float(x) for x in a.site.split(",")]
            charge = int(a.charge)
        except ValueError:
            raise InputError("--site takes x,y,z fractional coordinates, --charge an integer") from None
        report = ingest_relaxation(store, path, a.defect, charge, Path(a.host), site, a.trial,
                                   theory=a.theory, fmax=a.fmax)
    else:
        report = ingest_snb_folder(store, path, Path(a.host) if a.host else None, theory=a.theory,
                                   fmax=a.fmax)
    if not a.quiet:
        print(f"stored {report.stored} DFT relaxations ({', '.join(report.defects)})",
              file=sys.stderr)
        if report.unconverged:
            print(f"  {report.unconverged} not converged (max force above {a.fmax} eV/Å at the last "
                  "step): stored as unconverged, left out of the minima", file=sys.stderr)
        if report.unchecked:
            print(f"  {report.unchecked} without forces in their outputs: convergence not checked",
                  file=sys.stderr)
        for note in report.skipped:
            print(f"  skipped {note}", file=sys.stderr)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    """`defectml evaluate`: surrogate metrics, MLIP vs DFT."""
    from defectml.evaluate import evaluate, parity_plot, table, to_dict
    from defectml.summary import summarise

    kw = {"soap": _soap(a), "threshold": a.soap_threshold, "max_drop": a.max_drop}
    ml_store = _open_store(a.run)
    ml = summarise(ml_store, _run_key(ml_store, a.run, a.run_key), **kw)
    dft_store = _open_store(a.dft or a.run)
    dft = summarise(dft_store, _run_key(dft_store, a.dft or a.run, a.dft_run, "dft"), fidelity="dft", **kw)
    rows, summary = evaluate(ml, dft, max_per_defect=a.max_per_defect, window=a.window,
                             soap=_soap(a))
    if not rows:
        raise InputError("no defect and charge state is present in both the search and the DFT data")
    out = Path(a.out) if a.out else _run_folder(a.run)
    out.mkdir(parents=True, exist_ok=True)
    doc = to_dict(rows, summary)
    (out / "evaluation.json").write_text(json.dumps(doc, indent=2))
    parity_plot(rows, out / "evaluation_parity.png")
    print(json.dumps(doc, indent=2) if a.json else table(rows, summary), end="")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    """`defectml show`: rebuild and print the summary from the store."""
    from defectml.report import table
    from defectml.summary import summarise

    store = _open_store(a.run)
    fidelity = a.fidelity
    if fidelity == "auto":
        fidelity = "mlip" if store.count(kind="relaxation", fidelity="mlip") else "dft"
    summaries = summarise(store, _run_key(store, a.run, a.run_key, fidelity), soap=_soap(a),
                          threshold=a.soap_threshold, max_drop=a.max_drop, fidelity=fidelity)
    if a.json:
        print(json.dumps({"defects": [s.to_dict() for s in summaries]}, indent=2))
    else:
        print(table(summaries), end="")
    return 0


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

    store = _open_store(a.run)
    t = _temperatures(a.temperatures)
    charge_terms = {k: v for k, v in (("vbm", a.vbm), ("fermi_level", a.fermi),
                                      ("correction", a.correction)) if v is not None}
    settings = ThermoSettings(
        temperatures=t, mu=_key_values(a.mu, "--mu"), window=a.window, vibrations=a.vib,
        displacement=a.displacement, mesh=(a.mesh,) * 3, ti=a.ti, ti_t0=a.ti_t0, ti_t1=a.ti_t1,
        ti_repeats=a.ti_repeats, ti_switch_steps=a.ti_steps, charge_terms=charge_terms,
        electronic=_electronic(a.dos))
    results = thermo_from_store(store, settings, defect=a.defect, charge=a.charge, model=a.model,
                                run=_run_key(store, a.run, a.run_key), log=_say(a.quiet))
    base = Path(a.out) if a.out else (Path(a.run) if Path(a.run).is_dir() else Path(".")) / "thermo"
    for r in results:
        write(r, base / r.label)
        print(f"# {r.label} ({r.model})")
        print(table(r, every=max(1, len(t) // 10)), end="")
        for note in r.notes:
            print(f"note: {note}")
    print(f"written to {base}/", file=sys.stderr)
    return 0



def cmd_dynamics(a: argparse.Namespace) -> int:
    """`defectml dynamics`: MD + analysis (+ inherent structures, NEB) of a defect minimum."""
    from ase.io import write

    from defectml.summary import charge_label
    from defectml.thermo.from_store import dynamics_from_store

    if a.steps < 1 or a.temperature <= 0 or a.timestep <= 0:
        raise DefectMLError("--steps, --T and --timestep must be positive")
    store = _open_store(a.run)
    res = dynamics_from_store(store, defect=a.defect, charge=a.charge, temperature=a.temperature,
                              steps=a.steps, timestep=a.timestep, interval=a.interval,
                              pressure_bar=a.pressure, quench=a.quench, neb_to=a.neb_to, model=a.model,
                              seed=a.seed, run=_run_key(store, a.run, a.run_key), log=_say(a.quiet))
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


def _materials(text: str) -> list[str]:
    from defectml.predictor.data import MATERIALS

    chosen = list(MATERIALS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in chosen if m not in MATERIALS]
    if bad or not chosen:
        raise DefectMLError(f"unknown material(s) {', '.join(bad) or text!r}; "
                            f"choose from {', '.join(MATERIALS)}")
    return chosen


def cmd_predictor(a: argparse.Namespace) -> int:
    """`defectml predictor train|predict|evaluate`."""
    from defectml.predictor import data as pdata
    from defectml.predictor import prior
    from defectml.predictor import train as ptrain

    if a.predictor_command == "predict":
        from ase.io import write

        from defectml.predictor.predict import predict_relaxed
        from defectml.structure_io import read_structure, to_atoms

        model = ptrain.load_predictor(a.model)
        unrelaxed, pristine = (to_atoms(read_structure(x)) for x in (a.structure, a.pristine))
        out = predict_relaxed(model, unrelaxed, pristine, passes=_passes(a.passes))
        target = Path(a.output or Path(a.structure).with_suffix("").as_posix() + "_predicted.cif")
        write(target, out)
        print(f"wrote {target}")
        return 0
    out = Path(a.out)
    root = pdata.unpack(a.data, out / "cache")
    materials = _materials(a.materials)
    if a.predictor_command == "train":
        from tqdm.auto import tqdm

        if not 0.0 <= a.interpolate <= 1.0:
            raise DefectMLError(f"--interpolate {a.interpolate}: a fraction of the training inputs, 0 to 1")
        if a.seeds < 1:
            raise DefectMLError(f"--seeds {a.seeds}: train at least one model")

        from defectml.predictor.model import ModelConfig

        splits = [pdata.material_split(root, m, a.cutoff, out / "cache", limit=a.limit,
                                       progress=lambda x, m=m: tqdm(x, desc=f"graphs {m}", leave=False))
                  for m in materials]
        config = ModelConfig(features=a.features, layers=a.layers, cutoff=a.cutoff,
                             virtual_node=a.virtual_node, norm=a.norm)
        settings = ptrain.TrainSettings(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, device=a.device,
                                        threads=a.threads, noise=a.noise, compile=a.compile,
                                        init_from=a.init_from, seed=a.seed, local_weight=a.local_weight,
                                        ema=a.ema, interpolate=a.interpolate)
        groups = ([(out / s.material, [s]) for s in splits] if a.per_material else [(out, splits)])
        for folder, group in groups:
            for k in range(a.seeds):  # seed a.seed + k -> model.pt, model_s1.pt, ...: an ensemble
                target = folder / ("model.pt" if k == 0 else f"model_s{k}.pt")
                settings.seed = a.seed + k
                ptrain.train([g for s in group for g in s.train], [g for s in group for g in s.val],
                             target, config, settings,
                             log=lambda m, t=target: print(f"{t.parent.name}/{t.stem}: {m}", file=sys.stderr))
                print(f"model: {target}")
        return 0
    print(f"{'material':>8} {'model all':>9} {'A3':>7} {'dummy all':>9} {'A3':>7} {'A3 gain':>8}")
    specs = ptrain.predictor_paths(a.model)
    per_material = all(p.is_dir() for p in specs)
    shared = None if per_material else ptrain.load_predictor(specs)
    for m in materials:
        members = [q for p in specs for q in sorted((p / m).glob("model*.pt"))]  # every seed trained
        model = ptrain.load_predictor(members or [specs[0] / m / "model.pt"]) if per_material else shared
        split = pdata.material_split(root, m, model.config.cutoff, out / "cache")
        if prior.needs_prior(model):  # CHGNet features/forces as inputs (benchmark variants)
            prior.attach_priors(split.test, split.test_ids, cache=out / "cache" / f"prior_chgnet_{m}.pt")
        res, _ = ptrain.evaluate(model, split.test, passes=_passes(a.passes))
        dummy, _ = ptrain.evaluate(_Dummy(), split.test)
        print(f"{m:>8} {res['all']:9.4f} {res['A3']:7.4f} {dummy['all']:9.4f} {dummy['A3']:7.4f} "
              f"{1 - res['A3'] / dummy['A3']:8.1%}")
    return 0


def _passes(n: int) -> int:
    if n < 1:
        raise DefectMLError(f"--passes {n}: the model is applied at least once")
    return n


class _Dummy:
    """The "Dummy" baseline: the unrelaxed positions."""

    def eval(self):
        return self

    def __call__(self, batch):
        import torch

        return torch.zeros_like(batch.pos)


NEGATIVE_VALUE_OPTIONS = ("--charge", "--distortions", "--mu", "--T", "--vbm", "--fermi", "--correction")


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let ``--charge -2,-1`` and ``--distortions -0.4,0.4`` through argparse.

    argparse takes a value such as ``-0.4,0.4`` for an option flag; joining it to its option
    (``--distortions=-0.4,0.4``) removes the ambiguity.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in NEGATIVE_VALUE_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, 130 when interrupted)."""
    warnings.filterwarnings("ignore", module=r"(pymatgen|spglib|sevenn|dscribe|ase)(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning)
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    handler = {"search": cmd_search, "generate": cmd_generate, "show": cmd_show,
               "shortlist": cmd_shortlist, "ingest": cmd_ingest, "evaluate": cmd_evaluate,
               "alloy": cmd_alloy, "thermo": cmd_thermo, "predictor": cmd_predictor,
               "dynamics": cmd_dynamics}[args.command]
    try:
        return handler(args)
    except DefectMLError as exc:
        print(f"defectml: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectml: interrupted; finished relaxations are saved, rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
