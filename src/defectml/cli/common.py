"""What the command modules share: option groups, parsers of option values, the store and run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from defectml.core.optimizers import OPTIMIZERS
from defectml.errors import InputError
from defectml.models.ref import BUILTIN_MODELS
from defectml.search.distort import TrialSettings
from defectml.search.fingerprint import SoapSettings
from defectml.search.landscape import DEFAULT_MAX_RISE, DEFAULT_PHASE_CHANGE_DROP, DEFAULT_SOAP_THRESHOLD

EPILOG = """examples:
  defectml search examples/CdTe.cif --defect v_Cd --charge 0 --out runs/cdte
  defectml search host.cif --defect all --out runs/all          # every native defect, default charges
  defectml generate examples/CdTe.cif --defect v_Cd --charge 0,-1 --out trials/   # for DFT elsewhere
  defectml show runs/cdte
  defectml shortlist runs/cdte --window 0.5                 # DFT inputs for the unique minima
  defectml ingest snb_folders/ --out runs/dft               # ShakeNBreak/VASP results in
  defectml evaluate runs/cdte --dft runs/dft                # surrogate vs DFT metrics
"""


def parse_charges(text: str | None) -> list[int] | None:
    """``--charge``: 0, -2,-1,0 or -2:0 (``None``: each defect's defaults)."""
    if text is None:
        return None
    try:
        if ":" in text:
            lo, hi = (int(x) for x in text.split(":"))
            return list(range(min(lo, hi), max(lo, hi) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"cannot parse --charge {text!r}: use 0, -2,-1,0 or -2:0") from None


def add_structure_args(p: argparse.ArgumentParser, defect_required: bool = True) -> None:
    """The host, defect, charge, supercell and trial options.

    Each option is named for the settings field it sets (:class:`~defectml.search.SearchSettings`,
    :class:`~defectml.search.distort.TrialSettings`); older spellings stay as aliases. Defaults are
    ``None``: the dataclass decides, and the help quotes it.

    ``defect_required=False``: the command checks ``--defect`` itself (``search --trials-from``
    takes every folder's defect without it).
    """
    from defectml.search.pipeline import SearchSettings as S

    T = TrialSettings
    p.add_argument("structure", help="host crystal: CIF, POSCAR, extxyz or any ASE/pymatgen format")
    p.add_argument("--defect", required=defect_required,
                   help="v_Cd (vacancy), Se_Te (Se on a Te site), Cd_i or Te_i_C3v "
                        "(interstitial), comma-separated, or 'all' (every vacancy, antisite and native "
                        "interstitial: often hundreds of relaxations, so say it); or a JSON file of "
                        "pymatgen-analysis-defects/doped Defect or DefectEntry objects or a doped "
                        "DefectsGenerator (their own host cell is used); with search --trials-from: "
                        "which of the folder's defects (default: all)")
    p.add_argument("--charge", default=None,
                   help="charge state(s): 0, -2,-1,0 or -2:0 (default: each defect's defaults)")
    p.add_argument("--oxidation-states", "--oxi", default=None, metavar="EL=N,...",
                   help="oxidation-state overrides, e.g. Cd=2,Te=-2")
    g = p.add_argument_group("supercell")
    g.add_argument("--min-length", type=float, default=None,
                   help=f"minimum distance between periodic images of the defect, Å ({S.min_length})")
    g.add_argument("--max-atoms", type=int, default=None, help=f"largest supercell allowed ({S.max_atoms})")
    g.add_argument("--force-diagonal", "--diagonal", action=argparse.BooleanOptionalAction, default=None,
                   help="only diagonal supercell matrices (off by default)")
    t = p.add_argument_group("trials")
    t.add_argument("--distortions", default=None,
                   help="bond-distortion factors: -0.6:0.6:0.1 (default) or a list -0.4,-0.2,0.2")
    t.add_argument("--rattle-stdev", type=float, default=None,
                   help="rattle standard deviation, Å (default 10%% of the bulk bond length)")
    t.add_argument("--dimer-distance", type=float, default=None,
                   help=f"bond length of the vacancy Dimer trial, Å ({T.dimer_distance})")
    t.add_argument("--dimer", action=argparse.BooleanOptionalAction, default=None,
                   help="the vacancy Dimer trial (on by default)")
    t.add_argument("--rattled", action=argparse.BooleanOptionalAction, default=None,
                   help="the rattle-only trial (on by default)")
    t.add_argument("--off-centre", type=float, default=None, metavar="Å",
                   help="also move a substituted or interstitial atom this far off its site, toward "
                        "a first-shell bond, edge and face (Off_Centre_1..3 trials; e.g. 1.0)")
    t.add_argument("--all-pairs", action=argparse.BooleanOptionalAction, default=None,
                   help="also distort every other combination of first-shell neighbours (alloys; off by "
                        "default)")
    t.add_argument("--pair-distortions", default=None,
                   help="factors for the --all-pairs trials (default: the --distortions)")
    t.add_argument("--seed", type=int, default=None, help=f"base random seed ({T.seed})")
    t.add_argument("--sites", choices=("symmetry", "environment"), default=None,
                   help="symmetry: inequivalent sites of an ordered host (default); environment: "
                        "one site per local chemical environment of the cell as given (alloys)")
    t.add_argument("--env-shells", "--shells", type=int, default=None,
                   help=f"neighbour shells that define an environment ({S.env_shells})")


def trial_settings(a: argparse.Namespace) -> TrialSettings:
    """The trial settings from the parsed options."""
    return TrialSettings.from_options(a)


def add_search_args(s: argparse.ArgumentParser) -> None:
    """Model, relaxation and execution options (named for their settings fields, defaults ``None``)."""
    from defectml.search.pipeline import SearchSettings as S

    s.add_argument("--db", default=None,
                   help="results database: SQLite path or postgresql:// URL (OUT/results.db)")
    m = s.add_argument_group("model and relaxation")
    m.add_argument("--model", default=None,
                   help=f"built-in: {', '.join(BUILTIN_MODELS)} ({S.model} by default; NAME@HEAD picks a "
                        "SevenNet head); or a weights file: CHGNet .pth.tar, SevenNet .pth[@HEAD], "
                        "MACE .model")
    m.add_argument("--device", default=None, help=f"cpu or cuda ({S.device})")
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores)")
    m.add_argument("--fmax", type=float, default=None, help=f"force threshold, eV/Å ({S.fmax})")
    m.add_argument("--max-steps", type=int, default=None, help=f"step limit of a relaxation ({S.max_steps})")
    m.add_argument("--relax-host", action=argparse.BooleanOptionalAction, default=None,
                   help="relax the host cell with the model first (default); --no-relax-host: use the "
                        "host cell as given")
    m.add_argument("--pre-relax", default=None, metavar="MODEL.pt",
                   help="move every trial to a trained direct predictor's relaxed positions first "
                        "(a,b.pt: the average of an ensemble)")
    m.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"how each relaxation steps: {', '.join(OPTIMIZERS)} (ASE's, batched; "
                        f"{S.optimizer} by default; see benchmarks/results/optimizers.md)")
    m.add_argument("--polish-fmax", type=float, default=None, metavar="EV_PER_A",
                   help="rank minima on energies continued to this force threshold: each minimum's "
                        "lowest and highest relaxations and the Unperturbed one (0: rank on --fmax "
                        f"energies; {S.polish_fmax})")
    m.add_argument("--polish-members", type=int, default=None, metavar="N",
                   help="relaxations polished per minimum: the lowest, the highest, then the next lowest "
                        f"(0: all; {S.polish_members})")
    m.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=None,
                   help="stop a relaxation once it reaches the basin of an already relaxed "
                        "minimum (same defect-site SOAP, energy within 0.05 eV; off by default)")
    x = s.add_argument_group("execution")
    x.add_argument("--workers", type=int, default=1,
                   help="worker processes (1: this process); torch threads are split among them")
    x.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local process pool (default) or Dask distributed")
    x.add_argument("--scheduler", default=None,
                   help="Dask scheduler address, e.g. tcp://head:8786 (default: a LocalCluster)")
    x.add_argument("--batch-size", type=int, default=None,
                   help="trials relaxed together, one model call per step for all (1; with --batch-memory: "
                        "as many as fit)")
    x.add_argument("--batch-memory", type=float, default=None, metavar="GB",
                   help="fill the batch while the model's estimated memory of it stays within this many GB "
                        "(finished trials leave, waiting ones enter; CHGNet, --workers 1; estimates "
                        "measured on CPU: benchmarks/results/batch_memory.md)")


