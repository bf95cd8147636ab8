"""Alloys: random substitution, environments, all-pairs trials, the alloy command."""

import json
import re

import numpy as np
import pytest

from defectml.cli import main
from defectml.errors import InputError
from defectml.search.alloy import bond_kind, environment_defects, local_environment, make_alloy


def test_random_alloy_composition_and_seed(cdte):
    a = make_alloy(cdte, ("Te", "Se"), 0.25, seed=1)
    assert len(a) == 64 and a.composition["Se"] == 8 and a.composition["Te"] == 24
    assert make_alloy(cdte, ("Te", "Se"), 0.25, seed=1) == a
    assert make_alloy(cdte, ("Te", "Se"), 0.25, seed=2) != a
    with pytest.raises(InputError, match="not in the host"):
        make_alloy(cdte, ("S", "Se"), 0.5)
    with pytest.raises(InputError, match="within"):
        make_alloy(cdte, ("Te", "Se"), 1.5)


def test_vacancy_environments_cover_every_site(cdte):
    alloy = make_alloy(cdte, ("Te", "Se"), 0.5, seed=3)
    defects = environment_defects(alloy, "v_Cd")
    assert sum(d.multiplicity for d in defects) == 32  # every Cd site once
    envs = [d.name.split("_", 2)[2] for d in defects]
    assert len(set(envs)) == len(envs) >= 3
    for env, d in zip(envs, defects, strict=True):
        counts = dict(re.findall(r"([A-Z][a-z]?)(\d+)", env))
        assert sum(int(v) for v in counts.values()) == 4 and set(counts) <= {"Se", "Te"}
        assert len(d.supercell) == 63 and d.kind == "vacancy"
        # the representative (the site removed) really has that environment, and is gone
        j = int(np.argmin(np.linalg.norm(alloy.cart_coords - d.site, axis=1)))
        assert np.allclose(alloy[j].coords, d.site) and alloy[j].specie.symbol == "Cd"
        assert local_environment(alloy, j) == env
        assert not d.supercell.get_sites_in_sphere(d.site, 1.0)
    pure = environment_defects(cdte, "v_Cd")  # a small ordered cell is expanded first
    assert [d.name for d in pure] == ["v_Cd_Te4"] and pure[0].multiplicity == 32
    with pytest.raises(InputError, match="not interstitials"):
        environment_defects(alloy, "Cd_i")


def test_second_shell_environment(cdte):
    alloy = make_alloy(cdte, ("Te", "Se"), 0.5, seed=3)
    i = next(j for j, s in enumerate(alloy) if s.specie.symbol == "Cd")
    env = local_environment(alloy, i, shells=2)
    assert env.split(".")[1] == "Cd12"


def test_bond_kind():
    assert bond_kind([]) == "none"
    assert bond_kind([("Se", "Te", 2.7)]) == "Se-Te"
    assert bond_kind([("Te", "Te", 2.8), ("Se", "Te", 2.7)]) == "Se-Te+Te-Te"


def test_alloy_command_on_a_metal_alloy(tmp_path, copper_cif, capsys):
    out = tmp_path / "alloy"
    code = main(["alloy", str(copper_cif), "--substitute", "Cu:Au", "--x", "0.25",
                 "--defect", "v_Cu", "--charge", "0", "--oxi", "Cu=1,Au=1", "--model", "emt",
                 "--min-length", "7", "--distortions", "-0.3", "--pair-distortions", "-0.4",
                 "--no-relax-host", "--out", str(out), "--quiet"])
    assert code == 0
    rows = json.loads((out / "alloy_summary.json").read_text())
    assert rows and all(r["x"] == 0.25 for r in rows)
    assert sum(1 for _ in (out / "x_0.25").glob("v_Cu_*")) == len(rows)
    # one neighbour distorted (Cu+1 vacancy), every first-shell neighbour tried: 12 + U, R, Dimer
    assert all(r["n_trials"] >= 12 for r in rows)
    assert (out / "energy_vs_environment.png").exists()
    assert "environments" in capsys.readouterr().out
