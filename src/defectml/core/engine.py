"""Where relaxations run: in this process, in a local process pool, or on a Dask cluster.

Every executor takes the same input — a list of :class:`Job` (structure + how to relax it) —
and yields ``(job, Relaxation)`` pairs *as they finish*, in any order, so the caller writes each
result to the store at once. Only the main process writes to the store: workers never touch it,
so SQLite needs no concurrent-writer handling and a lost worker loses no stored result.

Workers load the model themselves (from its :class:`~defectml.models.ModelRef`, once per worker
process) rather than receiving it, which keeps tasks small; a user's ASE calculator object is
pickled to them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator

from defectml.core.optimizers import DEFAULT_OPTIMIZER
from defectml.core.relax import Relaxation, calculator_batch_fn, relax_batched
from defectml.errors import InputError
from defectml.models import Model, ModelRef, load_model, wrap_calculator
from defectml.models.model import default_threads

EXECUTORS = ("local", "dask")


@dataclass
class ModelSpec:
    """How a worker obtains the model: a reference (or its spelling), or a calculator to unpickle."""

    name: str | ModelRef = "chgnet"
    device: str = "cpu"
    threads: int | None = None
    calculator: Calculator | None = None


@dataclass
class Job:
    """One relaxation to run; ``tag`` is returned untouched (the caller's bookkeeping)."""

    atoms: Atoms
    tag: Any = None
    watch: Any = None  # optional early-stop check, see relax.relax_one
    extra: dict = field(default_factory=dict)


_MODELS: dict[tuple, Model] = {}


def _model(spec: ModelSpec) -> Model:
    """The worker's model, loaded once per process."""
    if spec.calculator is not None:
        return wrap_calculator(spec.calculator)
    key = (spec.name, spec.device, spec.threads)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec.name, spec.device, spec.threads)
    return _MODELS[key]


def relax_batch(atoms_list: list[Atoms], spec: ModelSpec, fmax: float, max_steps: int,
                watches: list | None = None, model: Model | None = None,
                optimizer: str = DEFAULT_OPTIMIZER) -> list[Relaxation]:
    """Relax a batch in the current process (what a worker runs): one model call per step."""
    model = model or _model(spec)
    out: list[Relaxation | None] = [None] * len(atoms_list)
    for i, r in relax_batched(atoms_list, model.batch(), fmax=fmax, max_steps=max_steps,
                              max_batch=len(atoms_list), watches=watches, optimizer=optimizer):
        out[i] = r
    return out


def _batches(jobs: list[Job], size: int) -> list[list[Job]]:
    size = max(1, int(size))
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def run_jobs(
    jobs: list[Job],
    spec: ModelSpec,
    *,
    fmax: float,
    max_steps: int,
    workers: int = 1,
    executor: str = "local",
    scheduler: str | None = None,
    batch_size: int | None = None,
    model: Model | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
    batch_memory: float | None = None,
) -> Iterator[tuple[Job, Relaxation]]:
    """Run ``jobs``; yield each ``(job, result)`` as soon as it is done.

    Args:
        jobs: The relaxations to run.
        spec: How workers load the model.
        fmax: Force threshold (eV/Å).
        max_steps: Step limit.
        workers: Local worker processes (``local``) or LocalCluster workers (``dask``, no
            scheduler given). 1 with ``local`` runs in this process.
        executor: ``local`` or ``dask``.
        scheduler: Address of a running Dask scheduler (``tcp://host:8786``).
        batch_size: Trials relaxed together (one model call per step for all of them); ``None``:
            one, or with ``batch_memory`` as many as fit.
        model: The already-loaded model, used when running in this process.
        optimizer: One of :data:`~defectml.core.optimizers.OPTIMIZERS`.
        batch_memory: Fill the batch (in flight: finished trials leave, waiting ones enter) while
            its estimated memory (:meth:`Model.memory <defectml.models.model.Model.memory>`,
            bytes) stays within this; one process only (``workers`` 1, ``local``).
    """
    if executor not in EXECUTORS:
        raise InputError(f"unknown executor {executor!r}: use {' or '.join(EXECUTORS)}")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if batch_memory is not None and (executor != "local" or workers != 1):
        raise InputError("--batch-memory fills the batch of one process: use it with --workers 1 "
                         "(and the local executor)")
    if not jobs:
        return
    if executor == "local" and workers == 1:
        model = model or _model(spec)
        size = batch_size or (len(jobs) if batch_memory is not None else 1)
        if batch_memory is not None and model.memory(jobs[0].atoms) is None:
            raise InputError(f"--batch-memory needs a model whose memory per structure was measured "
                             f"(chgnet; see benchmarks/batch_memory.py); {model.name} has none: use "
                             "--batch-size")
        # batch of one: the model's own calculator; several: its batched prediction
        fn = model.batch() if size > 1 or batch_memory is not None else calculator_batch_fn(model.calculator)
        for i, r in relax_batched([j.atoms for j in jobs], fn, fmax=fmax, max_steps=max_steps,
                                  max_batch=size, watches=[j.watch for j in jobs], optimizer=optimizer,
                                  max_memory=batch_memory, memory_fn=model.memory):
            yield jobs[i], r
        return
    per_worker = ModelSpec(spec.name, spec.device,
                           spec.threads or default_threads(workers),
                           spec.calculator)
    batches = _batches(jobs, batch_size or 1)
    if executor == "local":
        yield from _run_pool(batches, per_worker, fmax, max_steps, workers, optimizer)
    else:
        yield from _run_dask(batches, per_worker, fmax, max_steps, workers, scheduler, optimizer)


def _run_pool(batches, spec, fmax, max_steps, workers, optimizer):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # torch and fork do not mix
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {
            pool.submit(relax_batch, [j.atoms for j in b], spec, fmax, max_steps,
                        [j.watch for j in b], optimizer=optimizer): b
            for b in batches
        }
        for fut in as_completed(futures):
            yield from zip(futures[fut], fut.result(), strict=True)


def _run_dask(batches, spec, fmax, max_steps, workers, scheduler, optimizer):
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise InputError("the dask executor needs: pip install 'defectml[dask]'") from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        futures = {}
        for b in batches:
            fut = client.submit(relax_batch, [j.atoms for j in b], spec, fmax, max_steps,
                                [j.watch for j in b], optimizer=optimizer, pure=False, retries=2)
            futures[fut] = b
        for fut in as_completed(list(futures)):
            yield from zip(futures[fut], fut.result(), strict=True)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
