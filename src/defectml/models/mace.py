"""MACE ``.model`` files (``pip install mace-torch`` in its own environment: it pins e3nn 0.4.4)."""

from __future__ import annotations

from pymatgen.core import Element

from defectml.errors import ModelError
from defectml.models.model import Model
from defectml.models.ref import ModelRef


def load(ref: ModelRef) -> Model:
    """Load a MACE model file (float32, as MACE recommends for MD and relaxations)."""
    try:
        from mace.calculators import MACECalculator
    except ImportError:
        raise ModelError("a MACE model file needs mace-torch: pip install mace-torch") from None
    kwargs = {"head": ref.head} if ref.head else {}
    try:
        calc = MACECalculator(model_paths=str(ref.weights_path), device=ref.device,
                              default_dtype="float32", **kwargs)
    except Exception as exc:  # noqa: BLE001 - report any load failure clearly
        raise ModelError(f"cannot load MACE model {ref.weights_path}: {exc}") from None
    z = getattr(calc.models[0], "atomic_numbers", None)
    elements = frozenset(Element.from_Z(int(i)).symbol for i in z) if z is not None else None
    return Model(ref.label, f"mace model {ref.label}", calc, ref, elements, card=ref.card)
