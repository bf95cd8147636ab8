"""From relaxed trials to the energy landscape: quarantine, unique minima, labels.

Input is a list of :class:`RelaxedTrial` (what the store holds for one defect in one charge
state); output is a ranked list of :class:`Minimum`. Pure functions, no I/O.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from defectml.core.relax import CONVERGED, IN_BASIN
from defectml.errors import InputError
from defectml.search.defects import site_symmetry
from defectml.search.fingerprint import SoapSettings, cosine_distances, soap_fingerprints

#: Default SOAP cosine-distance threshold for "same minimum". On CdTe V_Cd^0 relaxed trials of one
#: basin lie within 1.8e-3 of each other; distinct motifs with the same bonds lie further apart.
#: Rerun benchmarks/soap_threshold.py to see the numbers on any run.
DEFAULT_SOAP_THRESHOLD = 0.005
#: Relaxations this far (eV) below the median of their defect are quarantined as phase changes.
DEFAULT_PHASE_CHANGE_DROP = 3.0
#: Relaxations this far (eV) above the Unperturbed one (the median where there is none) are
#: quarantined as broken, high-energy structures. ShakeNBreak sets a relaxation aside as
#: High_Energy 2 eV above Unperturbed (its SnB_run.sh, for one still unconverged after 150 steps);
#: these are converged ones, so a little more room: at 1500 K a configuration 3 eV up has a
#: Boltzmann weight of e^-23 (1e-10), nothing to any population or ranking window (0.5 eV), while
#: the broken "minima" seen on CdTe Cd_i (a host atom pushed onto another site) lay at +31 and +65 eV.
DEFAULT_MAX_RISE = 3.0


@dataclass
class RelaxedTrial:
    """One finished relaxation of one trial, as the landscape analysis needs it."""

    name: str
    status: str
    energy: float | None
    atoms: Atoms
    site: np.ndarray
    defect_index: int | None
    distortion: float | None = None
    reason: str = ""
    steps: int = 0
    basin_of: str | None = None
    trust: dict | None = None  # a committee's spread on it (``defectml.train.committee.Trust``)
    polish_fmax: float | None = None  # continued to this force threshold (eV/Å): energy and atoms are its
    search_energy: float | None = None  # the energy where the search's relaxation stopped (polished ones)

    def centre(self) -> np.ndarray:
        """Defect-site position in the relaxed structure (the defect atom follows its atom)."""
        if self.defect_index is None:
            return np.asarray(self.site, dtype=float)
        return np.asarray(self.atoms.positions[self.defect_index], dtype=float)


@dataclass
class Minimum:
    """One unique minimum of the landscape.

    Attributes:
        rank: 0 for the lowest energy.
        trial: Name of the lowest-energy trial in it (its structure represents the minimum).
        energy: Its energy (eV).
        delta_e: Energy relative to the ``Unperturbed`` relaxation (eV), or to the lowest
            minimum when the unperturbed relaxation is unavailable.
        trials: All trials that relaxed into it.
        bonds: New short bonds between like ions near the defect: (A, B, distance).
        symmetry: Local point symmetry (Schoenflies) of the defect and its first shell.
        label: Short human label, e.g. ``C2v, Te-Te dimer 2.86 Å``.
        identity_change: How the defect changed kind or site (:func:`identity_change`; empty:
            it did not).
    """

    rank: int
    trial: str
    energy: float
    delta_e: float
    trials: list[str]
    atoms: Atoms
    bonds: list[tuple[str, str, float]] = field(default_factory=list)
    symmetry: str = "C1"
    label: str = ""
    identity_change: str = ""

    @property
    def contains_unperturbed(self) -> bool:
        """Whether the unperturbed trial fell into this minimum."""
        return "Unperturbed" in self.trials


def quarantine(trials: list[RelaxedTrial], max_drop: float = DEFAULT_PHASE_CHANGE_DROP,
               max_rise: float = DEFAULT_MAX_RISE):
    """Split trials into rankable ones and quarantined ones (with reasons).

    Quarantined: failed relaxations (NaN, atoms too close, model error), unconverged ones,
    energies more than ``max_drop`` eV below the median of the rest (a likely phase change or
    model hole, not a defect minimum), and energies more than ``max_rise`` eV above the
    ``Unperturbed`` relaxation (above the median where it is not among them; a
    broken structure, not a candidate: ShakeNBreak's High_Energy).

    Raises:
        InputError: ``max_rise`` is not positive.
    """
    if not max_rise > 0:
        raise InputError(f"--max-rise must be positive (eV above the unperturbed relaxation), got {max_rise}")
    good = [t for t in trials if t.status == CONVERGED and t.energy is not None]
    bad = [(t, t.reason or t.status) for t in trials if t not in good and t.status != IN_BASIN]
    if len(good) >= 3:
        median = statistics.median(t.energy for t in good)
        keep = []
        for t in good:
            drop = median - t.energy
            if drop > max_drop:
                bad.append((t, f"energy {drop:.2f} eV below the median: possible phase change"))
            else:
                keep.append(t)
        good = keep
    return _set_aside_high(good, bad, max_rise)


def _set_aside_high(good: list[RelaxedTrial], bad: list, max_rise: float):
    """Move the trials more than ``max_rise`` eV above the reference from ``good`` to ``bad``.

    The reference is the ``Unperturbed`` relaxation, else the median of three or more.
    """
    unperturbed = next((t for t in good if t.name == "Unperturbed"), None)
    if unperturbed is not None:
        reference, what = unperturbed.energy, "the Unperturbed relaxation"
    elif len(good) >= 3:
        reference, what = statistics.median(t.energy for t in good), "the median"
    else:
        return good, bad
    keep = []
    for t in good:
        rise = t.energy - reference
        if rise > max_rise:
            bad.append((t, f"energy {rise:.2f} eV above {what}: a broken, high-energy structure"))
        else:
            keep.append(t)
    return keep, bad


def group_minima(
    trials: list[RelaxedTrial],
    threshold: float = DEFAULT_SOAP_THRESHOLD,
    soap: SoapSettings | None = None,
    signatures: list | None = None,
) -> list[list[int]]:
    """Group trials whose defect-site SOAP vectors lie within ``threshold`` cosine distance.

    Trials are taken from lowest energy up; each joins the first group whose lowest-energy
    member is within the threshold (and, if ``signatures`` are given, has the same signature,
    e.g. the same set of new bonds), else starts a new group.

    Returns:
        Lists of indices into ``trials``; each list starts with its lowest-energy member, and
        groups are ordered by that energy.
    """
    if not trials:
        return []
    fps = soap_fingerprints([t.atoms for t in trials], [t.centre() for t in trials], soap)
    dist = cosine_distances(fps)
    sig = signatures if signatures is not None else [None] * len(trials)
    order = sorted(range(len(trials)), key=lambda i: trials[i].energy)
    groups: list[list[int]] = []
    for i in order:
        for g in groups:
            if dist[i, g[0]] <= threshold and sig[i] == sig[g[0]]:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def bond_signature(bonds: list[tuple[str, str, float]]) -> tuple[tuple[str, str], ...]:
    """The bonding motif without lengths: which like-ion pairs are bonded, how many times."""
    return tuple(sorted((a, b) for a, b, _ in bonds))


@dataclass
class BasinWatch:
    """Early stop for relaxations that reach the basin of an already relaxed minimum.

    Called every ``every`` steps (after ``min_steps``): when the defect-site SOAP vector of the
    current structure is within ``threshold`` of a known minimum's and its energy is no more than
    ``energy_tol`` eV above that minimum, the relaxation would only end in that minimum, so it
    stops. Picklable, so it can travel to worker processes.
    """

    species: tuple[str, ...]
    site: np.ndarray
    defect_index: int | None
    soap: SoapSettings = field(default_factory=SoapSettings)
    threshold: float = DEFAULT_SOAP_THRESHOLD
    energy_tol: float = 0.05
    every: int = 5
    min_steps: int = 10
    names: list[str] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)
    fingerprints: list[np.ndarray] = field(default_factory=list)

    def _fingerprint(self, atoms: Atoms) -> np.ndarray:
        centre = self.site if self.defect_index is None else atoms.positions[self.defect_index]
        return soap_fingerprints([atoms], [centre], self.soap, self.species)[0]

    def add(self, name: str, atoms: Atoms, energy: float) -> None:
        """Record a converged minimum to watch for."""
        self.names.append(name)
        self.energies.append(float(energy))
        self.fingerprints.append(self._fingerprint(atoms))

    def __call__(self, atoms: Atoms, energy: float, step: int) -> str | None:
        """The name of the known minimum this structure has reached, or ``None``."""
        if not self.names or step < self.min_steps or step % self.every:
            return None
        close = [e for e in self.energies if energy - e <= self.energy_tol]
        if not close:
            return None
        d = 1.0 - np.asarray(self.fingerprints) @ self._fingerprint(atoms)
        for j in np.argsort(d):
            if d[j] > self.threshold:
                break
            if energy - self.energies[j] <= self.energy_tol:
                return self.names[j]
        return None


def _mic(atoms: Atoms, origin: np.ndarray, indices) -> np.ndarray:
    cell = atoms.cell.array
    frac = np.linalg.solve(cell.T, (atoms.positions[list(indices)] - origin).T).T
    frac -= np.round(frac)
    return frac @ cell


def new_bonds(
    atoms: Atoms,
    centre: np.ndarray,
    defect_index: int | None,
    oxidation_states: dict[str, int],
    bulk_like_distances: dict[tuple[str, str], float],
    radius: float,
    slack: float = 0.0,
) -> list[tuple[str, str, float]]:
    """Short bonds between like ions (same element, or same sign of charge) near the defect.

    A pair counts when it is shorter than 1.15 × the sum of covalent radii and, if such a pair
    exists in the host, shorter than 0.9 × its shortest distance there; ``slack`` (Å) widens
    both limits (a tolerant comparison of two structures' bonds).
    """
    vec = _mic(atoms, centre, range(len(atoms)))
    near = [int(i) for i in np.flatnonzero(np.linalg.norm(vec, axis=1) <= radius)]
    if defect_index is not None and defect_index not in near:
        near.append(defect_index)
    symbols = atoms.get_chemical_symbols()
    bonds = []
    for a_pos, a in enumerate(near):
        for b in near[a_pos + 1:]:
            sa, sb = symbols[a], symbols[b]
            oa, ob = oxidation_states.get(sa, 0), oxidation_states.get(sb, 0)
            if sa != sb and oa * ob <= 0:
                continue
            d = float(np.linalg.norm(vec[a] - vec[b]))
            limit = 1.15 * _covalent_sum(sa, sb)
            bulk = bulk_like_distances.get(tuple(sorted((sa, sb))))
            if bulk is not None:
                limit = min(limit, 0.9 * bulk)
            if d < limit + slack:
                bonds.append((*sorted((sa, sb)), round(d, 3)))
    return sorted(bonds, key=lambda x: x[2])


def identity_change(relaxed: Atoms, reference: Atoms, site: np.ndarray, defect_index: int | None,
                    vacancy: bool) -> str:
    """How the defect stopped being the defect it started as (empty when it did not).

    Every atom is matched to its nearest site of the unrelaxed supercell (``reference``, in the
    same atom order; a vacancy's empty site included). An atom nearer to another site than to its
    own has hopped: a neighbour into the vacancy (the vacancy moved, or became a complex such as
    C_Si + V_C), or the defect atom onto another site. A large move that stays nearest its own
    site (an off-centre distortion) is not flagged.
    """
    sites = reference.positions
    if vacancy:
        sites = np.vstack([sites, np.asarray(site, dtype=float)[None]])
    cell = relaxed.cell.array
    frac = np.linalg.solve(cell.T, (relaxed.positions[:, None, :] - sites[None, :, :]).reshape(-1, 3).T).T
    frac -= np.round(frac)
    d = np.linalg.norm(frac @ cell, axis=1).reshape(len(relaxed), len(sites))
    nearest = d.argmin(axis=1)
    symbols = relaxed.get_chemical_symbols()
    ref_symbols = reference.get_chemical_symbols()
    notes = []
    for i in np.flatnonzero(nearest != np.arange(len(relaxed))):
        j = int(nearest[i])
        moved = float(d[i, i])
        if vacancy and j == len(reference):
            what = f"{symbols[i]} {i} moved {moved:.2f} Å into the vacancy"
        else:
            what = f"{symbols[i]} {i} moved {moved:.2f} Å onto the {ref_symbols[j]} {j} site"
        notes.append(what + (" (the defect atom)" if i == defect_index else ""))
    return "; ".join(notes)


def _covalent_sum(a: str, b: str) -> float:
    """Sum of covalent radii (Å); 1.5 Å for an element without a tabulated radius."""
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

    r = CovalentRadius.radius
    return r.get(a, 1.5) + r.get(b, 1.5)


def like_pair_distances(bulk: Atoms, cutoff: float = 6.0) -> dict[tuple[str, str], float]:
    """Shortest distance of every element pair in the bulk host within ``cutoff`` Å."""
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", bulk, cutoff)
    symbols = np.array(bulk.get_chemical_symbols())
    out: dict[tuple[str, str], float] = {}
    for a, b, dist in zip(symbols[i], symbols[j], d, strict=True):
        key = tuple(sorted((str(a), str(b))))
        out[key] = min(out.get(key, np.inf), float(dist))
    return out


def local_symmetry(
    atoms: Atoms, centre: np.ndarray, defect_index: int | None, symprec: float = 0.2
) -> str:
    """Schoenflies point group of the defect site in the relaxed supercell (spglib).

    ``symprec`` (Å) absorbs the residual noise of a relaxation stopped at a force threshold.
    """
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    frac = structure.lattice.get_fractional_coords(centre)
    marker = atoms.get_chemical_symbols()[defect_index] if defect_index is not None else None
    return site_symmetry(structure, frac, marker, symprec=symprec)


def describe(bonds: list[tuple[str, str, float]], symmetry: str) -> str:
    """Short label: ``C2v, Te-Te dimer 2.86 Å`` / ``Td, no new bonds``."""
    if not bonds:
        return f"{symmetry}, no new bonds"
    if len(bonds) == 1:
        a, b, d = bonds[0]
        return f"{symmetry}, {a}-{b} dimer {d:.2f} Å"
    parts = ", ".join(f"{a}-{b} {d:.2f}" for a, b, d in bonds[:3])
    more = f" +{len(bonds) - 3}" if len(bonds) > 3 else ""
    return f"{symmetry}, {len(bonds)} bonds: {parts}{more} Å"


def _trial_bonds(
    good: list[RelaxedTrial], bulk: Atoms, oxidation_states: dict[str, int]
) -> list[list[tuple[str, str, float]]]:
    """New like-ion bonds around each trial's defect (:func:`new_bonds`).

    Args:
        good: The trials to rank.
        bulk: The bulk supercell (its like-pair distances are the reference).
        oxidation_states: Oxidation state of each element.

    Returns:
        One bond list per trial, within 1.5 × the shortest bulk pair distance of the defect.
    """
    like = like_pair_distances(bulk)
    radius = 1.5 * min(like.values())
    return [
        new_bonds(t.atoms, t.centre(), t.defect_index, oxidation_states, like, radius) for t in good
    ]


def _reference_energy(good: list[RelaxedTrial]) -> float:
    """The energy zero: the unperturbed relaxation's, else the lowest of ``good``."""
    unperturbed = next((t for t in good if t.name == "Unperturbed"), None)
    return unperturbed.energy if unperturbed else min(t.energy for t in good)


def _join_basins(
    trials: list[RelaxedTrial], members: dict[str, list[str]]
) -> list[tuple[RelaxedTrial, str]]:
    """Add trials stopped early (``in_basin``) to the minimum of the basin they reached.

    Args:
        trials: All trials, in their order.
        members: Trial names of each minimum by its representative's name; extended in place.

    Returns:
        The stopped trials whose basin is not a ranked minimum, with the reason (to quarantine).
    """
    where = {name: rep for rep, names in members.items() for name in names}
    bad = []
    for t in trials:
        if t.status == IN_BASIN:
            if t.basin_of in where:
                members[where[t.basin_of]].append(t.name)
            else:
                bad.append((t, f"{t.reason}, which is not a ranked minimum"))
    return bad


def _minimum(
    rank: int,
    rep: RelaxedTrial,
    bonds: list[tuple[str, str, float]],
    members: list[str],
    e_ref: float,
    reference: Atoms | None,
    vacancy: bool,
) -> Minimum:
    """The :class:`Minimum` represented by ``rep``: energy, symmetry, label, identity change.

    Args:
        rank: Its rank (0: lowest).
        rep: The representative (lowest) trial of the minimum.
        bonds: ``rep``'s new like-ion bonds.
        members: Names of the trials that reached the minimum.
        e_ref: The energy zero (:func:`_reference_energy`).
        reference: The unrelaxed defect supercell, or ``None``.
        vacancy: Whether the defect is a vacancy.
    """
    sym = local_symmetry(rep.atoms, rep.centre(), rep.defect_index)
    changed = ""
    if reference is not None and len(reference) == len(rep.atoms):
        changed = identity_change(rep.atoms, reference, rep.site, rep.defect_index, vacancy)
    return Minimum(
        rank=rank, trial=rep.name, energy=float(rep.energy),
        delta_e=float(rep.energy - e_ref), trials=members,
        atoms=rep.atoms, bonds=bonds, symmetry=sym, label=describe(bonds, sym),
        identity_change=changed,
    )


def find_minima(
    trials: list[RelaxedTrial],
    *,
    bulk: Atoms,
    oxidation_states: dict[str, int],
    threshold: float = DEFAULT_SOAP_THRESHOLD,
    soap: SoapSettings | None = None,
    max_drop: float = DEFAULT_PHASE_CHANGE_DROP,
    reference: Atoms | None = None,
    vacancy: bool = False,
    max_rise: float = DEFAULT_MAX_RISE,
) -> tuple[list[Minimum], list[tuple[RelaxedTrial, str]]]:
    """Rank the unique minima of one defect in one charge state.

    Two trials are one minimum when their defect-site SOAP vectors are within ``threshold`` and
    they form the same new like-ion bonds (so a dimer and a trimer are never merged).

    Args:
        trials: All finished relaxations of the defect in this charge state.
        bulk: The bulk supercell (reference distances for "new" bonds).
        oxidation_states: Oxidation state of each element (sign decides "like" ions).
        threshold: SOAP cosine-distance threshold.
        soap: SOAP settings.
        max_drop: Phase-change quarantine threshold (eV below the median).
        reference: The unrelaxed defect supercell (same atom order as the trials): with it each
            minimum says whether the defect changed kind or site (:func:`identity_change`).
        vacancy: Whether the defect is a vacancy (its empty site is a site too).
        max_rise: High-energy quarantine threshold (eV above the unperturbed relaxation).

    Returns:
        The minima (lowest first) and the quarantined trials with reasons.
    """
    good, bad = quarantine(trials, max_drop, max_rise)
    if not good:
        return [], bad
    bonds = _trial_bonds(good, bulk, oxidation_states)
    groups = group_minima(good, threshold, soap, [bond_signature(b) for b in bonds])
    e_ref = _reference_energy(good)
    members = {good[g[0]].name: [good[i].name for i in g] for g in groups}
    bad += _join_basins(trials, members)
    minima = [
        _minimum(rank, good[g[0]], bonds[g[0]], members[good[g[0]].name], e_ref, reference, vacancy)
        for rank, g in enumerate(groups)
    ]
    return minima, bad
