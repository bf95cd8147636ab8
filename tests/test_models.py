"""Models as keyed references: the contract of every family, checkpoint files, keys, cards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from ase.build import bulk

from defectml.cli import main
from defectml.errors import ModelError
from defectml.models import ModelRef, check_key, load_model, parse_model
from defectml.models.ref import card_path
from defectml.store import ResultStore

SEARCH = ["--defect", "v_Cu", "--charge", "0", "--min-length", "5", "--distortions", "-0.3",
          "--no-rattled", "--no-dimer", "--threads", "2", "--quiet"]


def _cell(symbols="CdTe", a=6.6):
    atoms = bulk(symbols, "zincblende", a=a, cubic=True) if len(symbols) > 2 else bulk(symbols, "fcc", a=a)
    atoms.rattle(0.05, seed=3)
    return atoms


def _energy_forces(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def _save_chgnet(path, scale: float) -> None:
    """The shipped CHGNet 0.3.0 weights with one parameter scaled: a fine-tuned-looking checkpoint."""
    import torch
    from chgnet.model import CHGNet

    model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
    with torch.no_grad():
        model.atom_embedding.embedding.weight.mul_(scale)
    torch.save({"model": model.as_dict()}, path)  # the layout chgnet's Trainer.save writes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "finetuned.pth.tar"
    _save_chgnet(path, 1.02)
    return path


# --- the contract: the wrapped model equals the family's own ASE calculator ----------------------
def test_chgnet_builtin_equals_chgnets_own_calculator():
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    atoms = _cell()
    ours = load_model("chgnet", threads=2)
    theirs = CHGNetCalculator(CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False),
                              use_device="cpu")
    (e1, f1), (e2, f2) = _energy_forces(ours.calculator, atoms), _energy_forces(theirs, atoms)
    assert e1 == pytest.approx(e2, abs=1e-5) and np.allclose(f1, f2, atol=1e-5)
    (eb, fb), = ours.batch()([atoms])
    assert eb == pytest.approx(e1, abs=1e-4) and np.allclose(fb, f1, atol=1e-4)


def test_chgnet_checkpoint_file_equals_chgnets_own_calculator(checkpoint):
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    atoms = _cell()
    ours = load_model(str(checkpoint), threads=2)
    theirs = CHGNetCalculator(CHGNet.from_file(str(checkpoint)), use_device="cpu")
    (e1, f1), (e2, f2) = _energy_forces(ours.calculator, atoms), _energy_forces(theirs, atoms)
    assert e1 == pytest.approx(e2, abs=1e-5) and np.allclose(f1, f2, atol=1e-5)
    base, _ = _energy_forces(load_model("chgnet", threads=2).calculator, atoms)
    assert abs(e1 - base) > 1e-3  # the file's own weights, not the built-in's
    assert ours.ref.family == "chgnet" and ours.name == "finetuned.pth.tar"


def test_chgnet_r2scan_is_a_builtin_with_its_own_weights():
    atoms = _cell()
    r2, pbe = load_model("chgnet-r2scan", threads=2), load_model("chgnet", threads=2)
    assert r2.key != pbe.key and "r2scan" in r2.version
    assert abs(_energy_forces(r2.calculator, atoms)[0] - _energy_forces(pbe.calculator, atoms)[0]) > 1e-3


def test_emt_equals_ases_own_calculator():
    from ase.calculators.emt import EMT

    atoms = _cell("Cu", 3.6)
    (e1, f1), (e2, f2) = _energy_forces(load_model("emt").calculator, atoms), _energy_forces(EMT(), atoms)
    assert e1 == e2 and np.array_equal(f1, f2)


@pytest.mark.parametrize("name, modal", [("sevennet-0", None), ("sevennet-mf-0", "PBE"),
                                         ("sevennet-mf-0@R2SCAN", "R2SCAN")])
def test_sevennet_equals_sevenns_own_calculator(name, modal):
    from sevenn.calculator import SevenNetCalculator

    atoms = _cell()
    ours = load_model(name, threads=2)
    key = "7net-0" if name == "sevennet-0" else "7net-mf-0"
    theirs = SevenNetCalculator(key, device="cpu", **({"modal": modal} if modal else {}))
    (e1, f1), (e2, f2) = _energy_forces(ours.calculator, atoms), _energy_forces(theirs, atoms)
    assert e1 == pytest.approx(e2, abs=1e-5) and np.allclose(f1, f2, atol=1e-5)
    assert ours.ref.head == modal
    other = atoms.copy()
    other.rattle(0.05, seed=9)
    (eb, fb), (eb2, _) = ours.batch()([atoms, other])  # one batched forward pass, float32 sums
    assert eb == pytest.approx(e1, abs=1e-3) and np.allclose(fb, f1, atol=1e-5)
    assert eb2 == pytest.approx(_energy_forces(ours.calculator, other)[0], abs=1e-3)


def test_sevennet_checkpoint_file_keeps_its_modal(tmp_path):
    from sevenn.util import pretrained_name_to_path

    path = tmp_path / "checkpoint_ft.pth"
    shutil.copy(pretrained_name_to_path("7net-mf-0"), path)
    pbe, r2 = load_model(f"{path}@PBE", threads=2), load_model(f"{path}@R2SCAN", threads=2)
    assert pbe.ref.family == "sevennet" and pbe.key != r2.key and pbe.key.endswith("@PBE")
    atoms = _cell()
    assert _energy_forces(pbe.calculator, atoms)[0] != _energy_forces(r2.calculator, atoms)[0]


# --- keys ----------------------------------------------------------------------------------------
def test_key_follows_the_bytes_not_the_name(tmp_path, checkpoint):
    key = parse_model(str(checkpoint)).key
    renamed = tmp_path / "another_name.pth.tar"
    shutil.copy(checkpoint, renamed)
    assert parse_model(str(renamed)).key == key
    _save_chgnet(renamed, 1.03)
    assert parse_model(str(renamed)).key != key
    builtin = parse_model("chgnet")
    assert builtin.key.startswith("chgnet-") and builtin.key != key
    assert parse_model("chgnet").key == load_model("chgnet", threads=2).key  # stable, no load needed


def test_ref_round_trips_through_json(checkpoint):
    ref = parse_model(f"chgnet:{checkpoint}")
    stored = json.loads(json.dumps(ref.to_dict()))
    assert ModelRef.from_dict(stored) == ref and check_key(stored).key == ref.key


def test_model_card_names_the_family_and_is_kept(tmp_path, checkpoint):
    odd = tmp_path / "weights.bin"  # a suffix that says nothing
    shutil.copy(checkpoint, odd)
    with pytest.raises(ModelError, match="cannot tell which family"):
        parse_model(str(odd))
    card = {"family": "chgnet", "base_model": "chgnet", "elements": ["Cd", "Te"],
            "charge_aware": False, "training_data_sha256": "abc", "metrics": {"force_mae": 0.05}}
    card_path(odd).write_text(json.dumps(card))
    model = load_model(str(odd), threads=2)
    assert model.ref.family == "chgnet" and model.card == card


@pytest.mark.parametrize("spec, message", [
    ("chgnet-9.9", "unknown model 'chgnet-9.9'"),
    ("missing/ft.pth.tar", "model file not found"),
    ("chgnet@PBE", "has no heads"),
])
def test_bad_model_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ModelError, match=message):
        parse_model(spec)


def test_a_file_of_another_family_is_refused_clearly(tmp_path):
    bad = tmp_path / "not_chgnet.pth.tar"
    bad.write_bytes(b"this is not a torch file")
    with pytest.raises(ModelError, match="cannot load .* as a CHGNet checkpoint"):
        load_model(str(bad), threads=2)


# --- a fine-tuned checkpoint through search, thermo and dynamics ---------------------------------
def test_checkpoint_through_search_thermo_and_dynamics(tmp_path, copper_cif, checkpoint, capsys):
    ft = tmp_path / "my_model.pth.tar"
    shutil.copy(checkpoint, ft)
    run = tmp_path / "run"
    assert main(["search", str(copper_cif), "--model", str(ft), "--out", str(run), *SEARCH]) == 0
    key = parse_model(str(ft)).key
    rows = ResultStore(run / "results.db").select(kind="relaxation")
    assert rows and {r.model_key for r in rows} == {key}
    assert {r.data["model_ref"]["source"] for r in rows} == {str(ft.resolve())}

    assert main(["thermo", str(run), "--T", "300,600", "--vib", "none", "--quiet"]) == 0
    doc = json.loads((run / "thermo" / "v_Cu_0" / "thermo.json").read_text())
    assert key in doc["model"]
    assert main(["dynamics", str(run), "--defect", "v_Cu", "--steps", "4", "--interval", "2",
                 "--quiet"]) == 0
    assert key in json.loads((run / "dynamics" / "v_Cu_0" / "dynamics.json").read_text())["model"]

    _save_chgnet(ft, 1.05)  # retrained into the same path: not the model the results were made with
    capsys.readouterr()
    assert main(["thermo", str(run), "--T", "300", "--vib", "none", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "changed since these results were made" in err and "Traceback" not in err


def test_a_moved_weights_file_is_taken_back_by_its_content_key_and_another_refused(
        tmp_path, copper_cif, checkpoint, capsys):
    from defectml.models.ref import builtin_weights_path

    weights = tmp_path / "mine.pth.tar"
    shutil.copy(builtin_weights_path("chgnet"), weights)  # chgnet's own 0.3.0 file, as it ships
    run = tmp_path / "run"
    assert main(["search", str(copper_cif), "--model", str(weights), "--out", str(run), "--no-report",
                 *SEARCH]) == 0
    key = parse_model(str(weights)).key
    moved = tmp_path / "elsewhere" / "renamed.pth.tar"
    moved.parent.mkdir()
    weights.rename(moved)
    other = tmp_path / "other.pth.tar"
    shutil.copy(checkpoint, other)  # other weights (one layer scaled), same family, loadable
    other_key = parse_model(str(other)).key
    assert other_key != key
    thermo = ["thermo", str(run), "--T", "300", "--vib", "none", "--quiet"]
    levels = ["levels", str(run), "--gap", "1.5", "--mu", "Cu=-3.5", "-q"]
    dynamics = ["dynamics", str(run), "--defect", "v_Cu", "--steps", "2", "--interval", "1", "--quiet"]

    def one_line_error(args) -> str:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        return err[0]

    line = one_line_error(thermo)
    assert "is gone" in line and str(weights) in line and key in line and "--model" in line
    assert main([*thermo, "--model", str(moved)]) == 0
    assert key in json.loads((run / "thermo" / "v_Cu_0" / "thermo.json").read_text())["model"]
    assert main([*dynamics, "--model", str(moved)]) == 0
    assert key in json.loads((run / "dynamics" / "v_Cu_0" / "dynamics.json").read_text())["model"]
    assert main([*levels, "--model", str(moved)]) == 0
    assert main([*levels, "--model", "chgnet"]) == 0  # the same bytes under their built-in name
    for command in (thermo, levels, dynamics):
        line = one_line_error([*command, "--model", str(other)])
        assert ("--model other.pth.tar is not the model these results were made with: "
                f"its key is {other_key}, theirs {key} (mine.pth.tar)") in line
