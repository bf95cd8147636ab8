"""Training with checkpoints that resume; evaluation of a trained model."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from defectml.errors import DefectMLError
from defectml.predictor.graph import DefectGraph
from defectml.predictor.metrics import coordinate_mae, mean_metrics
from defectml.predictor.model import Batch, DefectRelaxNet, Ensemble, ModelConfig, distance_loss, recycled
from defectml.settings import FromOptions

# A batch whose loss is not finite is skipped (no step, logged, counted in the history) as long as at
# most this fraction of an epoch's batches is; beyond it training stops as diverged. Deep networks
# that move coordinates in every layer can blow up on a rare noisy input (a 7-layer hBN model did at
# epoch 7: an early layer moved an atom next to another node and the features grew without bound through
# the layers after it) while the weights themselves stay finite.
MAX_SKIPPED_FRACTION = 0.05


@dataclass
class TrainSettings(FromOptions):
    """Optimiser settings (defaults: the small CPU configuration).

    ``compile`` runs the training forward pass through ``torch.compile`` (about 2x faster per step on
    CPU after a one-off compilation of about a minute). ``init_from`` starts a new run from another
    checkpoint's best weights (fine-tuning, or a warm restart with a fresh learning-rate cycle); it
    is ignored when the run's own checkpoint exists and is resumed. ``noise`` (A) perturbs the input
    positions of the real atoms of every training batch by Gaussian noise of that width (zero mean
    per structure) and moves the targets by the opposite amount, so the network learns to map a
    slightly perturbed structure to the same relaxed one (a regulariser for small data sets).
    ``local_weight`` counts atoms within ``local_radius`` (A) of a defect site ``1 + local_weight``
    times in the loss (training and validation), so the fit favours the defect neighbourhoods.
    ``ema`` > 0 keeps an exponential moving average of the weights (decay per step); the average is
    what is validated and kept as the best model, the raw weights go on training.
    ``interpolate`` is the fraction of training structures whose input is moved part of the way to
    the DFT-relaxed structure (a uniform random fraction t of each atom's displacement, the target
    shrinking to the remaining 1 - t): the network also sees partly relaxed inputs, as a relaxation
    passes through them, and can then refine its own prediction (``predict_relaxed(passes=2)``).
    """

    epochs: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-6
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    compile: bool = False
    noise: float = 0.0
    init_from: str | None = None
    local_weight: float = 0.0
    local_radius: float = 3.0
    ema: float = 0.0
    interpolate: float = 0.0
    log: list = field(default_factory=list)

    @classmethod
    def from_options(cls, options, **overrides) -> TrainSettings:
        """Settings from CLI options or a dict (:class:`~defectml.settings.FromOptions`), never ``log``.

        Args:
            options: An argparse namespace (or dict) whose attributes named like the fields are
                taken (``None`` keeps the default); a ``log`` in it is not taken.
            overrides: Fields set explicitly, over ``options``.

        Raises:
            DefectMLError: a value out of range.
        """
        source = options if isinstance(options, dict) else vars(options)
        return super().from_options({k: v for k, v in source.items() if k != "log"}, **overrides)

    def validate(self) -> None:
        """Raise ``DefectMLError`` for a value out of range."""
        from defectml.errors import DefectMLError

        if not 0.0 <= self.interpolate <= 1.0:
            raise DefectMLError(
                f"--interpolate {self.interpolate}: a fraction of the training inputs, 0 to 1")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise DefectMLError("--epochs and --batch-size must be at least 1 and --lr positive")
        if self.noise < 0 or not 0.0 <= self.ema < 1.0:
            raise DefectMLError("--noise must be non-negative and --ema in [0, 1)")


def perturb(b: Batch, width: float) -> None:
    """Shift the real atoms of ``b`` by Gaussian noise (zero mean per structure) and its targets back."""
    w = b.real.to(b.pos.dtype).unsqueeze(-1)
    eps = torch.randn_like(b.pos) * width * w
    count = torch.zeros(b.n_graphs, 1, dtype=w.dtype, device=w.device).index_add_(0, b.graph, w).clamp(min=1)
    mean = torch.zeros(b.n_graphs, 3, dtype=w.dtype, device=w.device).index_add_(0, b.graph, eps) / count
    eps = (eps - mean[b.graph]) * w
    b.pos = b.pos + eps
    if b.target is not None:
        b.target = b.target - eps


def interpolate(b: Batch, fraction: float, generator: torch.Generator | None = None) -> None:
    """Move a random ``fraction`` of the structures in ``b`` part of the way to their targets.

    Each chosen structure gets one t ~ U(0, 1): inputs ``pos + t * target``, targets ``(1 - t) * target``
    (targets are displacements from the input), so its relaxed positions are unchanged.
    """
    if b.target is None or fraction <= 0:
        return
    pick = torch.rand(b.n_graphs, generator=generator) < fraction
    t = (torch.rand(b.n_graphs, generator=generator) * pick).to(b.pos.dtype).to(b.pos.device)
    t_node = (t[b.graph] * b.real.to(b.pos.dtype)).unsqueeze(-1)
    b.pos = b.pos + t_node * b.target
    b.target = b.target * (1.0 - t_node)


def _ema_update(ema: dict, model: torch.nn.Module, decay: float) -> None:
    """Move the averaged weights ``ema`` toward the model's by ``1 - decay``."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v, alpha=1.0 - decay)
            else:
                ema[k].copy_(v)


