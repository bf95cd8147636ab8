"""A committee of fine-tuned models and the trust score it gives each structure.

A universal model cannot say where it is wrong. A committee can, roughly: models fine-tuned from
the same start on the same DFT data, but each on its own bootstrap resample of the relaxations
and with its own seed, agree where the data pin them down and drift apart where they do not.
The spread of their predictions on a structure is its *trust score* (lower is better):

* ``force``: the mean over atoms of the root-mean-square deviation of the members' force vectors
  from the committee mean (eV/Å), size-intensive, so one threshold serves cells of any size;
* ``energy``: the standard deviation of the members' total energies (eV), what decides a ranking
  of minima of one defect.

Member 0 is trained on all the data (no resample): it is the model the search relaxes with; the
others exist to disagree with it. :func:`calibration` says how well a score ranks the real
errors on held-out DFT frames (Spearman's rho); the score is a ranking, not an error bar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from ase import Atoms

from defectml.errors import InputError
from defectml.search.summary import DEFAULT_THRESHOLD
from defectml.structure_io import bare_atoms


@dataclass(frozen=True)
class Trust:
    """The committee spread on one structure (``None`` scores: no committee to ask)."""

    force: float | None
    energy: float | None
    members: int

    def untrusted(self, threshold: float = DEFAULT_THRESHOLD) -> bool | None:
        """Whether the force spread exceeds ``threshold``; ``None`` when it cannot be scored."""
        return None if self.force is None else self.force > threshold

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


NO_COMMITTEE = Trust(None, None, 1)


def spread(predictions: list[list[tuple[float, np.ndarray]]]) -> list[Trust]:
    """Trust of each structure from every member's ``(energy, forces)`` on it.

    Args:
        predictions: ``predictions[m][i]``: member ``m``'s energy (eV) and forces (eV/Å) on
            structure ``i``.
    """
    if len(predictions) < 2:
        return [NO_COMMITTEE for _ in (predictions[0] if predictions else [])]
    out = []
    for per_member in zip(*predictions, strict=True):
        e = np.array([p[0] for p in per_member], dtype=float)
        f = np.stack([np.asarray(p[1], dtype=float) for p in per_member])  # (members, atoms, 3)
        dev = f - f.mean(axis=0)
        rms = np.sqrt((dev**2).sum(axis=2).mean(axis=0))  # per atom, over members
        out.append(Trust(float(rms.mean()), float(e.std()), len(per_member)))
    return out


class Committee:
    """Loaded members (``defectml.models.Model``); member 0 is the one that relaxes."""

    def __init__(self, models: list):
        if not models:
            raise InputError("a committee needs at least one model")
        self.models = models

    @classmethod
    def load(cls, weights: list[str | Path], device: str = "cpu", threads: int | None = None) -> Committee:
        """Load every member's weights."""
        from defectml.models import load_model

        return cls([load_model(str(w), device, threads) for w in weights])

    @property
    def lead(self):
        """Member 0: trained on all the data; the model to relax with."""
        return self.models[0]

    def __len__(self) -> int:
        return len(self.models)

    def predictions(self, structures: list[Atoms]) -> list[list[tuple[float, np.ndarray]]]:
        """Every member's (energy, forces) on every structure (batched per member)."""
        from defectml.train.dataset import atom_chunks

        bare = [bare_atoms(a) for a in structures]
        out = []
        for model in self.models:
            preds: list = [None] * len(bare)
            for idx in atom_chunks(bare):
                for i, p in zip(idx, model.batch()([bare[i] for i in idx]), strict=True):
                    preds[i] = (float(p[0]), np.asarray(p[1]))
            out.append(preds)
        return out

    def trust(self, structures: list[Atoms]) -> list[Trust]:
        """The trust score of each structure (:data:`NO_COMMITTEE` for a committee of one)."""
        if len(self) < 2:
            return [NO_COMMITTEE for _ in structures]
        return spread(self.predictions(structures))


def bootstrap(groups: list[str], seed: int) -> list[str]:
    """A resample with replacement of relaxation ids (as many draws as ids), sorted."""
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(uniq, size=len(uniq), replace=True).tolist())


def member_frames(frames: list[Atoms], member: int, seed: int = 0) -> list[Atoms]:
    """Member ``member``'s training frames: all of them (member 0) or a bootstrap of relaxations."""
    if member == 0:
        return list(frames)
    ids = [str(f.info.get("run_id", i)) for i, f in enumerate(frames)]
    by_id: dict[str, list[Atoms]] = {}
    for rid, f in zip(ids, frames, strict=True):
        by_id.setdefault(rid, []).append(f)
    out = []
    for rid in bootstrap(ids, seed + 1000 * member):
        out.extend(by_id[rid])
    return out


def train_committee(train: str | Path, val: str | Path, out_dir: str | Path, settings, members: int = 3,
                    log: Callable[[str], None] = lambda m: None,
                    first: int = 0) -> list[Path]:
    """Fine-tune ``members`` models on ``train`` (member 0 on all of it, the rest on resamples).

    Args:
        train: extxyz of training frames (``info["run_id"]`` marks each relaxation).
        val: extxyz of validation frames (early stopping, every member).
        out_dir: Where ``member_<i><suffix>`` (and their cards, work folders) go; a killed run
            resumes member by member.
        settings: :class:`~defectml.train.finetune.FinetuneSettings`; member ``i`` gets seed
            ``settings.seed + i``.
        members: Committee size (1: a single model, no trust score).
        log: Progress messages.
        first: Train members ``first`` to ``members - 1`` only (member 0 made elsewhere: the loop's
            lead model); their paths are returned.

    Returns:
        The members' weights files, member 0 first.
    """
    from defectml.models import parse_model
    from defectml.structure_io import write_frames, write_json
    from defectml.train.finetune import SUFFIX, finetune, read_frames

    if members < 1:
        raise InputError(f"--committee must be at least 1, got {members}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = SUFFIX.get(parse_model(settings.base).family, ".pth.tar")
    frames = read_frames(train)
    paths = []
    for i in range(first, members):
        path = out_dir / f"member_{i}{suffix}"
        paths.append(path)
        if path.exists():
            continue
        data = train
        if i > 0:
            data = out_dir / f"member_{i}.train.extxyz"
            if not data.exists():
                write_frames(data, member_frames(frames, i, settings.seed))
        log(f"committee member {i + 1}/{members}")
        finetune(data, val, path, replace(settings, seed=settings.seed + i), log=log)
    write_json(out_dir / "committee.json", {"members": [p.name for p in paths]})
    return paths


def calibration(scores: list[float], errors: list[float]) -> dict:
    """How well the scores rank the real errors: Spearman's rho (and Pearson's r) with counts."""
    from scipy.stats import pearsonr, spearmanr

    s, e = np.asarray(scores, dtype=float), np.asarray(errors, dtype=float)
    if len(s) < 3 or np.ptp(s) == 0 or np.ptp(e) == 0:
        return {"n": int(len(s)), "spearman": None, "pearson": None}
    return {"n": int(len(s)), "spearman": float(spearmanr(s, e).statistic),
            "pearson": float(pearsonr(s, e).statistic)}
