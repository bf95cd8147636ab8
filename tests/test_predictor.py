"""Direct relaxed-structure predictor: representation, symmetry, learning, checkpoints, CLI."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.geometry import find_mic
from ase.io import write
from ase.optimize import FIRE
from conftest import EMT_VACANCY_SEARCH
from scipy.spatial.transform import Rotation

from defectml.cli import main
from defectml.errors import DefectMLError
from defectml.predictor.graph import NodeType, build_graph
from defectml.predictor.metrics import coordinate_mae
from defectml.predictor.model import Batch, DefectRelaxNet, Ensemble, ModelConfig, distance_loss
from defectml.predictor.train import (
    TrainSettings,
    evaluate,
    load_checkpoint,
    load_predictor,
    train,
    validation_loss,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "2dmd-high-density-pairs.tar.gz"


def test_node_types_vacancy_substitution_interstitial():
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    d = pristine.copy()
    d[5].symbol = "Ni"  # substitution
    d.append("Cu")
    d.positions[-1] = [0.9, 0.9, 0.9]  # interstitial (tetrahedral site)
    del d[0]  # vacancy
    g = build_graph(d, pristine, cutoff=4.0)
    counts = np.bincount(g.node_type.numpy(), minlength=4)
    assert counts.tolist() == [30, 1, 1, 1]
    vac = int(np.where(g.node_type.numpy() == NodeType.VACANCY)[0][0])
    assert vac >= g.n_atoms and g.z[vac] == 29  # placeholder after the real atoms, carrying Cu
    sub = int(np.where(g.node_type.numpy() == NodeType.SUBSTITUTED)[0][0])
    assert g.z[sub] == 28 and g.z_host[sub] == 29
    assert np.allclose(g.defect_sites()[0], d.positions[sub])


def _tiny_checkpoint(path: Path, cutoff: float = 4.0) -> Path:
    """A one-epoch, one-layer model trained on three random pairs, saved at ``path``."""
    graphs = [_random_pair(s) for s in range(3)]
    train(graphs, graphs[:1], path, ModelConfig(features=8, layers=1, cutoff=cutoff), TrainSettings(epochs=1),
          log=lambda m: None)
    return path


def _random_pair(seed: int):
    """An EMT-relaxed Cu vacancy cell with a random Ni substitution: unrelaxed -> relaxed."""
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    rng = np.random.default_rng(seed)
    u = pristine.copy()
    u[int(rng.integers(1, len(u)))].symbol = "Ni"
    del u[int(rng.integers(0, len(u)))]
    r = u.copy()
    r.calc = EMT()
    FIRE(r, logfile=None).run(fmax=0.02, steps=200)
    return build_graph(u, pristine, cutoff=4.0, relaxed=r)


@pytest.mark.parametrize(("virtual_node", "norm"), [(False, False), (True, False), (False, True)])
def test_equivariance_and_translation_invariance(virtual_node, norm):
    torch.manual_seed(0)
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    u = pristine.copy()
    del u[3]
    u.rattle(0.05, seed=1)
    config = ModelConfig(features=16, layers=2, cutoff=4.0, virtual_node=virtual_node, norm=norm)
    model = DefectRelaxNet(config)
    for p in model.parameters():  # make the coordinate read-outs large enough to test
        p.data.normal_(0, 0.3)
    disp = model(Batch([build_graph(u, pristine, 4.0)])).detach().numpy()
    assert np.abs(disp[: len(u)]).max() > 1e-3
    rot = Rotation.from_euler("xyz", [0.3, -0.7, 1.1]).as_matrix()
    ur, pr = u.copy(), pristine.copy()
    for a in (ur, pr):
        a.set_cell(a.cell @ rot.T, scale_atoms=True)
    disp_r = model(Batch([build_graph(ur, pr, 4.0)])).detach().numpy()
    assert np.allclose(disp_r, disp @ rot.T, atol=1e-4)
    ut, pt = u.copy(), pristine.copy()
    for a in (ut, pt):
        a.positions += [0.37, -0.2, 0.5]
    disp_t = model(Batch([build_graph(ut, pt, 4.0)])).detach().numpy()
    assert np.allclose(disp_t, disp, atol=1e-4)
    assert np.allclose(disp[len(u) :], 0)  # vacancy placeholders never move


def test_chgnet_prior_inputs_keep_the_model_equivariant_and_are_cached(tmp_path):
    from defectml.predictor.prior import PRIOR_FEATURES, attach_priors, load_chgnet

    torch.manual_seed(0)
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    u = pristine.copy()
    del u[3]
    u.rattle(0.05, seed=1)
    rot = Rotation.from_euler("xyz", [0.3, -0.7, 1.1]).as_matrix()
    ur, pr = u.copy(), pristine.copy()
    for a in (ur, pr):
        a.set_cell(a.cell @ rot.T, scale_atoms=True)
    g, gr = build_graph(u, pristine, 4.0), build_graph(ur, pr, 4.0)
    chgnet = load_chgnet()
    cache = tmp_path / "prior.pt"
    attach_priors([g, gr], ["u", "ur"], cache=cache, chgnet=chgnet)
    assert g.atom_prior.shape == (len(g.z), PRIOR_FEATURES) and g.force_prior.shape == (len(g.z), 3)
    n = g.n_atoms
    assert torch.all(g.atom_prior[n:] == 0) and torch.all(g.force_prior[n:] == 0)  # vacancy placeholder
    assert float(g.force_prior.abs().max()) > 0.01  # the rattled atoms feel forces
    assert torch.allclose(g.force_prior.sum(0), torch.zeros(3), atol=1e-3)  # no net force
    assert torch.allclose(gr.atom_prior, g.atom_prior, atol=1e-3)  # features are invariant
    assert torch.allclose(gr.force_prior, g.force_prior @ torch.tensor(rot.T, dtype=torch.float32), atol=1e-3)
    model = DefectRelaxNet(ModelConfig(features=16, layers=2, cutoff=4.0, prior_features=PRIOR_FEATURES,
                                       force_prior=True))
    for name, p in model.named_parameters():
        if not name.startswith(("embed_prior", "force_")):  # large read-outs; the prior paths as built
            p.data.normal_(0, 0.3)
    disp = model(Batch([g])).detach().numpy()
    assert 1e-3 < np.abs(disp).max() < 10
    without = DefectRelaxNet(ModelConfig(features=16, layers=2, cutoff=4.0))
    without.load_state_dict(model.state_dict(), strict=False)
    assert not np.allclose(disp, without(Batch([g])).detach().numpy(), atol=1e-4)  # the priors are used
    assert np.allclose(model(Batch([gr])).detach().numpy(), disp @ rot.T, atol=2e-3)
    fresh = build_graph(u, pristine, 4.0)
    with pytest.raises(DefectMLError, match="MLIP"):
        model(Batch([fresh]))

    class NoCalls:
        def predict_structure(self, *args, **kwargs):
            raise AssertionError("cached priors must not be recomputed")

    attach_priors([fresh], ["u"], cache=cache, chgnet=NoCalls())
    assert torch.equal(fresh.force_prior, g.force_prior)
    from defectml.predictor.predict import predict_relaxed  # computes the priors itself

    moved = predict_relaxed(model, u, pristine)  # wrapped into the cell: compare minimum images
    shift = find_mic(moved.positions - u.positions, u.cell, pbc=True)[0]
    assert np.allclose(shift, disp[:n], atol=1e-4)


def test_virtual_node_carries_information_beyond_the_cutoff():
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3)
    u = pristine.copy()
    del u[0]
    far = int(np.argmax(u.get_distances(0, range(len(u)), mic=True)))  # far from atom 0 (and the vacancy)
    v = u.copy()
    v[far].symbol = "Ni"
    for virtual, changes in ((False, False), (True, True)):
        torch.manual_seed(0)
        model = DefectRelaxNet(
            ModelConfig(features=8, layers=1, cutoff=3.0, virtual_node=virtual, zero_net_displacement=False)
        )
        for p in model.parameters():
            p.data.normal_(0, 0.3)
        a, b = (model(Batch([build_graph(x, pristine, 3.0)])).detach()[0] for x in (u, v))
        assert bool((a - b).abs().max() > 1e-6) == changes, virtual


def test_zero_net_displacement_per_structure():
    """Each structure's real atoms move with zero mean (as a DFT relaxation that drops the net force)."""
    torch.manual_seed(1)
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    cells = []
    for k, seed in enumerate((2, 3)):
        u = pristine.copy()
        del u[k]
        u.rattle(0.05, seed=seed)
        cells.append(build_graph(u, pristine, 4.0))
    free = DefectRelaxNet(ModelConfig(features=16, layers=2, cutoff=4.0, zero_net_displacement=False))
    for p in free.parameters():
        p.data.normal_(0, 0.3)
    held = DefectRelaxNet(ModelConfig(features=16, layers=2, cutoff=4.0))
    held.load_state_dict(free.state_dict())
    b = Batch(cells)
    d_free, d_held = free(b).detach(), held(b).detach()
    means = [d_free[(b.graph == k) & b.real].mean(0) for k in range(2)]
    assert max(float(m.abs().max()) for m in means) > 1e-4  # the unconstrained model does drift
    for k in range(2):
        sel = (b.graph == k) & b.real
        assert torch.allclose(d_held[sel].mean(0), torch.zeros(3), atol=1e-6)
        assert torch.allclose(d_held[sel], d_free[sel] - means[k], atol=1e-6)
    assert torch.all(d_held[~b.real] == 0)