def _validate(model: DefectRelaxNet, val_graphs: list, s: TrainSettings, ema: dict | None) -> float:
    """Validation loss of the model's weights, or of the averaged weights ``ema`` when kept."""
    if ema is None:
        return validation_loss(model, val_graphs, s)
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema)
    try:
        return validation_loss(model, val_graphs, s)
    finally:
        model.load_state_dict(live)


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DefectMLError(f"--device {device}: no CUDA device visible to torch here")


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[DefectRelaxNet, dict]:
    """A trained model and its checkpoint dictionary."""
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        config = {"zero_net_displacement": False, **ck["config"]}  # checkpoints written before the option
        model = DefectRelaxNet(ModelConfig(**config))
        model.load_state_dict(ck["best_state"] if ck.get("best_state") else ck["state"])
    except (OSError, KeyError, RuntimeError, TypeError) as exc:
        raise DefectMLError(f"cannot load predictor checkpoint {path}: {exc}") from None
    model.to(device).eval()
    return model, ck


def predictor_paths(spec: str | Path | list) -> list[Path]:
    """Checkpoint paths from one path, a comma-separated list of paths, or a list."""
    items = spec if isinstance(spec, list | tuple) else str(spec).split(",")
    paths = [Path(str(p).strip()) for p in items if str(p).strip()]
    if not paths:
        raise DefectMLError("no predictor checkpoint given")
    return paths


def load_predictor(spec: str | Path | list, device: str = "cpu") -> DefectRelaxNet | Ensemble:
    """One trained model, or the averaging ensemble of several (``a.pt,b.pt`` or a list of paths)."""
    models = [load_checkpoint(p, device)[0] for p in predictor_paths(spec)]
    if len(models) == 1:
        return models[0]
    try:
        return Ensemble(models).to(device).eval()
    except ValueError as exc:
        raise DefectMLError(f"cannot combine predictors {spec}: {exc}") from None


def evaluate(
    model: DefectRelaxNet | Ensemble, graphs: list[DefectGraph], device: str = "cpu", passes: int = 1
) -> tuple[dict, float]:
    """Mean coordinate MAEs over ``graphs`` and the inference time per structure (s).

    ``passes`` > 1 feeds each prediction back as the next input (:func:`~defectml.predictor.model.recycled`).

    One untimed pass on the first structure comes first, so one-off costs (lazy initialisation, the
    allocator's first requests) are not charged to the timing.
    """
    model.eval()
    rows, t = [], 0.0
    with torch.no_grad():
        if graphs:
            model(Batch(graphs[:1], device))
        for g in graphs:
            t0 = time.perf_counter()
            pred = recycled(model, Batch([g], device), passes).cpu().numpy()
            t += time.perf_counter() - t0
            rows.append(coordinate_mae(pred, g))
    return mean_metrics(rows), t / max(1, len(graphs))


