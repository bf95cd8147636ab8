"""Command-line interface: ``defectml COMMAND``, one module per area, each a thin shell.

:mod:`.search` (search, alloy, generate, show, report), :mod:`.dft` (shortlist, ingest, evaluate,
loop, export), :mod:`.train` (dataset, finetune, model-metrics, learning-curve), :mod:`.thermo`
(thermo, levels, dynamics), :mod:`.predictor`; :mod:`.common` holds what they share.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from defectml.cli import dft, predictor, search, thermo, train
from defectml.cli.common import EPILOG
from defectml.errors import DefectMLError, InputError

HANDLERS = {
    "search": search.cmd_search, "alloy": search.cmd_alloy, "generate": search.cmd_generate,
    "show": search.cmd_show, "report": search.cmd_report, "shortlist": dft.cmd_shortlist,
    "ingest": dft.cmd_ingest,
    "evaluate": dft.cmd_evaluate, "thermo": thermo.cmd_thermo, "dynamics": thermo.cmd_dynamics,
    "levels": thermo.cmd_levels,
    "predictor": predictor.cmd_predictor, "dataset": train.cmd_dataset,
    "finetune": train.cmd_finetune, "model-metrics": train.cmd_model_metrics,
    "learning-curve": train.cmd_learning_curve, "loop": dft.cmd_loop, "export": dft.cmd_export,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``defectml`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="defectml",
        description="Find the ground-state and metastable structures of point defects with a "
                    "machine-learned interatomic potential (default CHGNet, runs offline).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from defectml import __version__

    parser.add_argument("--version", action="version", version=f"defectml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in (search, dft, train, thermo, predictor):
        area.add_parsers(sub)
    for name, command in sub.choices.items():
        if name != "predictor":  # its own subcommands
            command.add_argument("--config", metavar="YAML",
                                 help="a settings file: option: value per line (e.g. min_length: 12, "
                                      "distortions: [-0.4, 0.4], early_stop: true); options given "
                                      "here win")
    return parser


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


def _with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--config FILE`` replaced by the options the file sets, before those on the command line."""
    from defectml.cli.common import config_tokens

    found = [i for i, tok in enumerate(argv) if tok == "--config" or tok.startswith("--config=")]
    if not found or not argv or argv[0].startswith("-"):
        return argv
    i = found[-1]
    if argv[i] == "--config":
        if i + 1 >= len(argv):
            raise InputError("--config needs a YAML file")
        path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    else:
        path, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1:]
    command = rest[0]
    sub = parser._subparsers._group_actions[0].choices.get(command)  # noqa: SLF001
    if sub is None:
        return argv
    return [command, *config_tokens(path, sub, command), *rest[1:]]


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's time limit, ``kill``).

    A ``BaseException``, like ``KeyboardInterrupt``: the relaxer's ``except Exception`` (one bad
    model call must not end a search) must not swallow it.
    """


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 bad input, 130 interrupted, 143 terminated)."""
    import os
    import signal

    warnings.filterwarnings("ignore", module=r"(pymatgen|spglib|sevenn|dscribe|ase)(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning)
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        argv = _with_config(parser, argv)
    except DefectMLError as exc:
        print(f"defectml: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    handler = HANDLERS[args.command]
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return handler(args)
    except DefectMLError as exc:
        print(f"defectml: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectml: interrupted; finished relaxations are saved, rerun to resume",
              file=sys.stderr)
        return 130
    except Terminated:
        print("defectml: terminated (SIGTERM); finished relaxations are saved, rerun to resume",
              file=sys.stderr)
        return 143
    except BrokenPipeError:  # `defectml show --json | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
