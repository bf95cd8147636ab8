"""Real physics with the shipped CHGNet weights on the CdTe Cd vacancy (63-atom cell).

These tests assert what is robust across machines: which minima exist, their bonds and their
order. Which trial falls into which basin is not asserted: a trial that starts near the ridge
between two basins can go either way when the last bits of the arithmetic differ (CPU instruction
set, package versions; see the README's "Reproducibility").
"""

import pytest

from defectml import SearchSettings, TrialSettings, search
from defectml.search.distort import neighbours_by_distance


def _search(cdte, out, model):
    settings = SearchSettings(model=model, trials=TrialSettings(distortions=(-0.3,), rattled=False),
                              threads=2)
    (s,) = search(cdte, "v_Cd", [0], out=out, settings=settings, progress=False).summaries
    return s


@pytest.fixture(scope="module")
def chgnet_020_search(cdte, tmp_path_factory):
    return _search(cdte, tmp_path_factory.mktemp("chgnet020"), "chgnet-0.2.0")


def test_chgnet_v_cd_neutral_relaxes_to_open_td_vacancy(cdte, tmp_path):
    s = _search(cdte, tmp_path, "chgnet")
    assert len(s.trials) == 3 and all(t.status == "converged" for t in s.trials)
    top = s.minima[0]
    assert top.contains_unperturbed and top.symmetry == "Td" and top.bonds == []
    unperturbed = next(t for t in s.trials if t.name == "Unperturbed")
    _, dist = neighbours_by_distance(unperturbed.atoms, unperturbed.site)
    # the four Te neighbours relax outward from the CHGNet bulk bond length (2.87 A), symmetrically
    assert dist[:4] == pytest.approx([dist[0]] * 4, abs=0.01)
    assert 2.88 < dist[0] < 3.0


def test_chgnet_020_keeps_a_te_te_dimer_as_a_separate_minimum(chgnet_020_search):
    s = chgnet_020_search
    assert len(s.trials) == 3 and all(t.status == "converged" for t in s.trials)
    top = s.minima[0]
    # the open vacancy (the unperturbed relaxation's minimum) is the lowest for this model ...
    assert top.contains_unperturbed and top.bonds == [] and top.delta_e == 0.0
    dimers = [m for m in s.minima if [(a, b) for a, b, _ in m.bonds] == [("Te", "Te")]]
    assert dimers, [m.label for m in s.minima]
    d = dimers[0]
    # ... and a Te-Te dimer of 2.7-3.0 A is a minimum of its own, above it
    assert 2.7 <= d.bonds[0][2] <= 3.0 and "Te-Te dimer" in d.label
    assert not d.contains_unperturbed and d is not top
    assert d.delta_e > 0.0 and d.energy > top.energy


def test_a_search_repeats_exactly_on_one_machine(cdte, tmp_path, chgnet_020_search):
    """Same settings, same machine, a new store: the same energies to the last bit, the same minima."""
    again = _search(cdte, tmp_path, "chgnet-0.2.0")
    first = {t.name: (t.energy, t.steps, t.atoms.positions.tobytes()) for t in chgnet_020_search.trials}
    second = {t.name: (t.energy, t.steps, t.atoms.positions.tobytes()) for t in again.trials}
    assert second == first
    assert [m.trials for m in again.minima] == [m.trials for m in chgnet_020_search.minima]
