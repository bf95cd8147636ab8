"""Fine-tuning a universal MLIP on defect data with the package's own trainer.

CHGNet: chgnet's ``Trainer`` does every step (its loss with the energy/force/stress weights,
Adam, cosine schedule, its train and validation passes). SevenNet: sevenn's ``Trainer`` (its
loss definitions, optimiser and ``run_one_epoch``) on sevenn's own graphs, with sevenn's
``append_modal`` for a new head. This module only feeds them the dataset's frames, stops early
when the validation error stops falling, checkpoints every epoch (a killed run resumes), and
writes the best weights atomically with a model card beside them, so ``search``, ``thermo`` and
``dynamics`` take the result as ``--model PATH``. The trainers sit behind one contract
(:mod:`defectml.train.backends`); what each strategy means is :mod:`defectml.train.strategy`.

Strategies (the substitutional-defects paper's question: learn defects without forgetting):

* ``standard``: the defect frames only;
* ``replay``: plus original-domain frames (:mod:`defectml.train.original_domain`): crystals
  labelled by the frozen base model (self-distillation, not DFT) and the data's bulk frames;
* ``multihead`` (SevenNet): a new head (sevenn modal, ``--head``, default ``defect``) learns the
  defect frames while the base model's head keeps learning the replay frames, the way MACE's
  multi-head fine-tuning keeps its pretraining head. Predict with ``OUT@defect``.

Multi-fidelity (the charged-defect paper's PBE + hybrid model), ``multifidelity`` (SevenNet with
heads): the frames carry their fidelity (``info["fidelity"]``, else ``info["functional"]``). Those
of the base head's fidelity (``--base sevennet-mf-0@PBE``: PBE) train that head; those of one other
fidelity (e.g. HSE06) train a new head of that name, appended by sevenn's ``append_modal``; the
shared layers learn from both. Predict at the high fidelity with ``OUT@HSE06``. Only the new head's
validation frames decide early stopping.

A host whose frames mix functionals (or mix labelled and unlabelled frames) is refused by the
one-head strategies: one head cannot fit two potential-energy surfaces of the same structures.

Units: CHGNet trains on energy per atom (eV/atom), forces (eV/Å) and, through its
``StructureData``, VASP-style stresses in kBar (it multiplies them by −0.1 to GPa); the dataset's
stresses are ASE's (eV/Å³, tensile positive) and are converted here. sevenn reads ASE's units
from the frames itself.

Energy labels. A charge-blind model cannot learn a charged cell's total energy (it carries a
charge-dependent offset: the electrons' chemical potential), and DFT energies of another
functional than the base model's (MPtrj is PBE/PBE+U) are shifted per element. Training on them
as they are spends the model on offsets and spoils the forces (measured on GaN: validation force
MAE 143 → 241 meV/Å in three epochs). So by default (``energies="anchored"``) each group of
frames of one host, functional, defect and charge state gets one constant shift that brings its
mean to the base model's: energy differences within a charge state (which trial is lower, the
relaxation's energy profile) stay DFT's; nothing else is asked of the model. With
``energies="absolute"`` the DFT totals are fitted as they are, and (CHGNet) ``refit_refs`` first
shifts CHGNet's per-element reference energies by the least-squares fit of its per-atom error
(when the functional differs, by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from ase import Atoms

from defectml.errors import InputError, ModelError
from defectml.models.charged import charge_of, training_cells
from defectml.models.ref import card_path
from defectml.settings import FromOptions
from defectml.structure_io import write_json
from defectml.train.backends import make_backend
from defectml.train.strategy import strategy

#: Functionals each base model was trained on (energies shift per element for any other).
BASE_FUNCTIONALS = {"chgnet": ("PBE",), "chgnet-0.2.0": ("PBE",), "chgnet-r2scan": ("R2SCAN", "r2SCAN"),
                    "sevennet-0": ("PBE",), "sevennet-l3i5": ("PBE",), "sevennet-mf-0": ("PBE", "R2SCAN")}
#: File suffix of each family's weights.
SUFFIX = {"chgnet": ".pth.tar", "sevennet": ".pth"}


@dataclass
class FinetuneSettings(FromOptions):
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
        strategy: ``standard``, ``replay``, ``multihead`` or ``multifidelity`` (see the module).
        replay: An extxyz of replay frames; ``None``: drawn from
            :mod:`defectml.train.original_domain` and labelled by the base model.
        replay_variants: With ``replay=None``: structures per replay prototype.
        head: With ``multihead``: the new head's (sevenn modal's) name.
        charge_aware: Train a charge-aware CHGNet (:mod:`defectml.models.charged`): the cell
            charge (every frame's ``info["charge"]``) as an input. Energies are then anchored per
            host, functional and defect across its charge states, so the model learns how the
            energy changes with the charge.
        charge_lr: With ``charge_aware``: the charge terms' learning rate as a multiple of
            ``lr``. They start at zero, far from where they end, while the rest starts trained.
            Measured on GaN (54 frames, in sample, 6 epochs): with lr 3e-4 the energy error rose
            (21 → 24 meV/atom) at 1× and at 10×; with lr 1e-4 and 30× it fell (20 → 15 meV/atom)
            with the forces unchanged (80 meV/Å).
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
    strategy: str = "standard"
    replay: str | None = None
    replay_variants: int = 2
    head: str = "defect"
    charge_aware: bool = False
    charge_lr: float = 30.0
    device: str = "cpu"
    threads: int | None = None

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
        strategy(self.strategy)  # an unknown one is refused
        if self.replay and self.strategy == "standard":
            raise InputError("--replay is for --strategy replay or multihead")
        if self.replay_variants < 1:
            raise InputError("--replay-variants must be at least 1")
        if self.charge_lr <= 0:
            raise InputError("--charge-lr must be positive")
        if self.replay and self.strategy == "multifidelity":
            raise InputError("--replay is not for --strategy multifidelity: its base head learns the "
                             "low-fidelity frames")
        if self.charge_aware and strategy(self.strategy).new_head:
            raise InputError("--charge-aware trains one CHGNet head: use --strategy standard or replay")
        if not self.head or not self.head.replace("_", "").replace("-", "").isalnum():
            raise InputError(f"--head must be a plain name (letters, digits, - or _), not {self.head!r}")

    def key(self, data_keys: list[str]) -> str:
        """What decides the result: these settings (less device/threads) and the data's hashes."""
        d = {k: v for k, v in asdict(self).items() if k not in ("device", "threads", "replay")}
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


