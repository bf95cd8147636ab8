import numpy as np
import pytest

from defectml.search.defects import make_defects
from defectml.search.distort import make_dimer, neighbours_by_distance
from defectml.search.landscape import (
    RelaxedTrial,
    describe,
    find_minima,
    group_minima,
    like_pair_distances,
    quarantine,
)
from defectml.structure_io import to_atoms

OXI = {"Cd": 2, "Te": -2}


@pytest.fixture(scope="module")
def vcd(cdte):
    (v,) = make_defects(cdte, "v_Cd")
    return v, to_atoms(v.supercell), to_atoms(v.bulk_supercell)


def _trial(name, atoms, energy, site, status="converged"):
    return RelaxedTrial(name, status, energy, atoms, site, None)


def _dimerised(atoms, site, length=2.85):
    order, _ = neighbours_by_distance(atoms, site)
    return make_dimer(atoms, (int(order[0]), int(order[1])), length)


def test_ideal_vacancy_is_td_without_new_bonds_and_dimer_is_c2v(vcd):
    v, atoms, bulk = vcd
    dimer = _dimerised(atoms, v.site)
    trials = [
        _trial("Unperturbed", atoms, -100.0, v.site),
        _trial("Bond_Distortion_10.0%", atoms.copy(), -100.0005, v.site),
        _trial("Dimer", dimer, -100.3, v.site),
    ]
    minima, bad = find_minima(trials, bulk=bulk, oxidation_states=OXI)
    assert not bad and len(minima) == 2
    low, high = minima
    assert low.trials == ["Dimer"] and low.delta_e == pytest.approx(-0.3)
    assert low.symmetry == "C2v"
    assert low.bonds == [("Te", "Te", pytest.approx(2.85, abs=1e-3))]
    assert low.label == "C2v, Te-Te dimer 2.85 Å"
    assert set(high.trials) == {"Unperturbed", "Bond_Distortion_10.0%"}
    assert high.symmetry == "Td" and high.bonds == [] and high.contains_unperturbed


def test_grouping_tells_small_rattles_from_a_real_change(vcd):
    v, atoms, _ = vcd
    jiggled = atoms.copy()
    jiggled.rattle(0.01, seed=3)
    trials = [_trial("a", atoms, -1.0, v.site), _trial("b", jiggled, -0.99, v.site),
              _trial("c", _dimerised(atoms, v.site), -1.2, v.site)]
    assert group_minima(trials) == [[2], [0, 1]]
    assert group_minima(trials, threshold=1.5) == [[2, 0, 1]]


def test_quarantine_failed_unconverged_and_phase_changes(vcd):
    v, atoms, _ = vcd
    trials = [_trial(f"t{i}", atoms, -100.0 - 0.01 * i, v.site) for i in range(4)]
    trials += [_trial("collapse", atoms, -120.0, v.site),
               _trial("nan", atoms, None, v.site, status="failed"),
               _trial("slow", atoms, -100.0, v.site, status="unconverged")]
    trials[-2].reason = "non-finite energy (NaN/inf)"
    good, bad = quarantine(trials, max_drop=3.0)
    assert [t.name for t in good] == ["t0", "t1", "t2", "t3"]
    reasons = {t.name: r for t, r in bad}
    assert "phase change" in reasons["collapse"]
    assert reasons["nan"].startswith("non-finite") and reasons["slow"] == "unconverged"


