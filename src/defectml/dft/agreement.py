"""Does the model agree with its DFT? Basins compared, the model's reproduction of its DFT, trust.

The active loop trusts nothing it has not checked against the DFT it already has:

* two structures of one defect form **the same bonds** when every new like-ion bond
  (:func:`defectml.search.landscape.new_bonds`) of each is a bond of the other within a slack of
  :data:`BOND_SLACK` (a pair at 2.66 Å in one and 2.69 Å in the other, either side of a 2.68 Å
  limit, is one bond, not a new one);
* they are in **the same basin** when they form the same bonds and either their atoms within the
  defect's neighbourhood lie within ``max_rmsd`` (0.2 Å) of each other (RMSD after removing the
  mean displacement of the cell) or their defect-site SOAP vectors lie within
  :data:`SOAP_MATCH` (a symmetry-equivalent copy of one basin, reached from another trial, has
  other atoms moved);
* a model **stays** in a DFT basin when, re-relaxed from the DFT end point, it forms the same
  bonds and lies within ``max_rmsd`` of it;
* a model **reproduces its DFT** (:func:`reproduction`) when every DFT end point, re-relaxed with
  the model, stays in its DFT basin, and the model orders the DFT basins as DFT does (each pair's
  energy difference within ``order_tol`` of DFT's, or of the same sign);
* a minimum of the model is **confirmed** when a DFT relaxation ended in its basin
  (:func:`confirming`): the trial having been asked is not enough, nor is a DFT end point that
  the model re-relaxed into it;
* a committee's force spread **trusts** a structure only when it has been calibrated on DFT
  frames the committee did not train on (:func:`calibrate_threshold`); uncalibrated, it trusts
  nothing.

Pure functions on ASE structures; no I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from ase import Atoms

from defectml.search.landscape import bond_signature, describe, like_pair_distances, local_symmetry, new_bonds
from defectml.structure_io import minimum_image

#: Largest RMSD (Å) of the defect's neighbourhood between two structures of one basin.
DEFAULT_MAX_RMSD = 0.2
#: A pair of DFT basins is ordered right when the model's energy difference is within this of
#: DFT's (eV), or of the same sign.
DEFAULT_ORDER_TOL = 0.1
#: Å by which a bond of one structure may exceed the bond limit in the other and still be the same
#: bond (seen on MgO Mg_O⁺⁴: DFT 2.662 Å, the model 2.69 Å, the limit 0.9 × 2.98 = 2.68 Å).
BOND_SLACK = 0.15
#: SOAP cosine distance below which two structures of one defect are one basin though other atoms
#: moved (a symmetry-equivalent copy). Measured on a 63-atom ZnS Zn vacancy (centred on the empty
#: site): a random 0.25 Å RMS move of the neighbourhood is 5.4e-4, 0.13 Å is 1.3e-4, an S-S dimer
#: 5.5e-3; so 5e-4 matches what ``max_rmsd`` 0.2 Å allows. (The search's 0.005 groups relaxed
#: trials of one model; it would merge structures 0.5 Å apart.)
SOAP_MATCH = 5e-4


@dataclass(frozen=True)
class Geometry:
    """How the structures of one defect in one supercell are compared.

    Attributes:
        like: Shortest distance of each element pair in the bulk supercell (Å).
        oxidation_states: Oxidation state of each element (the sign decides "like" ions).
        radius: The defect's neighbourhood (Å): bonds and RMSD are taken within it.
        site: The defect site (Cartesian, Å).
        defect_index: The defect atom (substitution, interstitial), or ``None`` (vacancy).
    """

    like: dict
    oxidation_states: dict
    radius: float
    site: np.ndarray
    defect_index: int | None

    @classmethod
    def of(cls, bulk: Atoms, oxidation_states: dict, site, defect_index: int | None) -> Geometry:
        """The geometry of a defect in ``bulk`` (the radius the landscape uses for new bonds)."""
        like = like_pair_distances(bulk)
        return cls(like, dict(oxidation_states), 1.5 * min(like.values()), np.asarray(site, float),
                   defect_index)

    def centre(self, atoms: Atoms) -> np.ndarray:
        """The defect's centre in ``atoms`` (the defect atom follows its atom)."""
        return self.site if self.defect_index is None else np.asarray(atoms.positions[self.defect_index])

    def bonds(self, atoms: Atoms, slack: float = 0.0) -> list[tuple[str, str, float]]:
        """New like-ion bonds near the defect (limits widened by ``slack`` Å)."""
        return new_bonds(atoms, self.centre(atoms), self.defect_index, self.oxidation_states, self.like,
                         self.radius, slack)

    def same_bonds(self, a: Atoms, b: Atoms) -> bool:
        """Every new bond of each is a bond of the other, within :data:`BOND_SLACK`."""
        strict_a, strict_b = Counter(bond_signature(self.bonds(a))), Counter(bond_signature(self.bonds(b)))
        loose_a = Counter(bond_signature(self.bonds(a, BOND_SLACK)))
        loose_b = Counter(bond_signature(self.bonds(b, BOND_SLACK)))
        return strict_a <= loose_b and strict_b <= loose_a

    def soap_distance(self, a: Atoms, b: Atoms) -> float:
        """Cosine distance of the two structures' defect-site SOAP vectors."""
        from defectml.search.fingerprint import soap_fingerprints

        species = sorted(set(a.get_chemical_symbols()) | set(b.get_chemical_symbols()))
        fa, fb = soap_fingerprints([a, b], [self.centre(a), self.centre(b)], None, species)
        return float(1.0 - fa @ fb)

    def label(self, atoms: Atoms) -> str:
        """``C3v, no new bonds`` / ``Cs, Te-Te dimer 2.81 Å``."""
        return describe(self.bonds(atoms), local_symmetry(atoms, self.centre(atoms), self.defect_index))

    def rmsd(self, a: Atoms, b: Atoms) -> float:
        """RMSD (Å) of the atoms within ``radius`` of the defect in ``a``, drift removed."""
        if len(a) != len(b) or list(a.numbers) != list(b.numbers):
            return float("inf")
        d = minimum_image(a, b.positions - a.positions)
        d -= d.mean(axis=0)
        near = np.linalg.norm(minimum_image(a, a.positions - self.centre(a)), axis=1) <= self.radius
        return float(np.sqrt((d[near] ** 2).sum(axis=1).mean())) if near.any() else 0.0

    def stays(self, start: Atoms, end: Atoms, max_rmsd: float = DEFAULT_MAX_RMSD) -> bool:
        """Whether a relaxation from ``start`` that ended at ``end`` stayed in its basin."""
        return self.same_bonds(start, end) and self.rmsd(start, end) <= max_rmsd

    def same_basin(self, a: Atoms, b: Atoms, max_rmsd: float = DEFAULT_MAX_RMSD) -> bool:
        """The same bonds; the neighbourhood within ``max_rmsd`` or the SOAP within :data:`SOAP_MATCH`."""
        if not self.same_bonds(a, b):
            return False
        return self.rmsd(a, b) <= max_rmsd or self.soap_distance(a, b) <= SOAP_MATCH


