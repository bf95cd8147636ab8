"""CHGNet's crystal graphs straight from ASE ``Atoms``, with a skin (Verlet) neighbour list.

CHGNet's own :class:`~chgnet.graph.converter.CrystalGraphConverter` builds every graph from
scratch: a pymatgen ``Structure`` (converted from the ``Atoms``), a neighbour search, the graph
in C and the line graph (angles) in Python, about 15 ms for a 63-atom cell, on every step of a
relaxation. :class:`SkinGraphConverter` builds the same graph (the same atoms, edges, images and
angles; the edges in another order, which changes the model's output only by float32 round-off)
with less work per step:

* no ``Structure``: the converter needs only atomic numbers, fractional coordinates, the cell
  and the neighbour pairs, all read from the ``Atoms``;
* a skin neighbour list: the pairs within ``atom_graph_cutoff + skin`` with their image offsets,
  kept per structure (per slot of the batch), their distances recomputed each step from the
  current positions. It is rebuilt only when two atoms together have moved more than ``skin``
  since it was built (no pair outside it can then be inside the cutoff), or when the cell, the
  atoms or their number changed;
* the graph's topology (the edges within ``atom_graph_cutoff``, the angles between bonds within
  ``bond_graph_cutoff``) is rebuilt, vectorised, only when some pair crossed a cutoff; otherwise
  the last step's index tensors are reused and only the coordinates are new.

The model computes every distance and angle itself from the coordinates, the cell and the images
(with gradients): what the converter decides is only which pairs and angles take part, so a graph
with the same pairs and angles gives the same energy and forces.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

TORCH_DTYPE = torch.float32


@dataclass
class _Topology:
    """The graph's index tensors for one set of pairs within the cutoffs (immutable once made)."""

    in_atom: np.ndarray  # per skin pair: within atom_graph_cutoff
    in_bond: np.ndarray  # per skin pair: within bond_graph_cutoff (<=, a bond-graph node)
    in_bond_strict: np.ndarray  # per skin pair: < bond_graph_cutoff (the other bond of an angle)
    atom_graph: torch.Tensor
    neighbor_image: torch.Tensor
    directed2undirected: torch.Tensor
    undirected2directed: torch.Tensor
    bond_graph: torch.Tensor


@dataclass
class _Skin:
    """One structure's skin neighbour list: undirected pairs ``i -> j + image`` within the skin."""

    numbers: np.ndarray
    cell: np.ndarray
    inverse: np.ndarray  # of the cell: fractional coordinates = positions @ inverse
    radius: float  # the pairs within this distance (Å) of each other at ``reference``
    reference: np.ndarray  # positions (Å) the list was built at
    i: np.ndarray
    j: np.ndarray
    image: np.ndarray  # int, [n_pairs, 3]
    offset: np.ndarray  # image @ cell (Å)
    atomic_number: torch.Tensor
    composition: str
    topology: _Topology | None = None

    def holds(self, atoms: Atoms, positions: np.ndarray, cutoff: float) -> bool:
        """Whether every pair of ``atoms`` within ``cutoff`` is in this list."""
        if len(positions) != len(self.reference) or not np.array_equal(atoms.cell.array, self.cell):
            return False
        if not np.array_equal(atoms.numbers, self.numbers) or cutoff >= self.radius:
            return False
        moved = np.sqrt(((positions - self.reference) ** 2).sum(axis=1))
        if len(moved) > 1:
            two = np.partition(moved, len(moved) - 2)[-2:]
            # a pair's distance changed by at most the two largest moves: one outside the list
            # (farther than radius at the build) is still farther than the cutoff
            return float(two.sum()) < self.radius - cutoff
        return True


