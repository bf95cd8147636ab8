"""How good is the surrogate? MLIP search results set against DFT for the same defects.

Metrics, per defect and charge state (seed paper, Methods and Table 2):

* ground-state hit: one of the shortlisted MLIP minima is the DFT lowest basin. Each shortlisted
  MLIP minimum is assigned to the nearest DFT minimum by the same defect-site SOAP distance the
  search groups with;
* DFT relaxations saved: 1 − shortlisted / DFT trials;
* energy MAE per atom, relative-energy MAE (each set relative to its own lowest paired trial),
  low-energy MAE (pairs whose DFT relative energy is within the window) — pairs are the same
  trial (e.g. ``Bond_Distortion_-30.0%``) relaxed by each method;
* Spearman rank correlation of the paired energies, averaged over defects;
* RMSD between the MLIP and DFT ground-state structures (success when ≤ 0.1 Å).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from defectml.dft.shortlist import select
from defectml.search.fingerprint import SoapSettings, cosine_distances, soap_fingerprints
from defectml.search.report import save_figure
from defectml.search.summary import DefectSummary

RMSD_SUCCESS = 0.1


@dataclass
class Comparison:
    """MLIP vs DFT for one defect in one charge state."""

    defect: str
    charge: int
    n_dft_trials: int
    n_shortlisted: int
    gs_hit: bool
    gs_match_distance: float | None
    dft_saved: float
    n_pairs: int
    energy_mae_per_atom: float | None
    relative_energy_mae: float | None
    low_energy_mae: float | None
    spearman: float | None
    gs_rmsd: float | None
    ml_gs_delta_e: float | None
    dft_gs_delta_e: float | None
    pairs: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def gs_rmsd_success(self) -> bool | None:
        """RMSD of the ground states within 0.1 Å."""
        return None if self.gs_rmsd is None else self.gs_rmsd <= RMSD_SUCCESS


def paired_energies(ml: DefectSummary, dft: DefectSummary) -> list[tuple[str, float, float]]:
    """(trial, E_ml, E_dft) for trials converged in both."""
    def energies(s: DefectSummary) -> dict[str, float]:
        bad = {t.name for t, _ in s.quarantined}
        return {t.name: t.energy for t in s.trials if t.energy is not None and t.name not in bad}

    e_ml, e_dft = energies(ml), energies(dft)
    return [(name, e_ml[name], e_dft[name]) for name in sorted(set(e_ml) & set(e_dft))]


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def structure_rmsd(a, b) -> float | None:
    """RMSD (Å) between two structures of the same composition (any order or origin)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    sa, sb = AseAtomsAdaptor.get_structure(a), AseAtomsAdaptor.get_structure(b)
    matcher = StructureMatcher(primitive_cell=False, scale=False, attempt_supercell=False,
                               stol=0.6, ltol=0.3, angle_tol=5)
    rms = matcher.get_rms_dist(sa, sb)
    if rms is None:
        return None
    return float(rms[0] * (sa.volume / len(sa)) ** (1 / 3))


def compare(
    ml: DefectSummary,
    dft: DefectSummary,
    *,
    max_per_defect: int = 5,
    window: float = 0.5,
    soap: SoapSettings | None = None,
) -> Comparison:
    """Compare the MLIP landscape of one defect with its DFT landscape."""
    shortlist = select(ml, max_per_defect, window)
    n_dft = len(dft.trials)
    hit, match = False, None
    if shortlist and dft.minima:
        structures = [m.atoms for m in shortlist] + [m.atoms for m in dft.minima]
        centres = [_centre(ml, m) for m in shortlist] + [_centre(dft, m) for m in dft.minima]
        d = cosine_distances(soap_fingerprints(structures, centres, soap))
        cross = d[: len(shortlist), len(shortlist):]
        nearest = cross.argmin(axis=1)
        hit = bool((nearest == 0).any())
        match = float(cross[:, 0].min())
    pairs = paired_energies(ml, dft)
    mae = rel = low = rho = None
    if pairs:
        natoms = len(ml.trials[0].atoms)
        e_ml = np.array([p[1] for p in pairs])
        e_dft = np.array([p[2] for p in pairs])
        mae = float(np.mean(np.abs(e_ml - e_dft)) / natoms)
        r_ml, r_dft = e_ml - e_ml.min(), e_dft - e_dft.min()
        rel = float(np.mean(np.abs(r_ml - r_dft)))
        low_mask = r_dft <= window
        low = float(np.mean(np.abs(r_ml - r_dft)[low_mask])) if low_mask.any() else None
        rho = _spearman(e_ml, e_dft)
    rmsd = None
    if ml.minima and dft.minima:
        rmsd = structure_rmsd(ml.minima[0].atoms, dft.minima[0].atoms)
    return Comparison(
        defect=ml.defect, charge=ml.charge, n_dft_trials=n_dft, n_shortlisted=len(shortlist),
        gs_hit=hit, gs_match_distance=match,
        dft_saved=1.0 - len(shortlist) / n_dft if n_dft else 0.0, n_pairs=len(pairs),
        energy_mae_per_atom=mae, relative_energy_mae=rel, low_energy_mae=low, spearman=rho,
        gs_rmsd=rmsd, ml_gs_delta_e=ml.minima[0].delta_e if ml.minima else None,
        dft_gs_delta_e=dft.minima[0].delta_e if dft.minima else None, pairs=pairs,
    )


