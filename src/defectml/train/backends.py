"""The trainers fine-tuning drives: one :class:`Backend` contract, CHGNet's and SevenNet's behind it.

Each backend feeds its package's own trainer (chgnet's ``Trainer``, sevenn's ``Trainer``) and
keeps its package's quirks to itself; :func:`defectml.train.finetune.finetune` only orchestrates.
chgnet's ``Trainer`` has no public call for one training or validation epoch (its ``train`` runs
every epoch with its own early stopping and printing), so :class:`ChgnetBackend` calls its
private ``_train`` / ``_validate``, in this one place.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from defectml.models.charged import charge_of
from defectml.train.strategy import strategy


class Backend(Protocol):
    """What fine-tuning asks of a package's trainer."""

    family: str

    def load_data(self, train: tuple, val: tuple, replay: tuple) -> None:
        """The (frames, energy labels) to train on, validate on and replay."""

    def start_model(self, base):
        """The trained head as it starts, as a loaded model (what energies are anchored on)."""

    def trained_model(self):
        """The torch model being trained (the charge fit writes into it before the first epoch)."""

    def validate(self) -> dict:
        """Validation errors: ``e`` (eV/atom), ``f`` (eV/Å), ``s`` (GPa) where trained."""

    def train_epoch(self, epoch: int) -> dict:
        """One epoch over the training frames; its training errors."""

    def save_weights(self, path: Path, epoch: int) -> None:
        """The weights alone, as the package's calculator loads them."""

    def save_state(self, path: Path, epoch: int) -> None:
        """Everything a resumed run needs (optimiser and schedule too)."""

    def heads(self) -> tuple[list[str] | None, str | None]:
        """The model's heads and the trained one (``None, None`` for one head)."""


def make_backend(base, s, targets: str, frames: list[Atoms], resume: Path | None, work: Path,
                 run_key: str) -> Backend:
    """The backend of ``base``'s family (``resume``: the last state file to go on from)."""
    if base.ref.family == "chgnet":
        return ChgnetBackend(base, s, targets, resume)
    return SevennetBackend(base, s, targets, frames, resume, work, run_key)


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
    """A dataset that builds each item (CHGNet's graph and targets) once, not every epoch.

    With ``charges``, each graph carries its cell's charge (a charge-aware model reads it).
    """

    def __init__(self, data, charges: list[int] | None = None):
        self.data, self.charges = data, charges
        self.items: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if i not in self.items:
            graph, targets = self.data[i]
            if self.charges is not None:
                from defectml.models.charged import with_charges

                graph = with_charges([graph], [self.charges[i]])[0]
            self.items[i] = (graph, targets)
        return self.items[i]


def _loader(data, batch_size: int, shuffle: bool, seed: int, charges: list[int] | None = None):
    import torch
    from chgnet.data.dataset import collate_graphs
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    return DataLoader(_Cached(data, charges), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=collate_graphs, generator=g)


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class ChgnetBackend:
    """chgnet's ``Trainer`` on CHGNet's ``StructureData`` (one output head)."""

    family = "chgnet"

    def __init__(self, base, s, targets: str, resume: Path | None):
        from chgnet.trainer import Trainer

        self.s, self.stress = s, targets == "efs"
        with contextlib.redirect_stdout(io.StringIO()):  # chgnet prints as it builds, loads and checks
            if resume is None:
                self.trainer = Trainer(model=base.calculator.model, targets=targets,
                                       energy_loss_ratio=s.energy_weight, force_loss_ratio=s.force_weight,
                                       stress_loss_ratio=s.stress_weight, optimizer="Adam",
                                       scheduler="CosLR", criterion="MSE", epochs=s.epochs,
                                       learning_rate=s.lr, use_device=s.device, print_freq=10**9,
                                       torch_seed=s.seed, data_seed=s.seed)
                _charge_groups(self.trainer, s)
            else:
                self.trainer = _load_trainer(resume, s)
        # as chgnet's Trainer.train does: the composition model (reference energies) stays fixed
        for param in self.trainer.model.composition_model.parameters():
            param.requires_grad = False

    def load_data(self, train: tuple, val: tuple, replay: tuple) -> None:
        """The (frames, energy labels) to train on, validate on and replay (one head: replay joins train)."""
        s = self.s
        joined = (train[0] + replay[0], np.concatenate([train[1], replay[1]]))
        charges = (lambda fs: [charge_of(f) for f in fs]) if s.charge_aware else (lambda fs: None)
        self.train_loader = _loader(chgnet_dataset(*joined, self.stress), s.batch_size, True, s.seed,
                                    charges(joined[0]))
        self.val_loader = _loader(chgnet_dataset(*val, self.stress), s.batch_size, False, s.seed,
                                  charges(val[0]))

    def start_model(self, base):
        """The base model itself: the one head is the trained one."""
        return base

    def trained_model(self):
        """The model of chgnet's trainer."""
        return self.trainer.model

    def validate(self) -> dict:
        """Validation errors (eV/atom, eV/Å, GPa)."""
        with contextlib.redirect_stdout(io.StringIO()):
            return {k: float(v) for k, v in self.trainer._validate(self.val_loader).items()}

    def train_epoch(self, epoch: int) -> dict:
        """One epoch over the training frames; its training errors."""
        with contextlib.redirect_stdout(io.StringIO()):
            return {k: float(v) for k, v in self.trainer._train(self.train_loader, epoch).items()}

    def save_weights(self, path: Path, epoch: int) -> None:
        """The weights alone, written atomically."""
        _atomic_save({"model": self.trainer.model.as_dict()}, path)

    def save_state(self, path: Path, epoch: int) -> None:
        """Everything a resumed run needs, written atomically."""
        tmp = path.with_name(f".{path.name}.tmp")
        with contextlib.redirect_stdout(io.StringIO()):
            self.trainer.save(filename=str(tmp))
        os.replace(tmp, path)

    def heads(self) -> tuple[list[str] | None, str | None]:
        """The model's heads and the trained one (``None, None`` for one head)."""
        return None, None


