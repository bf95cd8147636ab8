"""Defects in alloys and disordered hosts: one defect per inequivalent local environment.

In CdSe_xTe_(1-x) a Cd vacancy is not one defect but many: its four anion neighbours can be
4 Te, 3 Te + 1 Se, ... Symmetry cannot tell these sites apart in a disordered supercell (it has
none), so sites are grouped by the chemistry of their neighbour shells instead, and one
representative per environment is searched, with its multiplicity (seed paper, "Application to
the CdSe_xTe_(1-x) alloy").
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from pymatgen.core import Element, Structure

from defectml.errors import InputError
from defectml.search.defects import (
    Defect,
    default_charge_states,
    guess_oxidation_states,
    parse_defect_specs,
    site_symmetry,
    supercell_matrix,
)


def parse_substitution(text: str) -> tuple[str, str]:
    """``"Te:Se"`` → ``("Te", "Se")`` (replace Te by Se)."""
    try:
        old, new = (x.strip() for x in text.split(":"))
        Element(old)
        Element(new)
    except ValueError:
        raise InputError(f"cannot parse --substitute {text!r}: use OLD:NEW, e.g. Te:Se") from None
    return old, new


def make_alloy(
    host: Structure,
    substitute: tuple[str, str],
    x: float,
    *,
    min_length: float = 10.0,
    max_atoms: int = 500,
    seed: int = 0,
) -> Structure:
    """A random-substitution supercell: a fraction ``x`` of the OLD sites become NEW.

    The supercell is the near-cubic one with periodic images ≥ ``min_length`` apart; exactly
    round(x × N_OLD) sites are substituted, chosen with ``seed``.

    Raises:
        InputError: if OLD is not in the host or x is outside [0, 1].
    """
    old, new = substitute
    if old not in {e.symbol for e in host.composition.elements}:
        raise InputError(f"cannot substitute {old}: not in the host {host.composition.formula}")
    if not 0.0 <= x <= 1.0:
        raise InputError(f"alloy fraction x must be within [0, 1], got {x}")
    prim = host.get_primitive_structure()
    prim.remove_oxidation_states()
    cell = prim * supercell_matrix(prim, min_length, max_atoms)
    sites = [i for i, s in enumerate(cell) if s.specie.symbol == old]
    n = int(round(x * len(sites)))
    chosen = np.random.default_rng(seed).choice(sites, size=n, replace=False)
    for i in sorted(int(j) for j in chosen):
        cell.replace(i, new)
    return cell


def _shell_distances(structure: Structure, index: int, n_shells: int, tol: float = 0.15):
    """Distance cut-offs of the first ``n_shells`` neighbour shells of a site."""
    r = 2.0
    while True:
        dists = sorted(n.nn_distance for n in structure.get_neighbors(structure[index], r))
        shells: list[float] = []
        for d in dists:
            if not shells or d > shells[-1] * (1 + tol):
                shells.append(d)
        if len(shells) > n_shells or r > 12:
            return [s * (1 + tol) for s in shells[:n_shells]]
        r += 2.0


def local_environment(structure: Structure, index: int, shells: int = 1) -> str:
    """Chemistry of the first ``shells`` neighbour shells, e.g. ``Se1Te3`` or ``Se1Te3.Cd12``."""
    cuts = _shell_distances(structure, index, shells)
    parts, inner = [], 0.0
    neighbours = structure.get_neighbors(structure[index], cuts[-1] + 1e-6)
    for cut in cuts:
        count = Counter(n.specie.symbol for n in neighbours if inner < n.nn_distance <= cut)
        parts.append("".join(f"{el}{count[el]}" for el in sorted(count)))
        inner = cut
    return ".".join(parts)


def environment_defects(
    host: Structure,
    defects: str,
    *,
    oxidation_states: dict[str, int] | None = None,
    shells: int = 1,
    min_length: float = 10.0,
    max_atoms: int = 500,
) -> list[Defect]:
    """One vacancy or substitution per local environment of its site in ``host``.

    ``host`` is used as the defect supercell (a disordered alloy cell); a cell whose periodic
    images are closer than ``min_length`` is first expanded to a supercell.

    Raises:
        InputError: for interstitials or ``all`` (not defined by environment) and bad specs.
    """
    cell = host.copy()
    cell.remove_oxidation_states()
    if min(_image_distances(cell)) < min_length - 1e-6:
        sc = supercell_matrix(cell, min_length, max_atoms)
        cell = cell * sc
    else:
        sc = np.eye(3, dtype=int)
    oxi = guess_oxidation_states(cell, oxidation_states)
    found: list[Defect] = []
    for spec in parse_defect_specs(defects, cell):
        if spec is None or spec["int"]:
            raise InputError("environment sites take vacancies and substitutions (v_X, A_B), "
                             "not interstitials or 'all'")
        removed = spec["vac"] or spec["host"]
        added = spec["sub"]
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(cell):
            if s.specie.symbol == removed:
                groups.setdefault(local_environment(cell, i, shells), []).append(i)
        for env, members in sorted(groups.items()):
            j = members[0]
            defect_cell = cell.copy()
            if added is None:
                defect_cell.remove_sites([j])
                index, kind, new = None, "vacancy", 0
            else:
                defect_cell.replace(j, added)
                index, kind = j, "substitution"
                new = oxi.get(added, oxi[removed])
            base = f"v_{removed}" if added is None else f"{added}_{removed}"
            found.append(Defect(
                name=f"{base}_{env}", kind=kind, added=added, removed=removed,
                oxi_change=new - oxi[removed], multiplicity=len(members),
                site_symmetry=site_symmetry(cell, cell[j].frac_coords, added, symprec=0.1),
                supercell=defect_cell, bulk_supercell=cell.copy(), site=cell[j].coords.copy(),
                defect_index=index, sc_matrix=sc,
                default_charges=default_charge_states(new - oxi[removed]),
            ))
    return found


def _image_distances(cell: Structure) -> list[float]:
    """Perpendicular widths of the cell (distances between periodic images of a point)."""
    m = cell.lattice.matrix
    volume = abs(np.linalg.det(m))
    return [volume / np.linalg.norm(np.cross(m[(i + 1) % 3], m[(i + 2) % 3])) for i in range(3)]


def bond_kind(bonds: list[tuple[str, str, float]]) -> str:
    """``Se-Te`` (mixed), ``Te-Te``, ... of a minimum's new bonds; ``none`` without any."""
    if not bonds:
        return "none"
    kinds = sorted({f"{a}-{b}" for a, b, _ in bonds})
    return "+".join(kinds)