def search_settings(a: argparse.Namespace, **over):
    """The search settings from the parsed options (``over`` replaces any field)."""
    from defectml.search import SearchSettings

    return SearchSettings.from_options(a, **over)


def execution(a: argparse.Namespace) -> dict:
    """Where relaxations run, from the parsed options."""
    return {"workers": a.workers, "executor": a.executor, "scheduler": a.scheduler,
            "batch_size": a.batch_size, "batch_memory_gb": a.batch_memory}


def add_run_arg(p: argparse.ArgumentParser) -> None:
    """``--run KEY``: which run of a store to work on."""
    p.add_argument("--run", dest="run_key", default=None, metavar="KEY",
                   help="which run in the store (a settings key or a unique prefix; default: the only "
                        "one, or the one this folder's summary.json names)")


def add_analysis_args(p: argparse.ArgumentParser) -> None:
    """Options that decide how relaxed trials group into minima, and output options."""
    add_run_arg(p)
    g = p.add_argument_group("telling minima apart")
    g.add_argument("--soap-threshold", type=float, default=DEFAULT_SOAP_THRESHOLD,
                   help=f"SOAP cosine distance below which two relaxed trials are one minimum "
                        f"({DEFAULT_SOAP_THRESHOLD})")
    d = SoapSettings()
    g.add_argument("--soap-r-cut", "--soap-rcut", type=float, default=None,
                   help=f"SOAP cutoff, Å ({d.r_cut})")
    g.add_argument("--soap-n-max", "--soap-nmax", type=int, default=None,
                   help=f"SOAP radial basis size ({d.n_max})")
    g.add_argument("--soap-l-max", "--soap-lmax", type=int, default=None,
                   help=f"SOAP max angular degree ({d.l_max})")
    g.add_argument("--soap-sigma", type=float, default=None, help=f"SOAP Gaussian width, Å ({d.sigma})")
    g.add_argument("--max-drop", type=float, default=DEFAULT_PHASE_CHANGE_DROP,
                   help="quarantine relaxations this many eV below the median as phase changes "
                        f"({DEFAULT_PHASE_CHANGE_DROP})")
    g.add_argument("--max-rise", type=float, default=DEFAULT_MAX_RISE,
                   help="quarantine relaxations this many eV above the Unperturbed one (the median "
                        f"where there is none) as broken, high-energy structures ({DEFAULT_MAX_RISE})")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of a table")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")