def defect_family(frame: Atoms) -> str | None:
    """The frame's defect name without its charge-state suffix (``Mg_O_+2`` → ``Mg_O``).

    Sources name a charged defect's folder NAME_q; the suffix is cut only where it is the
    frame's own charge.
    """
    import re

    name = frame.info.get("defect")
    if name is None:
        return None
    m = re.fullmatch(r"(.+)_([+-]?\d+)", str(name))
    if m and int(m.group(2)) == int(frame.info.get("charge", 0)):
        return m.group(1)
    return str(name)


def group_of(frame: Atoms, across_charges: bool = False) -> tuple:
    """The anchoring group of a frame: host, functional, defect (with its charge), charge.

    ``across_charges``: host, functional and defect only, one group for all its charge states
    (a charge-aware model learns the energy differences between them). Frames computed with
    another plane-wave cutoff or k-point count (where the frames say) are another group: their
    energies do not compare (GaN's two bulk cells in ``defect-dft``: 500 and 420 eV).
    """
    i = frame.info
    settings = [f"{k}={i[k]}" for k in ("encut", "nkpts") if k in i]
    if across_charges:
        return (i.get("host"), i.get("functional"), defect_family(frame), *settings)
    return (i.get("host"), i.get("functional"), i.get("defect"), int(i.get("charge", 0)), *settings)


def predicted_energies(model, frames: list[Atoms]) -> np.ndarray:
    """A loaded model's (:class:`~defectml.models.Model`) total energies (eV) of the frames, batched."""
    from defectml.structure_io import bare_atoms
    from defectml.train.dataset import atom_chunks

    bare = [bare_atoms(f) for f in frames]
    out = np.empty(len(frames))
    for idx in atom_chunks(bare):
        for i, (e, _) in zip(idx, model.batch()([bare[i] for i in idx]), strict=True):
            out[i] = e
    return out


