"""Transition levels, the point-charge correction and the charge-neutral Fermi level, against
closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from ase.units import kB

from defectml.errors import InputError
from defectml.thermo.levels import (
    ChargeState,
    DefectLines,
    fermi_dirac_half,
    formation_lines,
    plot_diagram,
    point_charge_correction,
    solve_fermi_level,
    transition_levels,
)


def test_lines_and_levels_of_a_three_state_defect():
    states = [ChargeState(1, -99.0), ChargeState(0, -98.0), ChargeState(-1, -96.0, correction=0.5)]
    d = formation_lines("V_X", states, e_bulk=-100.0, exchanged={"X": -1}, mu={"X": -1.0}, vbm=0.25)
    # E_f(q, 0) = E_d − E_bulk + μ_X + q·E_VBM + corr
    assert d.intercepts == pytest.approx({1: 0.25, 0: 1.0, -1: 3.25})
    levels = transition_levels(d, gap=3.0)
    assert [(lv.q, lv.q_next) for lv in levels] == [(1, 0), (0, -1)]
    assert [lv.fermi_level for lv in levels] == pytest.approx([0.75, 2.25])
    assert levels[0].label == "ε(+1/+0)"
    # a narrower gap keeps only the levels inside it
    assert [lv.q for lv in transition_levels(d, gap=2.0)] == [1]


def test_a_state_never_lowest_has_no_level_of_its_own():
    d = DefectLines("D", {1: 0.0, 0: 2.0, -1: 2.0})  # 0 is above the +1/−1 crossing at 1.0
    levels = transition_levels(d, gap=3.0)
    assert [(lv.q, lv.q_next) for lv in levels] == [(1, -1)] and levels[0].fermi_level == pytest.approx(1.0)


def test_the_point_charge_correction_is_makov_payne_for_a_cubic_cell():
    length, eps = 12.6, 9.8
    alpha = 2.8373  # Madelung constant of a simple cubic lattice of point charges
    makov_payne = 14.399645 * alpha / (2 * eps * length)
    for q in (1, 2):
        corr = point_charge_correction(np.eye(3) * length, q, eps)
        assert corr == pytest.approx(q * q * makov_payne, rel=0.01)
    assert point_charge_correction(np.eye(3) * length, 0, 0) == 0.0
    with pytest.raises(InputError, match="dielectric"):
        point_charge_correction(np.eye(3) * length, 1, None)


def test_fermi_dirac_integral_limits():
    assert fermi_dirac_half(-10.0) == pytest.approx(np.exp(-10.0), rel=1e-3)
    # degenerate limit: (4 / 3√π) η^{3/2}
    assert fermi_dirac_half(30.0) == pytest.approx(4 / (3 * np.sqrt(np.pi)) * 30.0**1.5, rel=0.01)


def test_an_intrinsic_semiconductor_has_its_fermi_level_near_midgap():
    t, gap = 600.0, 2.0
    sol = solve_fermi_level([], gap, t, electron_mass=0.2, hole_mass=1.0)
    # non-degenerate: E_F = E_g/2 + (3/4) kT ln(m_h/m_e)
    assert sol.fermi_level == pytest.approx(gap / 2 + 0.75 * kB * t * np.log(1.0 / 0.2), abs=1e-3)
    assert sol.electrons == pytest.approx(sol.holes, rel=1e-3)


def test_a_shallow_donor_pins_the_fermi_level_near_the_conduction_band(tmp_path):
    # a donor whose +1 state is far below its neutral one at every E_F in the gap
    donor = DefectLines("D", {1: -1.0, 0: 1.5}, sites_per_cm3=1e22)
    sol = solve_fermi_level([donor], 3.0, 1000.0)
    assert sol.fermi_level > 2.0
    n_defect = sol.concentrations["D"][1]
    assert sol.electrons == pytest.approx(n_defect + sol.holes, rel=1e-3)  # neutrality
    plot_diagram([donor], 3.0, tmp_path / "d.png", fermi_level=sol.fermi_level, title="donor")
    assert (tmp_path / "d.png").stat().st_size > 5000


def test_levels_command_on_a_search_with_two_charge_states(tmp_path, copper_cif, capsys):
    import json

    from conftest import EMT_VACANCY_SEARCH

    from defectml.cli import main

    run = tmp_path / "run"
    args = [a if a != "0" else "-1,0" for a in EMT_VACANCY_SEARCH]  # --charge -1,0
    assert main(["search", str(copper_cif), *args, "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["levels", str(run), "--gap", "1.5", "--mu", "Cu=-3.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dielectric" in err[0]
    assert main(["levels", str(run), "--gap", "1.5", "--mu", "Cu=-3.5", "--dielectric", "10", "-q"]) == 0
    out = capsys.readouterr().out
    doc = json.loads((run / "levels" / "levels.json").read_text())
    states = doc["defects"]["v_Cu"]["charge_states"]
    assert set(states) == {"-1", "+0"} and states["+0"]["correction_eV"] == 0.0
    # ε(0/−1) where the lines cross: E_f(−1, 0) − E_f(0, 0); EMT has no charge input, so both
    # states relax on one surface (their trials' rattles differ) and it lies at about the −1
    # state's correction
    (level,) = doc["defects"]["v_Cu"]["levels"]
    assert (level["q"], level["q_next"]) == (0, -1)
    e_f = {q: s["formation_energy_at_vbm_eV"] for q, s in states.items()}
    assert level["fermi_level_eV"] == pytest.approx(e_f["-1"] - e_f["+0"], abs=1e-3)
    assert level["fermi_level_eV"] == pytest.approx(states["-1"]["correction_eV"], abs=0.01)
    assert "ε(+0/-1)" in out and (run / "levels" / "levels.png").stat().st_size > 5000
    assert "neutrality" in doc
    # finite temperature: thermo's free energies (here written by hand: +0.3 eV on the −1 state
    # at 600 K, 0 on the neutral one) move ε(0/−1) up by exactly that
    for label, g in (("v_Cu_-1", [0.0, 0.3]), ("v_Cu_0", [0.0, 0.0])):
        (tmp_path / label).mkdir()
        (tmp_path / label / "thermo.json").write_text(json.dumps({
            "defect": label, "temperatures_K": [300.0, 900.0], "g_f_eV": [1.0 + g[0], 1.0 + 2 * g[1]],
            "configurations": [{"u_f_eV": 1.0}, {"u_f_eV": 1.4}]}))
    assert main(["levels", str(run), "--gap", "1.5", "--mu", "Cu=-3.5", "--dielectric", "10", "-q",
                 "--T", "600", "--thermo", str(tmp_path / "v_Cu_-1"),
                 "--thermo", str(tmp_path / "v_Cu_0" / "thermo.json"), "--out", str(tmp_path / "hot")]) == 0
    hot = json.loads((tmp_path / "hot" / "levels.json").read_text())["defects"]["v_Cu"]
    assert hot["charge_states"]["-1"]["finite_t_eV"] == pytest.approx(0.3)
    assert hot["levels"][0]["fermi_level_eV"] == pytest.approx(level["fermi_level_eV"] + 0.3, abs=1e-6)
    capsys.readouterr()
    for extra, message in ((["--T", "1200"], "not 1200 K"), (["--T", "600", "--defect", "v_Cu"], None)):
        code = main(["levels", str(run), "--gap", "1.5", "--mu", "Cu=-3.5", "--dielectric", "10", "-q",
                     "--thermo", str(tmp_path / "v_Cu_-1"), "--out", str(tmp_path / "x"), *extra])
        if message:
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and message in err[0]
        else:
            assert code == 0
    other = {"defect": "v_Zn_0", "temperatures_K": [300], "g_f_eV": [1], "configurations": [{"u_f_eV": 1}]}
    (tmp_path / "v_Cu_-1" / "thermo.json").write_text(json.dumps(other))
    assert main(["levels", str(run), "--gap", "1.5", "--dielectric", "10", "-q", "--mu", "Cu=-3.5",
                 "--T", "300", "--thermo", str(tmp_path / "v_Cu_-1"), "--out", str(tmp_path / "y")]) == 2
    assert "v_Zn_0 match no charge state" in capsys.readouterr().err
