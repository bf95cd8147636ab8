"""CHGNet graphs from a skin neighbour list: CHGNet's own graphs, energies and forces, less work.

The reference is CHGNet's own converter on a pymatgen ``Structure`` of every frame
(``batch_fn(model, skin=None)``). The two graphs hold the same edges and angles in another order,
so the model's float32 sums run in another order: energies agree to a float32 rounding of
CHGNet's energy per atom (2.4e-7 eV/atom, 1.5e-5 eV for 63 atoms; the same as shuffling the
edges of CHGNet's own graph gives), forces to ~4e-5 eV/Å.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.geometry import find_mic
from pymatgen.io.ase import AseAtomsAdaptor

from defectml.models import load_model
from defectml.models.chgnet import batch_fn
from defectml.models.chgnet_graph import SkinGraphConverter, _Skin

E_TOL = 5e-5  # eV per 63-atom cell: 3 float32 roundings of the energy per atom, 8e-7 eV/atom
F_TOL = 1e-4  # eV/Å


@pytest.fixture(scope="module")
def chgnet():
    return load_model("chgnet", threads=1)


@pytest.fixture(scope="module")
def vacancy(cdte):
    """CdTe 2x2x2 conventional cell less one Cd (63 atoms), rattled; a Te next to the vacancy."""
    atoms = AseAtomsAdaptor.get_atoms(cdte).repeat(2)
    cd = int(np.flatnonzero(atoms.numbers == 48)[0])
    site = atoms.positions[cd].copy()
    del atoms[cd]
    atoms.rattle(0.05, seed=1)
    to_site, dist = find_mic(site - atoms.positions, atoms.cell)
    te = int(np.argmin(dist))
    return atoms, te, to_site[te] / dist[te]


def _frames(vacancy):
    """Two cells of a batch: six small random moves, then one Te moves 1.6 Å into the vacancy."""
    atoms, te, into_vacancy = vacancy
    rng = np.random.default_rng(2)
    a, b = atoms.copy(), atoms.copy()
    b.rattle(0.05, seed=3)
    yield "start", [a.copy(), b.copy()]
    for k in range(6):
        a.positions += rng.normal(0, 0.015, a.positions.shape)
        b.positions += rng.normal(0, 0.015, b.positions.shape)
        yield f"small {k}", [a.copy(), b.copy()]
    a.positions[te] += 1.6 * into_vacancy
    yield "big", [a.copy(), b.copy()]
    a.positions += rng.normal(0, 0.015, a.positions.shape)
    yield "after", [a.copy(), b.copy()]


def _canonical(graph) -> tuple:
    """A graph as sets: directed edges (i, j, image), undirected pairs, angles (bond pairs)."""
    image = graph.neighbor_image.numpy().round().astype(int)
    edges = [(int(i), int(j), tuple(x)) for (i, j), x in zip(graph.atom_graph.numpy(), image, strict=True)]
    pairs: dict[int, list] = {}
    for e, u in zip(edges, graph.directed2undirected.numpy(), strict=True):
        pairs.setdefault(int(u), []).append(e)
    pair = {u: tuple(sorted(es)) for u, es in pairs.items()}
    angles = sorted((int(r[0]), pair[int(r[1])], edges[int(r[2])], pair[int(r[3])], edges[int(r[4])])
                    for r in graph.bond_graph.numpy())
    first = sorted(edges[int(d)] for d in graph.undirected2directed.numpy())
    return sorted(edges), sorted(pair.values()), angles, len(first) == len(pair)


def _errors(model, vacancy):
    """Per frame: the largest energy and force differences from the stock path, and the counts."""
    stock, skinned = batch_fn(model, skin=None), batch_fn(model, skin=1.0)
    rows = []
    for name, frame in _frames(vacancy):
        ref, got = stock(frame), skinned(frame)
        de = max(abs(e1 - e2) for (e1, _), (e2, _) in zip(ref, got, strict=True))
        df = max(np.abs(f1 - f2).max() for (_, f1), (_, f2) in zip(ref, got, strict=True))
        c = skinned.converter
        rows.append((name, de, df, c.skin_builds, c.topology_builds, c.graphs))
    return rows


def test_skin_graphs_give_chgnets_energies_and_forces_and_a_big_move_rebuilds(chgnet, vacancy):
    rows = _errors(chgnet.calculator.model, vacancy)
    for name, de, df, *_ in rows:
        assert de < E_TOL and df < F_TOL, (name, de, df)
    builds = {name: b for name, _, _, b, *_ in rows}
    # one skin list per batch slot; small moves keep them; the big move rebuilds its cell's only
    assert builds["start"] == 2 and builds["small 5"] == 2
    assert builds["big"] == 3 and builds["after"] == 3
    _, _, _, _, topologies, graphs = rows[-1]
    # the graph's topology both reused (no pair crossed a cutoff) and rebuilt without a new list
    assert builds["after"] < topologies < graphs


def test_skin_graphs_are_chgnets_own_graphs(chgnet, vacancy):
    """The same edges (with images), pairs and angles as CHGNet's converter, frame by frame."""
    model = chgnet.calculator.model
    skinned = SkinGraphConverter(model.graph_converter, skin=1.0)
    for name, frame in _frames(vacancy):
        for atoms, ours in zip(frame, skinned(frame), strict=True):
            theirs = model.graph_converter(AseAtomsAdaptor.get_structure(atoms))
            assert _canonical(ours) == _canonical(theirs), name
            assert np.allclose(ours.atom_frac_coord.detach().numpy(),
                               theirs.atom_frac_coord.detach().numpy(), atol=1e-7)