def test_training_beats_dummy_and_resumes(tmp_path):
    graphs = [_random_pair(s) for s in range(10)]
    train_g, test_g = graphs[:8], graphs[8:]
    ck = tmp_path / "model.pt"
    config = ModelConfig(features=16, layers=2, cutoff=4.0)
    hist = train(
        train_g, test_g, ck, config, TrainSettings(epochs=2, batch_size=2, lr=5e-3), log=lambda m: None
    )
    assert len(hist["history"]) == 2
    hist = train(
        train_g, test_g, ck, config, TrainSettings(epochs=30, batch_size=2, lr=5e-3), log=lambda m: None
    )
    assert len(hist["history"]) == 30 and hist["history"][0]["epoch"] == 1  # resumed, not restarted
    model, _ = load_checkpoint(ck)
    res, t = evaluate(model, train_g)
    dummy = np.mean([coordinate_mae(np.zeros((len(g.z), 3)), g)["all"] for g in train_g])
    assert res["all"] < 0.7 * dummy, (res, dummy)
    assert t > 0


def test_coordinate_mae_is_periodic_and_local():
    g = _random_pair(3)
    exact = coordinate_mae(g.target.numpy(), g)
    assert exact["all"] == 0 and exact["A3"] == 0
    dummy = coordinate_mae(np.zeros((len(g.z), 3)), g)
    # local: A3 is the mean |displacement| of the atoms within 3 Å of a defect site; periodic: the
    # distance is the shortest over the periodic images (here 5 of those atoms are near only through one)
    n, pos, sites = g.n_atoms, g.pos.numpy()[: g.n_atoms], g.defect_sites()
    images = np.array(list(itertools.product((-1, 0, 1), repeat=3))) @ g.cell.numpy()
    gaps = pos[:, None, None] - sites[None, :, None] - images[None, None]
    d = np.linalg.norm(gaps, axis=-1).min(axis=(1, 2))
    direct = np.linalg.norm(pos[:, None] - sites[None], axis=-1).min(axis=1)
    near = g.real.numpy()[:n] & (d <= 3.0)
    assert near.sum() > (near & (direct <= 3.0)).sum()
    assert dummy["A3"] == pytest.approx(float(np.abs(g.target.numpy()[:n][near]).mean()), rel=1e-5)
    assert dummy["A3"] > dummy["A6"]  # the defect's neighbours move more than the atoms further out
    assert dummy["all"] == pytest.approx(float(np.abs(g.target.numpy()[: g.n_atoms]).mean()))


