"""Trial structures: chemically guided bond distortions, rattles and dimers.

A *trial* is one starting structure for a relaxation. For each defect and charge state we make
(following ShakeNBreak and the seed paper's Methods):

* ``Unperturbed``: the ideal defect supercell, untouched (the energy reference);
* ``Rattled``: every atom given a Monte-Carlo rattle, no bond distortion;
* ``Bond_Distortion_X%``: the N nearest neighbours of the defect moved radially by X% of their
  distance to the defect site, every other atom rattled;
* ``Dimer`` (vacancies): the two closest neighbours pushed together to a bond length;
* ``Off_Centre_k`` (substitutions and interstitials, with ``off_centre``): the defect atom moved
  off its site toward the centre of k = 1, 2, 3 adjacent first-shell neighbours (a bond, an edge,
  a face), every other atom rattled. Bond distortions move the neighbours and leave the defect
  atom on its site; where the model holds the on-site structure as a minimum (a DX-like or
  off-centre ground state, e.g. Mg_O in MgO, 1.3 Å off the site), no other trial leaves it.

N follows from the number of excess electrons (see :func:`number_of_distorted_neighbours`).
Each trial gets its own seed derived from the base seed and its name, so trials are reproducible
one by one and differ from each other.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from defectml.errors import InputError
from defectml.settings import FromOptions

DEFAULT_DISTORTIONS: tuple[float, ...] = (
    -0.6, -0.5, -0.4, -0.3, -0.2, -0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
)


def parse_distortions(text: str | None) -> tuple[float, ...]:
    """``--distortions``: -0.6:0.6:0.1 or a list (zero dropped: that is the Rattled trial)."""
    if text is None:
        return DEFAULT_DISTORTIONS
    try:
        if text.count(":") == 2:
            lo, hi, step = (float(x) for x in text.split(":"))
            n = int(round((hi - lo) / step)) + 1
            values = [round(lo + i * step, 6) for i in range(n)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except (ValueError, ZeroDivisionError):
        raise InputError(f"cannot parse --distortions {text!r}: use -0.6:0.6:0.1 or -0.4,0.4") from None
    return tuple(v for v in values if abs(v) > 1e-9)


@dataclass(frozen=True)
class TrialSettings(FromOptions):
    """How trials are generated.

    Attributes:
        distortions: Bond-distortion factors (fractions, -0.6 = 60% compression). 0.0 is the
            ``Rattled`` trial and is not repeated here.
        rattle_stdev: Standard deviation (Å) of the rattle; ``None`` means 10% of the bulk
            nearest-neighbour distance.
        rattle_min_distance_factor: Rattle moves are rejected when an atom comes closer than
            this factor times the bulk nearest-neighbour distance to another atom.
        dimer_distance: Bond length (Å) of the ``Dimer`` trial (2.0 Å in the seed paper).
        unperturbed: Include the ``Unperturbed`` trial.
        rattled: Include the rattle-only trial.
        dimer: Include the ``Dimer`` trial for vacancies.
        all_pairs: Also distort every other combination of N first-shell neighbours (for alloys,
            where the closest atoms are not the only candidates), by ``pair_distortions``.
        pair_distortions: Factors for the all-pairs trials (default: ``distortions``).
        seed: Base random seed.
        min_distance: Trials with two atoms closer than this (Å) are dropped.
        off_centre: Displacement (Å) of the defect atom in the ``Off_Centre_k`` trials;
            ``None``: no such trials.
    """

    distortions: tuple[float, ...] = field(default=DEFAULT_DISTORTIONS, metadata={"parse": parse_distortions})
    rattle_stdev: float | None = None
    rattle_min_distance_factor: float = 0.8
    dimer_distance: float = 2.0
    unperturbed: bool = True
    rattled: bool = True
    dimer: bool = True
    all_pairs: bool = False
    pair_distortions: tuple[float, ...] | None = field(default=None, metadata={"parse": parse_distortions})
    seed: int = 42
    min_distance: float = 1.0
    off_centre: float | None = None

    def validate(self) -> None:
        """Raise ``InputError`` for values no trial can be made with."""
        for factors in (self.distortions, self.pair_distortions or ()):
            if any(abs(f) >= 1 for f in factors):
                raise InputError("bond distortions must lie strictly between -1 and 1")
        if self.dimer_distance <= 0 or (self.rattle_stdev is not None and self.rattle_stdev < 0):
            raise InputError("the dimer distance must be positive and the rattle stdev non-negative, "
                             f"got {self.dimer_distance} and {self.rattle_stdev}")

    def as_dict(self) -> dict:
        """Return a JSON-friendly copy (used to key results in the store).

        Unset optional fields (``None``) are left out, so adding an optional setting later does
        not change the keys of results already stored.
        """
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        d["distortions"] = [round(x, 6) for x in self.distortions]
        if self.pair_distortions is not None:
            d["pair_distortions"] = [round(x, 6) for x in self.pair_distortions]
        return d


@dataclass
class Trial:
    """One starting structure for a relaxation.

    Attributes:
        name: ``Unperturbed``, ``Rattled``, ``Dimer`` or ``Bond_Distortion_X%`` (with a
            ``_a-b`` suffix naming the distorted atoms in all-pairs mode).
        atoms: The starting structure.
        seed: The seed used for its rattle (0 for the unperturbed trial and for ShakeNBreak's
            POSCARs, whose rattle came with them).
        distortion: The bond-distortion factor, 0.0 for ``Rattled``, ``None`` otherwise.
        distorted_indices: Indices of the atoms moved by the distortion or dimer.
        source: The file the trial was read from (``search --trials-from``); ``None``: generated.
    """

    name: str
    atoms: Atoms
    seed: int
    distortion: float | None = None
    distorted_indices: tuple[int, ...] = field(default_factory=tuple)
    source: str | None = None


def number_of_distorted_neighbours(excess_electrons: int) -> int:
    """Number of neighbours to distort for a defect with ``excess_electrons``.

    The ShakeNBreak rule: |n| ≤ 4 → |n| neighbours, otherwise 8 − |n| (the defect is then
    closer to a full shell of the opposite sign).
    """
    n = abs(int(excess_electrons))
    return n if n <= 4 else max(0, 8 - n)


def trial_seed(base_seed: int, *labels: object) -> int:
    """A stable per-trial seed (independent of Python's hash randomisation)."""
    key = "|".join(str(x) for x in (base_seed, *labels))
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def _mic_vectors(atoms: Atoms, origin: np.ndarray) -> np.ndarray:
    """Minimum-image vectors from ``origin`` (Cartesian) to every atom."""
    cell = atoms.cell.array
    frac = np.linalg.solve(cell.T, (atoms.positions - origin).T).T
    frac -= np.round(frac)
    return frac @ cell


def neighbours_by_distance(atoms: Atoms, site: np.ndarray, exclude: int | None = None):
    """Atom indices sorted by minimum-image distance to ``site`` and the distances."""
    vec = _mic_vectors(atoms, site)
    dist = np.linalg.norm(vec, axis=1)
    if exclude is not None:
        dist[exclude] = np.inf
    order = np.argsort(dist, kind="stable")
    if exclude is not None:
        order = order[order != exclude]
    return order, dist[order]


def first_shell(atoms: Atoms, site: np.ndarray, exclude: int | None = None, tol: float = 0.15):
    """Indices of the first neighbour shell of ``site`` (within (1+tol) × closest distance)."""
    order, dist = neighbours_by_distance(atoms, site, exclude)
    return [int(i) for i, d in zip(order, dist, strict=True) if d <= dist[0] * (1 + tol)]


def min_interatomic_distance(atoms: Atoms) -> float:
    """Smallest minimum-image distance between two atoms (inf for a single atom)."""
    if len(atoms) < 2:
        return float("inf")
    from ase.neighborlist import neighbor_list

    cutoff = 3.0
    d = neighbor_list("d", atoms, cutoff)
    return float(d.min()) if len(d) else cutoff


def distort_bonds(atoms: Atoms, site: np.ndarray, indices, factor: float) -> Atoms:
    """Move ``indices`` radially: new distance to ``site`` = (1 + factor) × old distance."""
    out = atoms.copy()
    vec = _mic_vectors(atoms, site)
    for i in indices:
        out.positions[i] = site + (1.0 + factor) * vec[i]
    out.wrap()
    return out


def make_dimer(atoms: Atoms, pair: tuple[int, int], distance: float) -> Atoms:
    """Push the atoms of ``pair`` symmetrically along their bond to ``distance`` apart."""
    out = atoms.copy()
    i, j = pair
    bond = _mic_vectors(atoms, atoms.positions[i])[j]
    mid = atoms.positions[i] + 0.5 * bond
    unit = bond / np.linalg.norm(bond)
    out.positions[i] = mid - 0.5 * distance * unit
    out.positions[j] = mid + 0.5 * distance * unit
    out.wrap()
    return out


def mc_rattle(
    atoms: Atoms,
    stdev: float,
    d_min: float,
    seed: int,
    frozen=(),
    max_attempts: int = 10,
) -> Atoms:
    """Monte-Carlo rattle: Gaussian displacements that keep atoms ≥ ``d_min`` apart.

    Each non-frozen atom (in random order) draws up to ``max_attempts`` displacements of
    standard deviation ``stdev``; the first that keeps it at least ``d_min`` from every other
    atom is accepted, otherwise the atom stays where it is.
    """
    rng = np.random.default_rng(seed)
    out = atoms.copy()
    cell = out.cell.array
    inv = np.linalg.inv(cell)
    frozen_set = set(int(i) for i in frozen)
    for i in rng.permutation(len(out)):
        if int(i) in frozen_set:
            continue
        for _ in range(max_attempts):
            trial = out.positions[i] + rng.normal(0.0, stdev, 3)
            frac = (out.positions - trial) @ inv
            frac -= np.round(frac)
            d = np.linalg.norm(frac @ cell, axis=1)
            d[i] = np.inf
            if d.min() >= d_min:
                out.positions[i] = trial
                break
    out.wrap()
    return out


def off_centre_targets(atoms: Atoms, site: np.ndarray, shell, order) -> list[tuple[int, np.ndarray]]:
    """Where the ``Off_Centre_k`` trials point: the centre of k adjacent first-shell neighbours.

    k = 1: the nearest neighbour; 2, 3: it and the shell atoms closest to those already chosen
    (an edge, a face, not opposite atoms). Directions closer than 0.1 Å to the site are skipped.
    """
    vec = _mic_vectors(atoms, site)
    shell = [int(i) for i in shell] or [int(i) for i in order[:1]]
    if not shell:
        return []
    chosen = [int(order[0])] if int(order[0]) in shell else [shell[0]]
    out = []
    for k in (1, 2, 3):
        if k > 1:
            rest = [i for i in shell if i not in chosen]
            if not rest:
                break
            chosen.append(min(rest, key=lambda i: sum(np.linalg.norm(vec[i] - vec[j]) for j in chosen)))
        centre = vec[chosen].mean(axis=0)
        if np.linalg.norm(centre) >= 0.1:
            out.append((k, site + centre))
    return out


@dataclass(frozen=True)
class _Rattler:
    """Rattles one trial's structure with the trial's own seed (from the base seed, label and name).

    Attributes:
        base_seed: ``TrialSettings.seed``.
        label: Defect and charge label, mixed into each trial's seed.
        stdev: Standard deviation (Å) of the rattle.
        d_min: Closest approach (Å) a rattle move may leave.
    """

    base_seed: int
    label: str
    stdev: float
    d_min: float

    def __call__(self, base: Atoms, name: str, frozen=()) -> tuple[Atoms, int]:
        """Return ``base`` rattled (``frozen`` atoms kept) and the seed used."""
        seed = trial_seed(self.base_seed, self.label, name)
        return mc_rattle(base, self.stdev, self.d_min, seed, frozen=frozen), seed


def _distortion_groups(
    order: np.ndarray, shell: list[int], n_distorted: int, settings: TrialSettings
) -> list[tuple[tuple[int, ...], tuple[float, ...], str]]:
    """The atom groups to distort, each with its factors and trial-name suffix.

    Args:
        order: Atom indices by distance to the defect site.
        shell: The first neighbour shell.
        n_distorted: Number of neighbours to distort.
        settings: Trial settings (``distortions``, ``all_pairs``, ``pair_distortions``).

    Returns:
        The ``n_distorted`` closest atoms with ``settings.distortions`` and no suffix, then (in
        all-pairs mode) every other combination of first-shell atoms with its ``_a-b`` suffix.
    """
    closest = tuple(int(i) for i in order[:n_distorted])
    groups = [(closest, settings.distortions, "")]
    if settings.all_pairs and len(shell) > n_distorted:
        factors = settings.pair_distortions or settings.distortions
        for combo in itertools.combinations(sorted(shell), n_distorted):
            if set(combo) != set(closest):
                groups.append((combo, factors, "_" + "-".join(str(i) for i in combo)))
    return groups


def _bond_distortion_trials(
    atoms: Atoms,
    site: np.ndarray,
    groups: list[tuple[tuple[int, ...], tuple[float, ...], str]],
    rattled: _Rattler,
) -> list[Trial]:
    """``Bond_Distortion_X%`` trials: each group distorted by each of its (non-zero) factors.

    Args:
        atoms: The unrelaxed defect supercell.
        site: Cartesian position of the defect site.
        groups: Atom groups with factors and name suffixes (:func:`_distortion_groups`).
        rattled: Rattles every other atom.

    Returns:
        The trials, group by group, factor by factor.
    """
    trials = []
    for group, factors, suffix in groups:
        for f in factors:
            if abs(f) < 1e-9:
                continue
            name = f"Bond_Distortion_{100 * f:.1f}%{suffix}"
            base = distort_bonds(atoms, site, group, f)
            a, seed = rattled(base, name, frozen=group)
            trials.append(Trial(name, a, seed=seed, distortion=f, distorted_indices=group))
    return trials


def _off_centre_trials(
    atoms: Atoms,
    site: np.ndarray,
    defect_index: int,
    step_length: float,
    shell: list[int],
    order: np.ndarray,
    rattled: _Rattler,
) -> list[Trial]:
    """``Off_Centre_k`` trials: the defect atom moved ``step_length`` Å toward each target.

    Args:
        atoms: The unrelaxed defect supercell.
        site: Cartesian position of the defect site.
        defect_index: Index of the defect atom.
        step_length: ``TrialSettings.off_centre`` (Å).
        shell: The first neighbour shell.
        order: Atom indices by distance to the defect site.
        rattled: Rattles every other atom.

    Returns:
        One trial per target of :func:`off_centre_targets`.
    """
    trials = []
    for k, target in off_centre_targets(atoms, site, shell, order):
        name = f"Off_Centre_{k}"
        base = atoms.copy()
        step = target - site
        base.positions[defect_index] += step_length * step / np.linalg.norm(step)
        a, seed = rattled(base, name, frozen=(defect_index,))
        trials.append(Trial(name, a, seed=seed, distorted_indices=(defect_index,)))
    return trials


def _dimer_trial(atoms: Atoms, order: np.ndarray, distance: float, rattled: _Rattler) -> Trial:
    """The ``Dimer`` trial: the two atoms closest to the site pushed to ``distance`` apart."""
    pair = (int(order[0]), int(order[1]))
    base = make_dimer(atoms, pair, distance)
    a, seed = rattled(base, "Dimer", frozen=pair)
    return Trial("Dimer", a, seed=seed, distorted_indices=pair)


def _drop_close_trials(candidates: list[Trial], min_distance: float) -> tuple[list[Trial], list[str]]:
    """Split ``candidates`` into those kept and notes on those with atoms under ``min_distance`` apart."""
    trials, dropped = [], []
    for t in candidates:
        dmin = min_interatomic_distance(t.atoms)
        if dmin < min_distance:
            dropped.append(f"{t.name}: atoms {dmin:.2f} Å apart (< {min_distance} Å)")
        else:
            trials.append(t)
    return trials, dropped


def make_trials(
    atoms: Atoms,
    site: np.ndarray,
    *,
    defect_index: int | None,
    n_distorted: int,
    bulk_nn_distance: float,
    is_vacancy: bool,
    settings: TrialSettings,
    label: str = "",
) -> tuple[list[Trial], list[str]]:
    """Make all trial structures for one defect in one charge state.

    Args:
        atoms: The unrelaxed defect supercell.
        site: Cartesian position of the defect site (vacant site, substituted or inserted atom).
        defect_index: Index of the defect atom (``None`` for a vacancy).
        n_distorted: Number of neighbours to distort (see :func:`number_of_distorted_neighbours`).
        bulk_nn_distance: Bulk nearest-neighbour distance (Å), sets the rattle scale.
        is_vacancy: Whether to add the ``Dimer`` trial.
        settings: Trial settings.
        label: Defect and charge label, mixed into each trial's seed.

    Returns:
        The trials, and a note for each trial dropped (atoms closer than ``settings.min_distance``).
    """
    stdev = settings.rattle_stdev if settings.rattle_stdev is not None else 0.1 * bulk_nn_distance
    rattled = _Rattler(settings.seed, label, stdev, settings.rattle_min_distance_factor * bulk_nn_distance)
    order, _ = neighbours_by_distance(atoms, site, exclude=defect_index)
    shell = first_shell(atoms, site, exclude=defect_index)
    candidates: list[Trial] = []
    if settings.unperturbed:
        candidates.append(Trial("Unperturbed", atoms.copy(), seed=0))
    if settings.rattled:
        a, seed = rattled(atoms, "Rattled")
        candidates.append(Trial("Rattled", a, seed=seed, distortion=0.0))
    if n_distorted > 0:
        groups = _distortion_groups(order, shell, n_distorted, settings)
        candidates += _bond_distortion_trials(atoms, site, groups, rattled)
    if settings.off_centre and defect_index is not None:
        step = settings.off_centre
        candidates += _off_centre_trials(atoms, site, defect_index, step, shell, order, rattled)
    if settings.dimer and is_vacancy and len(order) >= 2:
        candidates.append(_dimer_trial(atoms, order, settings.dimer_distance, rattled))
    return _drop_close_trials(candidates, settings.min_distance)
