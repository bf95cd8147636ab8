"""`defectml shortlist | ingest | evaluate`: what goes to DFT and what comes back."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from defectml.cli.common import add_analysis_args, add_run_arg, open_store, run_folder, run_key, soap
from defectml.errors import InputError


def add_parsers(sub) -> None:
    """Add this area's commands to the ``defectml`` subparsers."""
    from defectml.dft.loop import RULES, STARTS, LoopSettings

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
    sl.add_argument("--lattice", choices=("input", "model"), default="input",
                    help="write the structures on the host lattice as given to the search (input, "
                         "default: the DFT one a bulk reference uses) or the model's relaxed one")
    sl.add_argument("--calculator", default=None,
                    help="also relax the shortlist here with this DFT code (gpaw; emt for tests) "
                         "and store the results as fidelity=dft")
    sl.add_argument("--dft-fmax", type=float, default=0.05, help="force threshold for --calculator")
    add_analysis_args(sl)

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
    add_analysis_args(ev)

    lp = sub.add_parser(
        "loop", help="the active loop: DFT where the model is unsure, learn from it, repeat",
        description="From a finished search: each round picks --k trials per defect and charge for "
                    "DFT (by --rule), asks the oracle from where --dft-start says (the trial's own "
                    "start, as ShakeNBreak does; the model's minimum; or auto: the trial's until the "
                    "model reproduces its DFT), fine-tunes a committee on every DFT relaxation so far "
                    "(their paths too), checks that the model re-relaxes each DFT end point into its "
                    "own basin and orders the DFT minima as DFT does (training further, up to "
                    "--fit-attempts, while it does not), re-relaxes every trial with it and scores "
                    "each minimum by the committee's spread. A defect is converged only when the model "
                    "reproduces its DFT, the DFT lowest has not changed for --patience rounds and "
                    "every minimum within --window is confirmed by a DFT relaxation that ended in it, "
                    "refuted by DFT, or trusted by a spread threshold calibrated on DFT it had not "
                    "seen. The answer is DFT's lowest structure. Oracles: replay:DIR (a finished "
                    "ShakeNBreak DFT search, for benchmarks: answers only its own starts, so search "
                    "with --trials-from DIR), folder:DIR (VASP inputs written there; run them, then "
                    "run the loop again to read the results), calculator:NAME (relaxed here: gpaw; xtb "
                    "(GFN1-xTB) or a shipped model, stand-ins for DFT). Every round is stored; a "
                    "killed loop resumes.",
    )
    d = LoopSettings()
    lp.add_argument("run", help="the search (folder, results.db or URL)")
    lp.add_argument("--oracle", required=True,
                    help="replay:DIR, folder:DIR or calculator:NAME (gpaw, xtb, emt, or a model as a "
                         "stand-in for DFT, e.g. chgnet-0.2.0 or chgnet+well:Se-Se:0.4:2.45:0.35)")
    lp.add_argument("--out", default=None, help="loop state and models (default: RUN/loop)")
    lp.add_argument("--defect", default=None,
                    help="only these defect labels, comma-separated (e.g. Mg_O_0,Mg_O_+2; default: all)")
    lp.add_argument("--k", type=int, default=None, help=f"DFT relaxations per defect and charge per round "
                    f"({d.k})")
    lp.add_argument("--explore-k", type=int, default=None,
                    help="DFT relaxations in a round where every minimum of the model is settled (only "
                         "blind exploration: a kind of trial not yet asked, then the distortion farthest "
                         f"from those asked) ({d.explore_k})")
    lp.add_argument("--rule", choices=RULES, default=None,
                    help="which trials go to DFT: lowest predicted energy; one per minimum DFT has not "
                         f"settled; the most uncertain such minima; or alternately the last two ({d.rule})")
    lp.add_argument("--dft-start", choices=STARTS, default=None,
                    help="where DFT starts: the trial's own unrelaxed start; the model's minimum; or "
                         f"auto: the trial's until the model reproduces its DFT ({d.dft_start})")
    lp.add_argument("--budget", type=int, default=None, help="DFT relaxations in all (default: no limit)")
    lp.add_argument("--max-rounds", type=int, default=None, help=f"rounds at most ({d.max_rounds})")
    lp.add_argument("--patience", type=int, default=None,
                    help=f"rounds the DFT lowest must stay unchanged ({d.patience})")
    lp.add_argument("--tolerance", type=float, default=None,
                    help=f"a new DFT lowest counts as a change when this much lower, eV ({d.tolerance})")
    lp.add_argument("--window", type=float, default=None,
                    help=f"minima within this many eV of the lowest must be settled by DFT ({d.window})")
    lp.add_argument("--threshold", type=float, default=None,
                    help=f"force spread (eV/Å) flagged in tables ({d.threshold})")
    lp.add_argument("--trust-error", type=float, default=None,
                    help="force error (eV/Å) a calibrated-trusted structure may have; the spread "
                         f"threshold is chosen from it on DFT the committee had not seen ({d.trust_error})")
    lp.add_argument("--max-rmsd", type=float, default=None,
                    help=f"largest RMSD (Å) of the defect's neighbourhood within one basin ({d.max_rmsd})")
    lp.add_argument("--order-tol", type=float, default=None,
                    help=f"tolerance (eV) of the model's order of the DFT minima ({d.order_tol})")
    lp.add_argument("--fit-attempts", type=int, default=None,
                    help=f"trainings per round while the model does not reproduce its DFT ({d.fit_attempts})")
    lp.add_argument("--committee", type=int, default=None,
                    help=f"models per round (1: no trust score) ({d.committee})")
    lp.add_argument("--base", default=None,
                    help="model round 1 starts from (default: the search's model; CHGNet or SevenNet)")
    lp.add_argument("--epochs", type=int, default=None,
                    help=f"fine-tuning epochs at most, first attempt of a round ({d.training.epochs})")
    lp.add_argument("--lr", type=float, default=None, help=f"fine-tuning learning rate ({d.training.lr})")
    lp.add_argument("--energy-weight", type=float, default=None,
                    help="loss weight of energies (a 1 eV defect energy is ~5 meV/atom in 200 atoms) "
                         f"({d.training.energy_weight})")
    lp.add_argument("--strategy", choices=("standard", "replay"), default=None,
                    help="fine-tuning strategy (replay: base-labelled crystals mixed in) "
                         f"({d.training.strategy})")
    lp.add_argument("--frames-per-relaxation", type=int, default=None,
                    help="frames learnt per DFT relaxation, its path evenly spaced, the end point "
                         f"always; 0: every frame ({d.frames_per_relaxation})")
    lp.add_argument("--holdout", type=float, default=None,
                    help=f"share of DFT relaxations held back for early stopping ({d.holdout})")
    lp.add_argument("--fmax", type=float, default=None,
                    help=f"force threshold of every relaxation, eV/Å ({d.relaxation.fmax})")
    lp.add_argument("--max-steps", type=int, default=None, help=f"step limit of the MLIP relaxations "
                    f"({d.relaxation.max_steps})")
    lp.add_argument("--relax-batch", type=int, default=None,
                    help="trials relaxed together by the model, one call per step "
                         f"({d.relaxation.batch_size})")
    lp.add_argument("--oracle-steps", type=int, default=300, help="step limit of a calculator oracle (300)")
    lp.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=None,
                    help="stop a re-relaxation in a known basin (default); --no-early-stop: relax every "
                         "trial to the end")
    lp.add_argument("--seed", type=int, default=None, help=f"committee seeds and hold-out draws ({d.seed})")
    lp.add_argument("--device", default=None, help=f"cpu or cuda ({d.device})")
    lp.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores)")
    add_run_arg(lp)
    lp.add_argument("--json", action="store_true",
                    help="print, per defect, its status, DFT relaxations and ionic steps, the answer, "
                         "whether the model reproduces its DFT and the final minima; and the loop's status")
    lp.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")

    ex = sub.add_parser(
        "export", help="minima out to ShakeNBreak folders or DefectEntry JSON (doped, "
                       "pymatgen-analysis-defects)",
        description="snb: every relaxed trial in ShakeNBreak's layout (<defect>_<q>/Bond_Distortion_X%%/"
                    "{POSCAR,CONTCAR}, <defect>_<q>.yaml energies, distortion_metadata.json) for "
                    "snb-analyse / snb-plot; entries: the lowest minimum of each defect and charge as a "
                    "pymatgen-analysis-defects DefectEntry JSON (doped's DefectEntry extends it). "
                    "Energies are the model's.",
    )
    ex.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    ex.add_argument("--format", choices=("snb", "entries"), required=True,
                    help="snb (ShakeNBreak folders) or entries (DefectEntry JSON files)")
    ex.add_argument("--out", required=True, help="output folder")
    add_analysis_args(ex)