def test_predict_cli_and_bad_input(tmp_path, capsys):
    ck = _tiny_checkpoint(tmp_path / "m.pt")
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    u = pristine.copy()
    del u[0]
    write(tmp_path / "u.cif", u)
    write(tmp_path / "p.cif", pristine)
    assert (
        main(
            [
                "predictor",
                "predict",
                str(ck),
                str(tmp_path / "u.cif"),
                "--pristine",
                str(tmp_path / "p.cif"),
                "-o",
                str(tmp_path / "pred.cif"),
            ]
        )
        == 0
    )
    from ase.io import read

    pred = read(tmp_path / "pred.cif")
    assert len(pred) == len(u) and pred.get_chemical_symbols() == u.get_chemical_symbols()
    assert (
        main(
            [
                "predictor",
                "predict",
                str(tmp_path / "missing.pt"),
                str(tmp_path / "u.cif"),
                "--pristine",
                str(tmp_path / "p.cif"),
            ]
        )
        == 2
    )
    assert "cannot load predictor checkpoint" in capsys.readouterr().err
    assert (
        main(
            [
                "predictor",
                "train",
                "--data",
                str(tmp_path),
                "--materials",
                "Graphite",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert (
        main(["predictor", "train", "--data", str(tmp_path / "nothing.tar.gz"), "--out", str(tmp_path / "o")])
        == 2
    )


@pytest.mark.skipif(not DATA.exists(), reason="2DMD data not present")
def test_2dmd_representation_on_real_pairs(tmp_path, capsys):
    from defectml.predictor.data import material_split, unpack

    root = unpack(DATA, tmp_path)
    split = material_split(root, "hBN", 5.0, tmp_path / "cache", limit=4)
    assert len(split.train) == 3 and len(split.val) == 1 and len(split.test) == 50
    for g in split.train:
        counts = np.bincount(g.node_type.numpy(), minlength=4)
        assert counts[NodeType.INTERSTITIAL] == 0  # the data set has vacancies and substitutions only
        assert counts[NodeType.PRISTINE] + counts[NodeType.SUBSTITUTED] + counts[NodeType.VACANCY] == 128
    out = tmp_path  # the graph cache built above is reused
    common = ["--data", str(root), "--out", str(out), "--materials", "hBN"]
    tiny = ["--limit", "4", "--epochs", "1", "--features", "8", "--layers", "1", "--threads", "1"]
    extras = ["--ema", "0.9", "--virtual-node"]
    assert main(["predictor", "train", "--per-material", *common, *tiny, *extras, "--seeds", "2"]) == 0
    _, ck = load_checkpoint(out / "hBN" / "model.pt")
    assert ck["epoch"] == 1 and ck["config"]["zero_net_displacement"] and ck["config"]["virtual_node"]
    assert ck["ema"] is not None
    a, b = (load_checkpoint(out / "hBN" / name)[0] for name in ("model.pt", "model_s1.pt"))
    assert not torch.allclose(a.embed_z.weight, b.embed_z.weight)  # two seeds, two models
    capsys.readouterr()
    assert main(["predictor", "evaluate", str(out), *common]) == 0
    ensemble_line = capsys.readouterr().out.splitlines()[-1]
    with torch.no_grad():
        mean = evaluate(Ensemble([a, b]), split.test)[0]
    assert f"{mean['A3']:7.4f}" in ensemble_line  # evaluate averages every seed of the folder
    assert main(["predictor", "train", *common, *tiny, "--seeds", "0"]) == 2
    assert main(["predictor", "train", *common, *tiny, "--interpolate", "1.5"]) == 2
    assert main(["predictor", "evaluate", str(out), *common, "--passes", "0"]) == 2
    # a joint model (OUT/model.pt, beside the per-material folder) with partly relaxed inputs
    assert main(["predictor", "train", *common, *tiny, "--norm", "--interpolate", "0.5"]) == 0
    assert load_checkpoint(out / "model.pt")[1]["config"]["norm"]
    capsys.readouterr()
    assert main(["predictor", "evaluate", str(out / "model.pt"), *common, "--passes", "2"]) == 0
    assert "hBN" in capsys.readouterr().out.splitlines()[-1]


def test_search_pre_relax_option(tmp_path, copper_cif, monkeypatch, capsys):
    import importlib

    from defectml.errors import UntrustedPrediction
    from defectml.predictor.predict import predict_relaxed
    from defectml.store import ResultStore

    ck = _tiny_checkpoint(tmp_path / "m.pt")
    run = tmp_path / "run"
    args = ["search", str(copper_cif), *EMT_VACANCY_SEARCH, "--out", str(run)]
    assert main(args) == 0
    assert main([*args, "--pre-relax", str(ck)]) == 0
    rows = ResultStore(run / "results.db").select(kind="relaxation")
    keys = {r.settings_key for r in rows}
    assert len(keys) == 2  # pre-relaxed trials are a different search, not mixed with the plain one
    assert main([*args, "--pre-relax", str(tmp_path / "none.pt")]) == 2
    model, _ = load_checkpoint(ck)
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    cell = pristine.copy()
    del cell[0]
    moved = predict_relaxed(model, cell, pristine, max_move=5.0)
    shift = find_mic(moved.positions - cell.positions, cell.cell, pbc=True)[0]
    largest = float(np.linalg.norm(shift, axis=1).max())
    assert 0 < largest < 5.0
    with pytest.raises(UntrustedPrediction, match="moves an atom by"):
        predict_relaxed(model, cell, pristine, max_move=largest / 2)
    search_module = importlib.import_module("defectml.search.pipeline")
    monkeypatch.setattr(search_module, "MAX_PREDICTED_MOVE", 1e-9)  # every prediction now "too far"
    capsys.readouterr()
    loud = [x for x in args if x != "--quiet"]
    assert main([*loud, "--out", str(tmp_path / "run_kept"), "--pre-relax", str(ck)]) == 0
    assert "trials as generated" in capsys.readouterr().err


def test_derived_train_ids_are_shuffled_before_validation_hold_out(tmp_path):
    """Without train.csv (BP) the sorted ids group by composition: validation must not be their tail."""
    from defectml.predictor.data import material_split

    folder = tmp_path / "high_density_defects" / "BP"
    (folder / "CIF").mkdir(parents=True)
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True)
    write(folder / "Cu.cif", pristine)
    ids = [f"P_id{k:02d}" for k in range(22)]
    for k, i in enumerate(ids):
        u = pristine.copy()
        del u[k % len(u)]
        r = u.copy()
        r.rattle(0.02, seed=k)
        write(folder / "CIF" / f"{i}_unrelaxed.cif", u)
        write(folder / "CIF" / f"{i}_relaxed.cif", r)
    (folder / "test.csv").write_text("atoms_id\n" + "\n".join(ids[:2]) + "\n")
    split = material_split(folder.parent, "BP", 3.0, tmp_path / "cache", val_fraction=0.1)
    assert len(split.train) == 18 and len(split.val) == 2 and len(split.test) == 2
    assert sorted(split.train_ids + split.val_ids) == ids[2:]
    assert sorted(split.val_ids) != ids[-2:]  # not the sorted tail
    again = material_split(folder.parent, "BP", 3.0, tmp_path / "cache2", val_fraction=0.1)
    assert again.val_ids == split.val_ids  # a fixed order: reruns hold out the same ids


def test_input_noise_keeps_the_relaxed_positions():
    """The noise regulariser moves inputs and targets oppositely, with zero mean shift per structure."""
    from defectml.predictor.train import perturb

    torch.manual_seed(3)
    b = Batch(_two_vacancy_cells())
    pos0, target0 = b.pos.clone(), b.target.clone()
    perturb(b, 0.05)
    shift = b.pos - pos0
    assert float(shift[b.real].abs().mean()) > 0.01
    assert torch.all(shift[~b.real] == 0)  # vacancy placeholders stay on their sites
    assert torch.allclose(b.pos + b.target, pos0 + target0, atol=1e-6)  # same relaxed positions
    for k in range(2):
        assert torch.allclose(shift[(b.graph == k) & b.real].mean(0), torch.zeros(3), atol=1e-6)


def _two_vacancy_cells():
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    cells = []
    for k in range(2):
        u = pristine.copy()
        del u[k]
        r = u.copy()
        r.rattle(0.05, seed=k)
        r.positions -= (r.positions - u.positions).mean(0)
        cells.append(build_graph(u, pristine, 4.0, relaxed=r))
    return cells


def test_interpolated_inputs_keep_the_relaxed_positions():
    """Partly relaxed inputs: each structure moves a fraction t of its way, its target shrinks by 1 - t."""
    from defectml.predictor.train import interpolate

    b = Batch(_two_vacancy_cells())
    pos0, target0 = b.pos.clone(), b.target.clone()
    interpolate(b, 0.0)
    assert torch.equal(b.pos, pos0) and torch.equal(b.target, target0)
    interpolate(b, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(b.pos + b.target, pos0 + target0, atol=1e-6)  # same relaxed positions
    assert torch.all(b.pos[~b.real] == pos0[~b.real])  # vacancy placeholders stay on their sites
    for k in range(2):
        real = (b.graph == k) & b.real
        moved, whole = (b.pos - pos0)[real], target0[real]
        t = float((moved * whole).sum() / (whole * whole).sum())
        assert 0.0 < t < 1.0
        assert torch.allclose(moved, t * whole, atol=1e-6)  # one t per structure


def test_recycled_prediction_feeds_each_pass_the_last_positions():
    from defectml.predictor.model import recycled

    torch.manual_seed(1)
    model = DefectRelaxNet(ModelConfig(features=16, layers=2, cutoff=4.0, norm=True))
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    model.eval()
    b = Batch(_two_vacancy_cells())
    pos0 = b.pos.clone()
    with torch.no_grad():
        one = recycled(model, b, 1)
        assert torch.equal(one, model(b))
        two = recycled(model, b, 2)
        assert torch.equal(b.pos, pos0)  # the batch is left as it was
        b.pos = pos0 + one
        by_hand = one + model(b)
    assert float((two - one).abs().max()) > 1e-4
    assert torch.allclose(two, by_hand, atol=1e-6)
    with pytest.raises(ValueError):
        recycled(model, Batch(_two_vacancy_cells()), 0)


def test_init_from_starts_at_the_given_weights_with_a_fresh_schedule(tmp_path):
    graphs = [_random_pair(s) for s in range(4)]
    config = ModelConfig(features=8, layers=1, cutoff=4.0)
    first = tmp_path / "first.pt"
    train(graphs[:3], graphs[3:], first, config, TrainSettings(epochs=3, batch_size=2), log=lambda m: None)
    start, _ = load_checkpoint(first)
    second = tmp_path / "second.pt"
    logs: list[str] = []
    hist = train(
        graphs[:3],
        graphs[3:],
        second,
        ModelConfig(features=16, layers=2, cutoff=4.0),  # ignored: the architecture comes from `first`
        TrainSettings(epochs=1, batch_size=2, lr=0.0, noise=0.02, init_from=str(first)),
        log=logs.append,
    )
    assert len(hist["history"]) == 1 and any("starting from the weights" in m for m in logs)
    model, _ = load_checkpoint(second)
    assert model.config.features == 8
    for key, value in start.state_dict().items():  # lr 0: the weights are the ones it started from
        assert torch.equal(value, model.state_dict()[key]), key


def test_weight_average_is_what_is_validated_kept_and_resumed(tmp_path):
    graphs = [_random_pair(s) for s in range(4)]
    config = ModelConfig(features=8, layers=1, cutoff=4.0)
    settings = TrainSettings(epochs=1, batch_size=3, lr=5e-3, ema=0.5, seed=0)  # one step per epoch
    ck_path = tmp_path / "ema.pt"
    train(graphs[:3], graphs[3:], ck_path, config, settings, log=lambda m: None)
    torch.manual_seed(settings.seed)
    start = DefectRelaxNet(config).state_dict()  # the weights training started from
    ck = torch.load(ck_path, weights_only=False)
    for key, value in ck["state"].items():
        expected = 0.5 * start[key] + 0.5 * value if value.dtype.is_floating_point else value
        assert torch.allclose(ck["ema"][key], expected, atol=1e-7), key
        assert torch.equal(ck["best_state"][key], ck["ema"][key]), key  # the average is the model kept
    assert any(not torch.equal(ck["state"][k], ck["ema"][k]) for k in start)
    model, _ = load_checkpoint(ck_path)
    assert np.isclose(ck["best_val"], validation_loss(model, graphs[3:], settings), rtol=1e-5)
    settings.epochs = 2
    train(graphs[:3], graphs[3:], ck_path, config, settings, log=lambda m: None)  # resumes its average
    ck2 = torch.load(ck_path, weights_only=False)
    for key, value in ck2["state"].items():
        if value.dtype.is_floating_point:
            assert torch.allclose(ck2["ema"][key], 0.5 * ck["ema"][key] + 0.5 * value, atol=1e-7), key


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_training_step_matches_eager():
    """``torch.compile`` (TrainSettings.compile) gives the same predictions and gradients as eager mode."""
    torch.manual_seed(4)
    graphs = [_random_pair(s) for s in range(2)]
    model = DefectRelaxNet(ModelConfig(features=8, layers=2, cutoff=4.0))
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    compiled = torch.compile(model, dynamic=True)
    for group in (graphs, graphs[:1]):  # a second batch size must not break the compiled graph
        b = Batch(group)
        out_e, out_c = model(b), compiled(b)
        assert torch.allclose(out_e, out_c, atol=1e-5)
        g_e = torch.autograd.grad(out_e.square().sum(), list(model.parameters()))
        g_c = torch.autograd.grad(out_c.square().sum(), list(model.parameters()))
        assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(g_e, g_c, strict=True))


def test_defect_distance_matches_the_local_masks():
    g = _random_pair(4)
    d = g.defect_distance().numpy()
    assert np.all(d[g.node_type.numpy() != NodeType.PRISTINE] < 1e-5)  # defect sites are at distance 0
    sites = g.defect_sites()
    from ase.geometry import get_distances

    brute = get_distances(g.pos.numpy(), sites, cell=g.cell.numpy(), pbc=True)[1].min(axis=1)
    assert np.allclose(d, brute, atol=1e-5)
    assert np.abs(d).max() > 1.0  # the cell has atoms away from the defects
    assert g.defect_distance() is g.defect_distance()  # cached


def test_local_weight_shifts_the_loss_toward_defect_neighbourhoods():
    g = _random_pair(5)
    b = Batch([g])
    near = (b.near <= 3.0) & b.real
    far = (b.near > 3.0) & b.real
    assert near.any() and far.any()
    pred = b.target.clone()
    pred[far] += torch.tensor([0.3, 0.0, 0.0])  # errors only away from the defects
    plain = float(distance_loss(pred, b))
    assert plain == pytest.approx(0.3 * int(far.sum()) / int(b.real.sum()), abs=1e-5)
    weighted = float(distance_loss(pred, b, local_weight=4.0))
    n_near, n_far = int(near.sum()), int(far.sum())
    assert weighted == pytest.approx(0.3 * n_far / (5 * n_near + n_far), abs=1e-5)
    assert weighted < plain


def test_ensemble_averages_its_members_and_loads_from_a_list(tmp_path, capsys):
    graphs = [_random_pair(s) for s in range(3)]
    paths = []
    for seed in (0, 1):
        ck = tmp_path / f"m{seed}.pt"
        train(
            graphs,
            graphs[:1],
            ck,
            ModelConfig(features=8, layers=1, cutoff=4.0),
            TrainSettings(epochs=2, lr=5e-2, seed=seed),
            log=lambda m: None,
        )
        paths.append(ck)
    a, b = (load_checkpoint(p)[0] for p in paths)
    both = load_predictor(",".join(str(p) for p in paths))
    assert isinstance(both, Ensemble) and len(both.members) == 2
    batch = Batch(graphs)
    with torch.no_grad():
        pa, pb, pe = a(batch), b(batch), both(batch)
    assert not torch.allclose(pa, pb)  # different seeds, different models
    assert torch.allclose(pe, (pa + pb) / 2, atol=1e-6)
    assert isinstance(load_predictor(paths[0]), DefectRelaxNet)
    other = tmp_path / "c5.pt"
    _tiny_checkpoint(other, cutoff=5.0)
    with pytest.raises(DefectMLError, match="different cutoffs"):
        load_predictor([paths[0], other])
    pristine = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    u = pristine.copy()
    del u[0]
    write(tmp_path / "u.cif", u)
    write(tmp_path / "p.cif", pristine)
    spec = f"{paths[0]},{paths[1]}"
    args = ["predictor", "predict", spec, str(tmp_path / "u.cif"), "--pristine", str(tmp_path / "p.cif")]
    assert main([*args, "-o", str(tmp_path / "pred.cif")]) == 0
    from ase.io import read

    from defectml.predictor.predict import predict_relaxed

    expected = predict_relaxed(both, u, pristine)
    got = read(tmp_path / "pred.cif")
    assert np.allclose(got.get_scaled_positions(), expected.get_scaled_positions(), atol=1e-5)


@pytest.mark.parametrize("broken", ["whole", "all"])
def test_a_failing_torch_compile_falls_back_to_layers_then_eager(tmp_path, monkeypatch, broken):
    def fake_compile(module, **kwargs):
        if broken == "whole" and not isinstance(module, DefectRelaxNet):
            return module  # the per-layer graphs "compile" (run as they are)

        def call(*args):
            raise RuntimeError("inductor generated bad code")

        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    graphs = [_random_pair(s) for s in range(3)]
    messages = []
    out = train(
        graphs,
        graphs[:1],
        tmp_path / "m.pt",
        ModelConfig(features=8, layers=2, cutoff=4.0),
        TrainSettings(epochs=2, lr=5e-3, compile=True),
        log=messages.append,
    )
    failed = [m for m in messages if "torch.compile failed (RuntimeError: inductor generated bad code)" in m]
    assert "compiling each layer on its own" in failed[0]
    assert len(failed) == (1 if broken == "whole" else 2)
    if broken == "all":
        assert "training without it" in failed[1]
    assert len(out["history"]) == 2 and np.isfinite(out["best_val"])
    assert out["history"][1]["loss"] < out["history"][0]["loss"] * 1.5  # it really trained


def test_a_rare_non_finite_batch_is_skipped_and_a_diverging_run_stops(tmp_path, monkeypatch):
    """One blown-up batch costs one step (logged, counted); blow-ups on more than 5% of an epoch stop it."""
    import defectml.predictor.train as training

    graphs = [_random_pair(s) for s in range(2)] * 10  # 20 batches of one: at most 1 may be skipped
    real_loss = training.distance_loss
    calls = {"n": 0}

    def loss_with_blowups(pred, b, *args, bad=(3,)):
        if torch.is_grad_enabled():  # training steps only, not validation
            calls["n"] += 1
            if bad == "all" or calls["n"] in bad:
                return (pred * float("nan")).sum()
        return real_loss(pred, b, *args)

    monkeypatch.setattr(training, "distance_loss", loss_with_blowups)
    messages = []
    config = ModelConfig(features=8, layers=1, cutoff=4.0)
    out = train(graphs, graphs[:1], tmp_path / "a.pt", config, TrainSettings(epochs=2, batch_size=1),
                log=messages.append)
    assert [h["skipped"] for h in out["history"]] == [1, 0]
    assert any("batch 3 skipped" in m for m in messages)
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    assert all(torch.isfinite(p).all() for p in load_checkpoint(tmp_path / "a.pt")[0].parameters())

    monkeypatch.setattr(
        training, "distance_loss", lambda pred, b, *args: loss_with_blowups(pred, b, *args, bad="all")
    )
    with pytest.raises(DefectMLError, match="training diverged: 2 of the 20 batches of epoch 1"):
        train(graphs, graphs[:1], tmp_path / "b.pt", config, TrainSettings(epochs=1, batch_size=1),
              log=lambda m: None)
    assert not (tmp_path / "b.pt").exists()  # no epoch finished: nothing half-written


def test_train_settings_from_options_uses_the_shared_mixin_and_never_takes_log():
    import argparse

    from defectml.settings import FromOptions

    assert issubclass(TrainSettings, FromOptions)
    a = argparse.Namespace(epochs=3, lr=None, noise=0.1, log=print, seeds=2, no_compile=True)
    s = TrainSettings.from_options(a, threads=1, compile=not a.no_compile)
    assert (s.epochs, s.lr, s.noise, s.threads, s.compile, s.log) == (3, 2e-3, 0.1, 1, False, [])
    assert TrainSettings.from_options({"batch_size": 2, "log": ["x"]}).log == []
    with pytest.raises(DefectMLError, match="--interpolate"):
        TrainSettings.from_options({"interpolate": 2.0})
