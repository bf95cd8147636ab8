"""Defect objects in (pymatgen-analysis-defects, doped), ShakeNBreak's own reader on our output."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pymatgen.analysis.defects.core import Substitution, Vacancy
from pymatgen.analysis.defects.generators import VacancyGenerator
from pymatgen.core import Lattice, PeriodicSite, Structure

from defectml.errors import InputError
from defectml.search.pipeline import SearchSettings, plan, search


def _settings(**kw):
    return SearchSettings(model="emt", min_length=7.0, **kw)


def test_pymatgen_defect_objects_give_the_defects_a_spec_gives(copper):
    (vac,) = VacancyGenerator().generate(copper)
    by_object = plan(copper, [vac], [0], _settings(), reference=copper)
    by_spec = plan(copper, "v_Cu", [0], _settings())
    assert [it.defect.name for it in by_object] == [it.defect.name for it in by_spec] == ["v_Cu"]
    a, b = by_object[0].defect, by_spec[0].defect
    assert (a.multiplicity, a.site_symmetry, len(a.supercell)) == \
        (b.multiplicity, b.site_symmetry, len(b.supercell))
    assert [t.name for t in by_object[0].trials] == [t.name for t in by_spec[0].trials]


def test_objects_made_on_a_conventional_cell_are_placed_on_the_primitive_one(copper):
    conventional = Structure(Lattice.cubic(3.61), ["Cu"] * 4,
                             [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    sub = Substitution(conventional, PeriodicSite("Ni", [0.5, 0.5, 0], conventional.lattice))
    (item,) = plan(conventional, [sub], [0], _settings(), reference=conventional)
    d = item.defect
    assert d.name == "Ni_Cu" and d.kind == "substitution"
    assert d.supercell[d.defect_index].specie.symbol == "Ni"
    assert d.supercell.composition["Ni"] == 1


def test_objects_of_another_crystal_or_kind_are_refused(copper):
    fcc = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    silver = Structure(Lattice.cubic(4.09), ["Ag"] * 4, fcc)
    wrong = Vacancy(silver, silver[1])
    with pytest.raises(InputError, match="no Ag site of this host"):
        plan(copper, [wrong], [0], _settings(), reference=copper)
    with pytest.raises(InputError, match="cannot search str objects"):
        plan(copper, ["v_Cu"], [0], _settings(), reference=copper)


def test_a_search_takes_defect_objects(copper, tmp_path):
    (vac,) = VacancyGenerator().generate(copper)
    from defectml.search.distort import TrialSettings

    s = SearchSettings(model="emt", min_length=7.0, trials=TrialSettings(distortions=(-0.3,)))
    result = search(copper, [vac], [0], out=tmp_path / "run", settings=s, progress=False)
    (summary,) = result.summaries
    assert summary.defect == "v_Cu" and summary.minima


def test_doped_defect_objects_in():
    from doped import generation as doped
    from pymatgen.core import Structure

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = doped.DefectsGenerator(nacl, extrinsic=None, interstitial_gen_kwargs=False, processes=1)
    vacancies = [d for d in gen.defects["vacancies"]]
    assert vacancies and all(type(v).__module__.startswith("doped") for v in vacancies)
    host = vacancies[0].structure  # doped's own cell of the host (its orientation): the search's host
    items = plan(host, vacancies, [0], SearchSettings(model="emt", min_length=7.0), reference=host)
    assert sorted(it.defect.name for it in items) == ["v_Cl", "v_Na"]
    for it in items:
        removed = it.defect.removed
        assert it.defect.bulk_supercell.composition[removed] - it.defect.supercell.composition[removed] == 1
        assert np.isfinite(it.defect.site).all()


def test_defect_json_files_on_the_command_line(copper, tmp_path, capsys):
    from monty.serialization import dumpfn

    from defectml.cli import main

    cif = tmp_path / "Cu.cif"
    copper.to(filename=str(cif))
    (vac,) = VacancyGenerator().generate(copper)
    dumpfn([vac], tmp_path / "defects.json")
    common = ["--charge", "0", "--min-length", "7", "--distortions", "-0.3", "--quiet"]
    assert main(["generate", str(cif), "--defect", str(tmp_path / "defects.json"), *common,
                 "--out", str(tmp_path / "trials")]) == 0
    assert (tmp_path / "trials" / "v_Cu_0" / "Unperturbed" / "POSCAR").is_file()
    # a DefectEntry written by `export --format entries` goes back in as its defect
    run = tmp_path / "run"
    assert main(["search", str(cif), "--defect", "v_Cu", "--model", "emt", *common, "--no-report",
                 "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "entries", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert main(["generate", str(cif), "--defect", str(tmp_path / "e" / "v_Cu_0.json"), *common,
                 "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "v_Cu_0" / "Unperturbed" / "POSCAR").is_file()
    capsys.readouterr()
    (tmp_path / "plain.json").write_text('{"v_Cu": 1}')
    for bad, says in (("plain.json", "not a plain mapping"), ("missing.json", "no such file")):
        assert main(["generate", str(cif), "--defect", str(tmp_path / bad), *common,
                     "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0]


def test_a_doped_defects_generator_json_on_the_command_line(tmp_path):
    from doped import generation as doped

    from defectml.cli import main

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = doped.DefectsGenerator(nacl, extrinsic=None, interstitial_gen_kwargs=False, processes=1)
        gen.to_json(str(tmp_path / "gen.json"))
    cif = tmp_path / "NaCl.cif"
    nacl.to(filename=str(cif))
    assert main(["generate", str(cif), "--defect", str(tmp_path / "gen.json"), "--charge", "0",
                 "--min-length", "7", "--distortions", "-0.3", "--quiet", "--out", str(tmp_path / "t")]) == 0
    made = sorted(p.name for p in (tmp_path / "t").iterdir() if p.is_dir())
    n_antisites = sum(1 for group in ("substitutions",) for _ in gen.defects.get(group, []))
    assert {"v_Na_0", "v_Cl_0"} <= set(made) and len(made) == 2 + n_antisites
