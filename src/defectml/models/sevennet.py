"""SevenNet: the checkpoints inside the sevenn wheel and ``.pth`` checkpoint files, with modals."""

from __future__ import annotations

import warnings

from pymatgen.core import Element

from defectml.errors import ModelError
from defectml.models.model import Model
from defectml.models.ref import ModelRef


def load(ref: ModelRef) -> Model:
    """Load a SevenNet checkpoint; ``ref.head`` is the modal of a multi-fidelity model."""
    try:
        import sevenn
        from sevenn.calculator import SevenNetCalculator
    except ImportError:
        raise ModelError(f"model {ref.label} needs sevenn: pip install 'defectml[sevennet]'") from None
    kwargs = {"modal": ref.head} if ref.head else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calc = SevenNetCalculator(str(ref.weights_path), device=ref.device, **kwargs)
    except Exception as exc:  # noqa: BLE001 - sevenn raises many kinds for a bad file or modal
        raise ModelError(f"cannot load {ref.label} as a SevenNet checkpoint: {exc}") from None
    elements = frozenset(Element.from_Z(int(z)).symbol for z in calc.type_map)  # keys are Z
    name = ref.builtin.weights if ref.builtin else f"file {ref.label}"
    card = ref.card
    version = f"sevenn {sevenn.__version__}, {name}" + (f", modal {ref.head}" if ref.head else "")
    return Model(ref.label, version, calc, ref, elements,
                 charge_aware=bool(card and card.get("charge_aware")), card=card)