def test_relaxations_far_above_the_unperturbed_one_are_quarantined_with_their_reason(vcd):
    from defectml.errors import InputError
    from defectml.search.landscape import DEFAULT_MAX_RISE
    from defectml.search.report import table
    from defectml.search.summary import DefectSummary

    v, atoms, bulk = vcd
    # as a CdTe Cd_i search gave: two "minima" at +31.0 and +64.9 eV (a host atom pushed onto
    # another site), beside a metastable one 2.5 eV up (within a few eV: a candidate)
    trials = [_trial("Unperturbed", atoms, -100.0, v.site),
              _trial("Bond_Distortion_10.0%", atoms.copy(), -100.001, v.site),
              _trial("Dimer", _dimerised(atoms, v.site), -97.5, v.site),
              _trial("Bond_Distortion_-60.0%", atoms.copy(), -69.0, v.site),
              _trial("Bond_Distortion_60.0%", atoms.copy(), -35.1, v.site)]
    assert DEFAULT_MAX_RISE == 3.0
    minima, bad = find_minima(trials, bulk=bulk, oxidation_states=OXI)
    reasons = {t.name: r for t, r in bad}
    assert set(reasons) == {"Bond_Distortion_-60.0%", "Bond_Distortion_60.0%"}
    assert reasons["Bond_Distortion_-60.0%"].startswith("energy 31.00 eV above the Unperturbed relaxation")
    assert reasons["Bond_Distortion_60.0%"] == ("energy 64.90 eV above the Unperturbed relaxation: "
                                                "a broken, high-energy structure")
    ranked = {name for m in minima for name in m.trials}
    assert ranked == {"Unperturbed", "Bond_Distortion_10.0%", "Dimer"}
    assert max(m.delta_e for m in minima) == pytest.approx(2.5)
    # the summary (summary.json, summary.txt) lists them with the reason
    summary = DefectSummary("v_Cd", 0, "test", trials, minima, bad)
    listed = {q["trial"]: q["reason"] for q in summary.to_dict()["quarantined"]}
    assert listed == reasons
    assert f"quarantined Bond_Distortion_60.0%: {reasons['Bond_Distortion_60.0%']}" in table([summary])
    # a stricter threshold sets the +2.5 eV one aside too
    _, bad = find_minima(trials, bulk=bulk, oxidation_states=OXI, max_rise=2.0)
    assert "Dimer" in {t.name for t, _ in bad}
    # without an Unperturbed relaxation the median is the reference
    good, bad = quarantine(trials[1:4])
    assert [t.name for t in good] == ["Bond_Distortion_10.0%", "Dimer"]
    (high, reason), = bad
    assert high.name == "Bond_Distortion_-60.0%" and reason.startswith("energy 28.50 eV above the median")
    with pytest.raises(InputError, match="max-rise must be positive"):
        quarantine(trials, max_rise=0.0)


def test_reference_falls_back_to_lowest_without_unperturbed(vcd):
    v, atoms, bulk = vcd
    minima, _ = find_minima([_trial("Rattled", atoms, -5.0, v.site)], bulk=bulk, oxidation_states=OXI)
    assert minima[0].delta_e == 0.0


def test_like_pair_distances_of_cdte(vcd):
    _, _, bulk = vcd
    d = like_pair_distances(bulk)
    assert d[("Cd", "Te")] == pytest.approx(2.806, abs=1e-3)
    assert d[("Te", "Te")] == pytest.approx(4.583, abs=1e-3)


def test_describe():
    assert describe([], "Td") == "Td, no new bonds"
    assert "2 bonds" in describe([("Te", "Te", 2.9), ("Te", "Te", 3.0)], "C2")


def test_defect_atom_position_is_followed(cdte):
    (s,) = make_defects(cdte, "Se_Te")
    atoms = to_atoms(s.supercell)
    atoms.positions[s.defect_index] += [0.3, 0, 0]
    t = RelaxedTrial("x", "converged", 0.0, atoms, s.site, s.defect_index)
    assert np.allclose(t.centre(), atoms.positions[s.defect_index])


def test_a_neighbour_that_hops_into_the_vacancy_is_flagged_an_off_centre_move_is_not():
    from ase.build import bulk

    from defectml.search.landscape import identity_change

    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    site = cell.positions[0].copy()
    del cell[0]
    d = np.linalg.norm(cell.positions - site, axis=1)
    k = int(np.argmin(d))  # a first neighbour of the vacancy, 2.55 Å away
    hopped = cell.copy()
    hopped.positions[k] = site + 0.1
    note = identity_change(hopped, cell, site, None, vacancy=True)
    assert note == f"Cu {k} moved {np.linalg.norm(site + 0.1 - cell.positions[k]):.2f} Å into the vacancy"
    leaning = cell.copy()
    leaning.positions[k] += 0.8 * (site - cell.positions[k]) / d[k]  # 0.8 Å towards it: still its site
    assert identity_change(leaning, cell, site, None, vacancy=True) == ""
    # a substitutional atom that lands on its neighbour's site (which moved away)
    swapped = cell.copy()
    other = int(np.argsort(d)[1])
    swapped.positions[k] = cell.positions[other] + 0.05
    swapped.positions[other] = site
    note = identity_change(swapped, cell, site, k, vacancy=False)
    assert f"Cu {k} moved" in note and f"onto the Cu {other} site (the defect atom)" in note