def soap(a: argparse.Namespace) -> SoapSettings:
    """SOAP settings from the parsed options."""
    return SoapSettings.from_options(a)


def messages(quiet: bool):
    """A message printer (to stderr) that ``--quiet`` silences."""
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    return say


def open_store(target: str):
    """The store of a run folder, results.db or database URL (it must exist)."""
    from defectml.store import ResultStore, is_url

    if not is_url(target):
        p = Path(target)
        target = p / "results.db" if p.is_dir() else p
        if not Path(target).exists():
            raise InputError(f"no results database at {target}")
    return ResultStore(target)


def run_folder(target: str) -> Path:
    """The folder of a run (the folder given, or the one holding the database given)."""
    p = Path(target)
    return p if p.is_dir() else p.parent


def run_key(store, target: str, key: str | None, fidelity: str = "mlip") -> str:
    """The run to work on: ``key``, else the only one, else the one the folder's summary names."""
    from defectml.search.summary import choose_run
    from defectml.store import is_url

    return choose_run(store, key, fidelity, None if is_url(target) else run_folder(target))


#: ShakeNBreak's config keys that mean one of our options.
SNB_ALIASES = {"bond_distortions": "distortions", "stdev": "rattle_stdev"}


def config_tokens(path: str, sub: argparse.ArgumentParser, command: str) -> list[str]:
    """Command-line tokens for the options a YAML settings file sets (``--config``).

    Keys are option names with or without dashes (``min_length``, ``min-length``, the option's
    destination) or ShakeNBreak's ``bond_distortions`` / ``stdev``; flags take true/false; lists
    are joined with commas. Options given on the command line win (they come later).

    Raises:
        InputError: an unreadable file, not a mapping, or a key that is no option of ``command``.
    """
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read --config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"--config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise InputError(f"--config {path} must hold a mapping of option: value")
    if "distortion_parameters" in doc:  # ShakeNBreak's distortion_metadata.json: its trial settings
        params = doc["distortion_parameters"] or {}
        doc = {"bond_distortions": [d for d in params.get("bond_distortions", []) if d != 0],
               "stdev": (params.get("mc_rattle_parameters") or {}).get("stdev")}
    by_name = {}
    positionals = set()
    for action in sub._actions:  # noqa: SLF001 - argparse has no public list of a parser's options
        if not action.option_strings:
            positionals.add(action.dest)  # given on the command line; a written-back file names it
            continue
        if action.dest in ("help", "config"):
            continue
        by_name[action.dest] = action
        for opt in action.option_strings:
            by_name[opt.lstrip("-").replace("-", "_")] = action
    tokens: list[str] = []
    for key, value in doc.items():
        name = SNB_ALIASES.get(str(key), str(key)).lstrip("-").replace("-", "_")
        if value is None or name in positionals:
            continue  # None: the option's default
        action = by_name.get(name)
        if action is None:
            raise InputError(f"--config {path}: {key!r} is not an option of 'defectml {command}' "
                             "(see defectml " + command + " --help)")
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else \
            action.option_strings[0]
        if action.nargs == 0:  # a flag
            if not isinstance(value, bool):
                raise InputError(f"--config {path}: {key} is a flag; give true or false")
            tokens += _flag_tokens(action, flag, name, value)
            continue
        if isinstance(value, dict):  # oxidation states
            value = ",".join(f"{k}={v}" for k, v in value.items())
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        tokens.append(f"{flag}={value}")
    return tokens


