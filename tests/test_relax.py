import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from defectml.core.relax import CONVERGED, FAILED, UNCONVERGED, relax_one, relax_structures


def _rattled_cu(seed=0):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=seed)
    return atoms


def test_relaxation_converges_and_forces_sum_to_zero():
    (r,) = relax_structures([_rattled_cu()], EMT(), fmax=0.01)
    assert r.status == CONVERGED and r.reason == ""
    assert np.abs(r.forces).max() < 0.01
    assert np.abs(r.forces.sum(axis=0)).max() < 1e-6  # Newton's third law
    assert r.energy < 0.1 and r.steps > 0


def test_step_limit_is_reported_as_unconverged():
    r = relax_one(_rattled_cu(), EMT(), fmax=1e-6, max_steps=3)
    assert r.status == UNCONVERGED and "after 3 steps" in r.reason and r.energy is not None


class NaNCalculator(Calculator):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": float("nan"), "forces": np.zeros((len(atoms), 3))}


class CollapsingCalculator(Calculator):
    """Pulls atom 1 onto atom 0: a model hole."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        f = np.zeros((len(atoms), 3))
        f[1] = 5.0 * (atoms.positions[0] - atoms.positions[1])
        self.results = {"energy": -float(np.linalg.norm(f)), "forces": f}


def test_nan_energy_fails_with_reason():
    r = relax_one(_rattled_cu(), NaNCalculator())
    assert r.status == FAILED and "non-finite energy" in r.reason and r.energy is None


def test_collapsing_atoms_fail_with_reason():
    r = relax_one(_rattled_cu(), CollapsingCalculator(), max_steps=500)
    assert r.status == FAILED and "apart" in r.reason


def test_atoms_too_close_at_the_start():
    atoms = _rattled_cu()
    atoms.positions[1] = atoms.positions[0] + [0.3, 0, 0]
    r = relax_one(atoms, EMT())
    assert r.status == FAILED and "at the start" in r.reason


def test_model_crash_is_caught():
    class Boom(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, *a, **k):
            raise RuntimeError("kaboom")

    r = relax_one(_rattled_cu(), Boom())
    assert r.status == FAILED and "kaboom" in r.reason


@pytest.mark.parametrize("n", [0, 3])
def test_relax_structures_yields_one_result_per_input(n):
    out = list(relax_structures([_rattled_cu(i) for i in range(n)], EMT(), fmax=0.05))
    assert len(out) == n
