"""Seed ensembles of the direct predictor, and the Dummy baseline every result is measured against.

A training folder holds one member per seed: ``model.pt`` (seed ``s``), ``model_s1.pt`` (seed
``s + 1``), ...; evaluating the folder averages them (:class:`~defectml.predictor.model.Ensemble`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from defectml.predictor import train as ptrain
from defectml.predictor.model import ModelConfig


class Dummy:
    """The "Dummy" baseline: predict the unrelaxed positions (zero displacement)."""

    def eval(self):
        """No training mode to leave."""
        return self

    def __call__(self, batch):
        """Zero displacement for every atom of the batch."""
        import torch

        return torch.zeros_like(batch.pos)


def member_path(folder: Path, k: int) -> Path:
    """Checkpoint of ensemble member ``k``: ``model.pt`` for the first, ``model_s<k>.pt`` after."""
    return folder / ("model.pt" if k == 0 else f"model_s{k}.pt")


def train_ensemble(
    groups: list[tuple[Path, list]],
    config: ModelConfig,
    settings: ptrain.TrainSettings,
    seeds: int,
    log: Callable[[Path, str], None] = lambda path, msg: None,
) -> Iterator[Path]:
    """Train (or resume) ``seeds`` members per group; yield each checkpoint when it is done.

    Args:
        groups: ``(folder, material splits)``: one model per folder on the splits' pairs (one
            material per folder, or all of them jointly).
        config: The network.
        settings: Training settings; member ``k`` trains with seed ``settings.seed + k``.
        seeds: Members per folder.
        log: ``log(checkpoint, message)`` for progress.
    """
    for folder, group in groups:
        for k in range(seeds):
            target = member_path(folder, k)
            ptrain.train([g for s in group for g in s.train], [g for s in group for g in s.val],
                         target, config, replace(settings, seed=settings.seed + k, log=[]),
                         log=lambda m, t=target: log(t, m))
            yield target


def material_members(specs: list[Path], material: str) -> list[Path]:
    """Every member trained for ``material`` under per-material folders (``<folder>/<material>/``)."""
    members = [q for p in specs for q in sorted((p / material).glob("model*.pt"))]
    return members or [specs[0] / material / "model.pt"]


def gain_over_dummy(model, graphs: list, passes: int = 1) -> tuple[dict, dict, float]:
    """(model metrics, Dummy metrics, A3 gain) on ``graphs``: the benchmark's number."""
    res, _ = ptrain.evaluate(model, graphs, passes=passes)
    dummy, _ = ptrain.evaluate(Dummy(), graphs)
    return res, dummy, 1 - res["A3"] / dummy["A3"]
