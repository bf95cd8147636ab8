"""Settings are built one way: from options named for their fields, the dataclass deciding defaults."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from defectml.cli import build_parser
from defectml.cli.common import config_tokens
from defectml.dft.loop import LoopSettings
from defectml.errors import InputError
from defectml.search import SearchSettings
from defectml.search.distort import TrialSettings
from defectml.search.fingerprint import SoapSettings
from defectml.thermo.freeenergy import ThermoSettings

#: Fields no option sets (fixed by the method, or set by the command itself).
NOT_OPTIONS = {"trials", "soap", "rattle_min_distance_factor", "unperturbed", "min_distance"}


def _parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _dests(command: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in _parser(command)._actions}


def test_every_search_setting_is_the_option_of_its_name_with_no_default_of_its_own():
    dests = _dests("search")
    wanted = [f.name for cls in (SearchSettings, TrialSettings) for f in fields(cls)
              if f.name not in NOT_OPTIONS]
    wanted += [SoapSettings.OPTIONS_PREFIX + f.name for f in fields(SoapSettings)]
    assert [n for n in wanted if n not in dests] == []
    analysis = {"soap_threshold", "max_drop", "max_rise"}  # shared by commands that only rank (constants)
    assert {n: dests[n].default for n in wanted if n not in analysis and dests[n].default is not None} == {}


def test_settings_from_a_command_line_use_every_option_and_the_old_spellings():
    p = build_parser()
    a = p.parse_args(["search", "host.cif", "--defect", "v_Cd", "--diagonal", "--no-relax-host",
                      "--shells", "2", "--oxi", "Cd=2,Te=-2", "--no-dimer", "--distortions=-0.4,0.4",
                      "--soap-rcut", "4", "--soap-n-max", "6", "--fmax", "0.03", "--seed", "7"])
    s = SearchSettings.from_options(a)
    assert s.force_diagonal and not s.relax_host and s.env_shells == 2 and s.fmax == 0.03
    assert s.oxidation_states == {"Cd": 2, "Te": -2}
    assert s.trials == TrialSettings(distortions=(-0.4, 0.4), dimer=False, seed=7)
    assert s.soap == SoapSettings(r_cut=4.0, n_max=6)
    # nothing given: every default is the dataclass's
    assert SearchSettings.from_options(p.parse_args(["search", "host.cif", "--defect", "v_Cd"])) == \
        SearchSettings()


def test_bad_values_in_nested_settings_are_refused():
    with pytest.raises(InputError, match="SOAP needs"):
        SearchSettings.from_options({"soap_r_cut": 0.0})
    with pytest.raises(InputError, match="strictly between -1 and 1"):
        TrialSettings.from_options({"pair_distortions": (-1.2,)})
    with pytest.raises(InputError, match="batch size"):
        LoopSettings.from_options({"relax_batch": 0})


@pytest.mark.parametrize(("text", "relax_host", "dimer"), [
    ("relax_host: false\ndimer: false\n", False, False),   # as settings.yaml now writes them
    ("relax_host: true\ndimer: true\n", True, True),
    ("no_relax_host: true\nno_dimer: true\n", False, False),  # an older settings.yaml
    ("no_relax_host: false\nno-dimer: false\n", True, True),
])
def test_a_settings_file_turns_a_default_on_flag_off(tmp_path, text, relax_host, dimer):
    """A flag written false must not be dropped: ``relax_host: false`` would relax the host."""
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(text)
    parser = _parser("search")
    a = parser.parse_args(["host.cif", "--defect", "v_Cd", *config_tokens(str(cfg), parser, "search")])
    s = SearchSettings.from_options(a)
    assert (s.relax_host, s.trials.dimer) == (relax_host, dimer)


def test_the_loop_holds_its_fine_tuning_and_relaxation_settings_and_keeps_its_keys(tmp_path):
    s = LoopSettings.from_options({"patience": 3, "train_patience": 2, "epochs": 7, "relax_batch": 4,
                                   "fmax": 0.03, "early_stop": False})
    assert s.patience == 3 and s.training.patience == 2 and s.training.epochs == 7
    assert (s.relaxation.batch_size, s.relaxation.fmax, s.relaxation.early_stop) == (4, 0.03, False)
    ft = s.finetune("chgnet", seed=5, attempt=0, n_atoms=64)
    assert (ft.epochs, ft.patience, ft.seed, ft.energies, ft.base) == (7, 2, 5, "absolute", "chgnet")
    # a loop stored before the settings were nested keeps its key, so it resumes (key of the
    # defaults and of a varied set, computed at ea0057d)
    assert LoopSettings().key() == "f1a1af1c7bbcb1f4"
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("early_stop: false\n")
    parser = _parser("loop")
    tokens = config_tokens(str(cfg), parser, "loop")
    a = parser.parse_args(["runs/x", "--oracle", "calculator:emt", *tokens])
    assert tokens == ["--no-early-stop"] and LoopSettings.from_options(a).relaxation.early_stop is False
    a = build_parser().parse_args("loop runs/x --oracle calculator:emt --k 3 --epochs 10 --lr 1e-3 "
                                  "--energy-weight 5 --strategy replay --fmax 0.03 --max-steps 300 "
                                  "--relax-batch 4 --committee 2 --seed 3 --no-early-stop".split())
    assert LoopSettings.from_options(a).key() == "e9114ebd2963c8bd"


def test_thermo_settings_come_from_its_options_under_their_field_names():
    a = build_parser().parse_args(["thermo", "run", "--vib", "none", "--ti-steps", "50", "--window", "0.2"])
    s = ThermoSettings.from_options(a, temperatures=[300.0], mu={})  # cmd_thermo parses these two
    assert (s.vibrations, s.ti_switch_steps, s.window) == ("none", 50, 0.2)
    assert s.ti_repeats == ThermoSettings.ti_repeats


def test_the_written_settings_say_what_ran_defaults_included(tmp_path):
    from defectml.cli.common import write_settings

    parser = _parser("search")
    a = parser.parse_args(["host.cif", "--defect", "v_Cd", "--no-dimer", "--soap-rcut", "4"])
    s = SearchSettings.from_options(a)
    written = __import__("yaml").safe_load(write_settings(a, tmp_path, s).read_text())
    assert written["fmax"] == SearchSettings.fmax and written["relax_host"] is True  # defaults, as run
    assert written["dimer"] is False and written["soap_r_cut"] == 4.0
    assert written["distortions"] == list(TrialSettings().distortions)
    # and it reads back to the same settings
    again = parser.parse_args(["host.cif", *config_tokens(str(tmp_path / "settings.yaml"), parser, "search")])
    assert SearchSettings.from_options(again) == s
