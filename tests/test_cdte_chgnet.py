"""Real physics with the shipped CHGNet weights on the CdTe Cd vacancy (63-atom cell)."""

import pytest

from defectml import SearchSettings, TrialSettings, search
from defectml.distort import neighbours_by_distance


def _search(cdte, tmp_path, model):
    settings = SearchSettings(model=model, trials=TrialSettings(distortions=(-0.3,), rattled=False),
                              threads=2)
    return search(cdte, "v_Cd", [0], out=tmp_path, settings=settings, progress=False)


def test_chgnet_v_cd_neutral_relaxes_to_open_td_vacancy(cdte, tmp_path):
    (s,) = _search(cdte, tmp_path, "chgnet").summaries
    assert len(s.trials) == 3 and all(t.status == "converged" for t in s.trials)
    top = s.minima[0]
    assert top.contains_unperturbed and top.symmetry == "Td" and top.bonds == []
    unperturbed = next(t for t in s.trials if t.name == "Unperturbed")
    _, dist = neighbours_by_distance(unperturbed.atoms, unperturbed.site)
    # the four Te neighbours relax outward from the CHGNet bulk bond length (2.87 A), symmetrically
    assert dist[:4] == pytest.approx([dist[0]] * 4, abs=0.01)
    assert 2.88 < dist[0] < 3.0


def test_chgnet_020_keeps_a_te_te_dimer_as_a_separate_minimum(cdte, tmp_path):
    (s,) = _search(cdte, tmp_path, "chgnet-0.2.0").summaries
    dimers = [m for m in s.minima if [(a, b) for a, b, _ in m.bonds] == [("Te", "Te")]]
    assert dimers, [m.label for m in s.minima]
    d = dimers[0]
    assert 2.7 <= d.bonds[0][2] <= 3.0 and "Te-Te dimer" in d.label
    assert "Dimer" in d.trials and not d.contains_unperturbed
    assert d.delta_e != 0.0
