"""Shared fixtures: small real hosts (CdTe for CHGNet, Cu for the fast EMT potential)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

warnings.filterwarnings("ignore", category=UserWarning)

ROOT = Path(__file__).resolve().parents[1]
CDTE_CIF = ROOT / "examples" / "CdTe.cif"


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


EMT_VACANCY_SEARCH = ["--defect", "v_Cu", "--charge", "0", "--model", "emt", "--quiet"]


@pytest.fixture
def emt_vacancy_run(tmp_path, copper_cif) -> Path:
    """A finished EMT search of the Cu vacancy (charge 0): its output folder."""
    from defectml.cli import main

    run = tmp_path / "run"
    assert main(["search", str(copper_cif), *EMT_VACANCY_SEARCH, "--out", str(run)]) == 0
    return run
