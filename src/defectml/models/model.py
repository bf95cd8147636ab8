"""A loaded interatomic potential: one small interface in front of every family."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from pymatgen.core import Element

from defectml.errors import ModelError
from defectml.models.ref import BUILTIN_MODELS, ModelRef

BatchFn = Callable[[list[Atoms]], list[tuple[float, np.ndarray]]]


def calculator_batch_fn(calculator: Calculator) -> BatchFn:
    """A batch function that evaluates structures one by one with an ASE calculator.

    The forces are the calculator's own, before any constraint of the atoms (as a batched model
    gives them): the relaxer applies the constraints (:func:`~defectml.core.relax.constrained_forces`).
    """

    def evaluate(structures: list[Atoms]) -> list[tuple[float, np.ndarray]]:
        out = []
        for a in structures:
            a = a.copy()
            a.calc = calculator
            out.append((float(a.get_potential_energy()), np.array(a.get_forces(apply_constraint=False))))
        return out

    return evaluate


@dataclass
class Model:
    """A loaded interatomic potential.

    Attributes:
        name: For people: the built-in name, the weights file's name, or the calculator's class.
        version: Code and weights version, stored with every result.
        calculator: The ASE calculator.
        ref: What was loaded (family, weights, head); ``ref.key`` identifies it by content.
        elements: Element symbols the model covers (``None``: unknown, not checked).
        charge_aware: Whether the model takes the cell charge as an input.
        batch_fn: Energies and forces of a list of structures in one model call, if the model
            supports batching (CHGNet does).
        card: The model card read beside a weights file, if any.
    """

    name: str
    version: str
    calculator: Calculator
    ref: ModelRef
    elements: frozenset[str] | None = None
    charge_aware: bool = False
    batch_fn: Callable[[list[Atoms]], list[tuple[float, np.ndarray]]] | None = None
    card: dict | None = None

    @property
    def key(self) -> str:
        """The content key of the weights (see :class:`ModelRef`)."""
        return self.ref.key

    def batch(self) -> Callable[[list[Atoms]], list[tuple[float, np.ndarray]]]:
        """Energies and forces of many structures in one call (batched where the model can)."""
        return self.batch_fn or calculator_batch_fn(self.calculator)

    def memory(self, atoms: Atoms) -> float | None:
        """Estimated memory (bytes) of ``atoms`` in a batched call (:mod:`defectml.models.memory`).

        ``None`` where the model has no batched call or its family no measured coefficients.
        """
        if self.batch_fn is None:
            return None
        from defectml.models.memory import structure_bytes

        return structure_bytes(atoms, self.ref.family)

    def check_elements(self, elements) -> None:
        """Raise ``ModelError`` if the model does not cover every element in ``elements``."""
        if self.elements is None:
            return
        missing = sorted(set(elements) - self.elements)
        if missing:
            raise ModelError(
                f"model {self.name} does not cover element(s) {', '.join(missing)}; "
                f"choose another model (--model), built-in: {', '.join(BUILTIN_MODELS)}"
            )


def busy_cores() -> float:
    """Cores other processes keep busy now (the 1-minute load average; 0 where unknown)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0


def default_threads(workers: int = 1) -> int:
    """Torch threads per worker that do not oversubscribe the CPU.

    The cores this process may use that others leave free, shared among ``workers``, at least
    one. Oversubscribed, torch's threads spin against each other: 4.5 s per FIRE step instead of 0.25 s
    was seen on a loaded 2-core machine with all cores asked for (benchmarks/threads.py measures it).
    """
    cores = len(os.sched_getaffinity(0))
    # a job that keeps a core busy shows ~1 in the 1-minute average after a minute; a finished
    # one's residue (0.6-0.7 seen right after a 20 s job) must not cost this run a core
    busy = int(busy_cores() + 0.2)
    free = max(1, min(cores, cores - busy))
    return max(1, free // max(1, workers))


def set_threads(threads: int | None = None, device: str = "cpu") -> int:
    """Pin torch's intra-op threads (the default collapses under load); return the count.

    On CPU it also asks torch for deterministic algorithms (warning, not failing, where an op
    has none), so that a search repeats bit for bit on one machine with the same thread count.
    On CUDA it does not: deterministic scatter kernels are slower there and need
    ``CUBLAS_WORKSPACE_CONFIG``; GPU runs may differ in the last bits run to run.
    """
    import torch

    n = threads or default_threads()
    torch.set_num_threads(max(1, n))
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.get_num_threads()


def elements_up_to(z_max: int) -> frozenset[str]:
    """Symbols of elements 1..``z_max``."""
    return frozenset(Element.from_Z(z).symbol for z in range(1, z_max + 1))


def calculator_id(calculator: Calculator) -> str:
    """What can be known of a user's calculator: its class and its parameters."""
    cls = type(calculator)
    try:
        params = calculator.todict()
    except Exception:  # noqa: BLE001 - any calculator may lack todict
        params = {}
    return f"{cls.__module__}.{cls.__qualname__} {sorted((k, repr(v)) for k, v in params.items())}"


def wrap_calculator(calculator: Calculator, name: str | None = None) -> Model:
    """Wrap a user's ASE calculator as a :class:`Model` (elements not checked).

    Its key comes from the calculator's class and parameters: defectml cannot hash weights it
    does not load, so a user calculator whose weights change under the same parameters keeps
    its key. Pass a weights file (``--model PATH``) for a model keyed by content.
    """
    label = name or type(calculator).__name__
    ref = ModelRef("calculator", label, calculator_id=calculator_id(calculator))
    return Model(label, f"user calculator {type(calculator).__module__}.{label}", calculator, ref)
