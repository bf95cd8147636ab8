"""The defect representation: compare the defect supercell with the pristine one, site by site."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from ase import Atoms
from ase.geometry import find_mic, get_distances
from ase.neighborlist import neighbor_list

from defectml.errors import DefectMLError


class NodeType(IntEnum):
    """What a node is, relative to the pristine crystal."""

    PRISTINE = 0
    SUBSTITUTED = 1
    VACANCY = 2
    INTERSTITIAL = 3


@dataclass
class DefectGraph:
    """One unrelaxed defect supercell as a graph (tensors, CPU).

    Attributes:
        z: Atomic number per node (the removed element for a vacancy placeholder).
        z_host: Atomic number of the pristine site (0 for interstitials).
        node_type: :class:`NodeType` per node.
        pos: Unrelaxed Cartesian positions (nodes, 3).
        cell: Lattice vectors (3, 3).
        edge_index: (2, E) source j -> target i within the cutoff, built once on ``pos``.
        shift: (E, 3) Cartesian image shift so that r_ij = pos[j] + shift - pos[i].
        n_atoms: Real atoms (the first ``n_atoms`` nodes are the atoms of the input, in order).
        target: Relaxed - unrelaxed displacement of each node (zeros for vacancies), when known.
        atom_prior: Optional per-node features from a universal MLIP (see ``predictor.prior``).
        force_prior: Optional per-node MLIP forces on the unrelaxed atoms (nodes, 3).
    """

    z: torch.Tensor
    z_host: torch.Tensor
    node_type: torch.Tensor
    pos: torch.Tensor
    cell: torch.Tensor
    edge_index: torch.Tensor
    shift: torch.Tensor
    n_atoms: int
    target: torch.Tensor | None = None
    atom_prior: torch.Tensor | None = None
    force_prior: torch.Tensor | None = None

    @property
    def real(self) -> torch.Tensor:
        """Mask of real atoms (not vacancy placeholders)."""
        return self.node_type != NodeType.VACANCY

    def defect_sites(self) -> np.ndarray:
        """Cartesian positions of the defect sites (substituted, vacancy, interstitial nodes)."""
        sel = (self.node_type != NodeType.PRISTINE).numpy()
        return self.pos.numpy()[sel]

    def defect_distance(self) -> torch.Tensor:
        """Distance (A) of every node to the nearest defect site, periodic images included (cached).

        ``inf`` everywhere for a structure without defects.
        """
        cached = self.__dict__.get("_defect_distance")
        if cached is not None:
            return cached
        sites = self.defect_sites()
        if len(sites):
            pbc = [True, True, True]
            d = get_distances(self.pos.numpy(), sites, cell=self.cell.numpy(), pbc=pbc)[1].min(axis=1)
        else:
            d = np.full(len(self.z), np.inf)
        out = torch.tensor(d, dtype=torch.float32)
        self.__dict__["_defect_distance"] = out
        return out


def align_pristine(defect: Atoms, pristine: Atoms, tol: float = 0.3) -> Atoms:
    """``pristine`` shifted rigidly so its sites coincide with the defect cell's atoms.

    Tries the offsets that put pristine site 0 on each atom of its element and keeps the one
    matching most sites (unit cells often carry a different origin than the supercell).
    """
    p = pristine.copy()
    p.set_cell(defect.cell, scale_atoms=False)
    p.pbc = defect.pbc
    sym0 = p.get_chemical_symbols()[0]
    cands = [i for i, s in enumerate(defect.get_chemical_symbols()) if s == sym0] or list(range(len(defect)))
    best, best_count = np.zeros(3), -1
    for i in cands[:64]:
        off = find_mic(defect.positions[i] - p.positions[0], defect.cell, defect.pbc)[0]
        d = get_distances(p.positions + off, defect.positions, cell=defect.cell, pbc=defect.pbc)[1]
        count = int(np.sum(d.min(axis=1) < tol))
        if count > best_count:
            best, best_count = off, count
            if count == len(p):
                break
    p.positions = p.positions + best
    return p


def classify(defect: Atoms, pristine: Atoms, tol: float = 0.6) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Node types of the defect atoms, host element per atom, and the empty pristine sites.

    Each atom is assigned to the nearest pristine site within ``tol`` (one atom per site);
    unassigned atoms are interstitials, unoccupied sites are vacancies.
    """
    d = get_distances(defect.positions, pristine.positions, cell=defect.cell, pbc=defect.pbc)[1]
    order = np.argsort(d.min(axis=1))
    taken: dict[int, int] = {}
    types = np.full(len(defect), NodeType.INTERSTITIAL, dtype=np.int64)
    host = np.zeros(len(defect), dtype=np.int64)
    zp = pristine.get_atomic_numbers()
    zd = defect.get_atomic_numbers()
    for a in order:
        for site in np.argsort(d[a]):
            if d[a, site] > tol:
                break
            if site not in taken:
                taken[site] = a
                host[a] = zp[site]
                types[a] = NodeType.PRISTINE if zd[a] == zp[site] else NodeType.SUBSTITUTED
                break
    vacancies = [s for s in range(len(pristine)) if s not in taken]
    return types, host, vacancies