@dataclass(frozen=True)
class Point:
    """A relaxed structure with its energy (eV), named by its trial."""

    name: str
    atoms: Atoms
    energy: float


def basins(points: list[Point], geo: Geometry, max_rmsd: float = DEFAULT_MAX_RMSD) -> list[list[Point]]:
    """Group points into basins, lowest first; each group's first point is its lowest."""
    groups: list[list[Point]] = []
    for p in sorted(points, key=lambda p: p.energy):
        for g in groups:
            if geo.same_basin(g[0].atoms, p.atoms, max_rmsd):
                g.append(p)
                break
        else:
            groups.append([p])
    return groups


def confirming(atoms: Atoms, dft: list[Point], geo: Geometry,
               max_rmsd: float = DEFAULT_MAX_RMSD) -> str | None:
    """The DFT end point (its name) that lies in the basin of ``atoms``, lowest first; else ``None``."""
    for p in sorted(dft, key=lambda p: p.energy):
        if geo.same_basin(p.atoms, atoms, max_rmsd):
            return p.name
    return None


@dataclass
class Reproduction:
    """Whether a model reproduces its DFT (one defect and charge).

    Attributes:
        ok: ``True``/``False``; ``None`` when there is no DFT end point to check.
        reason: Why not (empty when it does).
        points: Per DFT end point: ``trial``, ``stayed``, ``rmsd_A``, ``dft_bonds``, ``model_bonds``.
        order: Per pair of DFT basins: ``lower``, ``upper``, ``dft_eV``, ``model_eV``, ``ok``.
    """

    ok: bool | None
    reason: str = ""
    points: list[dict] = field(default_factory=list)
    order: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def _bond_text(bonds) -> list:
    return [[a, b, float(d)] for a, b, d in bonds]