def cmd_shortlist(a: argparse.Namespace) -> int:
    """`defectml shortlist`: choose minima for DFT and write their inputs."""
    from defectml.dft.inputs import load_overrides
    from defectml.dft.shortlist import ShortlistRequest, dft_calculator, write_shortlist
    from defectml.search.summary import summarise

    store = open_store(a.run)
    summaries = summarise(store, run_key(store, a.run, a.run_key), soap=soap(a), threshold=a.soap_threshold,
                          max_drop=a.max_drop, max_rise=a.max_rise)
    if a.calculator:
        dft_calculator(a.calculator)  # an unknown or missing code fails before any work
    request = ShortlistRequest(
        out=Path(a.out) if a.out else run_folder(a.run) / "dft",
        codes=[c.strip() for c in a.codes.split(",") if c.strip()], overrides=load_overrides(a.overrides),
        max_per_defect=a.max_per_defect, window=a.window, lattice=a.lattice, calculator=a.calculator,
        dft_fmax=a.dft_fmax)
    doc = write_shortlist(store, summaries, request, say=print)
    if a.json:
        print(json.dumps(doc, indent=2))
    return 0


def cmd_ingest(a: argparse.Namespace) -> int:
    """`defectml ingest`: read DFT results into the store."""
    from defectml.dft.ingest import ingest_relaxation, ingest_snb_folder
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
    from defectml.dft.evaluate import evaluate, parity_plot, table, to_dict
    from defectml.search.summary import summarise

    kw = {"soap": soap(a), "threshold": a.soap_threshold, "max_drop": a.max_drop, "max_rise": a.max_rise}
    ml_store = open_store(a.run)
    ml = summarise(ml_store, run_key(ml_store, a.run, a.run_key), **kw)
    dft_store = open_store(a.dft or a.run)
    dft = summarise(dft_store, run_key(dft_store, a.dft or a.run, a.dft_run, "dft"), fidelity="dft", **kw)
    rows, summary = evaluate(ml, dft, max_per_defect=a.max_per_defect, window=a.window,
                             soap=soap(a))
    if not rows:
        raise InputError("no defect and charge state is present in both the search and the DFT data")
    out = Path(a.out) if a.out else run_folder(a.run)
    out.mkdir(parents=True, exist_ok=True)
    doc = to_dict(rows, summary)
    (out / "evaluation.json").write_text(json.dumps(doc, indent=2))
    parity_plot(rows, out / "evaluation_parity.png")
    print(json.dumps(doc, indent=2) if a.json else table(rows, summary), end="")
    return 0


