import itertools

import numpy as np
import pytest

from defectml.search.defects import bulk_nn_distance, make_defects
from defectml.search.distort import (
    TrialSettings,
    make_trials,
    mc_rattle,
    min_interatomic_distance,
    neighbours_by_distance,
    number_of_distorted_neighbours,
)
from defectml.structure_io import to_atoms


@pytest.mark.parametrize("n, expected", [(0, 0), (-2, 2), (2, 2), (4, 4), (-5, 3), (6, 2), (8, 0)])
def test_number_of_distorted_neighbours(n, expected):
    assert number_of_distorted_neighbours(n) == expected


@pytest.fixture(scope="module")
def vcd(cdte):
    (v,) = make_defects(cdte, "v_Cd")
    return v, to_atoms(v.supercell), bulk_nn_distance(cdte)


def _trials(vcd, **kw):
    v, atoms, nn = vcd
    return make_trials(atoms, v.site, defect_index=None, n_distorted=kw.pop("n", 2),
                       bulk_nn_distance=nn, is_vacancy=True, settings=TrialSettings(**kw),
                       label="v_Cd_0")


def test_default_trial_set_for_neutral_cd_vacancy(vcd):
    trials, dropped = _trials(vcd)
    names = [t.name for t in trials]
    assert names[:2] == ["Unperturbed", "Rattled"] and names[-1] == "Dimer"
    assert len(trials) == 15 and not dropped  # 12 distortions + unperturbed + rattled + dimer
    assert "Bond_Distortion_-30.0%" in names and "Bond_Distortion_0.0%" not in names
    seeds = [t.seed for t in trials if t.name != "Unperturbed"]
    assert len(set(seeds)) == len(seeds)  # every trial its own seed


def test_bond_distortion_moves_the_two_closest_neighbours_radially(vcd):
    v, atoms, nn = vcd
    trials, _ = _trials(vcd, distortions=(-0.3,))
    t = next(t for t in trials if t.name == "Bond_Distortion_-30.0%")
    order, dist = neighbours_by_distance(t.atoms, v.site)
    assert sorted(t.distorted_indices) == sorted(int(i) for i in order[:2])
    assert dist[:2] == pytest.approx(0.7 * nn, abs=1e-6)  # distorted atoms are not rattled
    assert dist[2] > 0.9 * nn  # the other two Te stay near the bulk distance (rattled)


def test_trials_reproducible_and_rattled(vcd):
    a, _ = _trials(vcd)
    b, _ = _trials(vcd)
    for x, y in zip(a, b, strict=True):
        assert np.allclose(x.atoms.positions, y.atoms.positions)
    rattled = a[1].atoms.positions - a[0].atoms.positions
    cell = a[0].atoms.cell.array
    frac = np.linalg.solve(cell.T, rattled.T).T
    disp = np.linalg.norm((frac - np.round(frac)) @ cell, axis=1)
    assert 0.1 < disp.mean() < 0.6  # ~10% of 2.8 A per component
    c, _ = _trials(vcd, seed=7)
    assert not np.allclose(c[1].atoms.positions, a[1].atoms.positions)


def test_dimer_trial_sets_bond_length(vcd):
    trials, _ = _trials(vcd, dimer_distance=2.0)
    dimer = trials[-1]
    i, j = dimer.distorted_indices
    assert dimer.atoms.get_distance(i, j, mic=True) == pytest.approx(2.0, abs=1e-6)


def test_no_distortion_when_no_excess_charge(vcd):
    trials, _ = _trials(vcd, n=0)
    assert [t.name for t in trials] == ["Unperturbed", "Rattled", "Dimer"]


def test_all_pairs_distorts_every_pair_of_the_first_shell(vcd):
    trials, _ = _trials(vcd, all_pairs=True, distortions=(-0.4, -0.2))
    distorted = [t for t in trials if t.name.startswith("Bond_Distortion")]
    assert len(distorted) == len(list(itertools.combinations(range(4), 2))) * 2
    assert len({t.distorted_indices for t in distorted}) == 6


def test_trials_with_atoms_too_close_are_dropped(vcd):
    trials, dropped = _trials(vcd, dimer_distance=0.5)
    assert "Dimer" not in [t.name for t in trials]
    assert dropped and dropped[0].startswith("Dimer")


def test_mc_rattle_respects_min_distance(vcd):
    _, atoms, nn = vcd
    out = mc_rattle(atoms, stdev=0.5, d_min=0.8 * nn, seed=1)
    assert min_interatomic_distance(out) >= 0.8 * nn - 1e-9


def test_off_centre_trials_move_a_substituent_toward_a_bond_an_edge_and_a_face():
    """Mg on an O site of rock salt: <100>, <110>, <111> (Mg_O's DFT ground state lies along <111>)."""
    from ase.build import bulk
    from ase.geometry import find_mic

    atoms = bulk("MgO", "rocksalt", a=4.21).repeat(3)
    i = atoms.get_chemical_symbols().index("O")
    atoms[i].symbol = "Mg"
    site = atoms.positions[i].copy()

    def make(off_centre):
        settings = TrialSettings(distortions=(0.2,), off_centre=off_centre)
        return make_trials(atoms, site, defect_index=i, n_distorted=2, bulk_nn_distance=2.105,
                           is_vacancy=False, settings=settings, label="Mg_O_0")[0]

    assert [t.name for t in make(None)] == ["Unperturbed", "Rattled", "Bond_Distortion_20.0%"]
    trials = {t.name: t for t in make(0.9)}
    assert list(trials)[3:] == ["Off_Centre_1", "Off_Centre_2", "Off_Centre_3"]
    for k, t in ((1, trials["Off_Centre_1"]), (2, trials["Off_Centre_2"]), (3, trials["Off_Centre_3"])):
        step, length = find_mic(t.atoms.positions[i] - site, atoms.cell)
        assert length == pytest.approx(0.9)
        assert sorted(np.round(np.abs(step) / 0.9 * np.sqrt(k), 6)) == [0.0] * (3 - k) + [1.0] * k
        assert t.distorted_indices == (i,)
        others = np.delete(np.arange(len(atoms)), i)
        assert np.abs(t.atoms.positions[others] - atoms.positions[others]).max() > 0.01  # rattled
    assert "off_centre" not in TrialSettings().as_dict()  # unset: old results keep their keys
    # a vacancy has no atom to move
    v = make_trials(atoms, site, defect_index=None, n_distorted=2, bulk_nn_distance=2.105, is_vacancy=True,
                    settings=TrialSettings(distortions=(), off_centre=0.9), label="v")[0]
    assert not any(t.name.startswith("Off_Centre") for t in v)