def _charge_groups(trainer, s) -> None:
    """Give a charge-aware model's charge terms their own learning rate (``s.charge_lr`` × lr).

    The optimiser and the cosine schedule are rebuilt as chgnet's ``Trainer`` builds them
    (Adam; cosine over 10 × epochs, down to 1% of the rate), with two parameter groups.
    """
    import torch
    from torch.optim.lr_scheduler import CosineAnnealingLR

    model = trainer.model
    if not hasattr(model, "charge_embedding") or s.charge_lr == 1.0:
        return
    charge = [model.charge_embedding.weight, model.charge_energy.weight]
    ids = {id(p) for p in charge}
    rest = [p for p in model.parameters() if id(p) not in ids]
    trainer.optimizer = torch.optim.Adam([{"params": rest, "lr": s.lr},
                                          {"params": charge, "lr": s.lr * s.charge_lr}], s.lr)
    trainer.scheduler = CosineAnnealingLR(trainer.optimizer, T_max=10 * s.epochs, eta_min=0.01 * s.lr)


def _load_trainer(path: Path, s):
    """A saved chgnet ``Trainer``, a charge-aware CHGNet too (``Trainer.load`` builds a plain one)."""
    import torch
    from chgnet.model import CHGNet
    from chgnet.trainer import Trainer

    from defectml.models.charged import charged_chgnet_class, is_charged_state

    state = torch.load(path, map_location=torch.device("cpu"), weights_only=False)
    cls = charged_chgnet_class() if is_charged_state(state["model"]["state_dict"]) else CHGNet
    model = cls.from_dict(state["model"])
    state["trainer_args"].pop("model", None)
    trainer = Trainer(model=model, **state["trainer_args"])
    trainer.model.to(trainer.device)
    _charge_groups(trainer, s)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.training_history = state["training_history"]
    trainer.starting_epoch = len(trainer.training_history["e"]["train"])
    return trainer


