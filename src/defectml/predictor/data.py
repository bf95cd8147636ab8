"""The 2DMD pairs (unrelaxed -> DFT-relaxed) as graphs, with the published splits, cached on disk."""

from __future__ import annotations

import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ase import Atoms
from ase.io import read

from defectml.errors import DefectMLError
from defectml.predictor.graph import DefectGraph, NodeType, align_pristine, build_graph, tile_pristine

MATERIALS = ("MoS2", "WSe2", "hBN", "GaSe", "InSe", "BP")


@dataclass
class Split:
    """Graphs of one material: train, validation (held out of train) and test."""

    material: str
    train: list[DefectGraph]
    val: list[DefectGraph]
    test: list[DefectGraph]
    test_ids: list[str]
    train_ids: list[str] = field(default_factory=list)
    val_ids: list[str] = field(default_factory=list)


def unpack(source: str | Path, cache: Path) -> Path:
    """The ``high_density_defects`` folder: ``source`` itself, or the tarball unpacked into ``cache``."""
    source = Path(source)
    if source.is_dir():
        root = source / "high_density_defects" if (source / "high_density_defects").is_dir() else source
        return root
    if not source.exists():
        raise DefectMLError(f"no 2DMD data at {source}")
    root = cache / "high_density_defects"
    if not root.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(source) as tar:
                tar.extractall(cache, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise DefectMLError(f"cannot unpack {source}: {exc}") from None
    return root


def _ids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()[1:] if line.strip()]


def pristine_cell(folder: Path) -> Atoms:
    """The pristine supercell (``*_8x8.cif``) or unit cell shipped with a material."""
    cifs = sorted(p for p in folder.glob("*.cif"))
    big = [p for p in cifs if "x" in p.stem.split("_")[-1]]
    if not cifs:
        raise DefectMLError(f"no pristine CIF in {folder}")
    return read(big[0] if big else cifs[0])


def _train_ids(folder: Path, test_ids: list[str]) -> list[str]:
    """Train ids of a material: ``train.csv``, else every id not in ``test_ids`` in a fixed random order."""
    if (folder / "train.csv").exists():
        return _ids(folder / "train.csv")
    all_ids = sorted(p.name[: -len("_unrelaxed.cif")] for p in (folder / "CIF").glob("*_unrelaxed.cif"))
    held = set(test_ids)
    train_ids = [i for i in all_ids if i not in held]
    random.Random(0).shuffle(train_ids)
    return train_ids


def _build_graphs(folder: Path, ids: list[str], cutoff: float,
                  progress: Callable | None) -> dict[str, DefectGraph]:
    """Graphs of the (unrelaxed, relaxed) pairs ``ids`` of a material, by id.

    The pristine cell is aligned to the first structure once and reused; a structure whose origin
    differs (the reused alignment leaves interstitials) is aligned afresh.

    Args:
        folder: The material's folder.
        ids: Structure ids, in order.
        cutoff: Graph cutoff (Å).
        progress: Wraps the ids for a progress bar (``None``: none).
    """
    pristine = pristine_cell(folder)
    graphs = {}
    aligned = None
    for k in progress(ids) if progress else ids:
        u = read(folder / "CIF" / f"{k}_unrelaxed.cif")
        r = read(folder / "CIF" / f"{k}_relaxed.cif")
        if aligned is None:
            g = build_graph(u, pristine, cutoff, r)
            aligned = _aligned(u, pristine)
        else:
            g = build_graph(u, aligned, cutoff, r, align=False)
            if int((g.node_type == NodeType.INTERSTITIAL).sum()) > 0:  # origin differs: realign
                g = build_graph(u, pristine, cutoff, r)
        graphs[k] = g
    return graphs


def material_split(
    root: Path,
    material: str,
    cutoff: float,
    cache: Path,
    val_fraction: float = 0.1,
    limit: int | None = None,
    progress: Callable | None = None,
) -> Split:
    """Graphs of one material (cached as ``<cache>/<material>_<cutoff>.pt``).

    Train ids: ``train.csv`` when shipped (already in random order), else every id not in
    ``test.csv`` (BP), put in a fixed random order (sorted ids group by composition, so a tail would be
    a biased validation set); the last ``val_fraction`` of them is held out for validation. ``limit``
    keeps the first N train ids.
    """
    folder = root / material
    if not folder.is_dir():
        raise DefectMLError(f"unknown material {material!r}; the data has {', '.join(MATERIALS)}")
    test_ids = _ids(folder / "test.csv")
    train_ids = _train_ids(folder, test_ids)
    if limit:
        train_ids = train_ids[:limit]
    path = cache / f"{material}_{cutoff:g}_{len(train_ids)}.pt"
    if path.exists():
        graphs = torch.load(path, weights_only=False)
    else:
        graphs = _build_graphs(folder, train_ids + test_ids, cutoff, progress)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(graphs, path)
    n_val = max(1, int(round(val_fraction * len(train_ids))))
    fit, val = train_ids[:-n_val], train_ids[-n_val:]
    return Split(
        material,
        [graphs[k] for k in fit],
        [graphs[k] for k in val],
        [graphs[k] for k in test_ids],
        test_ids,
        fit,
        val,
    )


def _aligned(defect: Atoms, pristine: Atoms) -> Atoms:
    return align_pristine(defect, tile_pristine(defect, pristine))
