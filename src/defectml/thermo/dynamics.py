"""Defect dynamics with an MLIP: MD, trajectory analysis, NEB barriers, TST rates, inherent structures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.geometry import get_distances
from ase.units import kB

from defectml.errors import DefectMLError


def run_md(
    atoms: Atoms,
    calculator: Calculator,
    temperature: float,
    steps: int,
    *,
    timestep: float = 2.0,
    pressure_bar: float | None = None,
    interval: int = 10,
    seed: int = 0,
    progress: Callable | None = None,
) -> list[Atoms]:
    """NVT (or NPT when ``pressure_bar`` is given) Langevin-BAOAB MD; every ``interval`` steps a frame.

    Frames carry ``info['time_fs']``, ``info['energy']`` and ``info['temperature']``.
    """
    from ase.md.langevinbaoab import LangevinBAOAB
    from ase.md.velocitydistribution import Stationary

    try:  # ASE >= 3.28
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # pragma: no cover
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    work = atoms.copy()
    work.calc = calculator
    rng = np.random.default_rng(seed)
    thermalize_momenta(work, temperature_K=temperature, rng=rng)
    Stationary(work)
    kwargs = {"temperature_K": temperature, "T_tau": 100 * units.fs, "rng": rng}
    if pressure_bar is not None:
        kwargs.update(externalstress=-pressure_bar * units.bar, hydrostatic=True, P_tau=1000 * units.fs)
    dyn = LangevinBAOAB(work, timestep * units.fs, **kwargs)
    frames: list[Atoms] = []

    def snapshot():
        e = float(work.get_potential_energy())
        if not np.isfinite(e):
            raise DefectMLError(f"MD exploded (NaN energy) after {dyn.nsteps} steps")
        frame = work.copy()
        frame.calc = None
        frame.info.update(time_fs=dyn.nsteps * timestep, energy=e, temperature=float(work.get_temperature()))
        frames.append(frame)
        if progress:
            progress(len(frames))

    dyn.attach(snapshot, interval=interval)
    dyn.run(steps)
    return frames


def defect_centre(atoms: Atoms, bulk: Atoms, kind: str, defect_index: int | None = None) -> np.ndarray:
    """Where the defect is now, found afresh in every frame (so exchanges and hops are seen).

    Vacancy: the bulk site farthest from any atom. Interstitial: the atom farthest from any bulk
    site. Substitution: the foreign atom (``defect_index``).
    """
    if kind == "substitution" and defect_index is not None:
        return atoms.positions[defect_index].copy()
    _, d = get_distances(bulk.positions, atoms.positions, cell=atoms.cell, pbc=True)
    if kind == "vacancy":
        return bulk.positions[int(np.argmax(d.min(axis=1)))].copy()
    if kind == "interstitial":
        return atoms.positions[int(np.argmax(d.min(axis=0)))].copy()
    raise DefectMLError(f"unknown defect kind {kind!r}")


def _defect_shell(frame: Atoms, centre: np.ndarray, shell: float) -> tuple[list, float | None, list | None]:
    """The defect's neighbour shell in one frame and the shortest bond within it.

    Args:
        frame: One MD frame.
        centre: The defect centre (Cartesian) in it.
        shell: Radius (Å) of the shell; atoms within 0.3 Å of the centre are not in it.

    Returns:
        The sorted centre-neighbour distances (rounded to 1e-4 Å), the shortest neighbour-neighbour
        distance and the angles (degrees, rounded to 0.01) of that bond to the x, y, z axes; the
        last two ``None`` with fewer than two neighbours.
    """
    _, dist = get_distances(centre, frame.positions, cell=frame.cell, pbc=True)
    sel = np.where((dist[0] > 0.3) & (dist[0] < shell))[0]
    distances = np.sort(dist[0][sel]).round(4).tolist()
    bond, angles = None, None
    if len(sel) > 1:
        pv, pd = get_distances(frame.positions[sel], cell=frame.cell, pbc=True)
        iu = np.triu_indices(len(sel), 1)
        k = int(np.argmin(pd[iu]))
        bond = float(pd[iu][k])
        v = pv[iu[0][k], iu[1][k]]
        angles = np.degrees(np.arccos(np.abs(v) / np.linalg.norm(v))).round(2).tolist()
    return distances, bond, angles


def analyse_trajectory(
    frames: Sequence[Atoms],
    bulk: Atoms,
    kind: str,
    defect_index: int | None = None,
    shell: float | None = None,
    bond_cutoff: float | None = None,
) -> dict:
    """Defect position, hops, neighbour distances and bond orientation along a trajectory.

    Args:
        frames: MD frames (same atom order as ``bulk`` plus/minus the defect).
        bulk: The pristine supercell (lattice sites).
        kind: ``vacancy``, ``interstitial`` or ``substitution``.
        defect_index: Index of the foreign atom for substitutions.
        shell: Radius of the defect's neighbour shell (default 1.2 x the bulk nearest-neighbour
            distance).
        bond_cutoff: Length below which two neighbours of the defect count as bonded (default
            0.9 x the bulk like-pair distance, i.e. dimers).

    Returns:
        Per-frame arrays: ``time_fs``, ``site`` (nearest lattice site of the defect), ``hops``
        (cumulative site changes), ``neighbour_distances`` (sorted distances from the defect centre
        to its shell), ``shortest_bond`` and ``bond_angles`` (angle in degrees of the shortest
        neighbour-neighbour bond to the x, y, z axes).
    """
    if len(frames) == 0:
        raise DefectMLError("no frames to analyse")
    d_bulk = get_distances(bulk.positions, cell=bulk.cell, pbc=True)[1]
    nn = float(np.min(d_bulk[d_bulk > 0.1]))
    shell = shell or 1.2 * nn
    bond_cutoff = bond_cutoff or 0.9 * _like_distance(bulk)
    keys = ("time_fs", "site", "hops", "neighbour_distances", "shortest_bond", "bond_angles")
    out: dict = {key: [] for key in keys}
    hops, last = 0, None
    for f in frames:
        c = defect_centre(f, bulk, kind, defect_index)
        site = int(np.argmin(get_distances(c, bulk.positions, cell=f.cell, pbc=True)[1][0]))
        if last is not None and site != last:
            hops += 1
        last = site
        distances, bond, angles = _defect_shell(f, c, shell)
        out["time_fs"].append(float(f.info.get("time_fs", len(out["time_fs"]))))
        out["site"].append(site)
        out["hops"].append(hops)
        out["neighbour_distances"].append(distances)
        out["shortest_bond"].append(bond)
        out["bond_angles"].append(angles if bond is not None and bond < bond_cutoff else None)
    out["n_hops"] = hops
    out["bonded_fraction"] = float(np.mean([a is not None for a in out["bond_angles"]]))
    return out


def _like_distance(bulk: Atoms) -> float:
    symbols = np.array(bulk.get_chemical_symbols())
    best = np.inf
    for s in set(symbols):
        idx = np.where(symbols == s)[0]
        if len(idx) > 1:
            d = get_distances(bulk.positions[idx], cell=bulk.cell, pbc=True)[1]
            best = min(best, float(np.min(d[d > 0.1])))
    return best


@dataclass
class NEBResult:
    """A minimum-energy path between two minima."""

    energies: np.ndarray  # relative to the initial image (eV)
    barrier: float  # forward barrier (eV)
    reverse_barrier: float
    images: list[Atoms]
    converged: bool

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return {
            "energies_eV": self.energies.round(5).tolist(),
            "barrier_eV": self.barrier,
            "reverse_barrier_eV": self.reverse_barrier,
            "converged": self.converged,
        }


def align_final(initial: Atoms, final: Atoms) -> Atoms:
    """``final`` with every atom moved to the periodic image nearest its ``initial`` position."""
    if len(initial) != len(final) or initial.get_chemical_symbols() != final.get_chemical_symbols():
        raise DefectMLError("NEB end points must have the same atoms in the same order")
    out = final.copy()
    d, _ = get_distances(initial.positions, final.positions, cell=initial.cell, pbc=True)
    out.positions = initial.positions + d[np.arange(len(initial)), np.arange(len(initial))]
    return out


def neb(
    initial: Atoms,
    final: Atoms,
    calculator: Calculator,
    n_images: int = 5,
    fmax: float = 0.05,
    steps: int = 300,
    climb: bool = True,
) -> NEBResult:
    """Climbing-image NEB (ASE, IDPP interpolation) between two relaxed minima."""
    from ase.mep import NEB
    from ase.optimize import FIRE

    final = align_final(initial, final)
    images = [initial.copy() for _ in range(n_images + 1)] + [final]
    for im in images:
        im.calc = calculator
    band = NEB(images, climb=climb, allow_shared_calculator=True, method="improvedtangent")
    band.interpolate("idpp", mic=False)
    opt = FIRE(band, logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    e = np.array([float(im.get_potential_energy()) for im in images])
    if not np.all(np.isfinite(e)):
        raise DefectMLError("NEB produced non-finite energies")
    out = [im.copy() for im in images]
    return NEBResult(e - e[0], float(e.max() - e[0]), float(e.max() - e[-1]), out, converged)


def attempt_frequency(atoms: Atoms, direction: np.ndarray, calculator: Calculator, h: float = 0.01) -> float:
    """Nu = sqrt(kappa)/2pi from the curvature along the (mass-weighted) path direction, in Hz."""
    m = np.repeat(atoms.get_masses(), 3)
    t = np.sqrt(m) * np.asarray(direction, float).ravel()
    t /= np.linalg.norm(t)
    step = h * t / np.sqrt(m)  # displacement in Cartesian space for a mass-weighted step h
    forces = []
    for sign in (1, -1):
        work = atoms.copy()
        work.positions = atoms.positions + sign * step.reshape(-1, 3)
        work.calc = calculator
        forces.append(np.asarray(work.get_forces()).ravel())
    kappa = -float(np.dot((forces[0] - forces[1]) / (2 * h), t / np.sqrt(m)))
    if kappa <= 0:
        raise DefectMLError("the initial state is not a minimum along the path (negative curvature)")
    omega = np.sqrt(kappa)  # 1 / ASE time
    return float(omega * units.fs * 1e15 / (2 * np.pi))  # 1/ASE-time -> 1/fs -> Hz


def tst_rate(barrier: float, attempt_hz: float, temperature: float) -> float:
    """Transition-state-theory rate nu exp(-Ea / kT) (1/s)."""
    return float(attempt_hz * np.exp(-barrier / (kB * temperature)))


def inherent_structures(
    frames: Sequence[Atoms],
    calculator: Calculator,
    minima: Sequence[Atoms],
    centres: Sequence[np.ndarray],
    frame_centres: Sequence[np.ndarray],
    threshold: float = 0.005,
    fmax: float = 0.05,
    steps: int = 300,
    species: Sequence[str] | None = None,
) -> dict:
    """Quench MD frames to their local minima and assign each to a known minimum (SOAP at the defect).

    Returns the quenched energies, the index of the matched minimum per frame (-1: none within
    ``threshold``, a minimum the search did not find) and the populations.
    """
    from defectml.core.relax import FAILED, relax_one
    from defectml.search.fingerprint import soap_fingerprints

    quenched, energies = [], []
    for i, f in enumerate(frames):
        r = relax_one(f, calculator, fmax=fmax, max_steps=steps)  # FIRE, with the relaxer's checks
        if r.status == FAILED:
            raise DefectMLError(f"quenching MD frame {i} failed: {r.reason}")
        energies.append(float(r.energy))
        quenched.append(r.atoms)
    species = species or sorted({s for a in list(minima) + quenched for s in a.get_chemical_symbols()})
    ref = soap_fingerprints(list(minima), list(centres), species=species)
    fp = soap_fingerprints(quenched, list(frame_centres), species=species)
    dist = 1 - np.clip(fp @ ref.T, -1, 1)
    match = np.where(dist.min(axis=1) <= threshold, dist.argmin(axis=1), -1)
    counts = {int(i): int(np.sum(match == i)) for i in range(-1, len(minima))}
    return {
        "energies_eV": energies,
        "match": match.tolist(),
        "distance": dist.min(axis=1).tolist(),
        "populations": {k: v / len(frames) for k, v in counts.items()},
    }
