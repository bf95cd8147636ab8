"""The charge-aware CHGNet: q = 0 is the base model, the charge changes energies and forces,
fine-tuning learns a charge dependence a charge-blind model cannot, bad input is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.lj import LennardJones
from ase.io import write
from conftest import emt_labelled_frames

from defectml.cli import main
from defectml.errors import InputError, ModelError
from defectml.models import load_model
from defectml.models.charged import charged_chgnet_class
from defectml.models.chgnet import batch_fn, charge_aware_copy
from defectml.search.pipeline import charges_outside
from defectml.structure_io import with_charge
from defectml.train.finetune import (
    FinetuneSettings,
    anchored_energies,
    defect_family,
    finetune,
    fit_charge_energy,
    predicted_energies,
    read_frames,
)

# The synthetic 'DFT' energy's charge dependence, per unit charge: OFFSET (eV), which the charge
# energy's least-squares fit (q and q² per element) gives before any training, plus STIFFENING x a
# Lennard-Jones pair energy relative to the unrattled cell, which depends on the geometry (and
# puts the charge into the forces), so no fit in q alone can give it: training must learn it.
OFFSET = 0.6
STIFFENING = 0.05
_PAIRS = LennardJones(sigma=2.3, epsilon=0.4, rc=5.0)


def _pair_energy_and_forces(atoms):
    a = atoms.copy()
    a.calc = _PAIRS
    return a.get_potential_energy(), a.get_forces()


def _unrattled_pair_energy():
    ideal = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    del ideal[0]  # the cells emt_labelled_frames rattles
    return _pair_energy_and_forces(ideal)[0]


def _frames(n, charge, seed):
    """Cu vacancy cells with EMT labels plus a charge-dependent energy and forces (a stand-in for DFT's)."""
    frames = emt_labelled_frames(n, seed, amplitude=0.08, repeat=(2, 2, 1))
    e_ideal = _unrattled_pair_energy()
    for a in frames:
        e, f = _pair_energy_and_forces(a)
        a.calc.results["energy"] += charge * (OFFSET + STIFFENING * (e - e_ideal))
        a.calc.results["forces"] = a.calc.results["forces"] + charge * STIFFENING * f
        a.info.update(host="Cu", functional="EMT", defect=f"v_Cu_{charge:+d}", charge=charge,
                      run_id=f"r{seed}")
    return frames


def _charge_dependence_errors(model, q=2, seeds=(20, 21)):
    """A model's errors in how the charge changes energies and forces, on relaxations no test trains on.

    The same structures at charge ``q`` and 0: the MAE of E(q) - E(0) (eV per cell) and of
    F(q) - F(0) (eV/Å, every component) against the data's.
    """
    de, df = [], []
    for seed in seeds:
        neutral, charged = _frames(3, 0, seed), _frames(3, q, seed)
        p0 = model.batch()([with_charge(a, 0) for a in neutral])
        pq = model.batch()([with_charge(a, q) for a in charged])
        for a0, aq, (e0, f0), (eq, fq) in zip(neutral, charged, p0, pq, strict=True):
            de.append(abs((eq - e0) - (aq.get_potential_energy() - a0.get_potential_energy())))
            df.append(np.abs((fq - f0) - (aq.get_forces() - a0.get_forces())).ravel())
    return {"e": float(np.mean(de)), "f": float(np.mean(np.concatenate(df)))}


@pytest.fixture(scope="module")
def chgnet():
    return load_model("chgnet", threads=2)


@pytest.fixture(scope="module")
def structure():
    a = emt_labelled_frames(1, 5, amplitude=0.1, repeat=(2, 2, 1))[0]
    a.calc = None
    return a


def test_a_fresh_charge_aware_model_is_the_base_model_at_every_charge(chgnet, structure):
    aware = charge_aware_copy(chgnet)
    assert aware.charge_aware and not chgnet.charge_aware
    (e_base, f_base), = chgnet.batch()([structure])
    for q in (0, 1, -2):
        (e, f), = aware.batch()([with_charge(structure, q)])
        assert e == pytest.approx(e_base, abs=1e-6) and np.allclose(f, f_base, atol=1e-6)


def test_the_charge_changes_energy_and_forces_and_q0_stays_the_base(chgnet, structure):
    import torch

    model = charged_chgnet_class().from_base(chgnet.calculator.model)
    with torch.no_grad():
        model.charge_embedding.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        model.charge_energy.weight.fill_(0.3)
    fn = batch_fn(model)
    (e0, f0), (e2, f2), (em, fm) = fn([with_charge(structure, q) for q in (0, 2, -1)])
    (e_base, f_base), = chgnet.batch()([structure])
    assert e0 == pytest.approx(e_base, abs=1e-6) and np.allclose(f0, f_base, atol=1e-6)
    assert abs(e2 - e0) > 1e-3 and abs(em - e0) > 1e-3 and abs(e2 - em) > 1e-3
    assert np.abs(f2 - f0).max() > 1e-4 and np.abs(fm - f0).max() > 1e-4
    # one batch of mixed charges gives what each gives alone
    (e2_alone, f2_alone), = fn([with_charge(structure, 2)])
    assert e2_alone == pytest.approx(e2, abs=1e-5) and np.allclose(f2_alone, f2, atol=1e-5)


def test_the_ase_calculator_recomputes_when_only_the_charge_changes(chgnet, structure):
    import torch

    aware = charge_aware_copy(chgnet)
    with torch.no_grad():
        aware.calculator.model.charge_energy.weight.fill_(0.5)
    a = with_charge(structure, 0)
    a.calc = aware.calculator
    e0 = a.get_potential_energy()
    a.info["charge"] = 1
    assert a.get_potential_energy() == pytest.approx(e0 + 0.5 + 0.5, abs=1e-4)  # q·a + q²·b, one element


def test_defect_names_lose_their_charge_suffix_only_when_it_is_the_charge():
    f = _frames(1, 2, 1)[0]
    assert defect_family(f) == "v_Cu"
    f.info["defect"] = "inter_26_Al_1"
    assert defect_family(f) == "inter_26_Al_1"  # the suffix 1 is not this frame's charge (+2)
    f.info["charge"] = 1
    assert defect_family(f) == "inter_26_Al"


def test_anchoring_across_charges_keeps_the_charged_states_relative_to_the_neutral_one():
    frames = _frames(2, 0, 1) + _frames(2, 1, 2) + _frames(2, 2, 3)
    dft = np.array([f.get_potential_energy() for f in frames])
    predicted = dft - 7.0 - np.array([0, 0, 1, 1, 2, 2]) * OFFSET  # a blind model: no charge offset
    labels, shifts = anchored_energies(frames, predicted, across_charges=True)
    assert list(shifts) == ["Cu/EMT/v_Cu"]
    assert np.allclose(labels[:2], predicted[:2])  # neutral frames on the model
    assert np.allclose(labels - predicted, [0, 0, OFFSET, OFFSET, 2 * OFFSET, 2 * OFFSET])
    # a held-out charge validated against the training anchor, not its own mean
    val = _frames(2, 3, 4)
    pv = np.array([f.get_potential_energy() for f in val]) - 7.0 - 3 * OFFSET
    own, _ = anchored_energies(val, pv, across_charges=True)
    given, _ = anchored_energies(val, pv, across_charges=True, given=shifts)
    assert np.allclose(own, pv) and np.allclose(given - pv, 3 * OFFSET)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("charged")
    write(d / "train.extxyz", _frames(3, 0, 1) + _frames(3, 1, 2) + _frames(3, 3, 3))
    write(d / "val.extxyz", _frames(3, 2, 4))  # charge +2 held out
    return d


def test_charge_aware_finetune_learns_the_charge_dependence_of_a_held_out_charge(data, tmp_path):
    out = tmp_path / "aware.pth.tar"
    s = FinetuneSettings(epochs=5, batch_size=3, threads=1, lr=3e-4, energy_weight=10.0, charge_aware=True)
    result = finetune(data / "train.extxyz", data / "val.extxyz", out, s)
    card = json.loads((tmp_path / "aware.pth.tar.card.json").read_text())
    assert card["charge_aware"] and card["charges"] == [0, 1, 3] and card["charge_energy_fit_eV"]
    # the model training starts from: the base model with the charge energy's least-squares fit
    fit = charge_aware_copy(load_model("chgnet", threads=1))
    train = read_frames(data / "train.extxyz")
    predicted = predicted_energies(fit, train)
    labels, _ = anchored_energies(train, predicted, across_charges=True)
    fitted = fit_charge_energy(fit.calculator.model, train, labels - predicted)
    assert fitted.keys() == card["charge_energy_fit_eV"].keys()
    assert np.allclose(list(fitted.values()), list(card["charge_energy_fit_eV"].values()), atol=2e-5)
    # the size of the cells its charge energy is valid on (`levels` compares its supercell with it)
    size = round((7.22 * 7.22 * 3.61) ** (1 / 3), 3)  # the 2x2x1 conventional Cu cells
    assert card["training_cells"] == {"size_A": [size, size], "atoms": [15, 15], "charged_frames": 6}
    model = load_model(str(out), threads=1)
    assert model.charge_aware and "charge-aware" in model.version
    # the same structure, the held-out charge +2 and the neutral state: the model's difference
    # follows the data's (2 x OFFSET + the geometry's part), interpolated from 0, +1, +3
    a, a2 = _frames(1, 0, 9)[0], _frames(1, 2, 9)[0]
    difference = a2.get_potential_energy() - a.get_potential_energy()
    a.calc = None
    (e0, _), (e2, _) = model.batch()([with_charge(a, 0), with_charge(a, 2)])
    assert e2 - e0 == pytest.approx(difference, abs=0.15)
    # training learned the geometry-dependent part the fit cannot give: on relaxations it never
    # saw, its errors in E(+2) - E(0) and F(+2) - F(0) fell well below the fit's (measured: energy
    # 121 -> 46 meV per cell, forces 116 -> 54 meV/Å in 5 epochs; the fit's ΔF is zero)
    before, after = _charge_dependence_errors(fit), _charge_dependence_errors(model)
    assert after["e"] < 0.7 * before["e"] and after["f"] < 0.7 * before["f"], (before, after)
    # and training lowered the held-out charge's validation errors, the fit's included (measured:
    # energy 13.1 -> 2.9 meV/atom, forces 185 -> 62 meV/Å)
    base, best = result.card["metrics"]["val_base"], result.card["metrics"]["val_best"]
    assert best["e"] < 0.9 * base["e"] and best["f"] < 0.75 * base["f"], (base, best)
    # a charge-blind fine-tune of the same data cannot tell the charges apart
    blind = load_model(str(finetune(data / "train.extxyz", data / "val.extxyz", tmp_path / "blind.pth.tar",
                                    FinetuneSettings(epochs=1, batch_size=3, threads=1)).weights), threads=1)
    (b0, _), (b2, _) = blind.batch()([with_charge(a, 0), with_charge(a, 2)])
    assert b2 == pytest.approx(b0, abs=1e-6) and not blind.charge_aware
    assert charges_outside(model, {0, 2}) is None
    assert charges_outside(model, {-1, 4}) == ([-1, 4], "+0..+3")
    assert charges_outside(blind, {5}) is None


def test_charge_aware_bad_input_is_refused_in_one_line(data, tmp_path, capsys):
    bare = _frames(2, 0, 5)
    for f in bare:
        del f.info["charge"]
    write(tmp_path / "nocharge.extxyz", bare)
    with pytest.raises(InputError, match="carry no charge"):
        finetune(tmp_path / "nocharge.extxyz", data / "val.extxyz", tmp_path / "x.pth.tar",
                 FinetuneSettings(epochs=1, charge_aware=True, threads=2))
    with pytest.raises(InputError, match="one CHGNet head"):
        FinetuneSettings(charge_aware=True, strategy="multihead").validate()
    with pytest.raises(ModelError, match="extends CHGNet"):
        finetune(data / "train.extxyz", data / "val.extxyz", tmp_path / "x.pth",
                 FinetuneSettings(base="sevennet-0", epochs=1, charge_aware=True, threads=2))
    code = main(["finetune", str(tmp_path / "nocharge.extxyz"), "--val", str(data / "val.extxyz"),
                 "--out", str(tmp_path / "y.pth.tar"), "--charge-aware", "--threads", "2", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "carry no charge" in err[0]


def test_a_search_relaxes_each_charge_state_on_its_own_surface(tmp_path, copper_cif, chgnet, capsys):
    import torch

    from defectml.search.summary import summarise
    from defectml.store import ResultStore

    model = charged_chgnet_class().from_base(chgnet.calculator.model)
    with torch.no_grad():
        model.charge_energy.weight[:, 0] = 0.4  # E(q) = E(0) + 0.4 q for any cell
    weights = tmp_path / "aware.pth.tar"
    torch.save({"model": model.as_dict()}, weights)
    (tmp_path / "aware.pth.tar.card.json").write_text(json.dumps({"charge_aware": True, "charges": [0, 1]}))
    run = tmp_path / "run"
    args = ["search", str(copper_cif), "--model", str(weights), "--defect", "v_Cu", "--charge", "-1,0",
            "--min-length", "5", "--distortions", "-0.3", "--no-rattled", "--no-dimer", "--threads", "2",
            "--out", str(run)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "has no charge input" not in err and "charge(s) -1 lie outside" in err
    by_q = {s.charge: s.minima[0].energy for s in summarise(ResultStore(run / "results.db"))}
    # one surface shifted by −0.4 eV: the same minimum, 0.4 eV lower (the trials' rattles differ)
    assert by_q[-1] - by_q[0] == pytest.approx(-0.4, abs=0.02)
