"""The CLI says what every option does (a newcomer reads --help before anything else)."""

from __future__ import annotations

import argparse
import json

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


def test_a_settings_file_sets_options_the_command_line_wins_and_the_run_writes_its_own(
        tmp_path, copper_cif, capsys):
    import yaml

    from defectml.cli import main

    cfg = tmp_path / "settings.yaml"
    cfg.write_text("defect: v_Cu\ncharge: 0\nmodel: emt\nmin_length: 7\nbond_distortions: [-0.3, 0.3]\n"
                   "no-dimer: true\nquiet: true\nfmax: 0.5\n")
    out = tmp_path / "run"
    assert main(["search", str(copper_cif), "--config", str(cfg), "--fmax", "0.1", "--out", str(out)]) == 0
    written = yaml.safe_load((out / "settings.yaml").read_text())
    # options are written under their settings' field names (--no-dimer: dimer false)
    assert written["defect"] == "v_Cu" and written["min_length"] == 7.0 and written["dimer"] is False
    assert written["fmax"] == 0.1  # the command line won over the file
    assert written["distortions"] == "-0.3,0.3"
    trials = json.loads((out / "summary.json").read_text())["defects"][0]["n_trials"]
    assert trials == 2  # Unperturbed and Rattled: no Dimer, no distortions for a metal's vacancy
    # the written file runs the same search again: the same run, nothing left to do
    from defectml import ResultStore

    key = json.loads((out / "summary.json").read_text())["settings_key"]
    assert main(["search", str(copper_cif), "--config", str(out / "settings.yaml")]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["settings_key"] == key and again["relaxed_this_run"] == 0
    assert ResultStore(out / "results.db").count(kind="relaxation") == 2


def test_a_bad_settings_file_is_one_line(tmp_path, copper_cif, capsys):
    from defectml.cli import main

    for text, msg in (("min_lenght: 7\n", "'min_lenght' is not an option of 'defectml search'"),
                      ("- a\n- b\n", "must hold a mapping"), ("early_stop: maybe\n", "is a flag"),
                      ("a: [\n", "not valid YAML")):
        cfg = tmp_path / "bad.yaml"
        cfg.write_text(text)
        assert main(["search", str(copper_cif), "--defect", "v_Cu", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert main(["search", str(copper_cif), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read --config" in capsys.readouterr().err


def test_max_rise_is_an_option_of_every_command_that_ranks_minima_and_reaches_the_search(
        tmp_path, copper_cif, capsys):
    from defectml.cli import main
    from defectml.cli.common import search_settings

    for command in ("search", "show", "report", "alloy", "shortlist", "evaluate", "export"):
        text = " ".join(_subcommands()[command].format_help().split())
        assert "--max-rise MAX_RISE" in text and "high-energy structures (3.0)" in text, command
    a = build_parser().parse_args(["search", str(copper_cif), "--defect", "v_Cu", "--max-rise", "5"])
    assert search_settings(a).max_rise == 5.0 and a.max_rise == 5.0
    assert main(["search", str(copper_cif), "--defect", "v_Cu", "--model", "emt", "--max-rise", "0",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max rise must be positive" in err[0], err
