"""Execution engines: batched FIRE, local process pool, Dask LocalCluster, early stop."""

from types import SimpleNamespace

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from defectml import SearchSettings, TrialSettings, search
from defectml.core.relax import calculator_batch_fn, relax_batched, relax_one
from defectml.search.landscape import BasinWatch


def _cu_vacancies(n):
    out = []
    for seed in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        del a[0]
        a.rattle(0.08, seed=seed)
        out.append(a)
    return out


def _ase_fire(atoms, fmax):
    """ASE's own FIRE, the reference defectml's one relaxer must reproduce."""
    from ase.optimize import FIRE

    work = atoms.copy()
    work.calc = EMT()
    opt = FIRE(work, logfile=None)
    converged = opt.run(fmax=fmax, steps=1500)
    return SimpleNamespace(status="converged" if converged else "unconverged", steps=opt.nsteps,
                           energy=work.get_potential_energy(), atoms=work)


def test_batched_fire_is_ase_fire():
    structures = _cu_vacancies(4)
    seq = [_ase_fire(a, fmax=0.02) for a in structures]
    batched = dict(relax_batched(structures, calculator_batch_fn(EMT()), fmax=0.02, max_batch=3))
    assert sorted(batched) == [0, 1, 2, 3]
    for i, r in enumerate(seq):
        b = batched[i]
        assert b.status == r.status == "converged"
        assert b.steps == r.steps
        assert abs(b.energy - r.energy) / len(r.atoms) < 1e-6
        assert np.allclose(b.atoms.positions, r.atoms.positions, atol=1e-6)


def test_the_serial_path_is_the_batch_of_one_and_records_every_frame():
    structures = _cu_vacancies(3)
    batched = dict(relax_batched(structures, calculator_batch_fn(EMT()), fmax=0.02, max_batch=3))
    for i, a in enumerate(structures):
        r = relax_one(a, EMT(), fmax=0.02)
        # EMT reuses its neighbour list across structures of a batch: equal to the last ~1e-14 eV
        assert r.steps == batched[i].steps and r.energy == pytest.approx(batched[i].energy, abs=1e-9)
        traj = r.trajectory
        assert len(traj) == r.steps + 1  # the start and one frame per step
        assert traj.energies[-1] == r.energy and np.allclose(traj.positions[-1], r.atoms.positions)
        assert np.allclose(traj.positions[0], a.positions) and traj.forces.shape == (len(traj), len(a), 3)
        assert np.allclose(traj.cells[0], a.cell.array)


def test_batched_fire_isolates_failures():
    good, bad = _cu_vacancies(2)
    bad.positions[1] = bad.positions[2] + [0.2, 0, 0]
    out = dict(relax_batched([good, bad], calculator_batch_fn(EMT()), fmax=0.05))
    assert out[0].status == "converged"
    assert out[1].status == "failed" and "at the start" in out[1].reason


def test_batched_chgnet_matches_sequential(cdte):
    from defectml.models import load_model
    from defectml.search.defects import make_defects
    from defectml.structure_io import to_atoms

    (v,) = make_defects(cdte, "v_Cd")
    a = to_atoms(v.supercell)
    structures = []
    for seed in (1, 2):
        s = a.copy()
        s.rattle(0.05, seed=seed)
        structures.append(s)
    model = load_model("chgnet", threads=2)
    seq = [relax_one(s, model.calculator, fmax=0.05) for s in structures]
    batched = dict(relax_batched(structures, model.batch(), fmax=0.05))
    for i, r in enumerate(seq):
        assert abs(batched[i].energy - r.energy) / len(a) < 1e-3  # within 1 meV/atom
        assert batched[i].status == "converged"


def _settings():
    return SearchSettings(model="emt", min_length=7.0, oxidation_states={"Cu": 2},
                          trials=TrialSettings(distortions=(-0.4, 0.3)))


@pytest.mark.parametrize("kw", [{"workers": 2}, {"executor": "dask", "workers": 2},
                                {"batch_size": 3}])
def test_executors_give_the_serial_answer(tmp_path, copper, kw):
    serial = search(copper, "v_Cu", [0], out=tmp_path / "serial", settings=_settings(),
                    progress=False)
    other = search(copper, "v_Cu", [0], out=tmp_path / "other", settings=_settings(),
                   progress=False, **kw)
    assert other.relaxed == serial.relaxed == 5
    (a,), (b,) = serial.summaries, other.summaries
    assert [sorted(m.trials) for m in a.minima] == [sorted(m.trials) for m in b.minima]
    assert [m.energy for m in a.minima] == pytest.approx([m.energy for m in b.minima], abs=1e-4)


def test_basin_watch_stops_only_near_a_known_minimum():
    a = _cu_vacancies(1)[0]
    site = np.zeros(3)
    w = BasinWatch(("Cu",), site, None, threshold=0.001, energy_tol=0.05)
    assert w(a, 0.0, 20) is None  # nothing known yet
    w.add("Unperturbed", a, -1.0)
    assert w(a, -0.98, 20) == "Unperturbed"
    assert w(a, -0.98, 3) is None  # too early
    assert w(a, -0.5, 20) is None  # energy far above the minimum
    far = a.copy()
    far.positions[1:5] += 0.8  # two nearest neighbours moved 0.8 A: cosine distance ~2e-3
    assert w(far, -0.99, 20) is None


def test_early_stop_search_records_basin_membership(tmp_path, copper):
    s = _settings()
    s.early_stop = True
    result = search(copper, "v_Cu", [0], out=tmp_path, settings=s, progress=False)
    (summary,) = result.summaries
    assert sum(len(m.trials) for m in summary.minima) + len(summary.quarantined) == 5
    for t in summary.trials:
        if t.status == "in_basin":
            assert any(t.name in m.trials and t.basin_of in m.trials for m in summary.minima)