def cmd_loop(a: argparse.Namespace) -> int:
    """`defectml loop`: the active loop on a finished search."""
    from defectml.cli.common import messages
    from defectml.dft.loop import LoopSettings, run_loop
    from defectml.dft.oracle import parse_oracle

    s = LoopSettings.from_options(a)  # bad numbers fail before anything is opened
    oracle = parse_oracle(a.oracle, s.relaxation.fmax, a.oracle_steps, device=s.device, threads=s.threads)
    store = open_store(a.run)
    key = run_key(store, a.run, a.run_key)
    only = {x.strip() for x in a.defect.split(",") if x.strip()} if a.defect else None
    out = Path(a.out) if a.out else run_folder(a.run) / "loop"
    say = messages(a.quiet)
    result = run_loop(store, key, oracle, s, out, only=only, log=say, progress=not a.quiet)
    if a.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(loop_table(result))
    if result.status == "waiting":
        print(f"waiting for {len(result.pending)} DFT result(s):", file=sys.stderr)
        for p in result.pending:
            print(f"  {p}", file=sys.stderr)
        print("put vasprun.xml/OUTCAR (or result.extxyz) there, then run the same command again",
              file=sys.stderr)
    return 0


def loop_table(result) -> str:
    """Rounds, picks, the model's check against its DFT and each defect's answer, for people."""
    from defectml.dft.loop import loop_text

    return loop_text({"rounds": result.rounds, "status": {**result.to_dict()}})


def cmd_export(a: argparse.Namespace) -> int:
    """`defectml export`: ShakeNBreak folders or DefectEntry JSON."""
    from defectml.dft.export import write_defect_entries, write_snb_folders
    from defectml.search.summary import charge_label, summarise, trial_start

    store = open_store(a.run)
    key = run_key(store, a.run, a.run_key)
    summaries = summarise(store, key, soap=soap(a), threshold=a.soap_threshold, max_drop=a.max_drop,
                          max_rise=a.max_rise)
    out = Path(a.out)
    if a.format == "snb":
        starts = {}
        for row in store.select(kind="relaxation", settings_key=key):
            start = trial_start(row)
            if start is not None:
                starts[(charge_label(row.defect, int(row.charge_state)), row.trial)] = start
        written = write_snb_folders(summaries, out, starts)
    else:
        written = write_defect_entries(store, summaries, out)
    if not a.quiet:
        for path in written:
            print(path)
    return 0
