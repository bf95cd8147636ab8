"""End-to-end search with ASE's EMT potential on a Cu vacancy (fast, real relaxations)."""

import json

import numpy as np
import pytest
from conftest import require

from defectml import ResultStore, SearchSettings, TrialSettings, search, summarise
from defectml.cli import main

FAST = ["--model", "emt", "--min-length", "7", "--oxi", "Cu=2", "--distortions", "-0.4,0.3",
        "--fmax", "0.05", "--quiet"]


def _settings(**kw):
    return SearchSettings(model="emt", min_length=7.0, oxidation_states={"Cu": 2},
                          trials=TrialSettings(distortions=(-0.4, 0.3)), **kw)


def test_python_api_end_to_end(tmp_path, copper):
    result = search(copper, "v_Cu", [0], out=tmp_path, settings=_settings(), progress=False)
    (s,) = result.summaries
    assert s.label == "v_Cu_0" and result.relaxed == 5 and result.skipped == 0
    assert [t.name for t in s.trials] == ["Unperturbed", "Rattled", "Bond_Distortion_-40.0%",
                                          "Bond_Distortion_30.0%", "Dimer"]
    assert all(t.status == "converged" for t in s.trials)
    assert s.minima and s.minima[0].energy == min(t.energy for t in s.trials)
    assert sum(len(m.trials) for m in s.minima) == 5
    # every relaxation is in the store with its metadata
    store = ResultStore(tmp_path / "results.db")
    rows = store.select(kind="relaxation")
    assert len(rows) == 5
    row = rows[0]
    assert row.model == "emt" and row.fidelity == "mlip" and row.charge_state == 0
    assert row.data["model_version"].startswith("ase") and row.forces.shape == (31, 3)
    assert store.count(kind="host") == 1 and store.count(kind="defect") == 1


def test_rerun_skips_everything_done(tmp_path, copper):
    first = search(copper, "v_Cu", [0], out=tmp_path, settings=_settings(), progress=False)
    again = search(copper, "v_Cu", [0], out=tmp_path, settings=_settings(), progress=False)
    assert again.relaxed == 0 and again.skipped == first.relaxed
    assert ResultStore(tmp_path / "results.db").count(kind="relaxation") == first.relaxed
    assert [m.trials for m in again.summaries[0].minima] == [
        m.trials for m in first.summaries[0].minima]
    # changed settings are a different run, not a reuse of stale results
    other = search(copper, "v_Cu", [0], out=tmp_path, settings=_settings(fmax=0.1), progress=False)
    assert other.relaxed == first.relaxed


def test_any_ase_calculator_through_the_api(tmp_path, copper):
    from ase.calculators.emt import EMT

    result = search(copper, "v_Cu", [0], out=tmp_path, calculator=EMT(), progress=False,
                    settings=_settings())
    assert result.model == "EMT" and result.summaries[0].minima