def validation_loss(
    model: DefectRelaxNet, graphs: list[DefectGraph], s: TrainSettings | None = None
) -> float:
    """Mean training loss (distance to the relaxed positions, A) over ``graphs``, batched as in training."""
    s = s or TrainSettings()
    model.eval()
    losses = []
    with torch.no_grad():
        for k in range(0, len(graphs), s.batch_size):
            b = Batch(graphs[k : k + s.batch_size], s.device)
            losses.append(float(distance_loss(model(b), b, s.local_weight, s.local_radius)))
    return float(np.mean(losses)) if losses else float("nan")


def compiled_forwards(model: DefectRelaxNet) -> list:
    """Compiled stand-ins for ``model``, fastest first: the whole model, then each layer on its own.

    ``benchmarks/predictor_training_speed.py`` (MoS2, one CPU thread, 64 features): at 3 layers the
    whole model steps 2.2x faster than eager, each layer compiled alone 1.9x; at 5 layers inductor
    (torch 2.13, CPU) emits broken code for the whole model and the per-layer graphs give 1.6x.
    """
    layers = [torch.compile(layer, dynamic=True) for layer in model.layers]
    return [torch.compile(model, dynamic=True), lambda b: model(b, layers)]


def _gradient_step(forward, b: Batch, s: TrainSettings) -> torch.Tensor:
    """Loss of one batch, back-propagated (gradients of a non-finite loss are never applied)."""
    loss = distance_loss(forward(b), b, s.local_weight, s.local_radius)
    if torch.isfinite(loss):
        loss.backward()
    return loss


@dataclass
class _TrainState:
    """What a training run carries from epoch to epoch (and what its checkpoint stores).

    Attributes:
        model: The network being trained.
        opt: Its optimiser.
        sched: The optimiser's learning-rate schedule.
        forward: What the training step calls: a compiled stand-in for ``model``, or ``model``.
        fallbacks: The slower compiled stand-ins still to try when ``forward`` fails to compile.
        ema: The averaged weights, or ``None`` when none are kept.
        history: One record per finished epoch.
        start: The first epoch (0-based) still to train.
        best: The best validation loss so far.
        best_state: The weights that gave ``best``.
    """

    model: DefectRelaxNet
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.CosineAnnealingLR
    forward: Callable
    fallbacks: list
    ema: dict | None
    history: list = field(default_factory=list)
    start: int = 0
    best: float = float("inf")
    best_state: dict | None = None


def _prepare(train_graphs: list[DefectGraph], checkpoint: str | Path, s: TrainSettings) -> Path:
    """Check the device and data, set threads and the seed, and make the checkpoint's folder.

    Returns:
        The checkpoint path.

    Raises:
        DefectMLError: no CUDA device for a ``cuda`` run, or no training structures.
    """
    _check_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    if not train_graphs:
        raise DefectMLError("no training structures")
    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    return checkpoint


def _starting_point(
    checkpoint: Path, config: ModelConfig | None, s: TrainSettings, log: Callable[[str], None]
) -> tuple[ModelConfig | None, dict | None, dict | None]:
    """Where a run starts: its own checkpoint, resumed; else ``s.init_from``'s weights; else ``config``.

    Returns:
        The network's configuration, the checkpoint to resume (or ``None``) and the weights to start
        from (or ``None``).
    """
    if checkpoint.exists():
        ck = torch.load(checkpoint, map_location=s.device, weights_only=False)
        config = ModelConfig(**{"zero_net_displacement": False, **ck["config"]})
        log(f"resuming {checkpoint} at epoch {ck['epoch']}")
        return config, ck, None
    if s.init_from:
        init_model, init_ck = load_checkpoint(s.init_from, s.device)
        log(f"starting from the weights of {s.init_from} (epoch {init_ck['epoch']})")
        return init_model.config, None, init_model.state_dict()
    return config, None, None


