"""Shared fixtures: small real hosts (CdTe for CHGNet, Cu for the fast EMT potential)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parents[1]
CDTE_CIF = ROOT / "examples" / "CdTe.cif"


# Under CI (``CI`` set, as .ci/run runs) what .ci/run installs must be there: a missing tool fails
# its test instead of skipping it, so a skip in CI means "not this platform", never "not installed".
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(available: bool, what: str) -> None:
    """Skip the calling test when ``what`` is not available here; fail it under CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is missing under CI; .ci/run installs it", pytrace=False)
    pytest.skip(f"{what} is not available here (.ci/run installs it)")


@pytest.fixture(scope="session")
def cdte() -> Structure:
    return Structure.from_file(CDTE_CIF)


@pytest.fixture(scope="session")
def copper() -> Structure:
    """fcc Cu, conventional cell (EMT covers Cu)."""
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(3.61), ["Cu"], [[0, 0, 0]])


@pytest.fixture
def copper_cif(tmp_path, copper) -> Path:
    path = tmp_path / "Cu.cif"
    copper.to(filename=str(path))
    return path


def emt_labelled_frames(n: int, seed: int, amplitude: float = 0.1, repeat=(2, 2, 2)) -> list:
    """A Cu vacancy cell rattled less and less: n frames labelled with EMT energies and forces
    (a stand-in for a DFT relaxation's ionic steps)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    base = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    del base[0]
    frames = []
    for i in range(n):
        a = base.copy()
        a.rattle(amplitude * (n - i) / n, seed=seed)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        a.info["ionic_step"] = i
        frames.append(a)
    return frames


def held_out_errors(model, series: list[list]) -> dict[str, float]:
    """A model's errors on labelled frames it was not trained on (a fine-tune's test of learning).

    Args:
        model: A loaded model (:class:`defectml.models.Model`).
        series: Groups of labelled frames, each one relaxation's steps (one structure's rattles).

    Returns:
        ``f``: force MAE (eV/Å) over every component; ``de``: MAE (eV/atom) of the energies
        relative to their series' mean, so that one constant shift per series (what anchored
        labels leave free) does not count.
    """
    import numpy as np

    forces, differences = [], []
    for frames in series:
        predicted = model.batch()(frames)
        e = np.array([p[0] for p in predicted])
        ref = np.array([f.get_potential_energy() for f in frames])
        differences.append(np.abs((e - e.mean()) - (ref - ref.mean())) / np.array([len(f) for f in frames]))
        forces += [np.abs(p[1] - f.get_forces()).ravel() for p, f in zip(predicted, frames, strict=True)]
    return {"f": float(np.mean(np.concatenate(forces))), "de": float(np.mean(np.concatenate(differences)))}


EMT_VACANCY_SEARCH = ["--defect", "v_Cu", "--charge", "0", "--model", "emt", "--quiet"]


@pytest.fixture
def emt_vacancy_run(tmp_path, copper_cif) -> Path:
    """A finished EMT search of the Cu vacancy (charge 0): its output folder."""
    from defectml.cli import main

    run = tmp_path / "run"
    assert main(["search", str(copper_cif), *EMT_VACANCY_SEARCH, "--out", str(run)]) == 0
    return run