def _centre(summary: DefectSummary, minimum) -> np.ndarray:
    trial = next(t for t in summary.trials if t.name == minimum.trial)
    return trial.centre()


def evaluate(
    ml: list[DefectSummary], dft: list[DefectSummary], **kw
) -> tuple[list[Comparison], dict]:
    """Compare every (defect, charge) present in both; return per-defect rows and averages."""
    dft_by_key = {(s.defect, s.charge): s for s in dft}
    rows = [compare(s, dft_by_key[(s.defect, s.charge)], **kw)
            for s in ml if (s.defect, s.charge) in dft_by_key]
    return rows, aggregate(rows)


def aggregate(rows: list[Comparison]) -> dict:
    """Averages over defects (``None`` entries skipped)."""
    def mean(key):
        vals = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        return float(np.mean(vals)) if vals else None

    n = len(rows)
    saved_total = (1 - sum(r.n_shortlisted for r in rows) / sum(r.n_dft_trials for r in rows)
                   if rows and sum(r.n_dft_trials for r in rows) else None)
    rmsd_ok = [r.gs_rmsd_success for r in rows if r.gs_rmsd is not None]
    return {
        "n_defects": n,
        "gs_hit_rate": sum(r.gs_hit for r in rows) / n if n else None,
        "dft_relaxations_saved": saved_total,
        "energy_mae_per_atom_eV": mean("energy_mae_per_atom"),
        "relative_energy_mae_eV": mean("relative_energy_mae"),
        "low_energy_mae_eV": mean("low_energy_mae"),
        "spearman_mean": mean("spearman"),
        "gs_rmsd_success_rate": (sum(rmsd_ok) / len(rmsd_ok)) if rmsd_ok else None,
    }


def to_dict(rows: list[Comparison], summary: dict) -> dict:
    """JSON-ready evaluation."""
    out = []
    for r in rows:
        d = asdict(r)
        d["gs_rmsd_success"] = r.gs_rmsd_success
        d["pairs"] = [{"trial": t, "e_ml": em, "e_dft": ed} for t, em, ed in r.pairs]
        out.append(d)
    return {"summary": summary, "defects": out}


def table(rows: list[Comparison], summary: dict) -> str:
    """Plain-text evaluation table."""
    def f(x, fmt):
        return format(x, fmt) if x is not None else "n/a"

    lines = [f"{'defect':<14} {'GS hit':>6} {'match d':>8} {'saved':>6} {'pairs':>5} "
             f"{'MAE/at':>8} {'relMAE':>7} {'lowMAE':>7} {'rho':>6} {'RMSD':>6} "
             f"{'dE_ml':>7} {'dE_dft':>7}"]
    for r in rows:
        label = f"{r.defect}_{r.charge:+d}" if r.charge else f"{r.defect}_0"
        lines.append(
            f"{label:<14} {str(r.gs_hit):>6} {f(r.gs_match_distance, '.1e'):>8} "
            f"{r.dft_saved:>6.0%} {r.n_pairs:>5} {f(r.energy_mae_per_atom, '.4f'):>8} "
            f"{f(r.relative_energy_mae, '.3f'):>7} {f(r.low_energy_mae, '.3f'):>7} "
            f"{f(r.spearman, '.2f'):>6} {f(r.gs_rmsd, '.3f'):>6} "
            f"{f(r.ml_gs_delta_e, '+.3f'):>7} {f(r.dft_gs_delta_e, '+.3f'):>7}")
    s = summary
    lines.append("")
    lines.append(
        f"GS hit rate {f(s['gs_hit_rate'], '.0%')}, DFT relaxations saved "
        f"{f(s['dft_relaxations_saved'], '.0%')}, mean Spearman {f(s['spearman_mean'], '.2f')}, "
        f"relative-energy MAE {f(s['relative_energy_mae_eV'], '.3f')} eV, "
        f"GS RMSD <= {RMSD_SUCCESS} Å: {f(s['gs_rmsd_success_rate'], '.0%')}")
    return "\n".join(lines) + "\n"


def parity_plot(rows: list[Comparison], path: Path) -> Path | None:
    """Relative energies, MLIP vs DFT, one colour per defect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.pairs for r in rows):
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=120)
    lo, hi = 0.0, 0.0
    for r in rows:
        if not r.pairs:
            continue
        e_ml = np.array([p[1] for p in r.pairs])
        e_dft = np.array([p[2] for p in r.pairs])
        x, y = e_dft - e_dft.min(), e_ml - e_ml.min()
        ax.scatter(x, y, s=18, label=f"{r.defect} {r.charge:+d}")
        hi = max(hi, x.max(), y.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("DFT relative energy (eV)")
    ax.set_ylabel("MLIP relative energy (eV)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