def _new_state(config: ModelConfig | None, s: TrainSettings, init: dict | None) -> _TrainState:
    """A fresh model (from ``init`` when given), its optimiser, schedule and averaged weights."""
    model = DefectRelaxNet(config).to(s.device)
    if init is not None:
        model.load_state_dict(init)
    forwards = compiled_forwards(model) if s.compile else []
    forward = forwards.pop(0) if forwards else model
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.epochs), eta_min=s.lr / 20)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if s.ema > 0 else None
    return _TrainState(model, opt, sched, forward, forwards, ema)


def _resume(state: _TrainState, ck: dict, s: TrainSettings) -> None:
    """Load the weights, optimiser, schedule, history and best model of checkpoint ``ck`` into ``state``."""
    state.model.load_state_dict(ck["state"])
    state.opt.load_state_dict(ck["optimizer"])
    state.sched.load_state_dict(ck["scheduler"])
    state.sched.T_max = max(1, s.epochs)  # extending a finished run continues its schedule smoothly
    state.history, state.start, state.best = ck["history"], ck["epoch"], ck["best_val"]
    state.best_state = ck["best_state"]
    if state.ema is not None and ck.get("ema"):
        state.ema = ck["ema"]


def _epoch_order(rng: random.Random, epoch: int, n: int) -> list[int]:
    """The order of the ``n`` training structures in ``epoch`` (draws one number from ``rng``)."""
    order = list(range(n))
    random.Random(rng.random() + epoch).shuffle(order)
    return order


def _training_batch(graphs: list[DefectGraph], s: TrainSettings) -> Batch:
    """A batch of ``graphs`` with the settings' input augmentations (interpolation, then noise)."""
    b = Batch(graphs, s.device)
    if s.interpolate > 0:
        interpolate(b, s.interpolate)
    if s.noise > 0:
        perturb(b, s.noise)
    return b


def _batch_loss(state: _TrainState, b: Batch, s: TrainSettings, log: Callable[[str], None]) -> torch.Tensor:
    """Loss of batch ``b``, back-propagated when finite; a failed compilation falls back and retries.

    When the compiled ``state.forward`` fails (an inductor error), the next stand-in in
    ``state.fallbacks`` (each layer compiled on its own), or eager ``state.model``, takes its place.
    """
    while True:
        state.opt.zero_grad()
        try:
            return _gradient_step(state.forward, b, s)
        except DefectMLError:
            raise
        except Exception as exc:  # a torch.compile (inductor) failure: a smaller unit, or eager
            if state.forward is state.model:
                raise
            state.forward = state.fallbacks.pop(0) if state.fallbacks else state.model
            eager = state.forward is state.model
            how = "training without it" if eager else "compiling each layer on its own"
            log(f"torch.compile failed ({type(exc).__name__}: {exc}); {how}")


def _check_skipped(skipped: int, n_batches: int, epoch: int, loss: torch.Tensor) -> None:
    """Raise ``DefectMLError`` when more than ``MAX_SKIPPED_FRACTION`` of an epoch's batches were skipped."""
    if skipped > int(MAX_SKIPPED_FRACTION * n_batches):
        raise DefectMLError(
            f"training diverged: {skipped} of the {n_batches} batches of epoch {epoch + 1} "
            f"gave a non-finite loss ({float(loss)})"
        )


def _optimizer_step(state: _TrainState, s: TrainSettings) -> None:
    """Clip the gradients, step the optimiser and move the averaged weights."""
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), 10.0)
    state.opt.step()
    if state.ema is not None:
        _ema_update(state.ema, state.model, s.ema)


