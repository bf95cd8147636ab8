import numpy as np
import pytest

from defectml.errors import InputError
from defectml.search.defects import (
    bulk_nn_distance,
    default_charge_states,
    guess_oxidation_states,
    make_defects,
    wrapped,
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


def _zincblende(a: float = 5.668, shift: float = 0.0):
    """ZnSe primitive cell; ``shift`` moves Zn to c = shift (a float32 relaxation leaves -1e-44)."""
    from pymatgen.core import Lattice, Structure

    lattice = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
    return Structure(lattice, ["Zn", "Se"], [[0, 0, shift], [0.25, 0.25, 0.25]])


@pytest.mark.parametrize("shift", [0.0, -7e-45, -1e-12, 1.0])
def test_zincblende_interstitial_sites_are_doped_s_three(shift):
    """Td next to the cation, Td next to the anion, and the hexagonal C3v site (as doped finds)."""
    found = {d.name: d for d in make_defects(_zincblende(shift=shift), "Se_i", min_length=9.0)}
    assert set(found) == {"Se_i_Td_Zn2.45", "Se_i_Td_Se2.45", "Se_i_C3v"}
    assert {n: d.multiplicity for n, d in found.items()} == {
        "Se_i_Td_Zn2.45": 1, "Se_i_Td_Se2.45": 1, "Se_i_C3v": 4}
    hexagonal = found["Se_i_C3v"]
    order, dist = neighbours_by_distance(to_atoms(hexagonal.bulk_supercell), hexagonal.site)
    ring = sorted(hexagonal.bulk_supercell[int(i)].specie.symbol for i in order[:6])
    assert ring == ["Se"] * 3 + ["Zn"] * 3
    assert np.ptp(dist[:6]) < 1e-3 and dist[6] > dist[5] + 0.3  # the centre of a six-ring
    # the interstitial's bulk supercell is the vacancy's, atom for atom (made from the host as given)
    (v,) = make_defects(_zincblende(shift=shift), "v_Zn", min_length=9.0)
    assert np.allclose(hexagonal.bulk_supercell.cart_coords, v.bulk_supercell.cart_coords)


def test_wrapped_puts_coordinates_in_the_unit_cell():
    s = wrapped(_zincblende(shift=-7e-45))
    assert np.all((s.frac_coords >= 0) & (s.frac_coords < 1)) and s.frac_coords[0].tolist() == [0, 0, 0]
    assert wrapped(_zincblende(shift=-0.1)).frac_coords[0, 2] == pytest.approx(0.9)


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
