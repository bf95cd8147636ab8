"""Minima out to ShakeNBreak folders and DefectEntry JSON, and ShakeNBreak's settings in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from defectml import ResultStore, summarise
from defectml.cli import main
from defectml.dft.ingest import ingest_snb_folder

MGO = Path(__file__).resolve().parents[2] / "shared" / "data" / "snb-mgo-mg_o"


@pytest.fixture(scope="module")
def run(tmp_path_factory, copper):
    cif = tmp_path_factory.mktemp("host") / "Cu.cif"
    copper.to(filename=str(cif))
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["search", str(cif), "--defect", "v_Cu", "--charge", "0", "--model", "emt", "--oxi", "Cu=2",
                 "--min-length", "7", "--distortions", "-0.4,0.3", "--quiet", "--no-report",
                 "--out", str(out)]) == 0
    return out, cif


def test_shakenbreak_folders_round_trip_through_a_shakenbreak_reader(run, tmp_path):
    out, cif = run
    assert main(["export", str(out), "--format", "snb", "--out", str(tmp_path / "snb"), "--quiet"]) == 0
    folder = tmp_path / "snb" / "v_Cu_0"
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert "Bond_Distortion_-40.0%" in names and "Bond_Distortion_0.0%" in names and "Unperturbed" in names
    assert (folder / "Bond_Distortion_-40.0%" / "POSCAR").exists()
    doc = yaml.safe_load((folder / "v_Cu_0.yaml").read_text())
    assert -0.4 in doc["distortions"] and "Unperturbed" in doc
    assert "from emt" in (folder / "v_Cu_0.yaml").read_text().splitlines()[0]
    # read back as ShakeNBreak output: the same trials and energies
    store = ResultStore(tmp_path / "back" / "results.db")
    report = ingest_snb_folder(store, tmp_path / "snb", host_file=cif, theory="emt (exported)")
    assert not report.skipped
    (back,) = summarise(store, fidelity="dft")
    (ml,) = summarise(ResultStore(out / "results.db"))
    mine = {t.name: t.energy for t in ml.trials if t.status == "converged"}
    theirs = {t.name: t.energy for t in back.trials}
    assert theirs.keys() == mine.keys() and all(theirs[k] == pytest.approx(mine[k], abs=1e-6) for k in mine)


def test_defect_entries_load_in_pymatgen_analysis_defects(run, tmp_path):
    from monty.serialization import loadfn
    from pymatgen.analysis.defects.thermo import DefectEntry

    out, _ = run
    assert main(["export", str(out), "--format", "entries", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    entry = loadfn(tmp_path / "e" / "v_Cu_0.json")
    assert isinstance(entry, DefectEntry) and entry.charge_state == 0
    (ml,) = summarise(ResultStore(out / "results.db"))
    assert entry.sc_entry.energy == pytest.approx(ml.minima[0].energy)
    assert entry.defect.name == "v_Cu" and len(entry.sc_entry.structure) == len(ml.minima[0].atoms)
    assert entry.sc_entry.data["model"] == ml.model


@pytest.mark.skipif(not MGO.exists(), reason="shared MgO ShakeNBreak data not present")
def test_shakenbreak_distortion_metadata_sets_the_trials(tmp_path):
    out = tmp_path / "trials"
    assert main(["generate", str(MGO / "MgO_bulk_relaxed_CONTCAR"), "--defect", "Mg_O", "--charge", "0",
                 "--min-length", "8", "--config", str(MGO / "Mg_O_0" / "distortion_metadata.json"),
                 "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "Mg_O_0" / "distortion_metadata.json").read_text())
    made = {k for k in meta["trials"] if k.startswith("Bond")}
    dropped = {d.split(":")[0] for d in meta["dropped"]}  # +-60%: two atoms closer than 1 Å here
    expected = {f"Bond_Distortion_{100 * d:.1f}%" for d in (-0.6, -0.5, -0.4, -0.3, -0.2, -0.1, 0.1, 0.2,
                                                             0.3, 0.4, 0.5, 0.6)}
    assert made | dropped == expected and len(made) >= 10


def test_shakenbreaks_own_reader_reads_the_exported_folders(run, tmp_path):
    from shakenbreak import analysis
    out, _ = run
    assert main(["export", str(out), "--format", "snb", "--out", str(tmp_path / "snb"), "--quiet"]) == 0
    energies = analysis.get_energies("v_Cu_0", output_path=str(tmp_path / "snb"), verbose=False)
    structures = analysis.get_structures("v_Cu_0", output_path=str(tmp_path / "snb"))
    (ml,) = summarise(ResultStore(out / "results.db"))
    mine = {t.distortion: t.energy for t in ml.trials if t.status == "converged" and t.distortion is not None
            and t.name.startswith("Bond")}
    unperturbed = next(t.energy for t in ml.trials if t.name == "Unperturbed")
    assert energies["Unperturbed"] == 0.0 and set(mine) <= set(energies["distortions"])
    for d, e in mine.items():  # ShakeNBreak gives them relative to Unperturbed
        assert energies["distortions"][d] == pytest.approx(e - unperturbed, abs=1e-6)
    assert "Unperturbed" in structures and len(structures["Unperturbed"]) == len(ml.minima[0].atoms)


def test_dopeds_defect_entry_reads_the_exported_entries(run, tmp_path):
    from doped import core
    out, _ = run
    assert main(["export", str(out), "--format", "entries", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "e" / "v_Cu_0.json").read_text())
    entry = core.DefectEntry.from_dict(doc)
    (ml,) = summarise(ResultStore(out / "results.db"))
    assert isinstance(entry, core.DefectEntry) and entry.charge_state == 0
    assert entry.sc_entry.energy == pytest.approx(ml.minima[0].energy)
