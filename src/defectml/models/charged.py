"""A charge-aware CHGNet: the supercell's total charge as a global input.

The multi-fidelity charged-defect paper's recipe on CHGNet's architecture (nothing else of it
changes):

* a charge embedding: ``q · w`` (one learned vector ``w`` of CHGNet's atom-feature width) added
  to every atom's initial features, so message passing sees the cell's charge;
* a geometry-independent charge energy: ``q · mean_i a(Z_i) + q² · mean_i b(Z_i)`` per cell,
  with ``a`` and ``b`` learned per element. A charged cell's DFT total energy carries terms in
  ``q`` (the electrons' reference: the host's band edges) and ``q²`` (the compensating
  background) that depend on the host, not on the geometry; the mean over the cell's atoms makes
  them a property of the host's composition.

Valid at the training cells' size. The charge energy does not depend on the cell size, while a
charged supercell's DFT energy carries the spurious image-charge energy ``−q² α / 2εL``, which
goes as 1/L (L: the cube root of the cell volume). Fitted to uncorrected DFT energies, the q²
term absorbs that energy at the size of the training cells, so the model predicts the
uncorrected energy of a cell *of that size*, and ``levels``' point-charge correction (``+q² α /
2εL`` of the search's supercell) then removes it correctly. On a supercell of another size the
model still carries the training cells' image energy and the corrected energy is off by about
``q² α / 2ε · (1/L − 1/L_train)`` (eV; 0.1-0.5 eV for q = ±2 between 64- and 216-atom cells of
a common semiconductor). The fine-tune's card records the training cells' sizes
(``training_cells``: :func:`training_cells`) and ``levels`` warns when the search's supercell is
not one of them (:func:`cell_size_warning`), or when the card does not say.

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
#: Relative difference in cell size beyond which a supercell is not one of the training cells'
#: size (5% of L is 5% of the image-charge energy; lattice constants of one host differ by 1-2%
#: between functionals and models).
CELL_SIZE_TOLERANCE = 0.05


def charge_of(atoms) -> int:
    """The total charge an ASE ``Atoms`` carries in ``info["charge"]`` (0 when absent)."""
    q = atoms.info.get("charge", 0) if hasattr(atoms, "info") else 0
    return int(round(float(q)))


def cell_size(cell) -> float:
    """A cell's size L (Å): the cube root of its volume, the length image-charge energies go as 1/L of."""
    return float(abs(np.linalg.det(np.asarray(cell, dtype=float)))) ** (1.0 / 3.0)


def training_cells(frames) -> dict | None:
    """The sizes of the cells a charge-aware model learns its charge terms on, for its card.

    Args:
        frames: The training frames (ASE ``Atoms`` with ``info["charge"]``).

    Returns:
        ``{"size_A": [min, max], "atoms": [min, max], "charged_frames": n}`` of the charged frames
        (of all frames when none is charged; ``charged_frames`` is then 0), or ``None`` for no
        frames.
    """
    frames = list(frames)
    if not frames:
        return None
    charged = [f for f in frames if charge_of(f) != 0]
    cells = charged or frames
    sizes = [cell_size(f.cell) for f in cells]
    atoms = [len(f) for f in cells]
    return {"size_A": [round(min(sizes), 3), round(max(sizes), 3)], "atoms": [min(atoms), max(atoms)],
            "charged_frames": len(charged)}


def has_charge_input(family: str, card: dict | None, version: str | None = None) -> bool | None:
    """Whether a model reads the cell charge.

    Args:
        family: The model's family (:class:`~defectml.models.ref.ModelRef`).
        card: Its model card, if any (``charge_aware``).
        version: Its version string as stored with each result (a charge-aware CHGNet's says so).

    Returns:
        ``True`` or ``False``; ``None`` for a user calculator (what it reads cannot be known).
    """
    if family == "calculator":
        return None
    return bool((card or {}).get("charge_aware")) or "charge-aware" in (version or "")


def cell_size_warning(label: str, card: dict | None, size: float,
                      correction: tuple[int, float] | None = None,
                      tolerance: float = CELL_SIZE_TOLERANCE) -> str | None:
    """One line when a charge-aware model is used on a supercell of another size than its training cells.

    Args:
        label: The model's name.
        card: Its model card (``training_cells``, :func:`training_cells`).
        size: The supercell's size L (Å, :func:`cell_size`).
        correction: ``(q, point-charge correction of this supercell in eV)`` of its most charged
            state, for an estimate of the error (the correction scaled as 1/L to the training size).
        tolerance: Relative difference in L still counted as the training size.

    Returns:
        The warning, or ``None`` when ``size`` lies within ``tolerance`` of the training cells' sizes.
    """
    cells = (card or {}).get("training_cells") or {}
    if not cells.get("size_A"):
        whose = f"{label}'s card does not record" if card else f"no model card beside {label} records"
        return (f"{whose} the size of its training cells: its q² charge energy holds their image-charge "
                f"energy (∝ 1/L), so it is valid only on cells of that size; check that this supercell "
                f"(L = {size:.2f} Å) is one")
    lo, hi = (float(x) for x in cells["size_A"])
    if lo * (1 - tolerance) <= size <= hi * (1 + tolerance):
        return None
    trained = lo if size < lo else hi
    line = (f"{label} learned its charge energy on cells of L = {lo:.2f}-{hi:.2f} Å and this supercell has "
            f"L = {size:.2f} Å: its q² term holds the training cells' image-charge energy (∝ 1/L), not this "
            f"cell's, so the corrected charged energies are off")
    if correction is not None and correction[0]:
        q, corr = correction
        line += f" (about {corr * (1 - size / trained):+.2f} eV at q = {q:+d})"
    return line + "; search with a supercell of the training size"


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