def anchored_energies(frames: list[Atoms], predicted: np.ndarray, across_charges: bool = False,
                      given: dict[str, float] | None = None) -> tuple[np.ndarray, dict]:
    """DFT energies shifted by one constant per group to the model's mean on the group.

    Args:
        frames: Frames with DFT energies.
        predicted: The model's energies of the frames (eV).
        across_charges: One group per defect for all its charge states (see :func:`group_of`),
            shifted to the model's mean on its neutral frames where it has any: a model whose
            charge terms vanish at q = 0 keeps the base model's neutral energies, and the
            charged states' energies relative to the neutral one are DFT's.
        given: Shifts to use for the groups they name (the training frames' shifts, for
            validation frames of a charge state held out of training: their energy relative to
            the trained charge states is then what is validated).

    Returns:
        The labels (eV) and the shift of each group (eV per cell).
    """
    dft = np.array([f.get_potential_energy() for f in frames])
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(group_of(f, across_charges), []).append(i)
    labels = dft.copy()
    shifts = {}
    for key, idx in groups.items():
        name = "/".join(str(k) for k in key)
        ref = idx
        if across_charges and any(charge_of(frames[i]) == 0 for i in idx):
            ref = [i for i in idx if charge_of(frames[i]) == 0]
        shift = given[name] if given and name in given else float(np.mean(predicted[ref] - dft[ref]))
        labels[idx] += shift
        shifts[name] = shift
    return labels, shifts


def fit_charge_energy(model, frames: list[Atoms], residual: np.ndarray) -> dict[str, list[float]]:
    """Set a charge-aware CHGNet's charge energy term to the least-squares fit of ``residual``.

    ``residual``: label − model energy of each frame (eV per cell). The term is
    ``q · Σ_Z x_Z a_Z + q² · Σ_Z x_Z b_Z`` with ``x_Z`` the cell's fraction of element Z
    (:mod:`defectml.models.charged`); its geometry-independent part of the charged states'
    energies is fitted before training, as CHGNet's reference energies are, so that training
    starts on the geometry-dependent rest. Directions the data do not pin down (defect cells of
    one host barely differ in composition) are cut as in :func:`refit_composition`.

    Returns:
        ``{element: [a, b]}`` (eV).
    """
    import torch
    from pymatgen.core import Element

    zs = sorted({int(z) for f in frames for z in f.numbers})
    q = np.array([charge_of(f) for f in frames], dtype=float)
    x = np.array([[np.mean(f.numbers == z) for z in zs] for f in frames])
    features = np.hstack([q[:, None] * x, (q * q)[:, None] * x])
    if not np.any(q):
        return {}
    coef = np.linalg.lstsq(features, residual, rcond=0.05)[0]
    a, b = coef[: len(zs)], coef[len(zs):]
    with torch.no_grad():
        for z, ai, bi in zip(zs, a, b, strict=True):
            model.charge_energy.weight[z - 1, 0] = float(ai)
            model.charge_energy.weight[z - 1, 1] = float(bi)
    return {Element.from_Z(z).symbol: [round(float(ai), 5), round(float(bi), 5)]
            for z, ai, bi in zip(zs, a, b, strict=True)}


def needs_refit(frames: list[Atoms], base: str) -> bool:
    """Whether the data's functional differs from what ``base`` was trained on."""
    trained_on = BASE_FUNCTIONALS.get(base, ())
    functionals = {str(f.info.get("functional", "")) for f in frames}
    return not all(any(t.lower() in fn.lower().split() or fn == t for t in trained_on) for fn in functionals)


def refit_composition(base, frames: list[Atoms]) -> dict[str, float]:
    """Shift a loaded CHGNet's per-element reference energies to fit ``frames``; return the shifts.

    The shift is the least-squares fit of the model's per-atom energy error against composition
    (eV/atom of each element), truncated to the well-determined directions.
    """
    import torch
    from pymatgen.core import Element

    n = np.array([len(f) for f in frames])
    err = (np.array([f.get_potential_energy() for f in frames]) - predicted_energies(base, frames)) / n
    zs = sorted({int(z) for f in frames for z in f.numbers})
    x = np.array([[np.mean(f.numbers == z) for z in zs] for f in frames])  # composition fractions
    # Defect cells barely change the composition, so the fit is nearly degenerate (GaN: Ga and N
    # fractions move by 1/32). Directions with singular values under 5% of the largest are cut:
    # the shift goes to the composition the data pins down, split evenly where it does not.
    shift = np.linalg.lstsq(x, err, rcond=0.05)[0]
    weight = base.calculator.model.composition_model.fc.weight
    with torch.no_grad():
        for z, d in zip(zs, shift, strict=True):
            weight[0, z - 1] += float(d)
    return {Element.from_Z(z).symbol: round(float(d), 6) for z, d in zip(zs, shift, strict=True)}


