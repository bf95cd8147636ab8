"""Defect datasets: reading, cleaning, sampling, grouped splits, labels in the written files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from conftest import emt_labelled_frames

from defectml import SearchSettings, TrialSettings, search
from defectml.cli import main
from defectml.errors import InputError
from defectml.train.dataset import (
    FrameSet,
    SplitSettings,
    clean,
    direct_sample,
    evenly_spaced,
    farthest_points,
    read_store,
    sample,
    split,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "defect-dft"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="shared defect-dft data not present")


def _relaxation(run_id, host="Cu", defect="v_Cu_0", n=6, charge=0, seed=0):
    """A real EMT 'relaxation': n frames of a rattled Cu vacancy cell moving toward its minimum."""
    return FrameSet(run_id, host, defect, charge, "EMT", emt_labelled_frames(n, seed), "test")


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(97, 10)[0] == 0 and evenly_spaced(97, 10)[-1] == 96
    assert len(evenly_spaced(97, 10)) == 10 and evenly_spaced(4, 10) == [0, 1, 2, 3]


def test_clean_drops_high_frames_and_absurd_forces():
    fs = _relaxation("r1")
    hot, broken = fs.frames[1], fs.frames[2]
    hot.calc.results["energy"] = fs.frames[-1].get_potential_energy() + 9.0
    broken.calc.results["forces"] = broken.get_forces() * 0 + [0, 0, 100.0]
    (kept,), report = clean([fs], energy_window=5.0, max_force=50.0)
    assert len(kept.frames) == 4 and report.above_window == 1 and report.absurd_forces == 1


def test_farthest_points_and_direct_pick_one_frame_per_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(0, 0.1, (20, 2)) for c in centres])
    for rows in (farthest_points(x, 3), direct_sample(x, 3)):
        assert sorted(int(r) // 20 for r in rows) == [0, 1, 2]  # one from each cluster
    assert direct_sample(x, 3) == direct_sample(x, 3)  # deterministic


def test_sampling_per_relaxation_and_over_the_set():
    sets = [_relaxation(f"r{k}", n=12, seed=k) for k in range(3)]
    even = sample(sets, "even", per_relaxation=4)
    assert [len(fs.frames) for fs in even] == [4, 4, 4]
    assert even[0].frames[0] is sets[0].frames[0] and even[0].frames[-1] is sets[0].frames[-1]
    flat = lambda frames: np.array([f.positions.ravel() for f in frames])  # noqa: E731
    fps = sample(sets, "fps", total=5, descriptor=flat)
    assert sum(len(fs.frames) for fs in fps) == 5
    with pytest.raises(InputError, match="unknown sampling"):
        sample(sets, "random")


def test_chgnet_descriptors_give_one_vector_per_frame():
    from defectml.train.dataset import chgnet_descriptors

    frames = _relaxation("r", n=3).frames
    x = chgnet_descriptors(frames)
    assert x.shape[0] == 3 and x.shape[1] > 8 and np.all(np.isfinite(x))


def test_splits_keep_groups_whole_and_hold_out():
    sets = [_relaxation(f"{h}{d}{q}", host=h, defect=f"{d}_{q}", charge=q, n=3)
            for h in ("A", "B", "C") for d in ("vac_1_X", "vac_2_Y", "sub_1_Z_on_X") for q in (0, 1)]
    sets += [_relaxation(f"{h}bulk", host=h, defect="bulk", n=2) for h in ("A", "B", "C")]
    parts = split(sets, SplitSettings(by="defect", fractions=(0.6, 0.2, 0.2), hold_out=("host:C",)))
    where = {}
    for name, part in parts.items():
        for fs in part:
            where.setdefault(fs.group("defect"), set()).add(name)
    assert all(len(v) == 1 for v in where.values())  # every defect (both charges) on one side
    assert {fs.host for fs in parts["test"] if fs.host == "C"} == {"C"}
    assert all(fs.host != "C" for name in ("train", "val") for fs in parts[name])  # C unseen, bulk too
    assert {fs.run_id for fs in parts["train"] if fs.is_bulk} == {"Abulk", "Bbulk"}
    assert _relaxation("x", defect="inter_26_Al_1").defect_group == "inter_Al"  # equivalent sites together
    with pytest.raises(InputError, match="no such host; there are A, B, C"):
        split(sets, SplitSettings(hold_out=("host:D",)))
    with pytest.raises(InputError, match="the val split is empty"):
        split(sets[:2], SplitSettings(by="host"))


def test_a_store_is_a_source_and_labels_survive_the_file(tmp_path, copper):
    settings = SearchSettings(model="emt", trials=TrialSettings(distortions=(-0.3,), rattled=False))
    search(copper, "v_Cu", [0], out=tmp_path / "run", settings=settings, progress=False)
    sets = read_store(tmp_path / "run")
    assert sets and all(fs.host == "Cu" and fs.charge == 0 for fs in sets)
    assert all(fs.functional.startswith("emt-") for fs in sets)  # the model key: its level of theory
    assert all(len(fs.frames) > 1 for fs in sets)
    assert main(["dataset", str(tmp_path / "run"), "--out", str(tmp_path / "ds"), "--split-by",
                 "relaxation", "--fractions", "1,0,0", "--quiet"]) == 0
    frames = read(tmp_path / "ds" / "train.extxyz", ":")
    assert len(frames) == sum(min(len(fs.frames), 10) for fs in sets)
    f = frames[0]
    assert f.info["charge"] == 0 and f.info["host"] == "Cu" and f.info["functional"].startswith("emt-")
    assert np.allclose(f.get_forces(), f.arrays["REF_forces"])
    assert f.get_potential_energy() == f.info["REF_energy"]


@needs_data
def test_the_shared_defect_data_split_by_defect_with_held_out_host_and_defect(tmp_path):
    out = tmp_path / "ds"
    assert main(["dataset", str(SHARED / "ZnS.extxyz.gz"), str(SHARED / "SrTiO3.extxyz.gz"),
                 str(SHARED / "GaN.extxyz.gz"), "--out", str(out), "--hold-out", "host:SrTiO3",
                 "--hold-out", "defect:ZnS/vac_S", "--quiet"]) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    test = read(out / "test.extxyz", ":")
    assert {a.info["host"] for a in test if a.info["defect_group"] == "vac_S"} == {"ZnS"}
    assert {a.info["host"] for a in test} >= {"SrTiO3", "ZnS"}
    for name in ("train", "val"):
        frames = read(out / f"{name}.extxyz", ":")
        assert all(a.info["host"] != "SrTiO3" and a.info["defect_group"] != "vac_S" for a in frames)
        assert manifest["counts"][name]["frames"] == len(frames)
    ref = {(a.info["run_id"], a.info["ionic_step"]): a for a in read(SHARED / "ZnS.extxyz.gz", ":")}
    for a in test[:5]:  # labels and targets are the source's, unchanged
        src = ref.get((a.info["run_id"], a.info["ionic_step"]))
        if src is not None:
            assert a.get_potential_energy() == pytest.approx(src.get_potential_energy())
            assert np.allclose(a.get_forces(), src.get_forces()) and a.info["functional"] == "HSE06"
            assert a.info["charge"] == src.info["charge"]


def test_bad_datasets_are_refused_with_one_line(tmp_path, capsys):
    no_forces = bulk("Cu", "fcc", a=3.61, cubic=True)
    no_forces.calc = SinglePointCalculator(no_forces, energy=-1.0)
    write(tmp_path / "noforces.extxyz", no_forces)
    mixed = [_relaxation("same").frames[0], bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)]
    mixed[1].calc = SinglePointCalculator(mixed[1], energy=-1.0, forces=np.zeros((32, 3)))
    for a in mixed:
        a.info["run_id"] = "same"
    write(tmp_path / "mixed.extxyz", mixed)
    cases = [
        (["noforces.extxyz"], "a frame without forces"),
        (["mixed.extxyz"], "mixes structures"),
        (["mixed.extxyz", "--fractions", "0.5,0.5"], "three non-negative shares"),
        (["nothing.txt"], "not a dataset source"),
    ]
    (tmp_path / "nothing.txt").write_text("")
    for args, message in cases:
        capsys.readouterr()
        code = main(["dataset", *[str(tmp_path / x) if i == 0 else x for i, x in enumerate(args)],
                     "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "out" / "train.extxyz").exists()  # nothing written half-way
    with pytest.raises(InputError, match="no frame is left after cleaning"):
        from defectml.train.dataset import build_dataset

        build_dataset([_relaxation("r")], tmp_path / "o2", max_force=1e-9)
