"""CHGNet: the built-in weights (0.3.0, 0.2.0, r2scan) and ``.pth.tar`` checkpoint files."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from ase import Atoms

from defectml.errors import ModelError
from defectml.models.model import Model, elements_up_to
from defectml.models.ref import ModelRef


def load(ref: ModelRef) -> Model:
    """Load CHGNet weights (built-in or a checkpoint such as chgnet's Trainer writes)."""
    import warnings

    import chgnet
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    # chgnet's own UserWarnings (a tensor converted to a scalar on every call) say nothing to a
    # user of defectml's API; only chgnet's are silenced, nothing else of the process
    warnings.filterwarnings("ignore", category=UserWarning, module=r"chgnet(\.|$)")

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
        if ref.builtin is not None:
            model = CHGNet.load(model_name=ref.builtin.weights, use_device=ref.device, verbose=False)
        else:
            try:  # the file's model_args carry everything (0.2.0's output bias included)
                model = CHGNet.from_file(str(ref.weights_path))
            except Exception as exc:  # noqa: BLE001 - torch/pickle/key errors of a bad file
                raise ModelError(
                    f"cannot load {ref.weights_path} as a CHGNet checkpoint ({type(exc).__name__}: "
                    f"{exc}); another family? name it sevennet:PATH or mace:PATH"
                ) from None
            model = model.to(ref.device)
        calc = ForcesOnlyCHGNetCalculator(model=model, use_device=ref.device,
                                          on_isolated_atoms="ignore")
    n_elements = model.atom_embedding.embedding.num_embeddings
    weights = ref.builtin.weights if ref.builtin else f"file {ref.label}"
    version = f"chgnet {chgnet.__version__}, weights {weights}"
    card = ref.card
    return Model(ref.label, version, calc, ref, elements_up_to(n_elements), batch_fn=batch_fn(model),
                 charge_aware=bool(card and card.get("charge_aware")), card=card)


def batch_fn(model):
    """CHGNet's batched prediction: all structures' graphs in one forward pass."""
    from pymatgen.io.ase import AseAtomsAdaptor

    def evaluate(structures: list[Atoms]) -> list[tuple[float, np.ndarray]]:
        pmg = [AseAtomsAdaptor.get_structure(a) for a in structures]
        preds = model.predict_structure(pmg, task="ef", batch_size=len(pmg))
        preds = preds if isinstance(preds, list) else [preds]
        return [(float(p["e"]) * len(a), np.asarray(p["f"], dtype=float))
                for p, a in zip(preds, structures, strict=True)]

    return evaluate
