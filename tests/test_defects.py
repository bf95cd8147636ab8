import numpy as np
import pytest

from defectml.errors import InputError
from defectml.search.defects import (
    bulk_nn_distance,
    default_charge_states,
    guess_oxidation_states,
    make_defects,
)
from defectml.search.distort import neighbours_by_distance
from defectml.structure_io import to_atoms


def test_cdte_vacancy_supercell(cdte):
    (v,) = make_defects(cdte, "v_Cd")
    assert v.name == "v_Cd" and v.kind == "vacancy" and v.site_symmetry == "Td"
    assert len(v.supercell) == 63 and len(v.bulk_supercell) == 64
    # near-cubic, images >= 10 A apart
    assert min(v.supercell.lattice.abc) >= 10.0
    assert np.allclose(v.supercell.lattice.angles, 90)
    # the vacancy site really is empty and has four Te neighbours at the bulk bond length
    order, dist = neighbours_by_distance(to_atoms(v.supercell), v.site)
    assert dist[0] == pytest.approx(bulk_nn_distance(cdte), abs=1e-3)
    assert [v.supercell[int(i)].specie.symbol for i in order[:4]] == ["Te"] * 4
    assert dist[4] > dist[3] + 1.0
    assert v.default_charges == [-2, -1, 0]
    assert v.excess_electrons(0) == -2


def test_all_native_defects_named_as_the_field_does(cdte):
    names = [d.name for d in make_defects(cdte, "all")]
    assert {"v_Cd", "v_Te", "Cd_Te", "Te_Cd", "Te_i_C3v", "Cd_i_C3v"} <= set(names)
    assert len(names) == len(set(names))
    assert any(n.startswith("Te_i_Td") for n in names)


def test_substitution_and_interstitial_sites(cdte):
    (sub,) = make_defects(cdte, "Se_Te")
    assert sub.supercell[sub.defect_index].specie.symbol == "Se"
    assert len(sub.supercell) == 64 and sub.oxi_change == 0 and sub.default_charges == [0]
    (i,) = make_defects(cdte, "Te_i_C3v")
    assert i.supercell[i.defect_index].specie.symbol == "Te" and len(i.supercell) == 65


def test_oxidation_states_and_overrides(cdte):
    assert guess_oxidation_states(cdte) == {"Cd": 2, "Te": -2}
    assert guess_oxidation_states(cdte, {"Te": -1})["Te"] == -1
    with pytest.raises(InputError, match="not in the host"):
        guess_oxidation_states(cdte, {"Zn": 2})
    assert default_charge_states(2) == [0, 1, 2]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("v_Zn", "Zn is not in the host"),
        ("Se_S", "S is not in the host"),
        ("Xx_i", "unknown element"),
        ("vacancy", "cannot parse"),
        ("Te_Te", "cannot substitute itself"),
    ],
)
def test_impossible_defects(cdte, spec, message):
    with pytest.raises(InputError, match=message):
        make_defects(cdte, spec)


def test_impossible_charge(cdte):
    (v,) = make_defects(cdte, "v_Cd")
    v.check_charge(-2)
    with pytest.raises(InputError, match="impossible charge"):
        v.check_charge(7)


def test_supercell_request_that_cannot_be_met(cdte):
    with pytest.raises(InputError, match="no supercell"):
        make_defects(cdte, "v_Cd", min_length=40.0, max_atoms=60)
