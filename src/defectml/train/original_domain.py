"""The base model's own domain: replay frames for fine-tuning and a set that measures forgetting.

No MPtrj (the universal models' training data) is reachable here, so the original domain is
stood for by two kinds of frames:

* crystals labelled by the frozen base model: strained and rattled supercells of simple
  prototypes (experimental lattice constants). These are **self-distillation labels, not DFT**
  (the pseudo-labelling MACE's multi-head fine-tuning uses when its pretraining data is out of
  reach): they ask the fine-tuned model to stay where the base model was, nothing more;
* real bulk DFT frames of the hosts.

:data:`PROTOTYPES` is split once and for all between *replay* (mixed into training by
``finetune --strategy replay|multihead``) and *forgetting* (never trained on; the
before/after error on it is the forgetting measure), so the measure never sees a crystal that
replay trained on. Each side holds crystals of the defect data's elements (Zn, S, O, Mg, Ga, N,
Se, Si, Sr, Ti, Al, Cu, Sb, Te, V, Y) and others; no host of the defect data is on the
forgetting side (training on a host's own DFT is learning, not forgetting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

#: (name, ase.build.bulk arguments, side). Lattice constants: experimental, room temperature.
PROTOTYPES: tuple[tuple[str, dict, str], ...] = (
    # replay side
    ("ZnSe", {"name": "ZnSe", "crystalstructure": "zincblende", "a": 5.668}, "replay"),
    ("MgO", {"name": "MgO", "crystalstructure": "rocksalt", "a": 4.212}, "replay"),
    ("GaN", {"name": "GaN", "crystalstructure": "wurtzite", "a": 3.189, "c": 5.185}, "replay"),
    ("Al", {"name": "Al", "crystalstructure": "fcc", "a": 4.05}, "replay"),
    ("Mg", {"name": "Mg", "crystalstructure": "hcp", "a": 3.209, "c": 5.211}, "replay"),
    ("Ti", {"name": "Ti", "crystalstructure": "hcp", "a": 2.951, "c": 4.686}, "replay"),
    ("SrS", {"name": "SrS", "crystalstructure": "rocksalt", "a": 6.02}, "replay"),
    ("SiC", {"name": "SiC", "crystalstructure": "zincblende", "a": 4.36}, "replay"),
    ("TiN", {"name": "TiN", "crystalstructure": "rocksalt", "a": 4.24}, "replay"),
    ("V", {"name": "V", "crystalstructure": "bcc", "a": 3.03}, "replay"),
    ("AlSb", {"name": "AlSb", "crystalstructure": "zincblende", "a": 6.136}, "replay"),
    ("ZnTe", {"name": "ZnTe", "crystalstructure": "zincblende", "a": 6.101}, "replay"),
    ("Y", {"name": "Y", "crystalstructure": "hcp", "a": 3.647, "c": 5.731}, "replay"),
    ("CuCl", {"name": "CuCl", "crystalstructure": "zincblende", "a": 5.42}, "replay"),
    ("KBr", {"name": "KBr", "crystalstructure": "rocksalt", "a": 6.60}, "replay"),
    ("Mo", {"name": "Mo", "crystalstructure": "bcc", "a": 3.147}, "replay"),
    # forgetting side (never trained on)
    ("ZnO", {"name": "ZnO", "crystalstructure": "wurtzite", "a": 3.25, "c": 5.207}, "forgetting"),
    ("MgS", {"name": "MgS", "crystalstructure": "rocksalt", "a": 5.20}, "forgetting"),
    ("GaP", {"name": "GaP", "crystalstructure": "zincblende", "a": 5.451}, "forgetting"),
    ("AlN", {"name": "AlN", "crystalstructure": "wurtzite", "a": 3.112, "c": 4.982}, "forgetting"),
    ("SrO", {"name": "SrO", "crystalstructure": "rocksalt", "a": 5.16}, "forgetting"),
    ("Si", {"name": "Si", "crystalstructure": "diamond", "a": 5.431}, "forgetting"),
    ("Cu", {"name": "Cu", "crystalstructure": "fcc", "a": 3.615}, "forgetting"),
    ("InP", {"name": "InP", "crystalstructure": "zincblende", "a": 5.869}, "forgetting"),
    ("VN", {"name": "VN", "crystalstructure": "rocksalt", "a": 4.14}, "forgetting"),
    ("NaCl", {"name": "NaCl", "crystalstructure": "rocksalt", "a": 5.64}, "forgetting"),
    ("GaAs", {"name": "GaAs", "crystalstructure": "zincblende", "a": 5.653}, "forgetting"),
    ("CaF2", {"name": "CaF2", "crystalstructure": "fluorite", "a": 5.463}, "forgetting"),
    ("W", {"name": "W", "crystalstructure": "bcc", "a": 3.165}, "forgetting"),
    ("Ni", {"name": "Ni", "crystalstructure": "fcc", "a": 3.524}, "forgetting"),
    ("LiF", {"name": "LiF", "crystalstructure": "rocksalt", "a": 4.03}, "forgetting"),
    ("CsCl", {"name": "CsCl", "crystalstructure": "cesiumchloride", "a": 4.123}, "forgetting"),
)
SIDES = ("replay", "forgetting")


@dataclass(frozen=True)
class CrystalSettings:
    """How the base-labelled crystals are drawn.

    Attributes:
        variants: Structures per prototype.
        min_atoms: Supercells are grown (cubic-ish repeats) to at least this many atoms.
        strain: Largest random strain (each component, fraction).
        rattle: Standard deviation of the atomic displacements, Å.
        seed: Random seed (the forgetting side adds 1000 to it, so the two sides never share one).
    """

    variants: int = 2
    min_atoms: int = 16
    strain: float = 0.02
    rattle: float = 0.05
    seed: int = 0


def prototypes(side: str, elements: set[str] | None = None) -> list[tuple[str, dict]]:
    """The prototypes of one side, those of ``elements`` first (all of them when ``None``)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    chosen = [(n, kw) for n, kw, s in PROTOTYPES if s == side]
    if elements is None:
        return chosen
    from pymatgen.core import Composition

    same = [(n, kw) for n, kw in chosen if set(map(str, Composition(n).elements)) & elements]
    return same + [p for p in chosen if p not in same]


