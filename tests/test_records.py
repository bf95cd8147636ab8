"""The store's schema: typed records, a version stamp, migration, and what every row keeps."""

from __future__ import annotations

from pathlib import Path

import ase.db
import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write

from defectml import ResultStore, SearchSettings, TrialSettings, search
from defectml.cli import main
from defectml.errors import StoreError
from defectml.records import SCHEMA_VERSION, Trajectory

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GAN = SHARED / "defect-dft" / "GaN.extxyz.gz"
MGO = SHARED / "snb-mgo-mg_o"


def test_ml_rows_keep_theory_trajectory_and_model_key(tmp_path, copper):
    settings = SearchSettings(model="emt", trials=TrialSettings(distortions=(-0.3,), rattled=False))
    result = search(copper, "v_Cu", [0], out=tmp_path, settings=settings, progress=False)
    store = ResultStore(tmp_path / "results.db")
    assert store.schema_version() == SCHEMA_VERSION
    rows = store.select(kind="relaxation")
    assert rows and all(r.theory == r.model_key and r.model_key.startswith("emt-") for r in rows)
    for r in rows:
        traj = Trajectory.from_data(r.data["trajectory"])
        assert len(traj) == r.steps + 1 and traj.forces.shape == (len(traj), r.natoms, 3)
        assert traj.energies[-1] == pytest.approx(r.energy)
        assert np.allclose(traj.positions[-1], r.positions, atol=1e-4)  # float32 frames
        assert np.allclose(traj.positions[0], r.data["initial_positions"], atol=1e-4)
        frame = traj.frame(0, r.numbers)
        assert frame.get_potential_energy() == traj.energies[0] and frame.get_forces().shape == (r.natoms, 3)
    assert result.relaxed == len(rows)


def _v1_store(path: Path) -> None:
    """A store as defectml wrote it before schema versions (no stamp, no theory)."""
    db = ase.db.connect(path, use_lock_file=False)
    db.write(bulk("Cu"), kind="relaxation", fidelity="mlip", model="emt", settings_key="k1",
             trial_key="t1", defect="v_Cu", defect_key="d1", charge_state=0, status="converged",
             trial="Unperturbed", steps=3)
    db.write(bulk("Cu"), kind="relaxation", fidelity="dft", model="dft", settings_key="k2",
             trial_key="t2", defect="v_Cu", defect_key="d1", charge_state=0, status="converged",
             trial="Unperturbed", steps=3)


def test_a_version_1_store_is_migrated_when_written(tmp_path):
    path = tmp_path / "results.db"
    _v1_store(path)
    store = ResultStore(path)
    assert store.schema_version() == 1  # reading changes nothing
    assert all(r.get("theory") is None for r in store.select(kind="relaxation"))
    store.lock()
    assert store.schema_version() == SCHEMA_VERSION
    theories = {r.fidelity: r.theory for r in store.select(kind="relaxation")}
    assert theories == {"mlip": "emt (weights not recorded)", "dft": "dft (functional not recorded)"}
    assert store.count(kind="relaxation") == 2  # nothing dropped


def test_a_store_from_a_newer_defectml_is_refused(tmp_path, capsys):
    path = tmp_path / "results.db"
    _v1_store(path)
    db = ase.db.connect(path, use_lock_file=False)
    db.metadata = {"defectml_schema": SCHEMA_VERSION + 1}
    with pytest.raises(StoreError, match="written by a newer defectml"):
        ResultStore(path)
    assert main(["show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "upgrade defectml" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not GAN.exists(), reason="shared defect-dft data not present")
def test_an_extxyz_dft_relaxation_keeps_its_frames_and_functional(tmp_path):
    frames = [f for f in read(GAN, ":") if f.info["run_id"] == "a45fd1bd"]  # Mg_Ga, q = 0
    host = next(f for f in read(GAN, ":") if f.info["run_id"] == "046b3360")  # its bulk supercell
    relaxation, host_file = tmp_path / "mg_ga.extxyz", tmp_path / "GaN_bulk.vasp"
    write(relaxation, frames)
    write(host_file, host, format="vasp")
    mg = frames[0].get_chemical_symbols().index("Mg")
    site = ",".join(f"{x:.6f}" for x in frames[0].get_scaled_positions()[mg])
    out = tmp_path / "dft"
    assert main(["ingest", str(relaxation), "--out", str(out), "--defect", "Mg_Ga", "--charge", "0",
                 "--site", site, "--host", str(host_file), "--quiet"]) == 0
    (row,) = ResultStore(out / "results.db").select(kind="relaxation")
    assert row.fidelity == "dft" and row.theory == "vasp PBEsol encut=500" and row.charge_state == 0
    traj = Trajectory.from_data(row.data["trajectory"])
    assert len(traj) == len(frames) == row.steps
    for i, f in enumerate(frames):
        assert traj.energies[i] == pytest.approx(f.get_potential_energy())
        assert np.allclose(traj.forces[i], f.get_forces(), atol=1e-5)
        assert np.allclose(traj.stresses[i], f.get_stress(), atol=1e-6)
        assert np.allclose(traj.cells[i], f.cell.array)
    fmax = float(np.linalg.norm(frames[-1].get_forces(), axis=1).max())
    assert row.status == ("converged" if fmax <= 0.05 else "unconverged")
    assert f"max force {fmax:.3f}" in row.data["convergence"]


@pytest.mark.skipif(not MGO.exists(), reason="shared MgO DFT data not present")
def test_a_shakenbreak_ingest_keeps_the_functional_and_says_convergence_was_not_checked(tmp_path, capsys):
    out = tmp_path / "dft"
    assert main(["ingest", str(MGO / "Mg_O_+4"), "--host", str(MGO / "MgO_bulk_relaxed_CONTCAR"),
                 "--out", str(out), "--theory", "vasp PBEsol"]) == 0
    assert "without forces in their outputs: convergence not checked" in capsys.readouterr().err
    rows = ResultStore(out / "results.db").select(kind="relaxation")
    assert rows and {r.theory for r in rows} == {"vasp PBEsol"}
    assert all(r.data["convergence"].startswith("not checked") for r in rows)
    assert all(r.data["initial_positions"].shape == (r.natoms, 3) for r in rows)