@pytest.mark.parametrize("name", ["lbfgs", "bfgs", "precon-fire"])
def test_each_batched_optimizer_is_the_ase_optimizer_it_names(name):
    from ase.optimize import BFGS, LBFGS
    from ase.optimize.precon import Exp, PreconFIRE

    from defectml.core.optimizers import PRECON_MU

    make = {"lbfgs": lambda a: LBFGS(a, logfile=None),
            "bfgs": lambda a: BFGS(a, logfile=None),
            "precon-fire": lambda a: PreconFIRE(a, logfile=None, precon=Exp(mu=PRECON_MU),
                                                use_armijo=False)}[name]
    structures = _cu_vacancies(3)
    batched = dict(relax_batched(structures, calculator_batch_fn(EMT()), fmax=0.02, max_batch=3,
                                 optimizer=name))
    for i, a in enumerate(structures):
        work = a.copy()
        work.calc = EMT()
        opt = make(work)
        assert opt.run(fmax=0.02, steps=1500)
        b = batched[i]
        assert b.status == "converged" and b.steps == opt.nsteps
        assert np.allclose(b.atoms.positions, work.positions, atol=1e-6)


def test_an_unknown_optimizer_is_refused_before_any_work():
    from defectml.errors import InputError

    with pytest.raises(InputError, match="unknown optimiser 'newton'"):
        list(relax_batched(_cu_vacancies(1), calculator_batch_fn(EMT()), optimizer="newton"))


@pytest.mark.parametrize("name", ["fire", "bfgs"])
def test_constraints_hold_as_in_ase(name):
    """FixSymmetry (thermo's symmetric relaxations) and FixAtoms: the same path as ASE's own run."""
    from ase.constraints import FixAtoms, FixSymmetry
    from ase.optimize import BFGS, FIRE

    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    del a[0]
    a.positions[3] += [0.05, 0.05, 0.0]  # a displacement the symmetry keeps (it lowers it)
    # fixed: four of the vacancy's neighbours (it was at the origin), whose forces are the largest:
    # convergence must be judged without them
    half = a.cell.lengths() / 2
    r = np.linalg.norm((a.positions + half) % (2 * half) - half, axis=1)
    near = [int(i) for i in np.flatnonzero(np.abs(r - 3.61 / np.sqrt(2)) < 0.05)][:4]
    for constraint in (FixSymmetry(a, symprec=1e-3), FixAtoms(indices=near)):
        start = a.copy()
        start.set_constraint(constraint)
        work = start.copy()
        work.calc = EMT()
        opt = {"fire": FIRE, "bfgs": BFGS}[name](work, logfile=None)
        assert opt.run(fmax=0.01, steps=500)
        r = relax_one(start, EMT(), fmax=0.01, optimizer=name)
        assert r.status == "converged" and r.steps == opt.nsteps
        assert np.allclose(r.atoms.positions, work.positions, atol=1e-6)
        if isinstance(constraint, FixAtoms):
            assert len(near) == 4 and np.allclose(r.atoms.positions[near], a.positions[near])


def test_batches_filled_by_memory_stay_within_it_and_give_the_unbatched_answer():
    structures = _cu_vacancies(5)
    seen = []
    emt = calculator_batch_fn(EMT())

    def recording(batch):
        seen.append(len(batch))
        return emt(batch)

    costs = (3.0, 3.0, 3.0, 8.0, 1.0)
    by_position = {tuple(np.round(a.positions[0], 9)): c for a, c in zip(structures, costs, strict=True)}

    def memory(atoms):  # looked up by where the structure starts
        return by_position[tuple(np.round(atoms.positions[0], 9))]

    out = dict(relax_batched(structures, recording, fmax=0.05, max_batch=99, max_memory=6.0,
                             memory_fn=memory))
    one = dict(relax_batched(structures, emt, fmax=0.05, max_batch=1))
    assert max(seen) == 2 and 1 in seen  # never three (9 > 6); the 8 runs alone: over budget alone
    for i, r in one.items():
        assert out[i].steps == r.steps and np.allclose(out[i].atoms.positions, r.atoms.positions)


def test_batch_memory_is_refused_where_it_cannot_be_kept(tmp_path, copper):
    from defectml.errors import InputError

    with pytest.raises(InputError, match="no memory per structure|has none"):
        search(copper, "v_Cu", [0], out=tmp_path / "a", settings=_settings(), progress=False,
               batch_memory_gb=1.0)  # EMT: nothing measured, so nothing to fill by
    with pytest.raises(InputError, match="--workers 1"):
        search(copper, "v_Cu", [0], out=tmp_path / "b", settings=_settings(), progress=False,
               batch_memory_gb=1.0, workers=2)


def test_chgnet_memory_counts_are_chgnets_own_graph():
    """The batcher's edges and angles are the graph CHGNet builds (rocksalt: 15x zinc blende's angles)."""
    from ase.io import read
    from pymatgen.io.ase import AseAtomsAdaptor

    from defectml.models import load_model
    from defectml.models.memory import graph_counts

    model = load_model("chgnet", threads=1)
    cells = [read("examples/CdTe.cif").repeat(2), bulk("MgO", "rocksalt", a=4.2, cubic=True).repeat(2)]
    estimates = []
    for atoms in cells:
        del atoms[0]
        atoms.rattle(0.1, seed=0)
        graph = model.calculator.model.graph_converter(AseAtomsAdaptor.get_structure(atoms))
        counts = graph_counts(atoms, "chgnet")
        assert (counts["edges"], counts["angles"]) == (len(graph.atom_graph), len(graph.bond_graph))
        estimates.append(model.memory(atoms))
    assert estimates[1] > 4 * estimates[0] > 0  # same atom count, far more memory