def check_heads(ref, s: FinetuneSettings) -> None:
    """Raise before any work if the strategy and ``ref``'s heads (SevenNet modals) do not fit."""
    if ref.family != "sevennet":
        return
    try:
        import sevenn._keys as KEY
        from sevenn.util import load_checkpoint
    except ImportError:
        raise ModelError(f"fine-tuning {ref.label} needs sevenn: pip install 'defectml[sevennet]'") from None

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        config = load_checkpoint(str(ref.weights_path)).config
    modal_map = config.get(KEY.MODAL_MAP) if config.get(KEY.USE_MODALITY) else None
    if modal_map and ref.head is None:
        raise ModelError(f"{ref.label} has heads ({', '.join(modal_map)}): name one, "
                         f"e.g. --base {ref.source}@{next(iter(modal_map))}")
    if modal_map and ref.head not in modal_map:
        raise ModelError(f"{ref.label} has no head {ref.head!r} (heads: {', '.join(modal_map)})")
    if strategy(s.strategy).new_head:
        if not modal_map:
            raise ModelError(f"--strategy {s.strategy} needs a SevenNet with heads (sevennet-mf-0); "
                             f"{ref.label} has one")
        if s.head in modal_map:
            raise InputError(f"--head {s.head}: {ref.label} already has a head of that name "
                             f"({', '.join(modal_map)})")


def fidelity_of(frame: Atoms) -> str | None:
    """A frame's fidelity: ``info["fidelity"]``, else its ``info["functional"]`` (``None``: unlabelled)."""
    value = frame.info.get("fidelity", frame.info.get("functional"))
    return None if value is None or str(value) == "" else str(value)


def check_one_fidelity(frames: list[Atoms], path) -> None:
    """Raise ``InputError`` where one host's frames mix fidelities, or labelled and unlabelled frames.

    A one-head fine-tune fits one potential-energy surface per host: PBE and hybrid labels of the
    same structures contradict each other (and an unlabelled frame could be either).
    """
    by_host: dict = {}
    for f in frames:
        by_host.setdefault(f.info.get("host"), {}).setdefault(fidelity_of(f), 0)
        by_host[f.info.get("host")][fidelity_of(f)] += 1
    for host, counts in by_host.items():
        if len(counts) > 1:
            listed = ", ".join(f"{k or 'no fidelity label'}: {v}" for k, v in counts.items())
            where = f"host {host}" if host is not None else "the frames"
            raise InputError(f"{path}: {where} mixes functionals ({listed}); label every frame's "
                             "info['fidelity'] and train one head per fidelity with --strategy "
                             "multifidelity (sevennet-mf-0@PBE), or keep one functional")


def split_fidelities(frames: list[Atoms], base_head: str | None,
                     path) -> tuple[str, list[Atoms], list[Atoms]]:
    """(new head's fidelity, its frames, the base head's frames) of a multi-fidelity dataset.

    The base head (e.g. ``PBE``) learns the frames of its own fidelity (matched without case);
    exactly one other fidelity gets a new head.
    """
    missing = sum(fidelity_of(f) is None for f in frames)
    if missing:
        raise InputError(f"{path}: {missing} of {len(frames)} frames carry no fidelity "
                         "(info['fidelity'] or info['functional']); --strategy multifidelity needs "
                         "every frame's")
    names = sorted({fidelity_of(f) for f in frames})
    base = (base_head or "").lower()
    others = [n for n in names if n.lower() != base]
    if len(names) == 1:
        raise InputError(f"{path}: one fidelity ({names[0]}); --strategy multifidelity needs frames of "
                         f"the base head's fidelity ({base_head}) beside those of one other")
    if len(others) != 1:
        raise InputError(f"{path}: fidelities {', '.join(names)}; --strategy multifidelity trains the "
                         f"base head ({base_head}) on its own fidelity and one new head on exactly one "
                         "other")
    new = others[0]
    if not new.replace("_", "").replace("-", "").replace("+", "").isalnum():
        raise InputError(f"{path}: fidelity {new!r} cannot name a head (letters, digits, -, _, +)")
    return (new, [f for f in frames if fidelity_of(f) == new],
            [f for f in frames if fidelity_of(f) != new])