class SevennetBackend:
    """sevenn's ``Trainer`` on sevenn's graphs; a new head by sevenn's ``append_modal``.

    Frames are tagged with the head (sevenn modal) they train: the defect frames with the base
    model's head (``standard``, ``replay``) or the new one (``multihead``), replay frames always
    with the base model's head. A model without heads (SevenNet-0) takes no tags.
    """

    family = "sevennet"

    def __init__(self, base, s, targets: str, frames: list[Atoms], resume: Path | None,
                 work: Path, run_key: str):
        import sevenn._keys as KEY
        from sevenn.error_recorder import ErrorRecorder
        from sevenn.train.loss import ForceLoss, PerAtomEnergyLoss, StressLoss
        from sevenn.train.trainer import Trainer
        from sevenn.util import load_checkpoint

        self.KEY, self.run_key = KEY, run_key
        quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
        with warnings.catch_warnings(), quiet[0], quiet[1]:  # sevenn and PyG print as they load and build
            warnings.simplefilter("ignore")
            cp = load_checkpoint(str(resume or base.ref.weights_path))
            config = cp.config
            base_head = base.ref.head
            if strategy(s.strategy).new_head and resume is None:
                model, config = self._append_head(cp, s.head, base_head, frames, work)
            else:
                model = cp.build_model()
        # The weights written below are the built model's, in this sevenn's layout; a checkpoint
        # keeping an older "version" would have them converted again on loading (sevenn's
        # backward-compatibility patch), scrambling them: seen as a 0.21 eV/Å force drift after
        # a fine-tune at lr 1e-12 of SevenNet-0 (written by sevenn 0.9).
        import sevenn

        config["version"] = sevenn.__version__
        self.modal_map = config.get(KEY.MODAL_MAP) if config.get(KEY.USE_MODALITY) else None
        self.base_head = base_head if self.modal_map else None
        self.s_strategy = strategy(s.strategy)
        self.train_head = s.head if self.s_strategy.new_head else self.base_head
        stress = targets == "efs"
        config.update({
            KEY.OPTIMIZER: "adam", KEY.OPTIM_PARAM: {"lr": s.lr}, KEY.SCHEDULER: "cosineannealinglr",
            KEY.SCHEDULER_PARAM: {"T_max": s.epochs}, KEY.LOSS: "mse", KEY.LOSS_PARAM: {},
            KEY.FORCE_WEIGHT: s.force_weight, KEY.STRESS_WEIGHT: s.stress_weight / 100.0,  # GPa -> kbar
            KEY.IS_TRAIN_STRESS: stress, KEY.DEVICE: s.device, KEY.IS_DDP: False,
            KEY.USE_WEIGHT: False,  # sevennet-mf-0 was trained with per-dataset weights; ours are equal
            KEY.ERROR_RECORD: [["Energy", "MAE"], ["Force", "MAE"]] + ([["Stress", "MAE"]] if stress else []),
        })
        self.config = config
        self.trainer = Trainer.from_config(model, config)
        # sevenn's energy loss weighs 1; ours may not (its stress loss is in kbar: 1/100 of GPa²)
        weights = {PerAtomEnergyLoss: s.energy_weight, ForceLoss: s.force_weight,
                   StressLoss: s.stress_weight / 100.0}
        self.trainer.loss_functions = [(ld, weights.get(type(ld), w))
                                       for ld, w in self.trainer.loss_functions]
        if resume is not None:
            self.trainer.load_state_dicts(None, cp.optimizer_state_dict, cp.scheduler_state_dict)
        self.recorder = ErrorRecorder.from_config(config)
        self.s, self.stress, self.work = s, stress, work

    def load_data(self, train: tuple, val: tuple, replay: tuple) -> None:
        """The (frames, energy labels) to train and validate the trained head on, and to replay."""
        import torch
        from torch_geometric.loader import DataLoader

        cutoff, s = self.config[self.KEY.CUTOFF], self.s
        graphs = self._graphs(*train, cutoff, self.stress, self.train_head)
        if replay[0]:
            graphs += self._graphs(*replay, cutoff, self.stress, self.base_head)
        g = torch.Generator().manual_seed(s.seed)
        self.train_loader = DataLoader(graphs, batch_size=s.batch_size, shuffle=True, generator=g)
        self.val_loader = DataLoader(self._graphs(*val, cutoff, self.stress, self.train_head),
                                     batch_size=s.batch_size)

    def start_model(self, base):
        """The trained head as it starts: a new head as ``append_modal`` made it, else ``base``.

        A new head is saved once in the work folder, so a resumed run anchors its labels on the
        same energies.
        """
        if not self.s_strategy.new_head:
            return base
        from defectml.models import load_model

        path = self.work / "start.pth"
        if not path.is_file():
            self.save_weights(path, 0)
        return load_model(f"sevennet:{path}@{self.train_head}" if self.train_head else f"sevennet:{path}",
                          self.s.device, self.s.threads)

    @staticmethod
    def _append_head(cp, head: str, base_head: str, frames: list[Atoms], work: Path):
        """A new head by sevenn's ``append_modal``: shared layers as they are, shifted like ``base_head``."""
        import copy

        import sevenn._keys as KEY
        import torch
        from ase.io import write
        from sevenn.model_build import build_E3_equivariant_model

        src = cp.config
        dst = copy.deepcopy(src)
        for k in [k for k in dst if k.endswith("set_path") or k == KEY.SAVE_DATASET]:
            dst.pop(k)
        dst.pop(KEY.MODAL_MAP, None)
        stats = work / "append_modal"
        stats.mkdir(parents=True, exist_ok=True)
        # sevenn computes a new head's statistics from a file of its frames (the shift and scale
        # are then set to the base head's, below)
        write(stats / "frames.extxyz", frames[:50])
        files = [{"file": str(stats / "frames.extxyz")}]
        dst[KEY.LOAD_TRAINSET] = [{"data_modality": head, "file_list": files}]
        if dst.get(KEY.USE_MODAL_WISE_SHIFT):
            dst[KEY.SHIFT] = "elemwise_reference_energies"
        if dst.get(KEY.USE_MODAL_WISE_SCALE):
            dst[KEY.SCALE] = "force_rms"
        state = cp.append_modal(dst, original_modal_name=base_head, working_dir=str(stats))
        dst.pop(KEY.LOAD_TRAINSET, None)
        # The new head's per-element energy shift: the base head's (a defect cell's composition
        # barely differs from its host's, so a shift fitted to it is ill-posed; anchored labels
        # sit on the base head's energies anyway).
        new, old = dst[KEY.MODAL_MAP][head], dst[KEY.MODAL_MAP][base_head]
        for key, modal_wise in ((KEY.SHIFT, dst.get(KEY.USE_MODAL_WISE_SHIFT)),
                                (KEY.SCALE, dst.get(KEY.USE_MODAL_WISE_SCALE))):
            if modal_wise:
                dst[key][head] = list(dst[key][base_head])
                name = f"rescale_atomic_energy.{'shift' if key == KEY.SHIFT else 'scale'}"
                with torch.no_grad():
                    state[name][new] = state[name][old].clone()
        model = build_E3_equivariant_model(dst)
        model.load_state_dict(state, strict=True)
        return model, dst

    def _graphs(self, frames: list[Atoms], energies: np.ndarray, cutoff: float, stress: bool,
                head: str | None) -> list:
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import atoms_to_graph

        out = []
        for f, e in zip(frames, energies, strict=True):
            a = Atoms(f.numbers, f.positions, cell=f.cell, pbc=True)
            results = {"energy": float(e), "forces": np.array(f.get_forces())}
            if stress:
                results["stress"] = np.array(f.get_stress(voigt=True))
            a.calc = SinglePointCalculator(a, **results)
            g = AtomGraphData.from_numpy_dict(
                atoms_to_graph(a, cutoff, transfer_info=False, y_from_calc=True))
            if head is not None:
                g[self.KEY.DATA_MODALITY] = head
            out.append(g)
        return out

    def _errors(self) -> dict:
        cur = self.recorder.get_current()
        self.recorder.epoch_forward()  # resets the running averages
        out = {"e": float(cur["Energy_MAE"]["value"]), "f": float(cur["Force_MAE"]["value"])}
        if "Stress_MAE" in cur:
            out["s"] = float(cur["Stress_MAE"]["value"]) / 10.0  # kbar -> GPa, as chgnet reports
        return out

    def validate(self) -> dict:
        """Validation errors (eV/atom, eV/Å, GPa)."""
        self.trainer.run_one_epoch(self.val_loader, is_train=False, error_recorder=self.recorder)
        return self._errors()

    def train_epoch(self, epoch: int) -> dict:
        """One epoch over the training frames; its training errors."""
        self.trainer.run_one_epoch(self.train_loader, is_train=True, error_recorder=self.recorder)
        self.trainer.scheduler_step()
        return self._errors()

    def _checkpoint(self, epoch: int, with_optimizer: bool) -> dict:
        # sevenn's checkpoint layout (its calculator and load_checkpoint read it); "hash" and
        # "time" are fixed by the run so that equal weights give equal bytes, hence equal keys
        cp = self.trainer.get_checkpoint_dict()
        return {"config": self.config, "epoch": epoch, "model_state_dict": cp["model_state_dict"],
                "optimizer_state_dict": cp["optimizer_state_dict"] if with_optimizer else None,
                "scheduler_state_dict": cp["scheduler_state_dict"] if with_optimizer else None,
                "time": f"defectml run {self.run_key}", "hash": self.run_key}

    def save_weights(self, path: Path, epoch: int) -> None:
        """The weights alone, written atomically."""
        _atomic_save(self._checkpoint(epoch, False), path)

    def save_state(self, path: Path, epoch: int) -> None:
        """Everything a resumed run needs, written atomically."""
        _atomic_save(self._checkpoint(epoch, True), path)

    def trained_model(self):
        """The model of sevenn's trainer."""
        return self.trainer.model

    def heads(self) -> tuple[list[str] | None, str | None]:
        """The model's heads and the trained one (``None, None`` for one head)."""
        return (list(self.modal_map), self.train_head) if self.modal_map else (None, None)