class SkinGraphConverter:
    """CHGNet crystal graphs of a batch of ``Atoms``, with a skin neighbour list per batch slot.

    Called with the structures of one batch (a relaxation's step), it returns their
    :class:`~chgnet.graph.crystalgraph.CrystalGraph` objects, the graphs that CHGNet's own
    converter (``converter``, whose cutoffs and isolated-atom response it follows) would make of
    the same structures, up to the order of edges and angles. The skin lists are kept per position
    in the batch; a structure that no longer fits its slot's list (finished trials leave the batch
    and the others move up) takes another kept list that holds it, else gets a new one.

    Attributes:
        skin_builds: Skin neighbour lists built (the neighbour searches done).
        topology_builds: Graph topologies built (steps where some pair crossed a cutoff).
        graphs: Graphs returned.
    """

    def __init__(self, converter, skin: float = 1.0, keep: int = 32) -> None:
        if skin <= 0:
            raise ValueError(f"skin must be positive, got {skin}")
        self.converter = converter
        self.skin = float(skin)
        self.keep = keep
        self._slots: list[_Skin] = []
        self._lock = threading.Lock()
        self.skin_builds = self.topology_builds = self.graphs = 0

    def __call__(self, structures: list[Atoms]) -> list:
        """The crystal graphs of one batch's structures (slot ``k`` is ``structures[k]``)."""
        with self._lock:
            cutoff = float(self.converter.atom_graph_cutoff)
            old, new, graphs = self._slots, [], []
            for k, atoms in enumerate(structures):
                positions = np.array(atoms.positions, dtype=float)
                own = [old[k]] if k < len(old) else []
                entry = next((e for e in own + old if e.holds(atoms, positions, cutoff)), None)
                if entry is None:
                    entry = self._build(atoms, positions)
                new.append(entry)
                graphs.append(self._graph(len(atoms), positions, entry))
            spare = [e for e in old if all(e is not n for n in new)][: self.keep]
            self._slots = new + spare
            return graphs

    # -- the skin list ------------------------------------------------------------------------
    def _build(self, atoms: Atoms, positions: np.ndarray) -> _Skin:
        from pymatgen.core import Composition
        from pymatgen.optimization.neighbors import find_points_in_spheres

        if not np.all(atoms.pbc):
            raise ValueError("SkinGraphConverter needs a periodic cell (pbc on all three axes)")
        cell = np.array(atoms.cell.array, dtype=float)
        r = float(self.converter.atom_graph_cutoff) + self.skin
        c, n, img, d = find_points_in_spheres(
            np.ascontiguousarray(positions), np.ascontiguousarray(positions), r=r,
            pbc=np.ones(3, dtype=np.int64), lattice=np.ascontiguousarray(cell), tol=1e-8)
        img = np.rint(img).astype(np.int64)
        keep = ~((c == n) & (d <= 1e-8))  # not an atom with itself
        c, n, img = c[keep], n[keep], img[keep]
        # one entry per undirected pair: i < j, or i == j (an atom and its own image) with the
        # image's first non-zero component positive; both directions of a pair map to the same one
        first = np.take_along_axis(img, np.argmax(img != 0, axis=1)[:, None], axis=1)[:, 0]
        flip = (c > n) | ((c == n) & (first < 0))
        i, j = np.where(flip, n, c), np.where(flip, c, n)
        img = np.where(flip[:, None], -img, img)
        pairs = np.unique(np.column_stack([i, j, img]), axis=0)
        self.skin_builds += 1
        numbers = np.array(atoms.numbers)
        return _Skin(numbers=numbers, cell=cell, inverse=np.linalg.inv(cell), radius=r,
                     reference=positions.copy(), i=pairs[:, 0],
                     j=pairs[:, 1], image=pairs[:, 2:], offset=pairs[:, 2:] @ cell,
                     atomic_number=torch.tensor(numbers, dtype=torch.int32),
                     composition=Composition(atoms.get_chemical_formula()).formula)

    # -- the graph ----------------------------------------------------------------------------
    def _graph(self, n_atoms: int, positions: np.ndarray, entry: _Skin):
        from chgnet.graph.crystalgraph import CrystalGraph

        conv = self.converter
        vec = positions[entry.j] + entry.offset - positions[entry.i]
        dist = np.sqrt((vec * vec).sum(axis=1))
        cut, bond_cut = float(conv.atom_graph_cutoff), float(conv.bond_graph_cutoff)
        in_atom = dist <= cut  # as pymatgen's neighbour search (d <= r)
        # CHGNet's line graph: a bond is a node if d <= cutoff; another bond makes an angle
        # with it if d < cutoff
        in_bond, in_bond_strict = in_atom & (dist <= bond_cut), in_atom & (dist < bond_cut)
        top = entry.topology
        if top is None or not (np.array_equal(top.in_atom, in_atom)
                               and np.array_equal(top.in_bond, in_bond)
                               and np.array_equal(top.in_bond_strict, in_bond_strict)):
            top = self._topology(entry, in_atom, in_bond, in_bond_strict, n_atoms)
            entry.topology = top
        # the fractional coordinates as pymatgen's Structure has them (cartesian @ inverse cell)
        frac = positions @ entry.inverse
        self.graphs += 1
        return CrystalGraph(
            atomic_number=entry.atomic_number,
            atom_frac_coord=torch.tensor(frac, dtype=TORCH_DTYPE, requires_grad=True),
            atom_graph=top.atom_graph,
            neighbor_image=top.neighbor_image,
            directed2undirected=top.directed2undirected,
            undirected2directed=top.undirected2directed,
            bond_graph=top.bond_graph,
            lattice=torch.tensor(entry.cell, dtype=TORCH_DTYPE, requires_grad=True),
            graph_id=None,
            mp_id=None,
            composition=entry.composition,
            atom_graph_cutoff=conv.atom_graph_cutoff,
            bond_graph_cutoff=conv.bond_graph_cutoff,
        )

    def _topology(self, entry: _Skin, in_atom, in_bond, in_bond_strict, n_atoms: int) -> _Topology:
        """CHGNet's atom graph and line graph of the pairs within the cutoffs, vectorised.

        Undirected edge ``u`` is the pair's two directed edges ``2u`` (i -> j, image) and
        ``2u + 1`` (j -> i, -image). An angle is a row ``[atom, u1, d1, u2, d2]`` for every two
        different directed edges ``d1``, ``d2`` leaving the same atom, ``d1``'s bond within
        the bond cutoff (``<=``) and ``d2``'s strictly within it, as CHGNet's
        ``Graph.line_graph_adjacency_list``.
        """
        self.topology_builds += 1
        kept = np.flatnonzero(in_atom)
        n_und = len(kept)
        i, j, img = entry.i[kept], entry.j[kept], entry.image[kept]
        center = np.column_stack([i, j]).ravel()
        neighbor = np.column_stack([j, i]).ravel()
        image = np.stack([img, -img], axis=1).reshape(-1, 3)
        undirected = np.repeat(np.arange(n_und), 2)
        isolated = n_atoms - len(np.unique(center))
        if isolated:
            msg = (f"Structure graph_id=None has {isolated} isolated atom(s) with "
                   f"atom_graph_cutoff={self.converter.atom_graph_cutoff}. "
                   "CHGNet calculation will likely go wrong")
            if self.converter.on_isolated_atoms == "error":
                raise ValueError(msg)
            if self.converter.on_isolated_atoms == "warn":
                import sys

                print(msg, file=sys.stderr)
        first = np.flatnonzero(in_bond[kept][undirected])  # d1 candidates (directed indices)
        second = np.flatnonzero(in_bond_strict[kept][undirected])  # d2 candidates
        second = second[np.argsort(center[second], kind="stable")]
        by_atom = center[second]
        lo = np.searchsorted(by_atom, center[first], side="left")
        count = np.searchsorted(by_atom, center[first], side="right") - lo
        total = int(count.sum())
        d1 = np.repeat(first, count)
        start = np.repeat(lo - (np.cumsum(count) - count), count)
        d2 = second[start + np.arange(total)]
        ok = d1 != d2
        d1, d2 = d1[ok], d2[ok]
        bond_graph = np.column_stack([center[d1], undirected[d1], d1, undirected[d2], d2])
        return _Topology(
            in_atom=in_atom, in_bond=in_bond, in_bond_strict=in_bond_strict,
            atom_graph=torch.tensor(np.column_stack([center, neighbor]), dtype=torch.int32),
            neighbor_image=torch.tensor(image, dtype=TORCH_DTYPE),
            directed2undirected=torch.tensor(undirected, dtype=torch.int32),
            undirected2directed=torch.tensor(2 * np.arange(n_und), dtype=torch.int32),
            bond_graph=torch.tensor(bond_graph.reshape(-1, 5), dtype=torch.int32),
        )
