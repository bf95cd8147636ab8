"""Models: every interatomic potential behind one interface, named by a content-keyed reference.

Built-in names (weights inside the installed wheels; nothing is downloaded at run time):

* ``chgnet`` (default): CHGNet 0.3.0; ``chgnet-0.2.0``; ``chgnet-r2scan`` (r2SCAN transfer-learned);
* ``sevennet-0``, ``sevennet-l3i5``, ``sevennet-mf-0`` (modals PBE, R2SCAN: ``sevennet-mf-0@R2SCAN``),
  with ``pip install defectml[sevennet]``;
* ``emt``: ASE's effective-medium potential (for tests and demos).

Files: a CHGNet ``.pth.tar`` checkpoint, a SevenNet ``.pth`` checkpoint or a MACE ``.model``
(fine-tuned ones included), with an optional model card beside them; see :mod:`.ref`.
One module per family loads it; any ASE calculator can be passed to the Python API instead.
"""

from __future__ import annotations

from defectml.models.model import Model, set_threads, wrap_calculator
from defectml.models.ref import BUILTIN_MODELS, BUILTINS, ModelRef, check_key, parse_model

__all__ = [
    "BUILTINS", "BUILTIN_MODELS", "Model", "ModelRef", "check_key", "load_model", "parse_model",
    "set_threads", "wrap_calculator",
]


def load_model(name: str | ModelRef = "chgnet", device: str = "cpu", threads: int | None = None) -> Model:
    """Load a model by built-in name, weights file or :class:`ModelRef`.

    Args:
        name: A built-in name (:data:`BUILTIN_MODELS`), a weights file (``[family:]PATH``),
            either with ``@HEAD``, or a :class:`ModelRef`.
        device: ``cpu`` or ``cuda``.
        threads: Torch threads (default: the cores this process may use).

    Raises:
        ModelError: unknown name, missing optional package, or unreadable model file.
    """
    ref = parse_model(name, device)
    if ref.family == "emt":
        from defectml.models import emt

        return emt.load(ref)
    set_threads(threads, device)
    if ref.family == "chgnet":
        from defectml.models import chgnet as family
    elif ref.family == "sevennet":
        from defectml.models import sevennet as family
    else:
        from defectml.models import mace as family
    return family.load(ref)
