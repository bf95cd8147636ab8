"""Stand-in oracles (defectml.dft.standin): a shipped model, optionally plus a stated pair well."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from defectml.dft.oracle import FolderOracle, ReplayOracle, Request, parse_oracle
from defectml.dft.standin import (
    PairWell,
    PairWellCalculator,
    StandInOracle,
    WellCalculator,
    pair_well_terms,
    parse_well,
)
from defectml.errors import InputError


def _rattled_znse() -> Atoms:
    a = bulk("ZnSe", "zincblende", a=5.67).repeat(2)
    a.rattle(0.25, seed=3)
    a.set_cell(a.cell * 0.75, scale_atoms=True)  # Se-Se pairs inside the well
    return a


WELLS = (PairWell("Se", "Se", 0.8, 2.45, 0.35), PairWell("Zn", "Se", 0.3, 2.0, 0.25))


def test_pair_well_forces_and_stress_match_finite_differences():
    atoms = _rattled_znse()
    atoms.calc = PairWellCalculator(WELLS)
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    assert energy < -0.5  # many pairs inside the wells
    h = 1e-5
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for k in range(3):
            shifted = []
            for sign in (1, -1):
                b = atoms.copy()
                b.positions[i, k] += sign * h
                shifted.append(pair_well_terms(b, WELLS)["energy"])
            numeric[i, k] = -(shifted[0] - shifted[1]) / (2 * h)
    assert np.abs(numeric - forces).max() < 1e-6
    assert np.abs(forces).max() > 0.1
    # stress = (1/V) dE/d(strain)
    from ase.stress import voigt_6_to_full_3x3_stress

    full = np.zeros((3, 3))
    for p in range(3):
        for q in range(3):
            for sign in (1, -1):
                eps = np.eye(3)
                eps[p, q] += sign * h
                b = atoms.copy()
                b.set_cell(atoms.cell.array @ eps, scale_atoms=True)
                full[p, q] += sign * pair_well_terms(b, WELLS)["energy"] / (2 * h * atoms.get_volume())
    assert np.abs(voigt_6_to_full_3x3_stress(stress) - full).max() < 1e-7


def test_each_pair_counts_once_and_the_well_is_a_gaussian():
    dimer = Atoms("Se2", positions=[[0, 0, 0], [0, 0, 2.6]], cell=[12, 12, 12], pbc=True)
    w = PairWell("Se", "Se", 0.8, 2.45, 0.35)
    e = pair_well_terms(dimer, [w])["energy"]
    assert e == pytest.approx(-0.8 * np.exp(-(0.15**2) / (2 * 0.35**2)))
    mixed = Atoms("ZnSe", positions=[[0, 0, 0], [0, 0, 2.0]], cell=[12, 12, 12], pbc=True)
    assert pair_well_terms(mixed, [PairWell("Se", "Zn", 0.5, 2.0, 0.2)])["energy"] == pytest.approx(-0.5)
    assert pair_well_terms(mixed, [w])["energy"] == 0.0  # no Se-Se pair
    molecule = dimer.copy()
    molecule.pbc = False
    molecule.calc = PairWellCalculator([w])
    assert molecule.get_potential_energy() == pytest.approx(e)  # no cell needed without stress


def test_the_well_makes_a_dimer_lower():
    """Two Au in Cu (EMT): adjacent vs far apart; an Au-Au well makes the adjacent pair lower."""
    from ase.calculators.emt import EMT

    host = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)  # 32 atoms
    d = host.get_all_distances(mic=True)[0]
    near, far = int(np.argsort(d)[1]), int(np.argmax(d))
    structures = {}
    for name, j in (("dimer", near), ("apart", far)):
        a = host.copy()
        a.symbols[0] = a.symbols[j] = "Au"
        structures[name] = a
    well = PairWell("Au", "Au", 0.5, float(d[near]), 0.2)

    def relaxed(calc_spec):
        out = {}
        oracle = parse_oracle(calc_spec, fmax=0.02, max_steps=500)
        for name, a in structures.items():
            (ans,), pending = oracle.ask([Request("Au2_Cu", 0, name, a.copy(), a.copy())])
            assert not pending and ans.status == "converged", ans.reason
            out[name] = ans.energy
        return out, oracle

    plain, _ = relaxed("calculator:emt")
    welled, oracle = relaxed(f"calculator:emt+{well.spec}")
    assert isinstance(oracle, StandInOracle)
    assert oracle.theory.startswith("stand-in for DFT: emt + Au-Au Gaussian well")
    gap_plain = plain["dimer"] - plain["apart"]
    gap_welled = welled["dimer"] - welled["apart"]
    assert gap_plain > 0 > gap_welled  # EMT keeps the two Au apart (by 0.06 eV); the well pairs them
    assert gap_welled == pytest.approx(gap_plain - 0.5, abs=0.06)  # by about the well's depth
    # same answers as the well added by hand to EMT
    a = structures["dimer"].copy()
    a.calc = WellCalculator(EMT(), [well])
    b = structures["dimer"].copy()
    b.calc = EMT()
    by_hand = b.get_potential_energy() + pair_well_terms(b, [well])["energy"]
    assert a.get_potential_energy() == pytest.approx(by_hand)
    assert np.allclose(a.get_forces(), b.get_forces() + pair_well_terms(b, [well])["forces"])
    assert np.allclose(a.get_stress(), b.get_stress() + pair_well_terms(b, [well], stress=True)["stress"])


def test_spellings_and_bad_input():
    w = parse_well("well:Se-Se:0.4:2.45:0.35")
    assert w == PairWell("Se", "Se", 0.4, 2.45, 0.35) and parse_well(w.spec) == w
    o = parse_oracle("calculator:chgnet-0.2.0")
    assert isinstance(o, StandInOracle) and o.wells == ()
    assert o.theory == "stand-in for DFT: chgnet-0.2.0"
    two = parse_oracle("calculator:chgnet+well:Se-Se:0.4:2.45:0.35+well:Zn-Zn:0.2:2.6:0.3")
    assert [x.a for x in two.wells] == ["Se", "Zn"]
    assert parse_oracle(two.spec).key() == two.key()
    for bad, words in [("calculator:nosuchmodel", "unknown model"),
                       ("calculator:chgnet+well:Se-Se:0.4:2.45", "well:A-B:DEPTH:R0:WIDTH"),
                       ("calculator:chgnet+well:Qq-Se:0.4:2.45:0.3", "not an element"),
                       ("calculator:chgnet+well:Se-Se:0.4:2.45:-1", "positive"),
                       ("calculator:chgnet+well:Se-Se:deep:2.45:0.3", "numbers"),
                       ("calculator:chgnet@PBE", "no heads"),
                       ("calculator:+well:Se-Se:0.4:2.45:0.3", "name a model")]:
        with pytest.raises(InputError, match=words):
            parse_oracle(bad)


def test_keys_say_what_decides_the_answers(tmp_path):
    a = parse_oracle("calculator:chgnet+well:Se-Se:0.4:2.45:0.35")
    assert a.key() == parse_oracle("calculator:chgnet+well:Se-Se:0.4:2.45:0.35").key()
    others = [parse_oracle("calculator:chgnet+well:Se-Se:0.5:2.45:0.35"),
              parse_oracle("calculator:chgnet-0.2.0+well:Se-Se:0.4:2.45:0.35"),
              parse_oracle("calculator:chgnet"),
              parse_oracle("calculator:chgnet+well:Se-Se:0.4:2.45:0.35", fmax=0.02),
              parse_oracle("calculator:chgnet+well:Se-Se:0.4:2.45:0.35", max_steps=100),
              parse_oracle("calculator:emt")]
    assert len({a.key(), *(o.key() for o in others)}) == 1 + len(others)
    assert parse_oracle("calculator:emt").key() == parse_oracle("calculator:emt").key()
    f1, f2 = FolderOracle(tmp_path / "a"), FolderOracle(tmp_path / "b")
    assert f1.key() != f2.key() and f1.key() == FolderOracle(tmp_path / "a").key()
    (tmp_path / "r" / "v_X_0").mkdir(parents=True)
    r = ReplayOracle(tmp_path / "r")
    before = r.key()
    (tmp_path / "r" / "v_X_0" / "v_X_0.yaml").write_text("Unperturbed: -1.0\n")
    assert ReplayOracle(tmp_path / "r").key() != before


def test_chgnet_stand_in_relaxes_the_start_it_is_given():
    """CHGNet + a Se-Se well on a 7-atom ZnSe V_Zn cell: each answer starts where it was asked,
    and its energy is CHGNet's plus the well's at the end point."""
    from defectml.models import load_model

    cell = bulk("ZnSe", "zincblende", a=5.67, cubic=True)  # 8 atoms
    del cell[[i for i, s in enumerate(cell.get_chemical_symbols()) if s == "Zn"][0]]
    se = [i for i, s in enumerate(cell.get_chemical_symbols()) if s == "Se"]
    j = se[1 + int(np.argmin(cell.get_distances(se[0], se[1:], mic=True)))]
    paired = cell.copy()
    v = paired.get_distance(se[0], j, mic=True, vector=True)
    paired.positions[se[0]] += 0.2 * v
    paired.positions[j] -= 0.2 * v
    spec = "calculator:chgnet+well:Se-Se:0.8:2.45:0.35"
    oracle = parse_oracle(spec, fmax=0.05, max_steps=400, threads=1)
    assert isinstance(oracle, StandInOracle) and oracle.spec == spec
    requests = [Request("v_Zn", 0, name, a.copy(), cell.copy()) for name, a in
                (("Unperturbed", cell), ("Dimer", paired))]
    answers, pending = oracle.ask(requests)
    assert not pending
    chgnet = load_model("chgnet", threads=1).calculator
    for q, ans in zip(requests, answers, strict=True):
        assert ans.request is q and ans.energy is not None, ans.reason
        assert ans.theory == ("stand-in for DFT: chgnet + Se-Se Gaussian well (depth 0.8 eV at 2.45 Å, "
                              "width 0.35 Å)")
        assert np.allclose(ans.frames[0].positions, q.start.positions)  # it started where asked
        end = ans.final.copy()
        end.calc = chgnet
        by_hand = end.get_potential_energy() + pair_well_terms(end, oracle.wells)["energy"]
        assert ans.energy == pytest.approx(by_hand, abs=1e-4)
    d = [a.final.get_distance(se[0], j, mic=True) for a in answers]
    assert d[1] < d[0] - 0.3  # the pushed pair ends bonded, the unperturbed one does not
