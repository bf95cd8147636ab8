"""Minima ranked on converged energies: what is polished, how it is stored, what the summary uses."""

import numpy as np
import pytest
from ase import Atoms

from defectml import ResultStore, SearchSettings, TrialSettings, search
from defectml.errors import InputError
from defectml.search.landscape import Minimum, RelaxedTrial
from defectml.search.polish import polished_rows, to_polish
from defectml.search.summary import DefectSummary


def _summary(energies: dict[str, float], minima: list[list[str]], polished: dict[str, float] | None = None,
             status: dict[str, str] | None = None) -> DefectSummary:
    atoms = Atoms("H", [[0, 0, 0]], cell=[5, 5, 5], pbc=True)
    polished, status = polished or {}, status or {}
    trials = [RelaxedTrial(n, status.get(n, "converged"), e, atoms, np.zeros(3), None,
                           polish_fmax=polished.get(n)) for n, e in energies.items()]
    ms = [Minimum(i, min(names, key=energies.get), 0.0, 0.0, names, atoms) for i, names in enumerate(minima)]
    return DefectSummary("v_X", 0, "m", trials, ms)


ENERGIES = {"Unperturbed": 0.0, "Rattled": -0.02, "Bond_Distortion_-30.0%": -0.05,
            "Bond_Distortion_30.0%": 0.3, "Dimer": 0.25, "Bond_Distortion_-60.0%": 0.31}
MINIMA = [["Unperturbed", "Rattled", "Bond_Distortion_-30.0%"],
          ["Bond_Distortion_30.0%", "Dimer", "Bond_Distortion_-60.0%"]]


def test_each_minimum_s_lowest_and_highest_members_and_the_unperturbed_reference_are_polished():
    s = _summary(ENERGIES, MINIMA)
    assert to_polish(s, 0.01, 2) == ["Bond_Distortion_-30.0%", "Unperturbed", "Dimer",
                                     "Bond_Distortion_-60.0%"]
    assert to_polish(s, 0.01, 3) == ["Bond_Distortion_-30.0%", "Rattled", "Unperturbed", "Dimer",
                                     "Bond_Distortion_30.0%", "Bond_Distortion_-60.0%"]
    assert to_polish(s, 0.01, 1) == ["Bond_Distortion_-30.0%", "Dimer", "Unperturbed"]
    assert sorted(to_polish(s, 0.01, 0)) == sorted(ENERGIES)


def test_what_is_polished_already_or_did_not_converge_is_not_polished_again():
    s = _summary(ENERGIES, MINIMA, polished={"Bond_Distortion_-30.0%": 0.01, "Dimer": 0.02},
                 status={"Unperturbed": "unconverged"})
    # Dimer was polished, but not as tightly as asked; an unconverged Unperturbed is not a reference
    assert to_polish(s, 0.01, 1) == ["Dimer"]
    assert to_polish(s, 0.02, 1) == []
    # the picks follow where the search stopped: once polished lower, the highest is still "done"
    s = _summary(ENERGIES, MINIMA[:1], polished={"Bond_Distortion_-30.0%": 0.01, "Unperturbed": 0.01})
    s.trials[0].energy, s.trials[0].search_energy = -0.2, 0.0
    assert to_polish(s, 0.01, 2) == []


def test_the_spread_is_taken_over_the_polished_members_where_two_are():
    s = _summary(ENERGIES, MINIMA, polished={"Rattled": 0.01, "Bond_Distortion_-30.0%": 0.01})
    first, second = s.minima
    assert s.spread(first) == pytest.approx(0.03)  # the unpolished Unperturbed (0.05 higher) is left out
    assert [t.name for t in s.spread_members(first)] == ["Rattled", "Bond_Distortion_-30.0%"]
    assert s.spread(second) == pytest.approx(0.06) and s.polish_fmax(second) is None
    assert s.to_dict()["minima"][0]["polish_fmax"] == 0.01


def test_the_tightest_converged_polish_is_the_one_used():
    class Row(dict):
        def __getattr__(self, k):
            return self[k]

        def get(self, k, default=None):
            return dict.get(self, k, default)

    rows = [Row(trial_key="a", polish_fmax=0.02, status="converged", energy=-1.0),
            Row(trial_key="a", polish_fmax=0.01, status="converged", energy=-1.1),
            Row(trial_key="a", polish_fmax=0.005, status="unconverged", energy=-1.2),
            Row(trial_key="b", polish_fmax=0.01, status="failed", energy=None)]
    assert polished_rows(rows)["a"]["energy"] == -1.1 and "b" not in polished_rows(rows)


def _settings(**kw):
    return SearchSettings(model="emt", min_length=7.0, oxidation_states={"Cu": 2}, fmax=0.1,
                          trials=TrialSettings(distortions=(-0.4, 0.3)), **kw)


def test_a_search_ranks_on_polished_energies_and_keeps_its_relaxations(tmp_path, copper):
    from ase.calculators.emt import EMT

    result = search(copper, "v_Cu", [0], out=tmp_path, settings=_settings(), progress=False)
    (s,) = result.summaries
    store = ResultStore(tmp_path / "results.db")
    polish = {r.trial_key: r for r in store.select(kind="polish")}
    relaxations = {r.trial: r for r in store.select(kind="relaxation")}
    assert len(relaxations) == 5 and 0 < len(polish) <= 5
    best = s.minima[0]
    row, p = relaxations[best.trial], polish[relaxations[best.trial].trial_key]
    # the minimum is the polished end point: lower than where the search stopped, forces below 0.01
    assert best.energy == pytest.approx(p.energy) and p.energy < row.energy
    atoms = best.atoms.copy()
    atoms.calc = EMT()
    assert np.abs(atoms.get_forces()).max() < 0.01 < np.linalg.norm(row.forces, axis=1).max()
    assert s.polish_fmax(best) == 0.01 and p.data["search_energy"] == pytest.approx(row.energy)
    # the Unperturbed reference is polished too: every dE is between polished energies
    assert relaxations["Unperturbed"].trial_key in polish
    # a rerun polishes nothing again; without polishing the search's own energies are ranked
    again = search(copper, "v_Cu", [0], out=tmp_path, settings=_settings(), progress=False)
    assert store.count(kind="polish") == len(polish) and again.summaries[0].minima[0].energy == best.energy
    coarse = search(copper, "v_Cu", [0], out=tmp_path / "coarse", settings=_settings(polish_fmax=0),
                    progress=False)
    assert ResultStore(tmp_path / "coarse" / "results.db").count(kind="polish") == 0
    assert coarse.summaries[0].minima[0].energy == pytest.approx(
        min(r.energy for r in relaxations.values()))
    # --polish-fmax 0 in a folder polished before: the search's own energies, as it says
    unpolished = search(copper, "v_Cu", [0], out=tmp_path, settings=_settings(polish_fmax=0), progress=False)
    assert unpolished.summaries[0].minima[0].energy == pytest.approx(coarse.summaries[0].minima[0].energy)


@pytest.mark.parametrize("kw", [{"polish_fmax": 0.1}, {"polish_fmax": -0.01}, {"polish_members": -1}])
def test_a_polish_that_cannot_help_is_refused(kw):
    with pytest.raises(InputError, match="polish"):
        _settings(**kw).validate()
