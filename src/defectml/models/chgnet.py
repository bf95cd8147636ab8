"""CHGNet: the built-in weights (0.3.0, 0.2.0, r2scan) and ``.pth.tar`` checkpoint files."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from ase import Atoms

from defectml.errors import ModelError
from defectml.models.charged import charge_of
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

        def check_state(self, atoms, tol=1e-15):
            # a charge-aware model's results depend on the cell's charge too
            changes = super().check_state(atoms, tol)
            if self.atoms is not None and charge_of(atoms) != charge_of(self.atoms):
                changes = [*changes, "charge"]
            return changes

        def calculate(self, atoms=None, properties=None, system_changes=None, task=None):
            props = properties or ["energy", "forces"]
            task = task or ("efs" if "stress" in props else "ef")
            if hasattr(self.model, "default_charge"):
                self.model.default_charge = float(charge_of(atoms if atoms is not None else self.atoms))
            super().calculate(atoms, props, system_changes, task=task)

    with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints on load
        if ref.builtin is not None:
            model = CHGNet.load(model_name=ref.builtin.weights, use_device=ref.device, verbose=False)
        else:
            try:  # the file's model_args carry everything (0.2.0's output bias included)
                model = _from_file(str(ref.weights_path))
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
    aware = hasattr(model, "charge_embedding")
    version = f"chgnet {chgnet.__version__}{' charge-aware' if aware else ''}, weights {weights}"
    card = ref.card
    return Model(ref.label, version, calc, ref, elements_up_to(n_elements), batch_fn=batch_fn(model),
                 charge_aware=aware, card=card)


def charge_aware_copy(model: Model) -> Model:
    """A charge-aware copy of a loaded CHGNet :class:`Model` (the charge terms start at zero).

    It predicts exactly what ``model`` predicts, at every charge, until trained.
    """
    import contextlib
    import io

    from defectml.models.charged import charged_chgnet_class

    charged = charged_chgnet_class().from_base(model.calculator.model)
    calc_cls = type(model.calculator)
    with contextlib.redirect_stdout(io.StringIO()):
        calc = calc_cls(model=charged, use_device=model.ref.device, on_isolated_atoms="ignore")
    return Model(model.name, model.version + " + zero charge terms", calc, model.ref, model.elements,
                 charge_aware=True, batch_fn=batch_fn(charged), card=model.card)


def _from_file(path: str):
    """A CHGNet checkpoint: a plain CHGNet, or a charge-aware one where it holds the charge terms."""
    import torch
    from chgnet.model import CHGNet

    from defectml.models.charged import charged_chgnet_class, is_charged_state

    state = torch.load(path, map_location=torch.device("cpu"), weights_only=False)
    cls = charged_chgnet_class() if is_charged_state(state["model"]["state_dict"]) else CHGNet
    return cls.from_dict(state["model"])


def batch_fn(model, skin: float | None = None):
    """CHGNet's batched prediction: all structures' graphs in one forward pass.

    A charge-aware model reads each structure's charge from ``info["charge"]``.

    Args:
        model: A CHGNet (or charge-aware CHGNet) model.
        skin: The graphs come from :class:`~defectml.models.chgnet_graph.SkinGraphConverter`
            with this neighbour-list skin (Å): straight from the ``Atoms``, the neighbour list
            kept per batch slot and rebuilt only when atoms moved more than the skin (~1.2-1.4x
            faster batched steps, benchmarks/results/search_speed.md). ``None`` (the default):
            CHGNet's own converter on a pymatgen ``Structure`` of every structure on every call.
            The graphs are the same up to the order of edges, so the results agree to float32
            round-off; but with the skin graphs two identical structures in one batch can differ
            by one float32 rounding step of the energy (3.6e-6 eV in a 15-atom cell with a
            fine-tuned model, tests/test_charge_aware.py), where CHGNet's own edge order gives
            them equal. Until that is understood the skin graphs are opt-in.
    """
    from pymatgen.io.ase import AseAtomsAdaptor

    from defectml.models.charged import with_charges
    from defectml.models.chgnet_graph import SkinGraphConverter

    skinned = SkinGraphConverter(model.graph_converter, skin=skin) if skin is not None else None

    def graphs_of(structures: list[Atoms]) -> list:
        if skinned is not None and all(np.all(a.pbc) for a in structures):
            return skinned(structures)
        return [model.graph_converter(AseAtomsAdaptor.get_structure(a)) for a in structures]

    def evaluate(structures: list[Atoms]) -> list[tuple[float, np.ndarray]]:
        graphs = graphs_of(structures)
        if hasattr(model, "charge_embedding"):
            graphs = with_charges(graphs, [charge_of(a) for a in structures])
        preds = model.predict_graph(graphs, task="ef", batch_size=len(graphs))
        preds = preds if isinstance(preds, list) else [preds]
        return [(float(p["e"]) * len(a), np.asarray(p["f"], dtype=float))
                for p, a in zip(preds, structures, strict=True)]

    evaluate.converter = skinned  # its counters (skin lists and topologies built) for benchmarks
    return evaluate