def check_charges(frames: list[Atoms], path) -> None:
    """Raise ``InputError`` unless every frame carries its cell's charge (``info["charge"]``)."""
    missing = sum("charge" not in f.info for f in frames)
    if missing:
        raise InputError(f"{path}: {missing} of {len(frames)} frames carry no charge (info['charge']); "
                         "--charge-aware needs every frame's total supercell charge")


def _replay_frames(base, s: FinetuneSettings, elements: set[str], work: Path,
                   log) -> tuple[list[Atoms], dict]:
    """The replay frames (a file's, or base-labelled crystals cached in ``work``) and their description."""
    from ase.io import write

    from defectml.train.original_domain import CrystalSettings, base_labelled

    if s.replay:
        frames = read_frames(s.replay)
        base.check_elements({sym for f in frames for sym in f.get_chemical_symbols()})
        return frames, {"source": str(s.replay), "sha256": _sha256(s.replay), "frames": len(frames)}
    cached = work / "replay.extxyz"
    if cached.is_file():
        frames = read_frames(cached)
    else:
        log(f"labelling replay crystals with {base.name} (self-distillation: these labels are the base "
            "model's, not DFT)")
        frames = base_labelled(base, "replay", CrystalSettings(variants=s.replay_variants, seed=s.seed),
                               elements=elements)
        tmp = cached.with_name(".replay.tmp.extxyz")
        write(tmp, frames)
        os.replace(tmp, cached)
    return frames, {"source": "crystals labelled by the base model (self-distillation, not DFT)",
                    "prototypes": sorted({f.info["host"].split(":", 1)[1] for f in frames}),
                    "frames": len(frames)}


