"""Fine-tuning CHGNet with its own trainer: anchored labels, keyed output with a card, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from conftest import emt_labelled_frames, held_out_errors

from defectml.cli import main
from defectml.errors import InputError, ModelError
from defectml.models import load_model, parse_model
from defectml.train.finetune import FinetuneSettings, anchored_energies, finetune


def _frames(n, charge, seed, defect="v_Cu_0"):
    """A small Cu vacancy cell, rattled less and less: EMT energies and forces as 'DFT' labels."""
    frames = emt_labelled_frames(n, seed, amplitude=0.08, repeat=(2, 2, 1))
    for a in frames:
        a.info.update(host="Cu", functional="EMT", defect=defect, charge=charge, run_id=f"r{seed}")
    return frames


def _held_out():
    """Two relaxations no fine-tune here trains or validates on (other seeds, other rattles)."""
    return [_frames(3, 0, 20), _frames(3, 1, 21, "v_Cu_1")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    write(d / "train.extxyz", _frames(4, 0, 1) + _frames(4, 1, 2, "v_Cu_1"))
    write(d / "val.extxyz", _frames(3, 0, 3))
    return d


def test_anchoring_keeps_differences_within_a_group_and_shifts_each_group_once():
    frames = _frames(3, 0, 1) + _frames(3, 1, 2, "v_Cu_1")
    dft = np.array([f.get_potential_energy() for f in frames])
    predicted = dft + np.array([5.0, 5.2, 4.8, -3.0, -3.1, -2.9])  # one offset per charge state
    labels, shifts = anchored_energies(frames, predicted)
    for part in (slice(0, 3), slice(3, 6)):  # DFT's differences inside a group, the model's mean
        assert np.allclose(np.diff(labels[part]), np.diff(dft[part]))
        assert np.isclose(labels[part].mean(), predicted[part].mean())
    assert len(shifts) == 2


def test_finetune_writes_keyed_weights_and_a_card_that_search_models_read(data, tmp_path):
    out = tmp_path / "ft.pth.tar"
    s = FinetuneSettings(epochs=2, batch_size=2, lr=1e-3, threads=1, patience=5)
    result = finetune(data / "train.extxyz", data / "val.extxyz", out, s)
    card = json.loads((tmp_path / "ft.pth.tar.card.json").read_text())
    assert card == result.card and card["family"] == "chgnet"
    assert card["base_key"] == parse_model("chgnet").key
    assert card["elements"] == ["Cu"] and card["energies"] == "anchored" and not card["charge_aware"]
    assert set(card["training_data_sha256"]) == {"train", "val"} and card["metrics"]["epochs_run"] == 2
    assert len(result.history) == 2 and all(np.isfinite(h["val"]["f"]) for h in result.history)
    model = load_model(str(out), threads=1)
    assert model.card == card and model.key != parse_model("chgnet").key  # its own weights, its own key
    atoms = _frames(1, 0, 9)[0]
    atoms.calc = model.calculator
    assert np.isfinite(atoms.get_potential_energy())
    # it learned: on relaxations it never saw, its errors fell well below the base model's
    # (measured: forces 93 -> 24 meV/Å, energy differences 5.6 -> 0.38 meV/atom; at lr 1e-14: none)
    before, after = (held_out_errors(m, _held_out()) for m in (load_model("chgnet", threads=1), model))
    assert after["f"] < 0.6 * before["f"] and after["de"] < 0.5 * before["de"], (before, after)


def test_a_killed_finetune_resumes_where_it_stopped(data, tmp_path, monkeypatch):
    from chgnet.trainer import Trainer

    out = tmp_path / "ft.pth.tar"
    s = FinetuneSettings(epochs=3, batch_size=4, threads=2)
    real = Trainer._train
    calls = {"n": 0}

    def dies_in_epoch_two(self, loader, epoch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, loader, epoch, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        finetune(data / "train.extxyz", data / "val.extxyz", out, s)
    assert not out.exists()  # nothing half-written
    monkeypatch.setattr(Trainer, "_train", real)
    result = finetune(data / "train.extxyz", data / "val.extxyz", out, s)
    assert result.resumed_from == 1 and [h["epoch"] for h in result.history] == [1, 2, 3]


def test_bad_finetune_input_gives_one_line(data, tmp_path, capsys):
    with pytest.raises(ModelError, match="is not supported"):
        finetune(data / "train.extxyz", data / "val.extxyz", tmp_path / "x.pth.tar",
                 FinetuneSettings(base="emt"))
    with pytest.raises(InputError, match="NAME.pth.tar"):
        finetune(data / "train.extxyz", data / "val.extxyz", tmp_path / "x.pt")
    (tmp_path / "empty.extxyz").write_text("")
    cases = [
        ([str(data / "train.extxyz"), "--val", str(tmp_path / "empty.extxyz")], "cannot read"),
        ([str(data / "train.extxyz")], "give --val"),
        ([str(data), "--base", "nope"], "unknown model 'nope'"),
        ([str(data), "--epochs", "0"], "must be at least 1"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["finetune", *args, "--out", str(tmp_path / "y.pth.tar"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "y.pth.tar").exists()


def test_model_metrics_are_exact_for_the_model_that_made_the_labels(tmp_path, capsys):
    """EMT frames judged by EMT: zero errors, and its relaxation test ends on DFT's end point."""
    from defectml.core.relax import relax_one

    start = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    del start[0]
    start.rattle(0.1, seed=4)
    r = relax_one(start, EMT(), fmax=0.01)
    frames = [r.trajectory.frame(i, start.numbers) for i in range(len(r.trajectory))]
    for i, f in enumerate(frames):
        f.info.update(host="Cu", functional="EMT", defect="v_Cu_0", charge=0, run_id="emt", ionic_step=i)
    write(tmp_path / "emt.extxyz", frames)
    assert main(["model-metrics", "emt", str(tmp_path / "emt.extxyz"), "--relax", "--fmax", "0.01",
                 "--out", str(tmp_path / "m")]) == 0
    doc = json.loads((tmp_path / "m" / "metrics.json").read_text())
    overall = doc["errors"]["overall"]
    assert overall["frames"] == len(frames) and overall["force"]["mae"] < 1e-6
    assert overall["relative_energy_per_atom"]["mae"] < 1e-9 and doc["relaxation_test"]["within_0.1A"] == 1.0
    assert doc["relaxation_test"]["relaxations"][0]["rmsd_A"] < 1e-3
    assert (tmp_path / "m" / "parity.png").stat().st_size > 10_000
    assert main(["model-metrics", "chgnet", str(tmp_path / "emt.extxyz"), "--threads", "2",
                 "--out", str(tmp_path / "c")]) == 0
    other = json.loads((tmp_path / "c" / "metrics.json").read_text())["errors"]["overall"]
    assert other["force"]["mae"] > 1e-3 and set(other) >= {"energy_per_atom", "relative_energy_per_atom"}
