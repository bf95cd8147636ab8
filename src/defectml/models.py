"""The model registry: one small interface in front of every interatomic potential.

Built-in names:

* ``chgnet`` (default): CHGNet 0.3.0, weights shipped inside the ``chgnet`` wheel;
* ``chgnet-0.2.0``: the earlier CHGNet weights, also in the wheel;
* ``sevennet-0`` and ``sevennet-mf-0``: SevenNet checkpoints shipped inside the ``sevenn`` wheel
  (``pip install defectml[sevennet]``);
* ``emt``: ASE's effective-medium potential (Al, Cu, Ag, Au, Ni, Pd, Pt; for tests and demos);
* a path to a ``.model`` file: a MACE model (``pip install mace-torch`` in its own environment).

Nothing is downloaded at run time. Any ASE calculator can be passed to the Python API instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from pymatgen.core import Element

from defectml.errors import ModelError

BUILTIN_MODELS = ("chgnet", "chgnet-0.2.0", "sevennet-0", "sevennet-mf-0", "emt")


@dataclass
class Model:
    """A loaded interatomic potential.

    Attributes:
        name: Registry name (or the calculator's class name for a user calculator).
        version: Code and weights version, stored with every result.
        calculator: The ASE calculator.
        elements: Element symbols the model covers (``None``: unknown, not checked).
        charge_aware: Whether the model takes the cell charge as an input.
        batch_fn: Energies and forces of a list of structures in one model call, if the model
            supports batching (CHGNet does).
    """

    name: str
    version: str
    calculator: Calculator
    elements: frozenset[str] | None = None
    charge_aware: bool = False
    batch_fn: Callable[[list[Atoms]], list[tuple[float, np.ndarray]]] | None = None

    def batch(self) -> Callable[[list[Atoms]], list[tuple[float, np.ndarray]]]:
        """Energies and forces of many structures in one call (batched where the model can)."""
        from defectml.relax import calculator_batch_fn

        return self.batch_fn or calculator_batch_fn(self.calculator)

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


def set_threads(threads: int | None = None) -> int:
    """Pin torch's intra-op threads (the default collapses under load); return the count."""
    import torch

    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def _elements_up_to(z_max: int) -> frozenset[str]:
    return frozenset(Element.from_Z(z).symbol for z in range(1, z_max + 1))


def _chgnet(device: str, weights: str = "0.3.0") -> Model:
    import chgnet
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    class ForcesOnlyCHGNetCalculator(CHGNetCalculator):
        """CHGNet without the stress (a second backward pass) unless stress is asked for.

        The stock calculator always predicts energy, forces, stress and magmoms; a fixed-cell
        relaxation needs only energy and forces.
        """

        def calculate(self, atoms=None, properties=None, system_changes=None, task=None):
            props = properties or ["energy", "forces"]
            task = task or ("efs" if "stress" in props else "ef")
            super().calculate(atoms, props, system_changes, task=task)

    with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints on load
        model = CHGNet.load(model_name=weights, use_device=device, verbose=False)
        calc = ForcesOnlyCHGNetCalculator(model=model, use_device=device,
                                          on_isolated_atoms="ignore")
    n_elements = model.atom_embedding.embedding.num_embeddings
    version = f"chgnet {chgnet.__version__}, weights {model.version}"
    name = "chgnet" if weights == "0.3.0" else f"chgnet-{weights}"
    return Model(name, version, calc, _elements_up_to(n_elements), batch_fn=_chgnet_batch(model))


def _chgnet_batch(model):
    """CHGNet's batched prediction: all structures' graphs in one forward pass."""
    from pymatgen.io.ase import AseAtomsAdaptor

    def evaluate(structures: list[Atoms]) -> list[tuple[float, np.ndarray]]:
        pmg = [AseAtomsAdaptor.get_structure(a) for a in structures]
        preds = model.predict_structure(pmg, task="ef", batch_size=len(pmg))
        preds = preds if isinstance(preds, list) else [preds]
        return [(float(p["e"]) * len(a), np.asarray(p["f"], dtype=float))
                for p, a in zip(preds, structures, strict=True)]

    return evaluate


def _sevennet(name: str, device: str) -> Model:
    try:
        import sevenn
        from sevenn.calculator import SevenNetCalculator
    except ImportError:
        raise ModelError(f"model {name} needs sevenn: pip install 'defectml[sevennet]'") from None
    key, kwargs = ("7net-0", {}) if name == "sevennet-0" else ("7net-mf-0", {"modal": "PBE"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = SevenNetCalculator(key, device=device, **kwargs)
    elements = frozenset(Element.from_Z(int(z)).symbol for z in calc.type_map)  # keys are Z
    return Model(name, f"sevenn {sevenn.__version__}, {key}", calc, elements)


def _emt() -> Model:
    import ase
    from ase.calculators.emt import EMT, parameters

    return Model("emt", f"ase {ase.__version__} EMT", EMT(), frozenset(parameters))


def _mace(path: Path, device: str) -> Model:
    try:
        from mace.calculators import MACECalculator
    except ImportError:
        raise ModelError("a MACE model file needs mace-torch: pip install mace-torch") from None
    try:
        calc = MACECalculator(model_paths=str(path), device=device, default_dtype="float32")
    except Exception as exc:  # noqa: BLE001 - report any load failure clearly
        raise ModelError(f"cannot load MACE model {path}: {exc}") from None
    z = getattr(calc.models[0], "atomic_numbers", None)
    elements = frozenset(Element.from_Z(int(i)).symbol for i in z) if z is not None else None
    return Model(f"mace:{path.name}", f"mace model {path.name}", calc, elements)


def load_model(name: str = "chgnet", device: str = "cpu", threads: int | None = None) -> Model:
    """Load a model by registry name or MACE model path.

    Args:
        name: One of :data:`BUILTIN_MODELS` or a path to a MACE ``.model`` file.
        device: ``cpu`` or ``cuda``.
        threads: Torch threads (default: the cores this process may use).

    Raises:
        ModelError: unknown name, missing optional package, or unreadable model file.
    """
    key = name.lower()
    if key in BUILTIN_MODELS:
        if key != "emt":
            set_threads(threads)
        if key.startswith("chgnet"):
            return _chgnet(device, "0.3.0" if key == "chgnet" else key.split("-", 1)[1])
        if key == "emt":
            return _emt()
        return _sevennet(key, device)
    path = Path(name)
    if path.suffix == ".model" or path.exists():
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        set_threads(threads)
        return _mace(path, device)
    raise ModelError(f"unknown model {name!r}: use one of {', '.join(BUILTIN_MODELS)} or a .model path")


def wrap_calculator(calculator: Calculator, name: str | None = None) -> Model:
    """Wrap a user's ASE calculator as a :class:`Model` (elements not checked)."""
    label = name or type(calculator).__name__
    return Model(label, f"user calculator {type(calculator).__module__}.{label}", calculator)
