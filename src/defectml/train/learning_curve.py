"""Learning curve: fine-tune on growing subsets of the training relaxations, judge each on test.

How much DFT does a target system need? Each point trains ``finetune`` (same settings) on a
seeded share of the training *relaxations* (whole relaxations: a subset of frames of every
relaxation would hide how few systems there are), the smaller subsets nested in the larger ones,
and reports the test split's force MAE and relative-energy MAE, with the base model's at share 0.
Every point is a keyed ``finetune`` run in the work folder, so an interrupted curve resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from defectml.errors import InputError


def subsets(n_relaxations: int, shares: list[float], seed: int = 0) -> list[list[int]]:
    """Nested index subsets: one seeded order of the relaxations, its first ``ceil(share * n)``."""
    if not shares or any(not 0 < f <= 1 for f in shares):
        raise InputError(f"--shares must lie in (0, 1], not {shares}")
    order = np.random.default_rng(seed).permutation(n_relaxations)
    return [sorted(order[: max(1, int(np.ceil(f * n_relaxations)))].tolist()) for f in sorted(shares)]


def learning_curve(train: Path, val: Path, test: Path, work: Path, shares: list[float], settings,
                   log: Callable[[str], None] = lambda m: None) -> dict:
    """Fine-tune on each share of ``train``'s relaxations; test errors per share.

    Args:
        train: The training split (extxyz); its relaxations are subsampled.
        val: The validation split (early stopping).
        test: The test split (the errors reported).
        work: Folder for the subsets, the weights and ``learning_curve.json``.
        shares: Fractions of the training relaxations (e.g. 0.25, 0.5, 1).
        settings: :class:`~defectml.train.finetune.FinetuneSettings` of every point.
        log: Progress messages.

    Returns:
        ``{"base": errors, "points": [{"share", "relaxations", "frames", "errors", "weights"}, ...]}``.
    """
    from defectml.models import load_model, parse_model
    from defectml.train import metrics
    from defectml.train.dataset import read_extxyz, write_extxyz
    from defectml.train.finetune import SUFFIX, finetune

    work.mkdir(parents=True, exist_ok=True)
    relaxations = read_extxyz(train)
    test_sets = read_extxyz(test)
    family = parse_model(settings.base).family

    def judge(model_spec: str) -> dict:
        model = load_model(model_spec, settings.device, settings.threads)
        return metrics.errors(metrics.predict(model, test_sets, stress=False))

    base_spec = settings.base
    doc = {"base": judge(base_spec), "points": [], "settings": {"shares": sorted(shares)}}
    log(f"base {base_spec}: test force MAE {doc['base']['force']['mae'] * 1000:.0f} meV/Å")
    for share, idx in zip(sorted(shares), subsets(len(relaxations), shares, settings.seed), strict=True):
        part = work / f"train_{share:g}.extxyz"
        write_extxyz(part, [relaxations[i] for i in idx])
        out = work / f"share_{share:g}{SUFFIX.get(family, '.pth.tar')}"
        ft = finetune(part, val, out, replace(settings), log=lambda m, s=share: log(f"share {s:g}: {m}"))
        errors = judge(str(out))
        doc["points"].append({"share": share, "relaxations": len(idx),
                              "frames": sum(len(relaxations[i].frames) for i in idx), "errors": errors,
                              "weights": str(out), "best_epoch": ft.card["metrics"]["best_epoch"]})
        log(f"share {share:g} ({len(idx)} relaxations): test force MAE "
            f"{errors['force']['mae'] * 1000:.0f} meV/Å")
        tmp = work / ".learning_curve.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=float))
        os.replace(tmp, work / "learning_curve.json")
    return doc


def plot(doc: dict, path: Path, title: str = "") -> None:
    """Test force and relative-energy MAE against training frames (the base model at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [0] + [p["frames"] for p in doc["points"]]
    rows = [doc["base"]] + [p["errors"] for p in doc["points"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    a1.plot(x, [r["force"]["mae"] * 1000 for r in rows], "o-")
    a1.set_xlabel("training frames (0: base model)")
    a1.set_ylabel("test force MAE (meV/Å)")
    a2.plot(x, [r["relative_energy_per_atom"]["mae"] * 1000 for r in rows], "o-", color="C1")
    a2.set_xlabel("training frames (0: base model)")
    a2.set_ylabel("test relative energy MAE (meV/atom)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