def _supercell(atoms: Atoms, min_atoms: int) -> Atoms:
    reps = [1, 1, 1]
    while len(atoms) * int(np.prod(reps)) < min_atoms:
        lengths = atoms.cell.lengths() * reps
        reps[int(np.argmin(lengths))] += 1
    return atoms.repeat(reps)


def crystals(side: str, s: CrystalSettings = CrystalSettings(), elements: set[str] | None = None,
             allowed: set[str] | frozenset[str] | None = None) -> list[Atoms]:
    """Strained, rattled supercells of one side's prototypes (unlabelled).

    Args:
        side: ``replay`` or ``forgetting``.
        s: How many and how far from the ideal crystal.
        elements: Elements to put first (their prototypes are "same elements").
        allowed: Only prototypes whose elements all lie here (the base model's elements).
    """
    rng = np.random.default_rng(s.seed + (1000 if side == "forgetting" else 0))
    out = []
    for name, kw in prototypes(side, elements):
        cell = bulk(**kw)
        if allowed is not None and not set(cell.get_chemical_symbols()) <= set(allowed):
            continue
        cell = _supercell(cell, s.min_atoms)
        for v in range(s.variants):
            a = cell.copy()
            eps = rng.uniform(-s.strain, s.strain, (3, 3))
            a.set_cell(a.cell.array @ (np.eye(3) + (eps + eps.T) / 2), scale_atoms=True)
            a.positions += rng.normal(0.0, s.rattle, a.positions.shape)
            a.info.update(host=f"{side}:{name}", defect="bulk", charge=0, run_id=f"{side}:{name}:{v}",
                          defect_group="bulk", ionic_step=0)
            out.append(a)
    return out


def label(model, structures: list[Atoms], stress: bool = True) -> list[Atoms]:
    """The structures with the model's energy, forces (and stress) as single-point results.

    ``info["functional"]`` names the model (``base:<key>``): these labels are the model's, not DFT.
    """
    out = []
    for a in structures:
        b = Atoms(a.numbers, a.positions, cell=a.cell, pbc=True)
        b.calc = model.calculator
        results = {"energy": float(b.get_potential_energy()), "forces": np.array(b.get_forces())}
        if stress:
            results["stress"] = np.array(b.get_stress(voigt=True))
        b.calc = SinglePointCalculator(b, **results)
        b.info.update(a.info)
        b.info["functional"] = f"base:{model.key}"
        out.append(b)
    return out


