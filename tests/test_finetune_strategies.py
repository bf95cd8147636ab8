"""SevenNet fine-tuning with sevenn's trainer, replay and multi-head strategies, the forgetting measure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.io import read, write
from conftest import emt_labelled_frames, held_out_errors

from defectml.cli import main
from defectml.errors import InputError, ModelError
from defectml.models import load_model, parse_model, wrap_calculator
from defectml.train import original_domain as od
from defectml.train.finetune import FinetuneSettings, finetune


def _frames(n, charge, seed, defect="v_Cu_0"):
    frames = emt_labelled_frames(n, seed, amplitude=0.08, repeat=(2, 2, 1))
    for a in frames:
        a.info.update(host="Cu", functional="EMT", defect=defect, charge=charge, run_id=f"r{seed}")
    return frames


def _held_out(calc=None):
    """Two relaxations no fine-tune here trains or validates on (other seeds, other rattles).

    ``calc``: label them with this calculator instead of EMT.
    """
    series = [_frames(3, 0, 20), _frames(3, 1, 21, "v_Cu_1")]
    if calc is not None:
        for frames in series:
            for i, f in enumerate(frames):
                a = f.copy()
                a.calc = calc
                a.get_potential_energy()
                frames[i] = a
    return series


def _learned(base, tuned, series=None):
    """The base model's and the fine-tuned model's errors on the held-out relaxations."""
    series = series or _held_out()
    return held_out_errors(base, series), held_out_errors(tuned, series)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    write(d / "train.extxyz", _frames(3, 0, 1) + _frames(3, 1, 2, "v_Cu_1"))
    write(d / "val.extxyz", _frames(2, 0, 3))
    replay = _frames(2, 0, 4, "bulk")
    for f in replay:
        f.info["functional"] = "EMT replay"
    write(d / "replay.extxyz", replay)
    return d


def _energy(model, atoms):
    a = atoms.copy()
    a.calc = model.calculator
    return a.get_potential_energy()


def test_sevennet_finetunes_with_its_own_trainer_into_a_model_search_reads(data, tmp_path):
    out = tmp_path / "ft.pth"
    result = finetune(data / "train.extxyz", data / "val.extxyz", out,
                      FinetuneSettings(base="sevennet-0", epochs=2, batch_size=2, lr=1e-3, threads=1))
    card = json.loads((tmp_path / "ft.pth.card.json").read_text())
    assert card["family"] == "sevennet" and card["heads"] is None and card["strategy"] == "standard"
    assert card["base_key"] == parse_model("sevennet-0").key and card["metrics"]["epochs_run"] == 2
    assert all(np.isfinite(h["val"]["f"]) and np.isfinite(h["train"]["f"]) for h in result.history)
    tuned, base = load_model(str(out), threads=1), load_model("sevennet-0", threads=1)
    assert tuned.ref.family == "sevennet" and tuned.key != base.key and tuned.card == card
    assert np.isfinite(_energy(tuned, _frames(1, 0, 9)[0]))
    # it learned: on relaxations it never saw, its errors fell well below the base model's
    # (measured: forces 78 -> 33 meV/Å, energy differences 4.4 -> 0.44 meV/atom; at lr 1e-14: none)
    before, after = _learned(base, tuned)
    assert after["f"] < 0.6 * before["f"] and after["de"] < 0.5 * before["de"], (before, after)


@pytest.mark.parametrize(("base", "suffix"), [("chgnet", ".pth.tar"), ("sevennet-0", ".pth"),
                                            ("sevennet-mf-0", ".pth")])
def test_weights_written_without_learning_predict_as_the_base(data, tmp_path, base, suffix):
    """A fine-tune at a vanishing learning rate must give back the base model, bit for bit or nearly.

    This caught sevenn's backward-compatibility patch applied twice to SevenNet-0's weights (a
    checkpoint keeping the 0.9 version): 0.21 eV/Å of force drift with nothing learned.
    """
    out = tmp_path / f"same{suffix}"
    finetune(data / "train.extxyz", data / "val.extxyz", out,
             FinetuneSettings(base=base, epochs=1, lr=1e-14, batch_size=4, threads=2, stress_weight=0))
    before, after = load_model(base, threads=2), load_model(str(out), threads=2)
    probe = _frames(1, 0, 9)[0]
    forces = []
    for m in (before, after):
        a = probe.copy()
        a.calc = m.calculator
        forces.append(a.get_forces())
    assert after.ref.head == before.ref.head  # sevennet-mf-0: the PBE head, named by the card
    assert abs(_energy(after, probe) - _energy(before, probe)) < 1e-3
    assert np.abs(forces[1] - forces[0]).max() < 1e-4


def test_multihead_adds_a_head_anchored_on_its_start_and_keeps_the_base_heads(data, tmp_path):
    import torch

    out = tmp_path / "mh.pth"
    s = FinetuneSettings(base="sevennet-mf-0", strategy="multihead", replay=str(data / "replay.extxyz"),
                         epochs=1, batch_size=2, lr=1e-3, threads=1)
    result = finetune(data / "train.extxyz", data / "val.extxyz", out, s)
    card = result.card
    assert card["heads"] == ["R2SCAN", "PBE", "defect"] and card["default_head"] == "defect"
    assert card["base_head"] == "PBE" and card["replay"]["frames"] == 2
    # the defect frames are anchored on the new head as append_modal starts it, not on the PBE head:
    # the start's validation energy error is the frames' spread only, far below the heads' gap
    val = read(data / "val.extxyz", ":")
    start = load_model(f"{out.with_name('mh.pth.work') / 'start.pth'}@defect", threads=1)
    base = load_model("sevennet-mf-0@PBE", threads=1)
    gap = np.mean([abs(_energy(start, f) - _energy(base, f)) / len(f) for f in val])
    assert card["metrics"]["val_base"]["e"] < 0.03 < gap
    # the new head's per-element energy shift started as the PBE head's
    cp = torch.load(out, map_location="cpu", weights_only=False)
    modal = cp["config"]["_modal_map"]
    assert modal == {"R2SCAN": 0, "PBE": 1, "defect": 2}
    first = torch.load(out.with_name("mh.pth.work") / "start.pth", map_location="cpu", weights_only=False)
    shift = first["model_state_dict"]["rescale_atomic_energy.shift"]
    assert torch.equal(shift[2], shift[1])
    new, pbe = load_model(str(out), threads=1), load_model(f"{out}@PBE", threads=1)
    assert new.ref.head == "defect" and pbe.ref.head == "PBE" and new.key != pbe.key
    probe = _frames(1, 0, 9)[0]
    assert abs(_energy(new, probe) - _energy(pbe, probe)) > 1e-3  # two heads, two answers
    # the new head learned: on relaxations it never saw, its errors fell well below the base
    # model's (measured: forces 95 -> 22 meV/Å, energy differences 5.6 -> 0.58 meV/atom)
    before, after = _learned(base, new)
    assert after["f"] < 0.6 * before["f"] and after["de"] < 0.5 * before["de"], (before, after)


def _two_fidelities(d):
    """EMT frames as the high fidelity; the same structures under Lennard-Jones as the low one."""
    hi = _frames(3, 0, 5) + _frames(2, 0, 6, "v_Cu_b")
    lo = []
    for f in _frames(4, 0, 5) + _frames(3, 0, 7, "v_Cu_c"):
        a = f.copy()
        a.calc = LennardJones(sigma=2.3, epsilon=0.4, rc=5.0)
        a.get_potential_energy()
        a.info["fidelity"] = "PBE"
        lo.append(a)
    for f in hi:
        f.info["fidelity"] = "HSE06"
    write(d / "mf_train.extxyz", hi + lo)
    val = _frames(2, 0, 8)
    for f in val:
        f.info["fidelity"] = "HSE06"
    write(d / "mf_val.extxyz", val)
    return hi, lo


def test_multifidelity_trains_the_base_head_on_low_and_a_new_head_on_high_fidelity(tmp_path):
    hi, lo = _two_fidelities(tmp_path)
    out = tmp_path / "mf.pth"
    s = FinetuneSettings(base="sevennet-mf-0@PBE", strategy="multifidelity", epochs=1, batch_size=4,
                         threads=1, lr=1e-3)
    card = finetune(tmp_path / "mf_train.extxyz", tmp_path / "mf_val.extxyz", out, s).card
    assert card["heads"] == ["R2SCAN", "PBE", "HSE06"] and card["default_head"] == "HSE06"
    assert card["fidelities"] == {"HSE06": len(hi), "PBE": len(lo)} and card["replay"]["frames"] == len(lo)
    assert card["strategy"] == "multifidelity" and card["settings"]["head"] == "HSE06"
    high, low = load_model(str(out), threads=1), load_model(f"{out}@PBE", threads=1)
    base = load_model("sevennet-mf-0@PBE", threads=1)
    probe = _frames(1, 0, 9)[0]
    e = [_energy(m, probe) for m in (high, low)]
    assert high.ref.head == "HSE06" and abs(e[0] - e[1]) > 1e-4  # one model, two fidelities
    # each head learned its own fidelity: on relaxations neither saw, the HSE06 head's errors
    # against the high-fidelity (EMT) labels fell well below the base model's (measured: forces
    # 95 -> 33 meV/Å, energy differences 5.6 -> 1.2 meV/atom), and the PBE head's against the
    # low-fidelity (Lennard-Jones) labels fell too, less in one epoch from so far (measured:
    # forces 879 -> 757 meV/Å, energy differences 57 -> 49 meV/atom)
    before, after = _learned(base, high)
    assert after["f"] < 0.6 * before["f"] and after["de"] < 0.5 * before["de"], (before, after)
    before, after = _learned(base, low, _held_out(LennardJones(sigma=2.3, epsilon=0.4, rc=5.0)))
    assert after["f"] < 0.95 * before["f"] and after["de"] < 0.95 * before["de"], (before, after)


def test_mixed_functionals_need_fidelity_heads(tmp_path, capsys):
    _two_fidelities(tmp_path)
    train, val = tmp_path / "mf_train.extxyz", tmp_path / "mf_val.extxyz"
    with pytest.raises(InputError, match="mixes functionals .*HSE06: 7, PBE: 7.*multifidelity"):
        finetune(train, val, tmp_path / "x.pth", FinetuneSettings(base="sevennet-0"))
    frames = read(train, ":")
    for f in frames[:2]:
        del f.info["fidelity"]
        f.info.pop("functional", None)
    write(tmp_path / "unlabelled.extxyz", frames)
    with pytest.raises(InputError, match="2 of 12 frames carry no fidelity"):
        finetune(tmp_path / "unlabelled.extxyz", val, tmp_path / "x.pth",
                 FinetuneSettings(base="sevennet-mf-0@PBE", strategy="multifidelity"))
    same = [f for f in read(train, ":") if f.info["fidelity"] == "HSE06"]
    write(tmp_path / "one.extxyz", same)
    with pytest.raises(InputError, match="one fidelity .*HSE06.*base head's .*PBE"):
        finetune(tmp_path / "one.extxyz", val, tmp_path / "x.pth",
                 FinetuneSettings(base="sevennet-mf-0@PBE", strategy="multifidelity"))
    three = read(train, ":")
    three[0].info["fidelity"] = "r2SCAN"
    write(tmp_path / "three.extxyz", three)
    with pytest.raises(InputError, match="exactly one other"):
        finetune(tmp_path / "three.extxyz", val, tmp_path / "x.pth",
                 FinetuneSettings(base="sevennet-mf-0@PBE", strategy="multifidelity"))
    capsys.readouterr()
    assert main(["finetune", str(train), "--val", str(val), "--out", str(tmp_path / "y.pth.tar"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mixes functionals" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.pth*"))


def test_replay_mixes_base_labelled_crystals_into_chgnet_training(data, tmp_path):
    out = tmp_path / "rp.pth.tar"
    s = FinetuneSettings(strategy="replay", replay_variants=1, epochs=1, batch_size=4, lr=1e-3, threads=1)
    result = finetune(data / "train.extxyz", data / "val.extxyz", out, s)
    replay = read(tmp_path / "rp.pth.tar.work" / "replay.extxyz", ":")
    base = load_model("chgnet", threads=1)
    assert result.card["replay"]["frames"] == len(replay) == len(od.prototypes("replay"))
    assert "not DFT" in result.card["replay"]["source"]
    assert {f.info["functional"] for f in replay} == {f"base:{base.key}"}
    # the labels are the base model's own
    assert abs(replay[0].get_potential_energy() - _energy(base, replay[0])) < 1e-3
    # and it learned the defect frames: on relaxations it never saw, its errors fell well below
    # the base model's (measured: forces 93 -> 31 meV/Å, energy differences 5.6 -> 0.53 meV/atom)
    before, after = _learned(base, load_model(str(out), threads=1))
    assert after["f"] < 0.6 * before["f"] and after["de"] < 0.5 * before["de"], (before, after)


def test_a_killed_sevennet_finetune_resumes(data, tmp_path, monkeypatch):
    from sevenn.train.trainer import Trainer

    out = tmp_path / "ft.pth"
    s = FinetuneSettings(base="sevennet-0", epochs=3, batch_size=4, threads=2)
    real = Trainer.run_one_epoch
    calls = {"n": 0}

    def dies_in_epoch_two(self, loader, is_train=False, *args, **kwargs):
        calls["n"] += is_train
        if is_train and calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, loader, is_train, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run_one_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        finetune(data / "train.extxyz", data / "val.extxyz", out, s)
    assert not out.exists()
    monkeypatch.setattr(Trainer, "run_one_epoch", real)
    result = finetune(data / "train.extxyz", data / "val.extxyz", out, s)
    assert result.resumed_from == 1 and [h["epoch"] for h in result.history] == [1, 2, 3]


def test_bad_strategy_input_gives_one_clear_error(data, tmp_path, capsys):
    train, val = data / "train.extxyz", data / "val.extxyz"
    with pytest.raises(ModelError, match="multihead needs a SevenNet"):
        finetune(train, val, tmp_path / "x.pth.tar", FinetuneSettings(strategy="multihead"))
    with pytest.raises(ModelError, match="has one"):
        finetune(train, val, tmp_path / "x.pth", FinetuneSettings(base="sevennet-0", strategy="multihead"))
    with pytest.raises(InputError, match="already has a head"):
        finetune(train, val, tmp_path / "x.pth",
                 FinetuneSettings(base="sevennet-mf-0", strategy="multihead", head="PBE"))
    with pytest.raises(InputError, match="NAME.pth"):
        finetune(train, val, tmp_path / "x.pth.tar", FinetuneSettings(base="sevennet-0"))
    cases = [(["--replay", str(data / "replay.extxyz")], "--replay is for"),
             (["--strategy", "multihead"], "needs a SevenNet"),
             (["--head", "a b", "--strategy", "multihead"], "plain name")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["finetune", str(data), "--out", str(tmp_path / "y.pth.tar"), "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not list(tmp_path.glob("*.pth*"))


def test_original_domain_sides_never_share_a_crystal_and_cover_the_data_elements():
    replay = {n for n, _ in od.prototypes("replay")}
    forgetting = {n for n, _ in od.prototypes("forgetting")}
    assert replay and forgetting and not replay & forgetting
    hosts = {"ZnS", "MgO", "GaN", "Se", "Cu2SiSe3", "SrTiO3", "Sb2Se3", "Sb2Si2Te6", "V2O5", "Y2Ti2S2O5"}
    assert not forgetting & hosts  # training on a host's DFT is learning, not forgetting
    from pymatgen.core import Composition

    def covered(side):
        return {str(e) for n in side for e in Composition(n).elements}

    data_elements = {"Zn", "S", "Al", "Mg", "O", "Ga", "N", "Se", "Cu", "Si", "Sr", "Ti", "Sb", "Te", "V",
                     "Y"}
    assert data_elements <= covered(replay)
    assert {"Zn", "S", "O", "Mg", "Ga", "N", "Al", "Si", "Sr", "Cu", "V"} <= covered(forgetting)
    assert len(covered(forgetting) - data_elements) >= 5  # and others
    # same elements first
    assert od.prototypes("forgetting", {"Zn"})[0][0] == "ZnO"


def test_base_labelled_crystals_and_the_forgetting_measure():
    emt = wrap_calculator(EMT(), "emt")
    emt.elements = frozenset({"Al", "Cu", "Ni", "Ag", "Au", "Pd", "Pt"})
    pseudo = od.base_labelled(emt, "forgetting", od.CrystalSettings(variants=2, seed=1), stress=False)
    assert {f.info["host"] for f in pseudo} == {"forgetting:Cu", "forgetting:Ni"}  # EMT's elements only
    assert all(len(f) >= 16 for f in pseudo) and len(pseudo) == 4
    again = od.base_labelled(emt, "forgetting", od.CrystalSettings(variants=2, seed=1), stress=False)
    assert np.allclose(again[0].positions, pseudo[0].positions)  # seeded
    assert od.force_mae(emt, pseudo) < 1e-9
    same = od.forgetting(emt, emt, pseudo, [])
    assert same["change"] is None and same["after"] < 1e-9  # zero error before: no ratio to give
    real = emt_labelled_frames(2, 5)  # "DFT" bulk frames: EMT labels, judged by EMT and by LJ
    lj = wrap_calculator(LennardJones(sigma=2.3, epsilon=0.4, rc=6.0), "lj")
    unchanged, worse = od.forgetting(emt, emt, pseudo, real), od.forgetting(emt, lj, pseudo, real)
    assert unchanged["change"] is None or abs(unchanged["change"]) < 1e-9
    assert worse["pseudo"]["after"] > 0.05 and worse["real"]["after"] > worse["real"]["before"]
    scaled = od.forgetting(emt, lj, pseudo, real, scale=0.1)  # the error increase in units of 0.1 eV/Å
    assert np.isclose(scaled["change"], (scaled["after"] - scaled["before"]) / 0.1) and scaled["change"] > 0.5


def test_learning_curve_subsets_are_nested_and_seeded():
    from defectml.train.learning_curve import subsets

    parts = subsets(10, [1, 0.3, 0.5], seed=1)
    assert [len(p) for p in parts] == [3, 5, 10]
    assert set(parts[0]) <= set(parts[1]) <= set(parts[2]) and parts == subsets(10, [0.3, 0.5, 1], seed=1)
    with pytest.raises(InputError, match="shares"):
        subsets(10, [0, 1])


def test_learning_curve_fine_tunes_each_share_and_reports_test_errors(data, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    ds.mkdir()
    for name in ("train", "val"):
        shutil.copy(data / f"{name}.extxyz", ds / f"{name}.extxyz")
    write(ds / "test.extxyz", _frames(3, 0, 7))
    out = tmp_path / "lc"
    assert main(["learning-curve", str(ds), "--out", str(out), "--shares", "0.5,1", "--epochs", "1",
                 "--threads", "2", "--quiet"]) == 0
    doc = json.loads((out / "learning_curve.json").read_text())
    assert [(p["relaxations"], p["frames"]) for p in doc["points"]] == [(1, 3), (2, 6)]
    maes = [doc["base"]["force"]["mae"]] + [p["errors"]["force"]["mae"] for p in doc["points"]]
    assert all(np.isfinite(maes)) and len(set(maes)) == 3  # three different models
    assert (out / "learning_curve.png").stat().st_size > 10_000
    assert main(["learning-curve", str(data), "--out", str(out), "--quiet"]) == 2  # no test split there