def tile_pristine(defect: Atoms, pristine: Atoms) -> Atoms:
    """``pristine`` repeated to the defect cell when it is a unit cell (unchanged otherwise)."""
    if np.allclose(defect.cell.lengths(), pristine.cell.lengths(), atol=0.05):
        return pristine
    from ase.build import make_supercell

    scale = np.rint(np.linalg.solve(pristine.cell.T, defect.cell.T).T).astype(int)
    if np.abs(np.linalg.det(scale)) < 1:
        raise DefectMLError("the pristine cell does not tile the defect cell")
    return make_supercell(pristine, scale)


def build_graph(
    defect: Atoms,
    pristine: Atoms,
    cutoff: float = 6.0,
    relaxed: Atoms | None = None,
    align: bool = True,
    positions: np.ndarray | None = None,
) -> DefectGraph:
    """The graph of ``defect`` (unrelaxed) against ``pristine`` (same cell), optionally with its target.

    ``positions`` (same atoms, e.g. a distorted search trial) replaces the atoms' coordinates after
    the node types were read from ``defect``, so large trial distortions do not confuse them.

    Raises:
        DefectMLError: when cells differ, or ``relaxed`` is not the same atoms in the same order.
    """
    pristine = tile_pristine(defect, pristine)
    if align:
        pristine = align_pristine(defect, pristine)
    types, host, vac = classify(defect, pristine)
    nodes = defect.copy()
    nodes.calc = None
    if positions is not None:
        nodes.positions = np.asarray(positions, float)
    n_atoms = len(defect)
    for s in vac:
        nodes.append(pristine[s])
    z = nodes.get_atomic_numbers()
    node_type = np.concatenate([types, np.full(len(vac), NodeType.VACANCY)])
    z_host = np.concatenate([host, pristine.get_atomic_numbers()[vac]]).astype(np.int64)
    i, j, s = neighbor_list("ijS", nodes, cutoff)
    shift = s @ np.asarray(nodes.cell)
    target = None
    if relaxed is not None:
        if relaxed.get_chemical_symbols() != defect.get_chemical_symbols():
            raise DefectMLError("relaxed and unrelaxed structures must list the same atoms in the same order")
        disp = find_mic(relaxed.positions - defect.positions, defect.cell, defect.pbc)[0]
        target = torch.zeros(len(nodes), 3)
        target[:n_atoms] = torch.tensor(disp, dtype=torch.float32)
    return DefectGraph(
        torch.tensor(z, dtype=torch.long),
        torch.tensor(z_host),
        torch.tensor(node_type, dtype=torch.long),
        torch.tensor(nodes.positions, dtype=torch.float32),
        torch.tensor(np.asarray(nodes.cell), dtype=torch.float32),
        torch.tensor(np.stack([j, i]), dtype=torch.long),
        torch.tensor(shift, dtype=torch.float32),
        n_atoms,
        target,
    )

