"""`defectml search | alloy | generate | show`: the search and its summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from defectml.cli.common import (
    EPILOG,
    add_analysis_args,
    add_search_args,
    add_structure_args,
    execution,
    messages,
    open_store,
    parse_charges,
    run_key,
    search_settings,
    soap,
    trial_settings,
    write_settings,
)
from defectml.errors import InputError


def add_parsers(sub) -> None:
    """Add this area's commands to the ``defectml`` subparsers."""
    s = sub.add_parser(
        "search", help="distort, relax with an MLIP, and rank the unique minima of each defect",
        description="Generate defects and distorted trials, relax every trial with an MLIP, "
                    "group the relaxed structures by a SOAP fingerprint of the defect site and "
                    "rank the unique minima. Every relaxation is saved at once in "
                    "OUT/results.db; rerunning the same command resumes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_structure_args(s, defect_required=False)
    s.add_argument("--trials-from", default=None, metavar="SNB_DIR",
                   help="a ShakeNBreak folder (SNB_DIR/<defect>_<q>/<trial>/POSCAR and "
                        "distortion_metadata.json): its POSCARs, as they are, are the trials and their "
                        "cell the supercell (supercell and trial options do not apply); --defect and "
                        "--charge pick folders (default: all); _High_Energy folders are left out")
    s.add_argument("--out", default="runs/defectml", help="output folder (runs/defectml)")
    s.add_argument("--no-report", action="store_true", help="do not write OUT/report.html")
    add_search_args(s)
    add_analysis_args(s)

    rp = sub.add_parser(
        "report", help="a self-contained HTML report of a run (opens offline in any browser)",
        description="Minima tables, interactive energy-vs-distortion plots and 3D views of each "
                    "minimum (defect site and new bonds marked), every warning, and the DFT "
                    "evaluation, thermodynamics and active-loop results the run folder holds.",
    )
    rp.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    rp.add_argument("--out", default=None, help="the HTML file (default RUN/report.html)")
    add_analysis_args(rp)

    al = sub.add_parser(
        "alloy", help="defects in random alloys: one search per composition and local environment",
        description="Build random-substitution supercells (seeded) for each fraction x, group the "
                    "defect sites by their neighbour-shell chemistry, and search one site per "
                    "environment with bond distortions on every pair of first-shell neighbours "
                    "(--pair-distortions, -0.6..-0.2 by default) plus the standard trials.",
    )
    add_structure_args(al)
    al.add_argument("--substitute", required=True, help="OLD:NEW, e.g. Te:Se")
    al.add_argument("--x", default="0.25,0.5,0.75", help="fractions of OLD replaced (0.25,0.5,0.75)")
    al.add_argument("--alloy-seed", type=int, default=0, help="seed of the random substitution (0)")
    al.add_argument("--out", default="runs/alloy", help="output folder (runs/alloy)")
    add_search_args(al)
    add_analysis_args(al)

    g = sub.add_parser(
        "generate", help="write the trial structures only (POSCARs), e.g. to run DFT elsewhere",
        description="Write every trial structure as OUT/<defect>_<charge>/<trial>/POSCAR, in "
                    "ShakeNBreak's folder layout, with distortion_metadata.json. No model used.",
    )
    add_structure_args(g)
    g.add_argument("--out", default="trials", help="output folder (trials)")
    g.add_argument("--quiet", "-q", action="store_true", help="no messages")

    sh = sub.add_parser("show", help="re-print the summary of a finished (or partial) search",
                        description="Rebuild the minima table from the results database.")
    sh.add_argument("run", help="a search output folder (or its results.db, or a database URL)")
    sh.add_argument("--fidelity", choices=("auto", "mlip", "dft"), default="auto",
                    help="which results: MLIP searches, DFT, or auto (MLIP if any, else DFT)")
    add_analysis_args(sh)


def cmd_search(a: argparse.Namespace) -> int:
    """`defectml search`: run the search and write the outputs."""
    from defectml.search import search
    from defectml.search.report import table, write_outputs
    from defectml.structure_io import read_structure

    if a.defect is None and not a.trials_from:
        raise InputError("--defect is required: v_Cd, Se_Te, Cd_i, a JSON file of defects or all (or "
                         "--trials-from SNB_DIR: a ShakeNBreak folder's trials)")
    if a.trials_from:  # settings.yaml keeps it absolute: --config reruns it from anywhere
        a.trials_from = str(Path(a.trials_from).resolve())
    host = read_structure(a.structure)
    say = messages(a.quiet)
    settings = search_settings(a, trials_from=a.trials_from)
    result = search(host, a.defect or "all", parse_charges(a.charge), out=a.out, db=a.db,
                    settings=settings, progress=not a.quiet, log_fn=say, **execution(a))
    extra = {
        "structure": str(a.structure), "model": result.model, "model_version": result.model_version,
        "settings_key": result.settings_key, "relaxed_this_run": result.relaxed,
        "skipped_already_done": result.skipped, "wall_time_s": round(result.seconds, 1),
        "dropped_trials": result.dropped,
    }
    doc = write_outputs(result.summaries, Path(a.out), extra)
    write_settings(a, Path(a.out), settings)
    if not a.no_report:
        from defectml.search.html_report import write_report

        write_report(result.summaries, Path(a.out) / "report.html", folder=Path(a.out),
                     meta={"model": result.model_version, "run": result.settings_key,
                           "host": a.structure, "wall time": f"{result.seconds:.0f} s"})
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        print(table(result.summaries), end="")
        say(f"{result.relaxed} relaxed, {result.skipped} already done, "
            f"{result.seconds:.0f} s; results in {a.out}/ (summary.json, results.db)")
    return 0


def cmd_alloy(a: argparse.Namespace) -> int:
    """`defectml alloy`: random alloys, one search per composition, per local environment."""
    from defectml.search.alloy import parse_substitution
    from defectml.search.alloy_report import alloy_rows, alloy_table, plot_alloy
    from defectml.search.alloy_run import alloy_trials, search_composition
    from defectml.search.report import write_outputs
    from defectml.structure_io import read_structure

    host = read_structure(a.structure)
    substitute = parse_substitution(a.substitute)
    try:
        fractions = [float(v) for v in a.x.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"cannot parse --x {a.x!r}: use e.g. 0.25,0.5") from None
    settings = search_settings(a, sites="environment", trials=alloy_trials(trial_settings(a)))
    say = messages(a.quiet)
    out = Path(a.out)
    rows = []
    for x in fractions:
        folder = out / f"x_{x:g}"
        _, result = search_composition(host, substitute, x, a.defect, parse_charges(a.charge), folder,
                                       settings, seed=a.alloy_seed, progress=not a.quiet, log_fn=say,
                                       execution=execution(a))
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
    from defectml.dft.inputs import write_trial_folders
    from defectml.search import SearchSettings, plan
    from defectml.structure_io import read_structure

    host = read_structure(a.structure)
    settings = SearchSettings.from_options(a)  # supercell and trial options; no model
    from defectml.search.defects import host_of, resolve_defects

    defects = resolve_defects(a.defect)
    if not isinstance(defects, str):
        host = host_of(defects, host)
    items = plan(host, defects, parse_charges(a.charge), settings, reference=host)
    say = messages(a.quiet)
    for label, n, folder in write_trial_folders(items, Path(a.out)):
        say(f"{label}: {n} trials -> {folder}/")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    """`defectml show`: rebuild and print the summary from the store."""
    from defectml.search.report import table
    from defectml.search.summary import summarise

    store = open_store(a.run)
    fidelity = a.fidelity
    if fidelity == "auto":
        fidelity = "mlip" if store.count(kind="relaxation", fidelity="mlip") else "dft"
    summaries = summarise(store, run_key(store, a.run, a.run_key, fidelity), soap=soap(a),
                          threshold=a.soap_threshold, max_drop=a.max_drop, max_rise=a.max_rise,
                          fidelity=fidelity)
    loop = _loop_state(a.run)
    if a.json:
        print(json.dumps({"defects": [s.to_dict() for s in summaries],
                          **({"loop": loop["status"]} if loop and loop.get("status") else {})}, indent=2))
    else:
        print(table(summaries), end="")
        if loop:
            from defectml.dft.loop import loop_text

            print(f"\nactive loop ({Path(a.run) / 'loop' / 'loop.json'}):\n{loop_text(loop)}")
    return 0


def _loop_state(run: str) -> dict | None:
    """The run folder's active-loop record (``RUN/loop/loop.json``), if it has one."""
    from defectml.store import is_url

    if is_url(run):
        return None
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    path = folder / "loop" / "loop.json"
    return json.loads(path.read_text()) if path.exists() else None


def cmd_report(a: argparse.Namespace) -> int:
    """`defectml report`: the run's HTML report."""
    from defectml.search.html_report import write_report
    from defectml.search.summary import summarise
    from defectml.store import is_url

    store = open_store(a.run)
    key = run_key(store, a.run, a.run_key)
    summaries = summarise(store, key, soap=soap(a), threshold=a.soap_threshold, max_drop=a.max_drop,
                          max_rise=a.max_rise)
    folder = None if is_url(a.run) else (Path(a.run) if Path(a.run).is_dir() else Path(a.run).parent)
    out = Path(a.out) if a.out else (folder or Path(".")) / "report.html"
    models = sorted({s.model for s in summaries})
    path = write_report(summaries, out, folder=folder,
                        meta={"model": ", ".join(models), "run": key, "store": store.target})
    if not a.quiet:
        print(f"report: {path}")
    return 0