def test_cli_search_writes_every_output_and_show_reprints(tmp_path, copper_cif, capsys):
    out = tmp_path / "run"
    assert main(["search", str(copper_cif), "--defect", "v_Cu", "--charge", "0",
                 "--out", str(out), *FAST]) == 0
    table = capsys.readouterr().out
    assert "v_Cu_0" in table and "dE (eV)" in table
    doc = json.loads((out / "summary.json").read_text())
    (entry,) = doc["defects"]
    assert entry["n_trials"] == 5 and entry["minima"][0]["delta_e_eV"] <= 0.0
    for f in entry["minima"][0]["files"]:
        assert (out / f).stat().st_size > 0
    assert (out / "v_Cu_0" / "energy_vs_distortion.png").stat().st_size > 1000
    assert main(["show", str(out)]) == 0
    assert capsys.readouterr().out == table
    assert main(["show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["defects"][0]["minima"] == [
        {k: v for k, v in m.items() if k != "files"} for m in entry["minima"]]


def test_cli_json_and_default_charges(tmp_path, copper_cif, capsys):
    out = tmp_path / "run"
    assert main(["search", str(copper_cif), "--defect", "v_Cu", "--out", str(out), "--json",
                 *FAST]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(d["charge"] for d in doc["defects"]) == [-2, -1, 0]


def test_generate_writes_shakenbreak_layout(tmp_path, cdte):
    cif = tmp_path / "CdTe.cif"
    cdte.to(filename=str(cif))
    assert main(["generate", str(cif), "--defect", "v_Cd", "--charge", "0,-1", "--out",
                 str(tmp_path / "t"), "--quiet"]) == 0
    neutral = tmp_path / "t" / "v_Cd_0"
    assert (neutral / "Unperturbed" / "POSCAR").exists()
    assert (neutral / "Bond_Distortion_-30.0%" / "POSCAR").exists()
    assert (neutral / "Dimer" / "POSCAR").exists()
    meta = json.loads((neutral / "distortion_metadata.json").read_text())
    assert len(meta["trials"]) == 15
    # V_Cd^-1 has one hole: one neighbour distorted
    meta1 = json.loads((tmp_path / "t" / "v_Cd_-1" / "distortion_metadata.json").read_text())
    assert {len(t["distorted_indices"]) for n, t in meta1["trials"].items()
            if n.startswith("Bond")} == {1}


def test_summarise_requires_relaxations(tmp_path):
    from defectml.errors import StoreError

    store = ResultStore(tmp_path / "empty.db")
    with pytest.raises(StoreError, match="no mlip relaxations"):
        summarise(store)


def test_postgresql_store_works_the_same(tmp_path, copper):
    """Against a real server: .ci/run starts one and sets DEFECTML_TEST_POSTGRES_URL."""
    import os

    url = os.environ.get("DEFECTML_TEST_POSTGRES_URL", "")
    require(bool(url), "a PostgreSQL server (DEFECTML_TEST_POSTGRES_URL=postgresql://...)")
    store = ResultStore(url)
    for row in store.select():
        store.db.delete([row.id])
    first = search(copper, "v_Cu", [0], out=tmp_path, db=url, settings=_settings(), progress=False)
    again = search(copper, "v_Cu", [0], out=tmp_path, db=url, settings=_settings(), progress=False)
    assert first.relaxed == 5 and again.relaxed == 0 and again.skipped == 5
    assert ResultStore(url).count(kind="relaxation") == 5


def test_model_element_coverage():
    from defectml.models import load_model

    model = load_model("emt")
    model.check_elements({"Cu", "Au"})
    with pytest.raises(__import__("defectml").ModelError, match="does not cover element"):
        model.check_elements({"Cu", "Te"})
    chgnet = load_model("chgnet", threads=1)
    chgnet.check_elements({"Cd", "Te", "Pu"})
    with pytest.raises(__import__("defectml").ModelError, match="Am"):
        chgnet.check_elements({"Am"})


def test_the_plan_is_printed_and_the_supercell_is_in_the_summary(tmp_path, copper_cif, capsys):
    from defectml.cli import main

    out = tmp_path / "run"
    assert main(["search", str(copper_cif), "--defect", "v_Cu", "--charge", "0", "--model", "emt",
                 "--min-length", "7", "--distortions", "-0.3,0.3", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # a metal's vacancy has no excess electrons: no bond-distortion trials, three in all
    assert "plan: 1 defect(s), 1 defect charge state(s), 3 relaxation(s) with emt" in err
    assert ("v_Cu: charges 0; 3 trials each; supercell [[-2 -2 2], [-2 2 -2], [2 -2 -2]] (31 atoms, "
            "periodic images 7.18 Å apart)") in err
    assert "first relaxation:" in err and "may take about" in err
    (entry,) = json.loads((out / "summary.json").read_text())["defects"]
    assert entry["supercell"] == {"matrix": [[-2, -2, 2], [-2, 2, -2], [2, -2, -2]], "atoms": 31,
                                  "min_image_distance_A": 7.179}


def test_each_minimum_shows_its_energy_spread_in_table_json_and_plot(tmp_path):
    from ase import Atoms

    from defectml.search.landscape import Minimum, RelaxedTrial
    from defectml.search.report import plot_energy_vs_distortion, table
    from defectml.search.summary import DefectSummary

    atoms = Atoms("H", [[0, 0, 0]], cell=[5, 5, 5], pbc=True)

    def trial(name, e, d=None, status="converged"):
        return RelaxedTrial(name, status, e, atoms, np.zeros(3), None, d)

    for energies in ({"Unperturbed": 0.0, "Rattled": 0.04, "Bond_Distortion_-30.0%": -0.02},
                     {"Unperturbed": 0.0, "Rattled": 0.10, "Bond_Distortion_-30.0%": -0.50}):
        trials = [trial(n, e, {"Rattled": 0.0, "Bond_Distortion_-30.0%": -0.3}.get(n))
                  for n, e in energies.items()]
        trials.append(trial("Dimer", 0.07, status="in_basin"))  # stopped early: not in the spread
        low = min(energies, key=energies.get)
        m = Minimum(0, low, energies[low], energies[low], [*energies, "Dimer"], atoms, label="Td")
        s = DefectSummary("v_X", 0, "m", trials, [m])
        spread = max(energies.values()) - min(energies.values())
        assert s.spread(m) == pytest.approx(spread)
        assert s.to_dict()["minima"][0]["energy_spread_eV"] == pytest.approx(spread)
        assert f"  {spread:.3f}  Td" in table([s])
        png = plot_energy_vs_distortion(s, tmp_path / f"{spread}.png")
        assert png.stat().st_size > 10_000


def test_threads_default_to_the_free_cores_and_slow_steps_are_reported(monkeypatch):
    import os

    from defectml.models import model as model_module
    from defectml.search.pipeline import Pace

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for busy, workers, expected in ((0.0, 1, 4), (0.7, 1, 4), (0.9, 1, 3), (1.2, 1, 3), (3.9, 1, 1),
                                    (9.0, 1, 1), (0.0, 2, 2), (2.0, 4, 1)):
        monkeypatch.setattr(model_module, "busy_cores", lambda b=busy: b)
        assert model_module.default_threads(workers) == expected, (busy, workers)
    pace = Pace()
    assert pace.add(1.0, 10, 10) is None and pace.add(1.5, 10, 10) is None
    assert pace.add(2.0, 2, 10) is None  # too few steps to judge
    note = pace.add(8.0, 10, 10)
    assert note.startswith("warning: relaxations are now 8x slower") and "--threads 1" in note
    assert pace.add(9.0, 10, 10) is None  # said once