def _train_batches(
    state: _TrainState,
    graphs: list[DefectGraph],
    order: list[int],
    epoch: int,
    s: TrainSettings,
    log: Callable[[str], None],
) -> tuple[list[float], int]:
    """One pass over ``graphs`` in ``order``, a step per batch; batches with a non-finite loss are skipped.

    Returns:
        The losses of the batches stepped on, and the number of batches skipped.

    Raises:
        DefectMLError: too many batches skipped (training diverged).
    """
    losses, skipped = [], 0
    n_batches = -(-len(order) // s.batch_size)
    for k in range(0, len(order), s.batch_size):
        b = _training_batch([graphs[i] for i in order[k : k + s.batch_size]], s)
        loss = _batch_loss(state, b, s, log)
        if not torch.isfinite(loss):
            skipped += 1
            _check_skipped(skipped, n_batches, epoch, loss)
            log(f"epoch {epoch + 1}: batch {k // s.batch_size + 1} skipped (non-finite loss: the network "
                "blew up on it; no step taken)")
            continue
        _optimizer_step(state, s)
        losses.append(float(loss.detach()))
    return losses, skipped


def _record_epoch(
    state: _TrainState, epoch: int, losses: list[float], skipped: int, val: float, dt: float
) -> None:
    """Append the epoch to the history and keep the validated weights when they are the best yet."""
    state.history.append(
        {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "val_loss": val,
            "time_s": dt,
            "skipped": skipped,
        }
    )
    if val < state.best:
        weights = state.ema if state.ema is not None else state.model.state_dict()
        state.best, state.best_state = val, {k: v.detach().clone() for k, v in weights.items()}


def _run_epoch(
    state: _TrainState,
    train_graphs: list[DefectGraph],
    val_graphs: list[DefectGraph],
    order: list[int],
    epoch: int,
    s: TrainSettings,
    log: Callable[[str], None],
) -> None:
    """Train one epoch on ``train_graphs`` in ``order``, validate, record and log it."""
    state.model.train()
    t0 = time.perf_counter()
    losses, skipped = _train_batches(state, train_graphs, order, epoch, s, log)
    state.sched.step()
    val = _validate(state.model, val_graphs, s, state.ema)
    dt = time.perf_counter() - t0
    _record_epoch(state, epoch, losses, skipped, val, dt)
    log(f"epoch {epoch + 1}/{s.epochs}: loss {np.mean(losses):.4f} Å, val {val:.4f} Å, {dt:.0f} s")


def _save_checkpoint(state: _TrainState, epochs_done: int, checkpoint: Path) -> None:
    """Write the run's state after ``epochs_done`` epochs to ``checkpoint``, atomically."""
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(
        {
            "config": state.model.config.to_dict(),
            "state": state.model.state_dict(),
            "optimizer": state.opt.state_dict(),
            "scheduler": state.sched.state_dict(),
            "epoch": epochs_done,
            "history": state.history,
            "best_val": state.best,
            "best_state": state.best_state,
            "ema": state.ema,
        },
        tmp,
    )
    tmp.replace(checkpoint)  # atomic: an interrupted save never corrupts the checkpoint


def train(
    train_graphs: list[DefectGraph],
    val_graphs: list[DefectGraph],
    checkpoint: str | Path,
    config: ModelConfig | None = None,
    settings: TrainSettings | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fit the network; a checkpoint is written every epoch and an existing one is resumed.

    Args:
        train_graphs: The structures fitted.
        val_graphs: The structures validated on after each epoch (the best model is kept by them).
        checkpoint: The checkpoint file (resumed when it exists); a ``.json`` summary goes beside it.
        config: The network, for a new run that does not start from ``settings.init_from``.
        settings: Optimiser settings (default: ``TrainSettings()``).
        log: Progress messages.

    Returns:
        ``{"history": [...], "best_val": ...}``: loss, validation loss and time per epoch, and the
        best validation loss.

    Raises:
        DefectMLError: no training structures, no CUDA device, or training diverged.
    """
    s = settings or TrainSettings()
    checkpoint = _prepare(train_graphs, checkpoint, s)
    config, ck, init = _starting_point(checkpoint, config, s, log)
    state = _new_state(config, s, init)
    if ck is not None:
        _resume(state, ck, s)
    rng = random.Random(s.seed)
    for epoch in range(state.start, s.epochs):
        order = _epoch_order(rng, epoch, len(train_graphs))
        _run_epoch(state, train_graphs, val_graphs, order, epoch, s, log)
        _save_checkpoint(state, epoch + 1, checkpoint)
    summary = {"config": state.model.config.to_dict(), "history": state.history}
    checkpoint.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return {"history": state.history, "best_val": state.best}