def test_a_skin_that_never_rebuilt_would_fail(chgnet, vacancy, monkeypatch):
    """The checks above have teeth: keeping the first list through the big move misses pairs."""
    monkeypatch.setattr(_Skin, "holds", lambda self, atoms, positions, cutoff:
                        len(positions) == len(self.reference))
    model = chgnet.calculator.model
    rows = {r[0]: r for r in _errors(model, vacancy)}
    _, de, df, builds, *_ = rows["big"]
    assert builds == 2
    assert de > 10 * E_TOL and df > 10 * F_TOL  # 27x and 26x here
    skinned = SkinGraphConverter(model.graph_converter, skin=1.0)
    same = [all(_canonical(ours) == _canonical(model.graph_converter(AseAtomsAdaptor.get_structure(a)))
                for a, ours in zip(frame, skinned(frame), strict=True)) for _, frame in _frames(vacancy)]
    assert all(same[:-2]) and not same[-2]  # the big move's graph misses pairs


def test_slots_move_up_and_a_new_cell_rebuilds(chgnet, vacancy):
    """A trial leaving the batch moves the next one up to its slot: that one keeps its list."""
    model = chgnet.calculator.model
    stock, skinned = batch_fn(model, skin=None), batch_fn(model, skin=1.0)
    atoms = vacancy[0]
    others = [atoms.copy() for _ in range(3)]
    for k, a in enumerate(others):
        a.positions[k] += [1.5, 0.0, 0.0]  # each beyond the others' skins
    skinned(others)
    assert skinned.converter.skin_builds == 3
    (e, f), = skinned(others[2:])  # slot 0 now holds the third cell
    (e0, f0), = stock(others[2:])
    assert skinned.converter.skin_builds == 3
    assert abs(e - e0) < E_TOL and np.abs(f - f0).max() < F_TOL
    strained = others[2].copy()
    strained.set_cell(strained.cell.array * 1.01, scale_atoms=True)  # the same atoms, a new cell
    (e, f), = skinned([strained])
    (e0, f0), = stock([strained])
    assert skinned.converter.skin_builds == 4
    assert abs(e - e0) < E_TOL and np.abs(f - f0).max() < F_TOL
