"""How good is a model on DFT frames: errors by host and charge, parity plots, relaxation test.

Errors: energy per atom (absolute: meaningful only within one functional and charge state) and
*relative within each relaxation* (each frame minus the relaxation's last frame, DFT against the
model: what ranking structures needs), forces and stresses (MAE and RMSE over components).

The relaxation test is what a search needs more than a force MAE: from the first frame of each
DFT relaxation, relax with the model (the search's own relaxer) and compare the end point with
DFT's last frame: RMSD (minimum image, the mean drift removed) and the model's energy there
against its energy at DFT's end point (negative: the model prefers a structure DFT does not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units

from defectml.structure_io import bare_atoms
from defectml.train.dataset import FrameSet, atom_chunks


@dataclass
class Predicted:
    """One frame, DFT against the model."""

    host: str
    charge: int
    run_id: str
    n_atoms: int
    e_dft: float
    e_model: float
    f_dft: np.ndarray
    f_model: np.ndarray
    s_dft: np.ndarray | None
    s_model: np.ndarray | None
    e_rel_dft: float = 0.0  # minus the relaxation's last frame
    e_rel_model: float = 0.0


def predict(model, sets: list[FrameSet], stress: bool = True, max_atoms: int = 256) -> list[Predicted]:
    """The model's energy and forces on every frame (batched), and its stress where DFT has one.

    With ``stress``, frames that carry a DFT stress go through the model's calculator (energy,
    forces and stress in one pass); the others through its batched prediction, in batches of at
    most ``max_atoms`` atoms.
    """
    out = []
    for fs in sets:
        bare = [bare_atoms(f) for f in fs.frames]
        has_s = [stress and f.calc.results.get("stress") is not None for f in fs.frames]
        results: list = [None] * len(bare)
        for i, a in enumerate(bare):
            if has_s[i]:
                a.calc = model.calculator
                results[i] = (float(a.get_potential_energy()), a.get_forces(), a.get_stress(voigt=True))
        rest = [i for i in range(len(bare)) if not has_s[i]]
        for chunk in atom_chunks([bare[i] for i in rest], max_atoms):
            idx = [rest[j] for j in chunk]
            for i, (e, f) in zip(idx, model.batch()([bare[i] for i in idx]), strict=True):
                results[i] = (e, f, None)
        rows = []
        for f, (e, forces, s_model) in zip(fs.frames, results, strict=True):
            s_dft = f.calc.results.get("stress")
            rows.append(Predicted(fs.host, fs.charge, fs.run_id, len(f), f.get_potential_energy(), e,
                                  f.get_forces(), np.asarray(forces),
                                  None if s_dft is None else np.asarray(s_dft).reshape(-1)[:6],
                                  None if s_model is None else np.asarray(s_model)))
        last = rows[-1]
        for r in rows:
            r.e_rel_dft, r.e_rel_model = r.e_dft - last.e_dft, r.e_model - last.e_model
        out.extend(rows)
    return out


def _mae_rmse(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.asarray(a, dtype=float).ravel() - np.asarray(b, dtype=float).ravel()
    return {"mae": float(np.abs(d).mean()), "rmse": float(np.sqrt((d**2).mean()))} if len(d) else {}


def errors(rows: list[Predicted]) -> dict:
    """Energy (per atom; relative per atom), force and stress errors of these frames."""
    n = np.array([r.n_atoms for r in rows])
    out = {
        "frames": len(rows),
        "energy_per_atom": _mae_rmse([r.e_model for r in rows] / n, [r.e_dft for r in rows] / n),
        "relative_energy_per_atom": _mae_rmse([r.e_rel_model for r in rows] / n,
                                              [r.e_rel_dft for r in rows] / n),
        "force": _mae_rmse(np.concatenate([r.f_model.ravel() for r in rows]),
                           np.concatenate([r.f_dft.ravel() for r in rows])),
    }
    with_s = [r for r in rows if r.s_dft is not None and r.s_model is not None]
    if with_s:
        out["stress_GPa"] = _mae_rmse(np.concatenate([r.s_model for r in with_s]) / units.GPa,
                                      np.concatenate([r.s_dft for r in with_s]) / units.GPa)
    return out


def grouped_errors(rows: list[Predicted]) -> dict:
    """:func:`errors` overall, per host and per charge."""
    by = {"overall": errors(rows), "host": {}, "charge": {}}
    for key, get in (("host", lambda r: r.host), ("charge", lambda r: str(r.charge))):
        for value in sorted({get(r) for r in rows}):
            by[key][value] = errors([r for r in rows if get(r) == value])
    return by


def parity_plot(rows: list[Predicted], path: Path, title: str = "") -> None:
    """Relative energies and force components, model against DFT, one colour per host."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_f) = plt.subplots(1, 2, figsize=(10, 4.6))
    hosts = sorted({r.host for r in rows})
    for h in hosts:
        sel = [r for r in rows if r.host == h]
        ax_e.scatter([r.e_rel_dft / r.n_atoms * 1000 for r in sel],
                     [r.e_rel_model / r.n_atoms * 1000 for r in sel], s=10, label=h)
        ax_f.scatter(np.concatenate([r.f_dft.ravel() for r in sel]),
                     np.concatenate([r.f_model.ravel() for r in sel]), s=3, alpha=0.5, label=h)
    for ax, what in ((ax_e, "energy relative to the relaxation's end (meV/atom)"),
                     (ax_f, "force component (eV/Å)")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"DFT {what}")
        ax.set_ylabel(f"model {what}")
    ax_e.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rmsd(a: Atoms, b: Atoms) -> float:
    """RMS displacement between two structures of the same atoms (minimum image, mean drift removed)."""
    d = a.get_scaled_positions() - b.get_scaled_positions()
    d -= np.round(d)
    cart = d @ a.cell.array
    cart -= cart.mean(axis=0)
    return float(np.sqrt((cart**2).sum(axis=1).mean()))


def relaxation_test(model, sets: list[FrameSet], fmax: float = 0.05, max_steps: int = 500,
                    progress: Callable = lambda x: x) -> list[dict]:
    """Relax each relaxation's first frame with the model; compare with DFT's last frame."""
    from defectml.core.relax import relax_one

    out = []
    for fs in progress(sets):
        if len(fs.frames) < 2 or fs.is_bulk:
            continue
        first, last = fs.frames[0], fs.frames[-1]
        start = bare_atoms(first)
        r = relax_one(start, model.calculator, fmax=fmax, max_steps=max_steps)
        end_dft = bare_atoms(last)
        end_dft.calc = model.calculator
        e_at_dft = float(end_dft.get_potential_energy())
        out.append({"run_id": fs.run_id, "host": fs.host, "defect": fs.defect, "charge": fs.charge,
                    "status": r.status, "steps": r.steps,
                    "rmsd_A": rmsd(r.atoms, last) if r.energy is not None else None,
                    "dft_rmsd_start_to_end_A": rmsd(first, last),
                    "model_energy_vs_dft_end_eV": None if r.energy is None else r.energy - e_at_dft})
    return out


def within(tests: list[dict], threshold: float = 0.1) -> float | None:
    """Fraction of relaxation tests ending within ``threshold`` Å RMSD of DFT's end point."""
    ok = [t["rmsd_A"] is not None and t["rmsd_A"] <= threshold for t in tests]
    return float(np.mean(ok)) if ok else None
