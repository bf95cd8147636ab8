"""What a structure costs a batched model call in memory, so batches can be filled by memory.

A graph model's memory in one energy-and-forces call grows with its graphs, not with the number of
structures: a 215-atom rocksalt cell has three times the edges and fifteen times the angles of a
zinc-blende cell of the same size (its second neighbours fall inside CHGNet's 3 Å bond graph). So a
batch counted in structures either wastes memory on small cells or runs out on large ones. Here
the cost of one structure is ``a * atoms + b * edges + c * angles`` bytes, with coefficients
measured per model (``benchmarks/batch_memory.py``, CPU): the batcher (:func:`~defectml.core.relax.
relax_batched`) admits a waiting structure while the batch's sum stays under a budget.

Models without coefficients have no estimate (``None``): their batches are counted in structures.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

#: Graph cutoffs (Å): atom graph (edges) and bond graph (angles: pairs of bonds at one atom).
CUTOFFS = {"chgnet": (6.0, 3.0)}

#: Bytes per atom, edge and angle of one more structure in a batched call (CPU), measured by
#: ``benchmarks/batch_memory.py`` (results/batch_memory.md) on CdTe and MgO vacancy cells.
COEFFICIENTS: dict[str, dict[str, float]] = {
    "chgnet": {"atom": 0.0, "edge": 52_500.0, "angle": 57_500.0},
}


def graph_counts(atoms: Atoms, family: str) -> dict[str, int]:
    """Edges (directed pairs within the atom-graph cutoff, images included) and angles.

    Angles are ordered pairs of bonds (within the bond-graph cutoff) sharing an atom: ``b (b - 1)``
    summed over atoms with ``b`` bonds.
    """
    from ase.neighborlist import neighbor_list

    atom_cut, bond_cut = CUTOFFS[family]
    edges = neighbor_list("i", atoms, atom_cut)
    bonds = np.bincount(neighbor_list("i", atoms, bond_cut), minlength=len(atoms))
    return {"edges": int(len(edges)), "angles": int((bonds * (bonds - 1)).sum())}


def structure_bytes(atoms: Atoms | dict, family: str) -> float | None:
    """Estimated memory (bytes) of one more structure in a batched call of a ``family`` model.

    Args:
        atoms: The structure, or its counts (``atoms``, ``edges``, ``angles``).
        family: The model family (``chgnet``, ...).

    Returns:
        The estimate, or ``None`` where no coefficients were measured for the family.
    """
    k = COEFFICIENTS.get(family)
    if k is None:
        return None
    counts = atoms if isinstance(atoms, dict) else {"atoms": len(atoms), **graph_counts(atoms, family)}
    return k["atom"] * counts["atoms"] + k["edge"] * counts["edges"] + k["angle"] * counts["angles"]
