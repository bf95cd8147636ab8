"""Fine-tuning a universal MLIP on defect data with the package's own trainer.

CHGNet: chgnet's ``Trainer`` does every step (its loss with the energy/force/stress weights,
Adam, cosine schedule, its train and validation passes); this module only feeds it the
dataset's frames, stops early when the validation error stops falling, checkpoints every epoch
(a killed run resumes), and writes the best weights atomically with a model card beside them, so
``search``, ``thermo`` and ``dynamics`` take the result as ``--model PATH``.

Units: CHGNet trains on energy per atom (eV/atom), forces (eV/Å) and, through its
``StructureData``, VASP-style stresses in kBar (it multiplies them by −0.1 to GPa); the dataset's
stresses are ASE's (eV/Å³, tensile positive) and are converted here.

Energy labels. A charge-blind model cannot learn a charged cell's total energy (it carries a
charge-dependent offset: the electrons' chemical potential), and DFT energies of another
functional than the base model's (MPtrj is PBE/PBE+U) are shifted per element. Training on them
as they are spends the model on offsets and spoils the forces (measured on GaN: validation force
MAE 143 → 241 meV/Å in three epochs). So by default (``energies="anchored"``) each group of
frames of one host, functional, defect and charge state gets one constant shift that brings its
mean to the base model's: energy differences within a charge state (which trial is lower, the
relaxation's energy profile) stay DFT's; nothing else is asked of the model. With
``energies="absolute"`` the DFT totals are fitted as they are, and ``refit_refs`` first shifts
CHGNet's per-element reference energies by the least-squares fit of its per-atom error (when the
functional differs, by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from ase import Atoms, units

from defectml.errors import InputError, ModelError

#: Functionals each base model was trained on (energies shift per element for any other).
BASE_FUNCTIONALS = {"chgnet": ("PBE",), "chgnet-0.2.0": ("PBE",), "chgnet-r2scan": ("R2SCAN", "r2SCAN")}


@dataclass
class FinetuneSettings:
    """How to fine-tune (the seed paper's loss weights 1 : 1 : 0.1 and batch 4; lr 1e-4).

    Attributes:
        base: The model to start from (a built-in name or a weights file: a warm start).
        epochs: At most this many epochs.
        lr: Initial learning rate (cosine decay over ``epochs``). 1e-4: at the seed paper's 5e-4
            (for M3GNet) CHGNet's training error rose from the first epoch (GaN, 40 frames).
        batch_size: Frames per step.
        energy_weight: Loss weight of energies (per atom).
        force_weight: Loss weight of forces.
        stress_weight: Loss weight of stresses (used when every frame has one).
        patience: Stop after this many epochs without a better validation error (forces with
            anchored energies; energy + force, by their loss weights, with absolute ones).
        energies: ``anchored`` (one shift per host/functional/defect/charge group, see the
            module) or ``absolute``.
        refit_refs: With absolute energies: ``auto`` (when the functional differs from the
            base's), ``yes`` or ``no``.
        seed: Weights' and batches' random seed (a committee: several seeds).
        device: ``cpu`` or ``cuda``.
        threads: Torch CPU threads.
    """

    base: str = "chgnet"
    epochs: int = 30
    lr: float = 1e-4
    batch_size: int = 4
    energy_weight: float = 1.0
    force_weight: float = 1.0
    stress_weight: float = 0.1
    patience: int = 5
    energies: str = "anchored"
    refit_refs: str = "auto"
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    @classmethod
    def from_options(cls, options, **overrides) -> FinetuneSettings:
        """The one place these settings are built (CLI namespace or dict, then ``overrides``)."""
        source = options if isinstance(options, dict) else vars(options)
        chosen = {f.name: source[f.name] for f in fields(cls) if source.get(f.name) is not None}
        s = cls(**{**chosen, **overrides})
        s.validate()
        return s

    def validate(self) -> None:
        """Raise ``InputError`` for values out of range."""
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise InputError("--epochs, --batch-size and --patience must be at least 1")
        if self.lr <= 0 or min(self.energy_weight, self.force_weight, self.stress_weight) < 0:
            raise InputError("--lr must be positive and the loss weights non-negative")
        if self.energies not in ("anchored", "absolute"):
            raise InputError(f"--energies must be anchored or absolute, not {self.energies!r}")
        if self.refit_refs not in ("auto", "yes", "no"):
            raise InputError(f"--refit-refs must be auto, yes or no, not {self.refit_refs!r}")

    def key(self, data_keys: list[str]) -> str:
        """What decides the result: these settings (less device/threads) and the data's hashes."""
        d = {k: v for k, v in asdict(self).items() if k not in ("device", "threads")}
        return hashlib.sha256(json.dumps([d, data_keys], sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FinetuneResult:
    """What :func:`finetune` made."""

    weights: Path
    card: dict
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def read_frames(path: str | Path) -> list[Atoms]:
    """A dataset file's frames (energy and forces required on every one)."""
    from defectml.train.dataset import read_extxyz

    frames = [f for fs in read_extxyz(path) for f in fs.frames]
    if not frames:
        raise InputError(f"{path}: an empty split; nothing to train or validate on")
    return frames


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _kbar(stress: np.ndarray) -> list[list[float]]:
    """ASE stress (eV/Å³, Voigt or 3x3, tensile positive) → VASP kBar 3x3 (compressive positive)."""
    s = np.asarray(stress, dtype=float)
    if s.shape == (6,):
        xx, yy, zz, yz, xz, xy = s
        s = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    return (-s / units.GPa * 10.0).tolist()


def chgnet_dataset(frames: list[Atoms], energies: np.ndarray, with_stress: bool):
    """CHGNet's ``StructureData`` of the frames with these total-energy labels (eV)."""
    from chgnet.data.dataset import StructureData

    from defectml.train.dataset import bare_structures

    with contextlib.redirect_stdout(io.StringIO()):
        return StructureData(
            structures=bare_structures(frames),
            energies=[float(e) / len(f) for e, f in zip(energies, frames, strict=True)],
            forces=[f.get_forces().tolist() for f in frames],
            stresses=[_kbar(f.get_stress(voigt=True)) for f in frames] if with_stress else None,
            shuffle=False,
        )


class _Cached:
    """A dataset that builds each item (CHGNet's graph and targets) once, not every epoch."""

    def __init__(self, data):
        self.data = data
        self.items: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if i not in self.items:
            self.items[i] = self.data[i]
        return self.items[i]


def _loader(data, batch_size: int, shuffle: bool, seed: int):
    import torch
    from chgnet.data.dataset import collate_graphs
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    return DataLoader(_Cached(data), batch_size=batch_size, shuffle=shuffle, collate_fn=collate_graphs,
                      generator=g)


def group_of(frame: Atoms) -> tuple:
    """The anchoring group of a frame: host, functional, defect (with its charge), charge."""
    i = frame.info
    return (i.get("host"), i.get("functional"), i.get("defect"), int(i.get("charge", 0)))


def predicted_energies(model, frames: list[Atoms]) -> np.ndarray:
    """The model's total energies (eV) of the frames, batched."""
    from defectml.train.dataset import atom_chunks, bare_structures

    pred = []
    for idx in atom_chunks(frames):
        with contextlib.redirect_stdout(io.StringIO()):
            p = model.predict_structure(bare_structures([frames[i] for i in idx]), task="e",
                                        batch_size=len(idx))
        pred += p if isinstance(p, list) else [p]
    return np.array([float(p["e"]) * len(f) for p, f in zip(pred, frames, strict=True)])


def anchored_energies(frames: list[Atoms], predicted: np.ndarray) -> tuple[np.ndarray, dict]:
    """DFT energies shifted by one constant per group to the model's mean on the group.

    Returns:
        The labels (eV) and the shift of each group (eV per cell).
    """
    dft = np.array([f.get_potential_energy() for f in frames])
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(group_of(f), []).append(i)
    labels = dft.copy()
    shifts = {}
    for key, idx in groups.items():
        shift = float(np.mean(predicted[idx] - dft[idx]))
        labels[idx] += shift
        shifts["/".join(str(k) for k in key)] = round(shift, 4)
    return labels, shifts


def needs_refit(frames: list[Atoms], base: str) -> bool:
    """Whether the data's functional differs from what ``base`` was trained on."""
    trained_on = BASE_FUNCTIONALS.get(base, ())
    functionals = {str(f.info.get("functional", "")) for f in frames}
    return not all(any(t.lower() in fn.lower().split() or fn == t for t in trained_on) for fn in functionals)


def refit_composition(model, frames: list[Atoms]) -> dict[str, float]:
    """Shift CHGNet's per-element reference energies to fit ``frames``; return the shifts.

    The shift is the least-squares fit of the model's per-atom energy error against composition
    (eV/atom of each element), truncated to the well-determined directions.
    """
    import torch
    from pymatgen.core import Element

    n = np.array([len(f) for f in frames])
    err = (np.array([f.get_potential_energy() for f in frames]) - predicted_energies(model, frames)) / n
    zs = sorted({int(z) for f in frames for z in f.numbers})
    x = np.array([[np.mean(f.numbers == z) for z in zs] for f in frames])  # composition fractions
    # Defect cells barely change the composition, so the fit is nearly degenerate (GaN: Ga and N
    # fractions move by 1/32). Directions with singular values under 5% of the largest are cut:
    # the shift goes to the composition the data pins down, split evenly where it does not.
    shift = np.linalg.lstsq(x, err, rcond=0.05)[0]
    weight = model.composition_model.fc.weight
    with torch.no_grad():
        for z, d in zip(zs, shift, strict=True):
            weight[0, z - 1] += float(d)
    return {Element.from_Z(z).symbol: round(float(d), 6) for z, d in zip(zs, shift, strict=True)}


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    os.replace(tmp, path)


def finetune(train: str | Path, val: str | Path, out: str | Path, s: FinetuneSettings | None = None,
             log: Callable[[str], None] = lambda m: None) -> FinetuneResult:
    """Fine-tune ``s.base`` on the ``train`` frames, early-stopped on ``val``; write ``out``.

    Args:
        train: extxyz of training frames (``defectml dataset`` writes them).
        val: extxyz of validation frames (early stopping and the card's metrics).
        out: The weights file to write (``.pth.tar``); its card goes beside it.
        s: Settings.
        log: Progress messages.

    Returns:
        The weights, the card and the per-epoch history.

    Raises:
        InputError: empty or unreadable data. ModelError: a base model that cannot be fine-tuned
            here, or elements it does not cover.
    """
    import torch
    from chgnet.trainer import Trainer

    from defectml.models import load_model, parse_model, set_threads
    from defectml.models.ref import card_path

    s = s or FinetuneSettings()
    s.validate()
    out = Path(out)
    if not out.name.endswith(".pth.tar"):
        raise InputError(f"--out {out}: CHGNet weights are written as NAME.pth.tar")
    ref = parse_model(s.base, s.device)
    if ref.family != "chgnet":
        raise ModelError(f"fine-tuning {ref.label} ({ref.family}) is not supported yet: use a CHGNet base "
                         "(chgnet, chgnet-0.2.0, chgnet-r2scan or a CHGNet .pth.tar)")
    train_frames, val_frames = read_frames(train), read_frames(val)
    base = load_model(ref, s.device, s.threads)
    base.check_elements({sym for f in train_frames + val_frames for sym in f.get_chemical_symbols()})
    set_threads(s.threads, s.device)
    torch.manual_seed(s.seed)
    with_stress = all(f.calc is not None and "stress" in f.calc.results for f in train_frames + val_frames)
    targets = "efs" if with_stress and s.stress_weight > 0 else "ef"
    data_keys = [_sha256(train), _sha256(val)]
    run_key = s.key(data_keys + [ref.key])
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    state_path, last_path, best_path = work / "state.json", work / "last.pth.tar", work / "best.pth.tar"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if state is not None and state.get("run_key") != run_key:
        log(f"{work} holds another run (other data or settings): starting afresh")
        state = None

    model = base.calculator.model
    do_refit = s.energies == "absolute" and (
        s.refit_refs == "yes" or (s.refit_refs == "auto" and needs_refit(train_frames, ref.source)))
    if s.energies == "anchored":  # with the untouched base model (a resume trains a loaded copy)
        train_e, anchors = anchored_energies(train_frames, predicted_energies(model, train_frames))
        val_e, _ = anchored_energies(val_frames, predicted_energies(model, val_frames))
    else:
        train_e = np.array([f.get_potential_energy() for f in train_frames])
        val_e, anchors = np.array([f.get_potential_energy() for f in val_frames]), {}
    stress = targets == "efs"
    train_loader = _loader(chgnet_dataset(train_frames, train_e, stress), s.batch_size, True, s.seed)
    val_loader = _loader(chgnet_dataset(val_frames, val_e, stress), s.batch_size, False, s.seed)
    with contextlib.redirect_stdout(io.StringIO()):  # chgnet prints as it builds, loads and checks
        if state is None:
            trainer = Trainer(model=model, targets=targets, energy_loss_ratio=s.energy_weight,
                              force_loss_ratio=s.force_weight, stress_loss_ratio=s.stress_weight,
                              optimizer="Adam", scheduler="CosLR", criterion="MSE", epochs=s.epochs,
                              learning_rate=s.lr, use_device=s.device, print_freq=10**9,
                              torch_seed=s.seed, data_seed=s.seed)
            base_mae = {k: float(v) for k, v in trainer._validate(val_loader).items()}
            shifts = refit_composition(model, train_frames) if do_refit else {}
            refit_mae = {k: float(v) for k, v in trainer._validate(val_loader).items()} if do_refit else None
            state = {"run_key": run_key, "epoch": 0, "best": None, "best_epoch": None, "stale": 0,
                     "history": [], "val_base": base_mae, "val_after_refit": refit_mae,
                     "refit_shifts": shifts}
            fresh = True
        else:
            trainer = Trainer.load(str(last_path))
            shifts = state["refit_shifts"]
            fresh = False
    if fresh:
        log(f"base {ref.label}: validation MAE energy {base_mae['e'] * 1000:.1f} meV/atom, forces "
            f"{base_mae.get('f', float('nan')) * 1000:.0f} meV/Å; training on {len(train_frames)} frames "
            f"({targets}), {len(val_frames)} to validate")
        if refit_mae is not None:
            listed = ", ".join(f"{k} {v:+.3f}" for k, v in shifts.items())
            log(f"per-element reference energies refit ({listed} eV/atom): validation energy MAE "
                f"{refit_mae['e'] * 1000:.1f} meV/atom")
    # as chgnet's Trainer.train does: the composition model (reference energies) stays fixed
    for param in trainer.model.composition_model.parameters():
        param.requires_grad = False

    def score(mae: dict) -> float:
        # Anchored labels pin each group's mean to the base model: on groups never trained on,
        # the absolute energy error is an offset, not physics (seen: validation forces 77 -> 33
        # meV/Å while that offset grew 0 -> 67 meV/atom). Forces decide there.
        if s.energies == "anchored":
            return mae.get("f", mae["e"])
        return s.energy_weight * mae["e"] + s.force_weight * mae.get("f", 0.0)

    resumed_from = state["epoch"]
    if resumed_from:
        log(f"resuming at epoch {resumed_from + 1} (best so far: epoch {state['best_epoch'] + 1})")
    for epoch in range(state["epoch"], s.epochs):
        if state["stale"] >= s.patience:
            break
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            tr = trainer._train(train_loader, epoch)
            va = trainer._validate(val_loader)
        tr, va = ({k: float(v) for k, v in d.items()} for d in (tr, va))
        if not np.isfinite(va["e"]):
            raise ModelError(f"fine-tuning diverged at epoch {epoch + 1} (validation loss not finite); "
                             f"the best weights so far are in {best_path}")
        seconds = time.perf_counter() - t0
        state["history"].append({"epoch": epoch + 1, "train": tr, "val": va, "seconds": seconds})
        if state["best"] is None or score(va) < state["best"]:
            state.update(best=score(va), best_epoch=epoch, stale=0)
            _atomic_save({"model": trainer.model.as_dict()}, best_path)
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        with contextlib.redirect_stdout(io.StringIO()):
            tmp = last_path.with_name(".last.tmp")
            trainer.save(filename=str(tmp))
            os.replace(tmp, last_path)
        _write_json(state_path, state)
        log(f"epoch {epoch + 1}/{s.epochs}: val energy {va['e'] * 1000:.1f} meV/atom, forces "
            f"{va.get('f', float('nan')) * 1000:.0f} meV/Å ({seconds:.0f} s)"
            + (" *" if state["stale"] == 0 else ""))
    if state["best_epoch"] is None:
        raise ModelError("no epoch finished; nothing to write")
    best = state["history"][state["best_epoch"]]
    card = {
        "family": "chgnet", "base_model": ref.label, "base_key": ref.key,
        "elements": sorted({sym for f in train_frames for sym in f.get_chemical_symbols()}),
        "heads": None, "charge_aware": False, "strategy": "standard",
        "training_data_sha256": {"train": data_keys[0], "val": data_keys[1]},
        "functionals": sorted({str(f.info.get("functional", "")) for f in train_frames}),
        "targets": targets, "energies": s.energies, "anchor_shifts_eV": anchors,
        "refit_shifts_eV_per_atom": shifts,
        "metrics": {"val_base": state["val_base"], "val_after_refit": state["val_after_refit"],
                    "val_best": best["val"],
                    "best_epoch": best["epoch"], "epochs_run": state["epoch"],
                    "seconds_per_epoch": float(np.mean([h["seconds"] for h in state["history"]]))},
        "settings": asdict(s), "run_key": run_key,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.copyfile(best_path, tmp)
    os.replace(tmp, out)  # the weights appear whole or not at all
    _write_json(card_path(out), card)
    return FinetuneResult(out, card, state["history"], resumed_from)
