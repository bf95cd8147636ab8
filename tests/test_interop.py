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
    doped = pytest.importorskip("doped.generation")
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
