"""The CLI says what every option does (a newcomer reads --help before anything else)."""

from __future__ import annotations

import argparse

from defectml.cli import build_parser
from defectml.models.ref import BUILTIN_MODELS


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_of_every_command_has_help():
    missing = {name: [a.option_strings[0] for a in parser._actions
                      if a.option_strings and not a.help and a.dest != "help"]
               for name, parser in _subcommands().items()}
    assert len(missing) >= 14 and not any(missing.values()), {k: v for k, v in missing.items() if v}


def test_thermo_and_dynamics_help_shows_defaults_and_uses_angstrom():
    for command in ("thermo", "dynamics"):
        text = _subcommands()[command].format_help()
        assert "(default: " in text and " A)" not in text and "(A)" not in text
    thermo = " ".join(_subcommands()["thermo"].format_help().split())
    assert "independent TI switches averaged (default: 4)" in thermo


def test_model_help_names_every_built_in_model():
    text = " ".join(_subcommands()["search"].format_help().split())
    assert all(name in text for name in BUILTIN_MODELS) and "chgnet-0.2.0" in text