def _flag_tokens(action: argparse.Action, flag: str, name: str, value: bool) -> list[str]:
    """The tokens that give a flag ``name: value``.

    A ``--x/--no-x`` flag is given either way, so a written ``relax_host: false`` (or an older
    file's ``no_relax_host: true``) turns the default off instead of being dropped; a plain flag
    given false is its default, so it emits nothing.
    """
    if not isinstance(action, argparse.BooleanOptionalAction):
        return [flag] if value else []
    negated = {o.lstrip("-").replace("-", "_") for o in action.option_strings if o.startswith("--no-")}
    on = value != (name in negated)
    positive = next(o for o in action.option_strings if not o.startswith("--no-"))
    return [positive if on else "--no-" + positive[2:]]


def write_settings(a: argparse.Namespace, folder: Path, settings=None) -> Path:
    """Every option of this run, as a ``--config`` file beside its results (``settings.yaml``).

    Options left at ``None`` are written with the value ``settings`` (the run's, built from these
    options) used, so the file keeps saying what ran if a default changes later.
    """
    import yaml

    from defectml.settings import option_values
    from defectml.structure_io import write_atomic

    doc = {k: v for k, v in sorted(vars(a).items()) if k not in ("command", "config", "func")}
    used = option_values(settings) if settings is not None else {}
    doc.update({k: used[k] for k, v in doc.items() if v is None and used.get(k) is not None})
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / "settings.yaml",
                        lambda tmp: Path(tmp).write_text(yaml.safe_dump(doc, sort_keys=True)))
