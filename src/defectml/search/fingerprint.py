"""SOAP fingerprints of the defect site (dscribe), and their cosine distances.

The seed paper found the SOAP vector centred on the defect site more robust than energies
(which miss near-degenerate minima) or whole-cell RMSD (which sees differences far from the
defect) for telling minima apart.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from ase import Atoms

from defectml.errors import InputError
from defectml.settings import FromOptions


@dataclass(frozen=True)
class SoapSettings(FromOptions):
    """SOAP parameters (seed paper: r_cut 5 Å, n_max 10, l_max 10, sigma 1.0 Å).

    Options: ``--soap-r-cut``, ``--soap-n-max``, ``--soap-l-max``, ``--soap-sigma``.
    """

    OPTIONS_PREFIX: ClassVar[str] = "soap_"

    r_cut: float = 5.0
    n_max: int = 10
    l_max: int = 10
    sigma: float = 1.0

    def validate(self) -> None:
        """Raise ``InputError`` for a descriptor dscribe cannot build."""
        if self.r_cut <= 0 or self.sigma <= 0 or self.n_max < 1 or self.l_max < 0:
            raise InputError(f"SOAP needs r_cut > 0, sigma > 0, n_max >= 1 and l_max >= 0; got r_cut "
                             f"{self.r_cut}, sigma {self.sigma}, n_max {self.n_max}, l_max {self.l_max}")


def soap_fingerprints(
    structures: Sequence[Atoms],
    centres: Sequence[np.ndarray],
    settings: SoapSettings | None = None,
    species: Sequence[str] | None = None,
) -> np.ndarray:
    """One L2-normalised SOAP vector per structure, centred on its defect site.

    Args:
        structures: Relaxed structures (same species set).
        centres: Cartesian position of the defect site in each structure.
        settings: SOAP parameters.
        species: Species the descriptor covers (default: those in ``structures``); vectors are
            comparable only between calls with the same species.

    Returns:
        Array of shape (n_structures, n_features).
    """
    if len(structures) == 0:
        return np.zeros((0, 0))
    s = settings or SoapSettings()
    species = sorted(species or {sym for a in structures for sym in a.get_chemical_symbols()})
    soap = _descriptor(tuple(species), s)
    vectors = np.array(
        [soap.create(a, centers=[np.asarray(c)])[0] for a, c in zip(structures, centres, strict=True)]
    )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


@functools.lru_cache(maxsize=16)
def _descriptor(species: tuple[str, ...], s: SoapSettings):
    from dscribe.descriptors import SOAP

    return SOAP(species=list(species), r_cut=s.r_cut, n_max=s.n_max, l_max=s.l_max,
                sigma=s.sigma, periodic=True, sparse=False)


def cosine_distances(fingerprints: np.ndarray) -> np.ndarray:
    """Pairwise cosine distances (1 − cos θ) between L2-normalised fingerprints."""
    sim = np.clip(fingerprints @ fingerprints.T, -1.0, 1.0)
    return 1.0 - sim
