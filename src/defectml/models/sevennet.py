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
    return Model(ref.label, version, calc, ref, elements, batch_fn=batch_fn(calc),
                 charge_aware=bool(card and card.get("charge_aware")), card=card)


def batch_fn(calc):
    """SevenNet's batched forward pass (its model's batch mode, as sevenn's own inference uses).

    Equal to the calculator one structure at a time up to float32 summation order (~1e-4 eV in
    total energies of ~100 atoms, ~1e-7 eV/Å in forces).
    """
    import numpy as np
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph
    from torch_geometric.data import Batch

    def evaluate(structures):
        graphs = []
        for atoms in structures:
            g = AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, calc.cutoff, with_shift=False))
            if calc.modal:
                g[KEY.DATA_MODALITY] = calc.modal
            graphs.append(g)
        batch = Batch.from_data_list(graphs).to(calc.device)
        calc.model.set_is_batch_data(True)
        try:
            out = calc.model(batch)
        finally:
            calc.model.set_is_batch_data(False)  # the calculator runs one structure at a time
        energies = out[KEY.PRED_TOTAL_ENERGY].detach().cpu().numpy().reshape(-1)
        forces = out[KEY.PRED_FORCE].detach().cpu().numpy().astype(float)
        owner = batch.batch.cpu().numpy()
        return [(float(energies[i]), np.array(forces[owner == i])) for i in range(len(structures))]

    return evaluate