def finetune(train: str | Path, val: str | Path, out: str | Path, s: FinetuneSettings | None = None,
             log: Callable[[str], None] = lambda m: None) -> FinetuneResult:
    """Fine-tune ``s.base`` on the ``train`` frames, early-stopped on ``val``; write ``out``.

    The steps: check the request, read the frames (split by fidelity for ``multifidelity``),
    load the base, assemble the replay frames, resume or start, label the energies (anchored or
    absolute), train epoch by epoch, write the best weights and the card.

    Args:
        train: extxyz of training frames (``defectml dataset`` writes them).
        val: extxyz of validation frames (early stopping and the card's metrics).
        out: The weights file to write (CHGNet ``.pth.tar``, SevenNet ``.pth``); its card goes beside it.
        s: Settings.
        log: Progress messages.

    Returns:
        The weights, the card and the per-epoch history.

    Raises:
        InputError: empty or unreadable data, a bad output name. ModelError: a base model that
            cannot be fine-tuned here (or not with this strategy), or elements it does not cover.
    """
    import torch

    from defectml.models import set_threads

    s = s or FinetuneSettings()
    s.validate()
    out = Path(out)
    ref = _check_request(s, out)
    data, s = _read_data(train, val, s, ref)
    base = _load_base(ref, s, data)
    set_threads(s.threads, s.device)
    torch.manual_seed(s.seed)
    run = _Run(out.with_name(out.name + ".work"), SUFFIX[ref.family])
    run.work.mkdir(parents=True, exist_ok=True)
    replay_frames, replay_info = _replay(base, s, ref, data, train, run.work, log)
    everything = data.train + data.val + replay_frames
    with_stress = all(f.calc is not None and f.calc.results.get("stress") is not None for f in everything)
    targets = "efs" if with_stress and s.stress_weight > 0 else "ef"
    data_keys = [_sha256(train), _sha256(val)] + ([_sha256(s.replay)] if s.replay else [])
    run_key = s.key(data_keys + [ref.key])
    state = run.saved_state(run_key, log)
    do_refit = s.energies == "absolute" and ref.family == "chgnet" and (
        s.refit_refs == "yes" or (s.refit_refs == "auto" and needs_refit(data.train, ref.source)))
    if s.energies == "absolute" and ref.family != "chgnet" and s.refit_refs == "yes":
        raise InputError("--refit-refs yes is for CHGNet bases (its per-element reference energies)")
    fresh = state is None
    shifts: dict = {} if fresh else state["refit_shifts"]
    if fresh and do_refit:
        shifts = refit_composition(base, data.train)
    backend = make_backend(base, s, targets, data.train, None if fresh else run.last, run.work, run_key)
    labels = _labels(s, base, backend, data, replay_frames, {} if fresh else state.get("charge_fit", {}),
                     fresh)
    backend.load_data((data.train, labels.train), (data.val, labels.val), (replay_frames, labels.replay))
    if fresh:
        state = _start_state(backend, run_key, shifts, do_refit, labels.charge_fit)
        _log_start(log, ref, s, state, targets, len(data.train), len(replay_frames), len(data.val))
    resumed_from = state["epoch"]
    if resumed_from:
        log(f"resuming at epoch {resumed_from + 1} (best so far: epoch {state['best_epoch'] + 1})")
    _train_epochs(backend, state, s, run, log)
    card = _card(ref, s, backend, data, state, targets, replay_info, labels, shifts, data_keys, run_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.copyfile(run.best, tmp)
    os.replace(tmp, out)  # the weights appear whole or not at all
    write_json(card_path(out), card)
    return FinetuneResult(out, card, state["history"], resumed_from)


def _check_request(s: FinetuneSettings, out: Path):
    """The base's :class:`ModelRef`, once the family, output name and strategy fit it."""
    from defectml.models import parse_model

    ref = parse_model(s.base, s.device)
    if ref.family not in SUFFIX:
        raise ModelError(f"fine-tuning {ref.label} ({ref.family}) is not supported: start from a CHGNet "
                         "(chgnet, chgnet-0.2.0, chgnet-r2scan, a .pth.tar) or a SevenNet (sevennet-0, "
                         "sevennet-l3i5, sevennet-mf-0, a .pth) model")
    if not out.name.endswith(SUFFIX[ref.family]):
        raise InputError(f"--out {out}: {ref.family} weights are written as NAME{SUFFIX[ref.family]}")
    if strategy(s.strategy).new_head and ref.family != "sevennet":
        raise ModelError(f"--strategy {s.strategy} needs a SevenNet base with heads (sevennet-mf-0); "
                         f"{ref.label} has one output head: use --strategy replay")
    if s.charge_aware and ref.family != "chgnet":
        raise ModelError(f"--charge-aware extends CHGNet here (chgnet, chgnet-0.2.0, chgnet-r2scan, a "
                         f".pth.tar); {ref.label} is {ref.family}")
    return ref


@dataclass
class _Data:
    """The frames a fine-tune reads: training, validation, and (multifidelity) the low-fidelity ones."""

    train: list[Atoms]
    val: list[Atoms]
    low: list[Atoms] = field(default_factory=list)


def _read_data(train, val, s: FinetuneSettings, ref) -> tuple[_Data, FinetuneSettings]:
    """The frames, checked for fidelities, charges and heads (``s`` gains the head for multifidelity)."""
    data = _Data(read_frames(train), read_frames(val))
    if strategy(s.strategy).replay == "low_fidelity":
        fidelity, data.train, data.low = split_fidelities(data.train, ref.head, train)
        data.val = [f for f in data.val if fidelity_of(f) == fidelity]
        if not data.val:
            raise InputError(f"{val}: no {fidelity} frames to validate the {fidelity} head on")
        s = replace(s, head=fidelity)
    else:
        check_one_fidelity(data.train + data.val, train)
    if s.charge_aware:
        check_charges(data.train, train)
        check_charges(data.val, val)
    check_heads(ref, s)
    return data, s


def _load_base(ref, s: FinetuneSettings, data: _Data):
    """The base model (a charge-aware copy where asked), checked to cover the frames' elements."""
    from defectml.models import load_model

    base = load_model(ref, s.device, s.threads)
    if s.charge_aware and not base.charge_aware:
        from defectml.models.chgnet import charge_aware_copy

        base = charge_aware_copy(base)
    base.check_elements({sym for f in data.train + data.val for sym in f.get_chemical_symbols()})
    return base


def _replay(base, s: FinetuneSettings, ref, data: _Data, train, work: Path,
            log) -> tuple[list[Atoms], dict | None]:
    """The frames the base head keeps learning, as the strategy says, and their description."""
    kind = strategy(s.strategy).replay
    if kind == "low_fidelity":  # the base head learns the low-fidelity frames, real DFT
        return data.low, {"source": f"{train}: the {ref.head} frames (low fidelity)", "frames": len(data.low),
                          "fidelity": sorted({fidelity_of(f) for f in data.low})}
    if kind == "none":
        return [], None
    elements = {sym for f in data.train + data.val for sym in f.get_chemical_symbols()}
    return _replay_frames(base, s, elements, work, log)


@dataclass
class _Run:
    """A fine-tune's work folder: its state file and its last and best weights."""

    work: Path
    suffix: str

    @property
    def state(self) -> Path:
        return self.work / "state.json"

    @property
    def last(self) -> Path:
        return self.work / f"last{self.suffix}"

    @property
    def best(self) -> Path:
        return self.work / f"best{self.suffix}"

    def saved_state(self, run_key: str, log) -> dict | None:
        """The state a killed run left, if it was this run (same data and settings)."""
        state = json.loads(self.state.read_text()) if self.state.exists() else None
        if state is not None and state.get("run_key") != run_key:
            log(f"{self.work} holds another run (other data or settings): starting afresh")
            state = None
        return state


@dataclass
class _Labels:
    """The energy labels of the training, validation and replay frames."""

    train: np.ndarray
    val: np.ndarray
    replay: np.ndarray
    anchors: dict
    charge_fit: dict


def _labels(s: FinetuneSettings, base, backend, data: _Data, replay_frames: list[Atoms],
            charge_fit: dict, fresh: bool) -> _Labels:
    """Energy labels: anchored on the trained head as it starts (see the module), or DFT's as they are."""
    if s.energies != "anchored":
        train_e, val_e = (np.array([f.get_potential_energy() for f in fs]) for fs in (data.train, data.val))
        return _Labels(train_e, val_e, np.array([f.get_potential_energy() for f in replay_frames]), {},
                       charge_fit)
    # on the head being trained as it starts: the untouched base model, or a new head as sevenn
    # appends it (a resume trains a loaded copy; the start is kept)
    start = backend.start_model(base)
    across = s.charge_aware
    predicted_train = predicted_energies(start, data.train)
    train_e, anchors = anchored_energies(data.train, predicted_train, across)
    val_e, _ = anchored_energies(data.val, predicted_energies(start, data.val), across,
                                 anchors if across else None)
    if across and fresh:  # (the trainer's model is ``base``'s: predictions above come first)
        charge_fit = fit_charge_energy(backend.trained_model(), data.train, train_e - predicted_train)
    # replay frames train the base model's head: anchored on it
    replay_e = anchored_energies(replay_frames, predicted_energies(base, replay_frames))[0] \
        if replay_frames else np.array([])
    return _Labels(train_e, val_e, replay_e, anchors, charge_fit)


def _start_state(backend, run_key: str, shifts: dict, do_refit: bool, charge_fit: dict) -> dict:
    """A fresh run's state, with the base's validation error.

    After the refit, where there is one; for a new head: the head as sevenn's append_modal starts it.
    """
    base_mae = backend.validate()
    return {"run_key": run_key, "epoch": 0, "best": None, "best_epoch": None, "stale": 0, "history": [],
            "val_base": base_mae, "val_after_refit": base_mae if do_refit else None,
            "refit_shifts": shifts, "charge_fit": charge_fit}


def _log_start(log, ref, s: FinetuneSettings, state: dict, targets: str, n_train: int, n_replay: int,
               n_val: int) -> None:
    base_mae, shifts, charge_fit = state["val_base"], state["refit_shifts"], state["charge_fit"]
    log(f"base {ref.label}: validation MAE energy {base_mae['e'] * 1000:.1f} meV/atom, forces "
        f"{base_mae.get('f', float('nan')) * 1000:.0f} meV/Å; training on {n_train} frames "
        + (f"+ {n_replay} replay " if n_replay else "")
        + f"({targets}, {s.strategy}), {n_val} to validate")
    if state["val_after_refit"] is not None:
        listed = ", ".join(f"{k} {v:+.3f}" for k, v in shifts.items())
        log(f"per-element reference energies refit ({listed} eV/atom)")
    if charge_fit:
        listed = ", ".join(f"{k} {a:+.3f}·q {b:+.3f}·q²" for k, (a, b) in charge_fit.items())
        log(f"charge energy fitted before training (per element, weighted by its fraction: {listed} eV); "
            "the validation error above includes it")


def _score(s: FinetuneSettings, mae: dict) -> float:
    """The validation error early stopping minimises."""
    # Anchored labels pin each group's mean to the base model: on groups never trained on, the
    # absolute energy error is an offset, not physics (seen: validation forces 77 -> 33 meV/Å
    # while that offset grew 0 -> 67 meV/atom). Forces decide there.
    if s.energies == "anchored" and not s.charge_aware:
        return mae.get("f", mae["e"])
    return s.energy_weight * mae["e"] + s.force_weight * mae.get("f", 0.0)


def _train_epochs(backend, state: dict, s: FinetuneSettings, run: _Run, log) -> None:
    """Epochs until ``s.epochs`` or ``s.patience`` without a better score; every epoch saved."""
    for epoch in range(state["epoch"], s.epochs):
        if state["stale"] >= s.patience:
            break
        t0 = time.perf_counter()
        tr = backend.train_epoch(epoch)
        va = backend.validate()
        if not np.isfinite(va["e"]) or not np.isfinite(va.get("f", 0.0)):
            raise ModelError(f"fine-tuning diverged at epoch {epoch + 1} (validation error not finite); "
                             f"the best weights so far are in {run.best}")
        seconds = time.perf_counter() - t0
        state["history"].append({"epoch": epoch + 1, "train": tr, "val": va, "seconds": seconds})
        if state["best"] is None or _score(s, va) < state["best"]:
            state.update(best=_score(s, va), best_epoch=epoch, stale=0)
            backend.save_weights(run.best, epoch + 1)
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        backend.save_state(run.last, epoch + 1)
        write_json(run.state, state)
        log(f"epoch {epoch + 1}/{s.epochs}: val energy {va['e'] * 1000:.1f} meV/atom, forces "
            f"{va.get('f', float('nan')) * 1000:.0f} meV/Å ({seconds:.0f} s)"
            + (" *" if state["stale"] == 0 else ""))
    if state["best_epoch"] is None:
        raise ModelError("no epoch finished; nothing to write")


def _card(ref, s: FinetuneSettings, backend, data: _Data, state: dict, targets: str,
          replay_info: dict | None, labels: _Labels, shifts: dict, data_keys: list[str],
          run_key: str) -> dict:
    """The model card written beside the weights (``search`` and friends read it)."""
    best = state["history"][state["best_epoch"]]
    heads, default_head = backend.heads()
    return {
        "family": ref.family, "base_model": ref.label, "base_key": ref.key,
        "elements": sorted({sym for f in data.train for sym in f.get_chemical_symbols()}),
        "heads": heads, "default_head": default_head, "base_head": ref.head,
        "charge_aware": s.charge_aware,
        "charges": sorted({charge_of(f) for f in data.train}) if s.charge_aware else None,
        # the charge energy is valid on cells of this size only (defectml.models.charged)
        "training_cells": training_cells(data.train) if s.charge_aware else None,
        "charge_energy_fit_eV": labels.charge_fit or None,
        "strategy": s.strategy, "replay": replay_info,
        "training_data_sha256": {"train": data_keys[0], "val": data_keys[1]},
        "functionals": sorted({str(f.info.get("functional", "")) for f in data.train + data.low}),
        "fidelities": ({s.head: len(data.train), ref.head: len(data.low)}
                       if strategy(s.strategy).replay == "low_fidelity" else None),
        "targets": targets, "energies": s.energies,
        "anchor_shifts_eV": {k: round(v, 4) for k, v in labels.anchors.items()},
        "refit_shifts_eV_per_atom": shifts,
        "metrics": {"val_base": state["val_base"], "val_after_refit": state["val_after_refit"],
                    "val_best": best["val"],
                    "best_epoch": best["epoch"], "epochs_run": state["epoch"],
                    "seconds_per_epoch": float(np.mean([h["seconds"] for h in state["history"]]))},
        "settings": asdict(s), "run_key": run_key,
    }
