"""A charge-aware CHGNet: the supercell's total charge as a global input.

The multi-fidelity charged-defect paper's recipe on CHGNet's architecture (nothing else of it
changes):

* a charge embedding: ``q · w`` (one learned vector ``w`` of CHGNet's atom-feature width) added
  to every atom's initial features, so message passing sees the cell's charge;
* a geometry-independent charge energy: ``q · mean_i a(Z_i) + q² · mean_i b(Z_i)`` per cell,
  with ``a`` and ``b`` learned per element. A charged cell's DFT total energy carries terms in
  ``q`` (the electrons' reference: the host's band edges) and ``q²`` (the compensating
  background) that depend on the host, not on the geometry; the mean over the cell's atoms makes
  them a property of the host's composition, the same for every cell size.

Both start at zero, so a fresh charge-aware model is the base model exactly at every charge
(and stays so at q = 0 whatever it learns: both terms vanish there).

The charge travels with the structure: ``atoms.info["charge"]`` (ASE's convention for a total
charge) for the calculator and the batched prediction, a :class:`ChargedGraph` in training.
"""

from __future__ import annotations

from functools import cache

import numpy as np

#: State-dict keys that only a charge-aware CHGNet has.
CHARGE_KEYS = ("charge_embedding.weight", "charge_energy.weight")


def charge_of(atoms) -> int:
    """The total charge an ASE ``Atoms`` carries in ``info["charge"]`` (0 when absent)."""
    q = atoms.info.get("charge", 0) if hasattr(atoms, "info") else 0
    return int(round(float(q)))


@cache
def _classes():
    """The torch classes, built on first use (torch and chgnet load lazily)."""
    import torch
    from chgnet.graph.crystalgraph import CrystalGraph
    from chgnet.model import CHGNet
    from torch import nn

    class ChargedGraph(CrystalGraph):
        """CHGNet's crystal graph with the cell's total charge (kept when moved to a device)."""

        charge: float = 0.0

        @classmethod
        def of(cls, graph: CrystalGraph, charge: float) -> ChargedGraph:
            out = cls.__new__(cls)
            out.__dict__.update(graph.__dict__)
            out.charge = float(charge)
            return out

        def to(self, device: str = "cpu") -> ChargedGraph:
            return ChargedGraph.of(super().to(device), self.charge)

    class ChargedCHGNet(CHGNet):
        """CHGNet with a charge embedding and a charge energy term (see the module)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            emb = self.atom_embedding.embedding
            self.charge_embedding = nn.Linear(1, emb.embedding_dim, bias=False)
            self.charge_energy = nn.Embedding(emb.num_embeddings, 2)
            with torch.no_grad():
                self.charge_embedding.weight.zero_()
                self.charge_energy.weight.zero_()
            #: The charge of graphs that carry none (set per call by the calculator).
            self.default_charge = 0.0
            self._atom_charges = None
            self.atom_embedding.register_forward_hook(self._add_charge)

        def _add_charge(self, module, inputs, output):
            if self._atom_charges is None:
                return output
            return output + self.charge_embedding(self._atom_charges.to(output.dtype)[:, None])

        @classmethod
        def from_base(cls, base: CHGNet) -> ChargedCHGNet:
            """A charge-aware copy of a plain CHGNet (same weights; charge terms at zero)."""
            model = cls(**base.model_args)
            missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
            if unexpected or set(missing) != set(CHARGE_KEYS):
                raise RuntimeError(f"cannot extend this CHGNet: missing {missing}, unexpected {unexpected}")
            return model.to(next(base.parameters()).device)

        def forward(self, graphs, *, task="e", **kwargs):
            dev = graphs[0].atomic_number.device
            q = torch.tensor([float(getattr(g, "charge", self.default_charge)) for g in graphs],
                             dtype=torch.float32, device=dev)
            counts = torch.tensor([len(g.atomic_number) for g in graphs], device=dev)
            self._atom_charges = torch.repeat_interleave(q, counts)
            try:
                prediction = super().forward(graphs, task=task, **kwargs)
            finally:
                self._atom_charges = None
            prediction["e"] = prediction["e"] + self.charge_energies(graphs, q, counts)
            return prediction

        def charge_energies(self, graphs, q, counts):
            """The charge energy term of each graph (eV per atom if the model is intensive)."""
            z = torch.cat([g.atomic_number for g in graphs]) - 1
            owners = torch.repeat_interleave(torch.arange(len(graphs), device=q.device), counts)
            per_atom = self.charge_energy(z)  # (atoms, 2)
            mean = torch.zeros(len(graphs), 2, device=q.device).index_add_(0, owners, per_atom)
            mean = mean / counts[:, None]
            energy = q * mean[:, 0] + q * q * mean[:, 1]
            return energy / counts if self.is_intensive else energy

        def as_dict(self) -> dict:
            return {"state_dict": self.state_dict(), "model_args": self.model_args, "charge_aware": True}

    return ChargedGraph, ChargedCHGNet


def charged_graph_class():
    """:class:`ChargedGraph`: a CHGNet ``CrystalGraph`` carrying the cell's charge."""
    return _classes()[0]


def charged_chgnet_class():
    """:class:`ChargedCHGNet`: CHGNet with the charge embedding and energy term."""
    return _classes()[1]


def is_charged_state(state_dict: dict) -> bool:
    """Whether a CHGNet state dict holds the charge terms."""
    return all(k in state_dict for k in CHARGE_KEYS)


def with_charges(graphs, charges) -> list:
    """Graphs tagged with their cells' charges."""
    cls = charged_graph_class()
    return [cls.of(g, q) for g, q in zip(graphs, charges, strict=True)]


def charge_terms(model) -> dict:
    """The learned charge terms of a charge-aware CHGNet, for a card: their sizes."""
    w = model.charge_embedding.weight.detach().cpu().numpy()
    e = model.charge_energy.weight.detach().cpu().numpy()
    used = np.abs(e).sum(axis=1) > 0
    return {"embedding_norm": round(float(np.linalg.norm(w)), 6),
            "energy_elements": int(used.sum())}
