"""The active loop: trust scores, picking rules, stopping, oracles, and a real loop end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from defectml.cli import main
from defectml.dft.loop import LoopSettings, assess, choose, lowest_changed_round, run_loop
from defectml.dft.oracle import CalculatorOracle, FolderOracle, ReplayOracle, Request, parse_oracle
from defectml.errors import InputError
from defectml.search.landscape import Minimum, RelaxedTrial
from defectml.search.summary import DefectSummary
from defectml.train.committee import NO_COMMITTEE, Trust, bootstrap, calibration, member_frames, spread

MGO = Path(__file__).resolve().parents[2] / "shared" / "data" / "snb-mgo-mg_o"
needs_data = pytest.mark.skipif(not MGO.exists(), reason="shared MgO DFT data not present")


# --- trust ------------------------------------------------------------------------------------
def test_spread_is_the_committee_disagreement():
    f0 = np.zeros((2, 3))
    f1 = np.array([[0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    (t,) = spread([[(1.0, f0)], [(1.2, f1)]])
    # atom 0: members at 0 and 0.2 -> deviations 0.1 each -> rms 0.1; atom 1: 0. Mean 0.05.
    assert t.force == pytest.approx(0.05)
    assert t.energy == pytest.approx(0.1)
    assert t.untrusted(0.04) and not t.untrusted(0.06)
    (same,) = spread([[(1.0, f1)], [(1.0, f1)], [(1.0, f1)]])
    assert same.force == pytest.approx(0.0, abs=1e-12) and same.energy == pytest.approx(0.0, abs=1e-12)
    assert spread([[(1.0, f0)]]) == [NO_COMMITTEE] and NO_COMMITTEE.untrusted() is None


def test_members_resample_relaxations_and_member_zero_keeps_all():
    frames = []
    for rid in "abcd":
        for i in range(3):
            a = Atoms("H", [[0, 0, i]])
            a.info["run_id"] = rid
            frames.append(a)
    assert member_frames(frames, 0) == frames
    m1, m1_again = member_frames(frames, 1), member_frames(frames, 1)
    assert [f.info["run_id"] for f in m1] == [f.info["run_id"] for f in m1_again]  # seeded
    assert len(m1) == len(frames)  # as many relaxations drawn as there are, whole
    assert bootstrap(list("abcd"), 1) != bootstrap(list("abcd"), 2) or bootstrap(list("abcd"), 3)
    assert calibration([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.5])["spearman"] == pytest.approx(1.0)
    assert calibration([1, 1, 1], [1, 2, 3])["spearman"] is None


# --- picking and stopping ---------------------------------------------------------------------
def _summary(energies: dict[str, float], minima: list[list[str]],
             distortions: dict[str, float] | None = None) -> DefectSummary:
    atoms = Atoms("H", [[0, 0, 0]], cell=[5, 5, 5], pbc=True)
    trials = [RelaxedTrial(n, "converged", e, atoms, np.zeros(3), None, (distortions or {}).get(n))
              for n, e in energies.items()]
    ms = []
    for rank, names in enumerate(sorted(minima, key=lambda g: min(energies[n] for n in g))):
        rep = min(names, key=lambda n: energies[n])
        ms.append(Minimum(rank, rep, energies[rep], energies[rep], sorted(names, key=energies.get), atoms,
                          label=f"m{rank}"))
    return DefectSummary("v_X", 0, "m", trials, ms)


ENERGIES = {"A": -3.0, "B": -2.9, "C": -2.0, "D": -1.95, "Unperturbed": -1.0}
MINIMA = [["A", "B"], ["C", "D"], ["Unperturbed"]]


def test_rules_pick_what_they_say():
    s = _summary(ENERGIES, MINIMA)
    trust = {"A": Trust(0.01, 0.0, 3), "C": Trust(0.02, 0.0, 3), "Unperturbed": Trust(0.30, 0.0, 3)}
    assert choose(s, trust, set(), 2, "lowest") == ["A", "B"]  # may take two from one basin
    assert choose(s, trust, set(), 2, "unvisited") == ["A", "C"]  # one per minimum
    assert choose(s, trust, set(), 2, "uncertain") == ["Unperturbed", "C"]
    assert choose(s, trust, set(), 3, "mix") == ["A", "Unperturbed", "C"]
    # a minimum with a DFT answer (or a re-relaxed DFT end point in it) is visited
    assert choose(s, trust, {"B"}, 2, "unvisited") == ["C", "Unperturbed"]
    assert choose(s, trust, {"A"}, 1, "lowest") == ["B"]
    # without a committee, "uncertain" falls back to the unvisited order
    assert choose(s, {}, set(), 2, "uncertain") == ["A", "C"]
    assert choose(s, trust, set(ENERGIES), 2, "mix") == []


def test_a_model_that_folds_every_trial_into_one_minimum_still_gets_k_diverse_picks():
    e = {"Unperturbed": -1.0, "Bond_Distortion_-30.0%": -0.99, "Bond_Distortion_60.0%": -0.98,
         "Rattled": -0.97}
    d = {"Bond_Distortion_-30.0%": -0.3, "Bond_Distortion_60.0%": 0.6, "Rattled": 0.0}
    s = _summary(e, [list(e)], d)
    assert choose(s, {}, set(), 2, "mix") == ["Unperturbed", "Bond_Distortion_60.0%"]
    assert choose(s, {}, {"Unperturbed", "Bond_Distortion_60.0%"}, 1, "mix") == ["Bond_Distortion_-30.0%"]


def test_dft_lowest_history():
    assert lowest_changed_round([None, -1.0, -1.02, -1.5, -1.51], 0.05) == 3
    assert lowest_changed_round([None, None], 0.05) is None


def test_assess_needs_a_stable_dft_lowest_a_visited_lowest_minimum_and_trust():
    s = _summary(ENERGIES, MINIMA)
    st = LoopSettings(patience=1, window=0.5, threshold=0.05)
    trusted = {"A": Trust(0.01, 0, 3), "C": Trust(0.01, 0, 3), "Unperturbed": Trust(0.01, 0, 3)}
    dft = {"A": -10.0}
    # first DFT answer: changed this round
    a = assess(s, trusted, {"A"}, dft, [None, -10.0], st)
    assert not a.finished and "changed 0 round" in a.reason
    a = assess(s, trusted, {"A"}, dft, [None, -10.0, -10.0], st)
    assert a.finished and a.reason.startswith("converged")
    # the model's lowest minimum without DFT: not finished
    a = assess(s, trusted, {"C"}, {"C": -10.0}, [-10.0, -10.0], st)
    assert not a.finished and "lowest minimum has no DFT" in a.reason
    # an untrusted, unvisited minimum inside the window: not finished; outside: fine
    near = _summary({**ENERGIES, "C": -2.8, "D": -2.7}, MINIMA)
    shaky = {**trusted, "C": Trust(0.2, 0, 3)}
    a = assess(near, shaky, {"A"}, dft, [-10.0, -10.0], st)
    assert not a.finished and a.untrusted == ["C"]
    assert assess(s, shaky, {"A"}, dft, [-10.0, -10.0], st).finished  # C is 1 eV up
    # no committee: every unvisited minimum in the window counts as untrusted
    assert assess(near, {}, {"A"}, dft, [-10.0, -10.0], st).untrusted == ["C"]


def test_settings_refuse_bad_values():
    for bad in ({"k": 0}, {"rule": "best"}, {"budget": 0}, {"committee": 0}, {"holdout": 1.0}):
        with pytest.raises(InputError):
            LoopSettings(**bad).validate()
    with pytest.raises(InputError, match="replay:DIR"):
        parse_oracle("replay")
    with pytest.raises(InputError, match="unknown kind"):
        parse_oracle("cluster:x")
    with pytest.raises(InputError, match="unknown oracle calculator"):
        parse_oracle("calculator:vasp")


# --- oracles ----------------------------------------------------------------------------------
@needs_data
def test_replay_oracle_answers_by_trial_name():
    from ase.io import read

    oracle = ReplayOracle(MGO)
    assert "Rattled" in oracle.trials("Mg_O_0") and "Unperturbed" in oracle.trials("Mg_O_0")
    start = read(MGO / "Mg_O_0" / "Unperturbed" / "POSCAR")
    answers, pending = oracle.ask([Request("Mg_O", 0, t, start) for t in
                                   ("Bond_Distortion_40.0%", "Rattled", "Bond_Distortion_-70.0%")])
    assert not pending
    a40, rattled, missing = answers
    assert a40.status == "converged" and a40.energy == pytest.approx(-1347.6433371)
    assert np.allclose(a40.final.get_forces(), 0.0)  # a converged DFT end point
    assert rattled.energy == pytest.approx(-1347.6384532)  # Bond_Distortion_0.0%
    assert missing.status == "failed" and "no Bond_Distortion_-70.0%" in missing.reason


def test_folder_oracle_writes_inputs_then_reads_results(tmp_path):
    from ase.io import write

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    del atoms[0]
    q = Request("v_Cu", -1, "Bond_Distortion_-30.0%", atoms)
    oracle = FolderOracle(tmp_path / "dft")
    answers, pending = oracle.ask([q])
    folder = oracle.path(q)
    assert not answers and pending == [str(folder)]
    assert (folder / "INCAR").exists() and (folder / "POSCAR").exists() and (folder / "start.extxyz").exists()
    relaxed = atoms.copy()
    relaxed.calc = EMT()
    relaxed.get_potential_energy()
    write(folder / "result.extxyz", relaxed)
    (answer,), pending = oracle.ask([q])
    assert not pending and answer.energy == pytest.approx(relaxed.get_potential_energy())
    assert answer.status in ("converged", "unconverged")


def test_calculator_oracle_records_a_failure_and_goes_on():
    class Broken(EMT):
        def calculate(self, *args, **kw):
            raise RuntimeError("SCF did not converge")

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    calcs = {0: EMT(), 1: Broken()}
    oracle = CalculatorOracle(lambda q: calcs[q], "emt", fmax=0.1, max_steps=20)
    answers, _ = oracle.ask([Request("v_Cu", 1, "A", atoms), Request("v_Cu", 0, "B", atoms)])
    assert answers[0].status == "failed" and answers[1].status != "failed"
    assert answers[1].energy is not None and len(answers[1].frames) >= 1


# --- the loop, end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def chgnet_vacancy_run(tmp_path_factory):
    """A CHGNet search of a Cu vacancy in a 31-atom cell (three trials)."""
    from pymatgen.core import Lattice, Structure

    from defectml import SearchSettings, search
    from defectml.search.distort import TrialSettings

    cu = Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.61), ["Cu"], [[0, 0, 0]])
    out = tmp_path_factory.mktemp("loop") / "run"
    res = search(cu, "v_Cu", [0], out=out, progress=False,
                 settings=SearchSettings(model="chgnet", min_length=5, relax_host=False, threads=None,
                                         trials=TrialSettings(distortions=(-0.3, 0.3))))
    return out, res.settings_key


def test_loop_learns_from_an_oracle_stores_every_round_and_resumes(chgnet_vacancy_run, tmp_path):
    from defectml import ResultStore
    from defectml.models.ref import card_path

    run, key = chgnet_vacancy_run
    store = ResultStore(run / "results.db")
    s = LoopSettings(k=1, rule="lowest", committee=2, epochs=1, max_rounds=1, threads=None)
    oracle = parse_oracle("calculator:emt", max_steps=50)
    first = run_loop(store, key, oracle, s, tmp_path / "loop")
    assert first.status == "stopped" and "max-rounds" in first.reason
    (rd,) = first.rounds
    assert rd["complete"] and len(rd["picks"]["v_Cu_0"]) == 1 and len(rd["models"]) == 2
    assert all(Path(m).exists() and card_path(m).exists() for m in rd["models"])
    # the DFT answer and the round's relaxations are stored rows; each ML row has its trust score
    dft = store.select(kind="relaxation", fidelity="dft")
    assert len(dft) == 1 and dft[0].theory.startswith("ase EMT")
    ml = store.select(kind="relaxation", settings_key=rd["ml_key"])
    assert {r.trial for r in ml} >= {"dft:" + dft[0].trial, "Unperturbed"}
    assert all(r.data["trust"]["members"] == 2 and r.data["trust"]["force"] is not None for r in ml
               if r.get("energy") is not None)
    minima = rd["items"]["v_Cu_0"]["minima"]
    assert any(m["visited"] for m in minima)
    # show: the loop's landscape carries its committee spread; the universal model's cannot
    from defectml.search.report import table
    from defectml.search.summary import summarise

    scored = table(summarise(store, rd["ml_key"]))
    assert "[spread " in scored and "meV/Å" in scored and "not scored" not in scored
    assert "a universal model cannot score itself" in table(summarise(store, key))
    assert summarise(store, rd["ml_key"])[0].to_dict()["minima"][0]["trust"]["members"] == 2
    # resume with a larger round limit: round 1 is not redone (same models, same DFT row)
    mtimes = [Path(m).stat().st_mtime for m in rd["models"]]
    second = run_loop(store, key, oracle, LoopSettings(k=1, rule="lowest", committee=2, epochs=1,
                                                         max_rounds=3, threads=None), tmp_path / "loop")
    assert [Path(m).stat().st_mtime for m in rd["models"]] == mtimes
    assert second.rounds[0]["picks"] == rd["picks"] and len(second.rounds) >= 2
    asked = [t for r in second.rounds for p in r["picks"].values() for t in p]
    assert len(asked) == len(set(asked)) == len(store.select(kind="relaxation", fidelity="dft"))
    # other settings into the same folder: refused, nothing touched
    with pytest.raises(InputError, match="another loop"):
        run_loop(store, key, oracle, LoopSettings(k=2, threads=None), tmp_path / "loop")


def test_loop_cli_folder_oracle_waits_for_results(chgnet_vacancy_run, tmp_path, capsys):
    run, key = chgnet_vacancy_run
    out = tmp_path / "loop"
    code = main(["loop", str(run), "--run", key, "--oracle", f"folder:{tmp_path / 'dft'}", "--k", "1",
                 "--rule", "lowest", "--committee", "1", "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert "waiting for 1 DFT result" in err and str(tmp_path / "dft" / "v_Cu_0") in err
    state = json.loads((out / "loop.json").read_text())
    assert state["status"]["status"] == "waiting" and not state["rounds"][0].get("answered")
    # the user runs the calculation there; the same command reads it and goes on
    from ase.io import read, write

    (pending,) = [p for p in (tmp_path / "dft" / "v_Cu_0").iterdir()]
    relaxed = read(pending / "start.extxyz")
    relaxed.calc = EMT()
    relaxed.get_forces()
    write(pending / "result.extxyz", relaxed)
    code = main(["loop", str(run), "--run", key, "--oracle", f"folder:{tmp_path / 'dft'}", "--k", "1",
                 "--rule", "lowest", "--committee", "1", "--epochs", "1", "--max-rounds", "1",
                 "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "round 1: asked v_Cu_0: " + pending.name in printed and "no committee" in printed
    state = json.loads((out / "loop.json").read_text())
    assert state["rounds"][0]["answered"] and state["status"]["status"] in ("stopped", "finished")


def test_loop_cli_bad_input(emt_vacancy_run, capsys):
    code = main(["loop", str(emt_vacancy_run), "--oracle", "calculator:emt", "--budget", "0"])
    assert code == 2 and "--budget must be at least 1" in capsys.readouterr().err
    code = main(["loop", str(emt_vacancy_run), "--oracle", "calculator:emt"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be fine-tuned" in err and len(err.strip().splitlines()) == 1
    code = main(["loop", str(emt_vacancy_run), "--oracle", "calculator:emt", "--base", "chgnet",
                 "--defect", "v_Zn_0"])
    assert code == 2 and "v_Zn_0: not in run" in capsys.readouterr().err


def test_xtb_oracle_is_a_real_calculation_with_the_cell_charge():
    pytest.importorskip("tblite")
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True)
    atoms.rattle(0.05, seed=1)
    oracle = parse_oracle("calculator:xtb", fmax=0.1, max_steps=3)
    assert "stand-in" in oracle.theory
    neutral, charged = oracle.ask([Request("bulk", 0, "A", atoms), Request("bulk", 1, "A", atoms)])[0]
    assert neutral.status != "failed" and charged.status != "failed", (neutral.reason, charged.reason)
    assert len(neutral.frames) >= 2 and neutral.frames[-1].get_forces().shape == (8, 3)
    # one electron fewer: another energy on the same structure
    assert abs(neutral.frames[0].get_potential_energy() - charged.frames[0].get_potential_energy()) > 1.0