def reproduction(dft: list[Point], model: dict[str, Point | None], geo: Geometry, *,
                 max_rmsd: float = DEFAULT_MAX_RMSD, order_tol: float = DEFAULT_ORDER_TOL) -> Reproduction:
    """Check a model against its DFT end points.

    Args:
        dft: The converged DFT end points of one defect and charge.
        model: By DFT point name: the model's relaxation from that end point (``None``: failed).
        geo: How structures compare.
        max_rmsd: Largest neighbourhood RMSD (Å) of a point that stayed.
        order_tol: Energy tolerance (eV) of the order of the DFT basins.
    """
    if not dft:
        return Reproduction(None, "no DFT end point yet")
    points, left = [], []
    for p in dft:
        m = model.get(p.name)
        rmsd = geo.rmsd(p.atoms, m.atoms) if m is not None else float("inf")
        db = geo.bonds(p.atoms)
        mb = geo.bonds(m.atoms) if m is not None else []
        stayed = m is not None and geo.stays(p.atoms, m.atoms, max_rmsd)
        points.append({"trial": p.name, "stayed": stayed,
                       "rmsd_A": round(rmsd, 3) if np.isfinite(rmsd) else None,
                       "dft_bonds": _bond_text(db), "model_bonds": _bond_text(mb)})
        if not stayed:
            left.append(p.name)
    order, wrong = [], []
    lows = [g[0] for g in basins(dft, geo, max_rmsd)]
    for i, lo in enumerate(lows):
        for up in lows[i + 1:]:
            if model.get(lo.name) is None or model.get(up.name) is None:
                continue
            d_dft = up.energy - lo.energy
            d_ml = model[up.name].energy - model[lo.name].energy
            ok = abs(d_ml - d_dft) <= order_tol or np.sign(d_ml) == np.sign(d_dft)
            order.append({"lower": lo.name, "upper": up.name, "dft_eV": round(d_dft, 4),
                          "model_eV": round(d_ml, 4), "ok": bool(ok)})
            if not ok:
                wrong.append(f"{up.name} {d_ml:+.2f} eV above {lo.name} (DFT {d_dft:+.2f})")
    why = []
    if left:
        why.append(f"re-relaxed, {len(left)} DFT end point(s) leave their basin ({', '.join(left)})")
    if wrong:
        why.append("the DFT minima in the wrong order: " + "; ".join(wrong))
    return Reproduction(not why, "; ".join(why), points, order)


@dataclass
class TrustCalibration:
    """A committee force-spread threshold chosen on DFT frames it did not train on.

    Attributes:
        n: Frames scored.
        spearman: Rank correlation of spread and real force error (``None``: too few or constant).
        threshold: Spreads at or below it are trusted (eV/Å); ``None``: the score trusts nothing.
        error_target: The force error (eV/Å) a trusted frame may have at most.
        note: How it was chosen, or why there is no threshold.
    """

    n: int
    spearman: float | None
    threshold: float | None
    error_target: float
    note: str

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def calibrate_threshold(spreads: list[float], errors: list[float], error_target: float, *,
                        min_frames: int = 10, min_rho: float = 0.3) -> TrustCalibration:
    """The largest spread below which every held-out frame's force error is within ``error_target``.

    With fewer than ``min_frames`` frames, or a rank correlation below ``min_rho``, there is no
    threshold: a score that does not rank the errors trusts nothing.
    """
    from defectml.train.committee import calibration

    s, e = np.asarray(spreads, float), np.asarray(errors, float)
    rho = calibration(list(s), list(e))["spearman"]
    if len(s) < min_frames:
        return TrustCalibration(len(s), rho, None, error_target,
                                f"uncalibrated: {len(s)} held-out DFT frames (< {min_frames})")
    if rho is None or rho < min_rho:
        return TrustCalibration(len(s), rho, None, error_target,
                                f"uncalibrated: spread does not rank the errors (Spearman "
                                f"{'n/a' if rho is None else f'{rho:.2f}'} < {min_rho})")
    order = np.argsort(s)
    bad = np.flatnonzero(e[order] > error_target)
    if len(bad) and bad[0] == 0:
        return TrustCalibration(len(s), rho, None, error_target,
                                "the least uncertain held-out frame is already off by "
                                f"{e[order][0]:.3f} eV/Å")
    last = len(s) - 1 if not len(bad) else bad[0] - 1
    thr = float(s[order][last])
    return TrustCalibration(len(s), rho, thr, error_target,
                            f"{last + 1} of {len(s)} held-out frames up to spread {thr:.4f} eV/Å have force "
                            f"errors ≤ {error_target} eV/Å (Spearman {rho:.2f})")
