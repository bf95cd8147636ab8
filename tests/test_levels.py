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
    out, err = capsys.readouterr()
    doc = json.loads((run / "levels" / "levels.json").read_text())
    # EMT has no charge input: one energy surface for every charge state, said in one line (even
    # with -q) and kept in levels.json
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and warned[0].startswith("warning: emt has no charge input: every charge state")
    assert doc["warnings"] == [warned[0].removeprefix("warning: ")]
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


def test_a_charge_aware_model_is_valid_at_its_training_cells_size():
    from ase.build import bulk

    from defectml.models.charged import cell_size, cell_size_warning, has_charge_input, training_cells

    small = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # L = 7.22 Å
    big = small.repeat((2, 1, 1))
    assert cell_size(small.cell) == pytest.approx(7.22)
    frames = [small.copy(), small.copy(), big.copy()]
    frames[0].info["charge"], frames[2].info["charge"] = 1, -2  # the neutral one is left out
    cells = training_cells(frames)
    assert cells == {"size_A": [7.22, round(7.22 * 2 ** (1 / 3), 3)], "atoms": [32, 64], "charged_frames": 2}
    assert training_cells(frames[1:2])["charged_frames"] == 0 and training_cells([]) is None
    card = {"charge_aware": True, "training_cells": {"size_A": [7.22, 7.22]}}
    assert cell_size_warning("aware", card, 7.22 * 1.04) is None  # within 5%: the training size
    # a cell twice the size keeps the training cells' image energy: the corrected energy is off by
    # the difference of the two cells' corrections (0.8 eV at 14.44 Å, 1.6 eV at 7.22 Å: −0.8 eV)
    line = cell_size_warning("aware", card, 14.44, correction=(2, 0.8))
    assert "L = 7.22-7.22 Å" in line and "L = 14.44 Å" in line and "about -0.80 eV at q = +2" in line
    assert "\n" not in line
    assert "aware's card does not record the size" in cell_size_warning("aware", {"charge_aware": True}, 7.22)
    assert "no model card beside aware records the size" in cell_size_warning("aware", None, 7.22)
    assert has_charge_input("chgnet", card) and has_charge_input("chgnet", None, "chgnet 0.4.2 charge-aware")
    assert has_charge_input("emt", None, "ase emt") is False and has_charge_input("calculator", None) is None


def test_levels_warns_when_a_charge_aware_model_meets_another_cell_size(tmp_path, copper_cif, capsys):
    import json

    import torch

    from defectml.cli import main
    from defectml.models import load_model
    from defectml.models.charged import charged_chgnet_class

    model = charged_chgnet_class().from_base(load_model("chgnet", threads=2).calculator.model)
    with torch.no_grad():
        model.charge_energy.weight[:, 0] = 0.4  # E(q) = E(0) + 0.4 q
    weights = tmp_path / "aware.pth.tar"
    torch.save({"model": model.as_dict()}, weights)
    card = tmp_path / "aware.pth.tar.card.json"
    card.write_text(json.dumps({"charge_aware": True, "charges": [-1, 0]}))
    run = tmp_path / "run"
    assert main(["search", str(copper_cif), "--model", str(weights), "--defect", "v_Cu", "--charge", "-1,0",
                 "--min-length", "5", "--distortions", "-0.3", "--no-rattled", "--no-dimer", "--threads", "2",
                 "--out", str(run), "--no-report", "--quiet"]) == 0
    levels = ["levels", str(run), "--gap", "1.5", "--mu", "Cu=-3.5", "--dielectric", "10", "-q"]

    def warnings_of(card_doc):
        card.write_text(json.dumps(card_doc))
        capsys.readouterr()
        assert main(levels) == 0
        err = capsys.readouterr().err
        return [line for line in err.splitlines() if line.startswith("warning:")]

    # a card without the training cells' size (written before it was recorded): one line says so
    (line,) = warnings_of({"charge_aware": True, "charges": [-1, 0]})
    assert "does not record the size of its training cells" in line and "(L = 7.2" in line
    # trained on this supercell's size (2x2x2 conventional Cu cells, L = 7.2 Å): nothing to say
    assert warnings_of({"charge_aware": True, "training_cells": {"size_A": [7.1, 7.3]}}) == []
    # trained on 2.5x larger cells: one line with the error estimate
    (line,) = warnings_of({"charge_aware": True, "training_cells": {"size_A": [18.05, 18.05]}})
    assert "learned its charge energy on cells of L = 18.05-18.05 Å" in line and "at q = -1" in line
    doc = json.loads((run / "levels" / "levels.json").read_text())
    assert doc["warnings"] == [line.removeprefix("warning: ")]