def base_labelled(model, side: str, s: CrystalSettings = CrystalSettings(),
                  elements: set[str] | None = None, stress: bool = True) -> list[Atoms]:
    """One side's crystals labelled by ``model`` (only prototypes within its elements)."""
    return label(model, crystals(side, s, elements, allowed=model.elements), stress=stress)


def force_mae(model, frames: list[Atoms]) -> float:
    """Force MAE (eV/Å, over components) of ``model`` against the frames' labels."""
    from defectml.train.dataset import atom_chunks

    bare = [Atoms(f.numbers, f.positions, cell=f.cell, pbc=True) for f in frames]
    diffs = []
    for idx in atom_chunks(bare):
        for i, (_, forces) in zip(idx, model.batch()([bare[i] for i in idx]), strict=True):
            diffs.append(np.abs(np.asarray(forces) - frames[i].get_forces()).ravel())
    return float(np.concatenate(diffs).mean()) if diffs else float("nan")


def energy_mae(model, frames: list[Atoms]) -> float:
    """Energy MAE (eV/atom) of ``model`` against the frames' labels."""
    from defectml.train.dataset import atom_chunks

    bare = [Atoms(f.numbers, f.positions, cell=f.cell, pbc=True) for f in frames]
    errs = []
    for idx in atom_chunks(bare):
        for i, (e, _) in zip(idx, model.batch()([bare[i] for i in idx]), strict=True):
            errs.append(abs(e - frames[i].get_potential_energy()) / len(frames[i]))
    return float(np.mean(errs)) if errs else float("nan")


def forgetting(base, tuned, pseudo: list[Atoms], real: list[Atoms], scale: float | None = None) -> dict:
    """How much worse ``tuned`` is than ``base`` on the original domain.

    Args:
        base: The model before fine-tuning (it labelled ``pseudo``).
        tuned: The fine-tuned model (its original head, for a multi-head model).
        pseudo: Base-labelled crystals that training never saw (the forgetting side).
        real: Real DFT bulk frames that training never saw.
        scale: The base model's force error against real DFT (eV/Å), the yardstick of the change.

    Returns:
        Force MAE (eV/Å) before and after on each part and on the union (atoms weighted), and
        ``change``: the union's error increase divided by ``scale``. On ``pseudo`` the base
        model's error is zero by construction (its own labels), so a ratio after / before does
        not exist there and "after" is the drift away from the base model. The true error on
        such crystals can grow by at most that drift (triangle inequality), so with ``scale`` the
        base's typical DFT error, ``change`` bounds the relative growth of the original-domain
        error. Without ``scale``: after / before - 1 (``None`` when before is zero).
    """
    out: dict = {"pseudo_frames": len(pseudo), "real_frames": len(real), "scale": scale}
    n_p = sum(len(f) for f in pseudo)
    n_r = sum(len(f) for f in real)
    parts = {}
    for name, frames in (("pseudo", pseudo), ("real", real)):
        if frames:
            parts[name] = {"before": force_mae(base, frames), "after": force_mae(tuned, frames)}
            if name == "pseudo":
                parts[name]["energy_drift_per_atom"] = energy_mae(tuned, frames)
    out.update(parts)
    if not parts:
        return {**out, "before": None, "after": None, "change": None}
    w = {"pseudo": n_p, "real": n_r}
    before = sum(parts[k]["before"] * w[k] for k in parts) / sum(w[k] for k in parts)
    after = sum(parts[k]["after"] * w[k] for k in parts) / sum(w[k] for k in parts)
    out.update(before=before, after=after, change=error_change(before, after, scale))
    return out


def error_change(before: float, after: float, scale: float | None = None) -> float | None:
    """(after - before) / scale, or after / before - 1 without a scale (``None`` if it is zero)."""
    if scale:
        return (after - before) / scale
    return after / before - 1 if before > 0 else None
