"""Oracles: who answers the active loop's questions with a (DFT) relaxation.

Every oracle takes :class:`Request` s (relax this trial of this defect and charge, starting from
this structure) and answers with :class:`Answer` s: the relaxation's frames (the last is the
relaxed structure; energies, and forces where the oracle gives them), its status and its level
of theory. A request the oracle cannot answer is answered ``failed`` with a reason (the loop
records it and goes on); a request whose answer is not there *yet* (the folder oracle) is
returned as pending and the loop stops cleanly until it is.

* :class:`CalculatorOracle`: any ASE calculator (GPAW; tblite's GFN1-xTB as a cheap stand-in,
  named as such), relaxing from the MLIP minimum's structure;
* :class:`FolderOracle`: writes VASP inputs (and the starting structure as ``start.extxyz``)
  under ``FOLDER/<defect>_<charge>/<trial>/`` and reads back what the user ran there on a
  cluster: ``vasprun.xml``/``OUTCAR`` (gzipped too) or a ``result.extxyz`` trajectory;
* :class:`ReplayOracle`: answers from a finished ShakeNBreak DFT search by trial name, for
  benchmarks. The DFT started from ShakeNBreak's own distorted structure of that name, not from
  ours (the bond distortion is the same, the rattle is not), unless our trials were made from
  its POSCARs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from defectml.errors import InputError
from defectml.search.relax import CONVERGED, FAILED
from defectml.search.summary import charge_label


@dataclass
class Request:
    """Relax one trial of one defect in one charge state.

    Attributes:
        defect: Defect name (``Mg_O``).
        charge: Supercell charge.
        trial: Trial name (``Bond_Distortion_-30.0%``).
        start: Where the relaxation starts (the MLIP minimum the trial fell into).
        initial: The trial's unrelaxed structure.
    """

    defect: str
    charge: int
    trial: str
    start: Atoms
    initial: Atoms | None = None

    @property
    def label(self) -> str:
        """ShakeNBreak-style folder label of the defect and charge."""
        return charge_label(self.defect, self.charge)


@dataclass
class Answer:
    """A relaxation the oracle ran (or failed to run)."""

    request: Request
    status: str
    frames: list[Atoms] = field(default_factory=list)
    energy: float | None = None
    theory: str = ""
    reason: str = ""
    seconds: float = 0.0

    @property
    def final(self) -> Atoms | None:
        """The relaxed structure (``None`` when it failed)."""
        return self.frames[-1] if self.frames else None


def _with_energy(atoms: Atoms, energy: float, forces=None) -> Atoms:
    a = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    a.calc = SinglePointCalculator(a, energy=float(energy), forces=forces)
    return a


class CalculatorOracle:
    """Relaxes with an ASE calculator in this process.

    Args:
        calculator_for: ``charge -> calculator``.
        theory: The level of theory stored with each answer.
        fmax: Force threshold (eV/Å).
        max_steps: Step limit.
    """

    kind = "calculator"

    def __init__(self, calculator_for, theory: str, fmax: float = 0.05, max_steps: int = 300):
        self.calculator_for, self.theory = calculator_for, theory
        self.fmax, self.max_steps = fmax, max_steps

    def ask(self, requests: list[Request]) -> tuple[list[Answer], list[str]]:
        """Relax each request; a calculator error fails that request only."""
        from defectml.search.relax import relax_one

        answers = []
        for q in requests:
            try:
                r = relax_one(q.start, self.calculator_for(q.charge), fmax=self.fmax,
                              max_steps=self.max_steps)
            except Exception as exc:  # noqa: BLE001 - any calculator's failure: record it, go on
                answers.append(Answer(q, FAILED, theory=self.theory, reason=f"calculator error: {exc}"))
                continue
            if r.status == FAILED or r.energy is None:
                answers.append(Answer(q, FAILED, theory=self.theory, reason=r.reason, seconds=r.seconds))
                continue
            frames = ([r.trajectory.frame(i, r.atoms.numbers) for i in range(len(r.trajectory))]
                      if r.trajectory is not None else [])
            frames = [f for f in frames if f.calc is not None] or [_with_energy(r.atoms, r.energy, r.forces)]
            frames[-1] = _with_energy(r.atoms, r.energy, r.forces)
            answers.append(Answer(q, r.status, frames, r.energy, self.theory, r.reason, r.seconds))
        return answers, []


def calculator_oracle(name: str, fmax: float = 0.05, max_steps: int = 300) -> CalculatorOracle:
    """A built-in calculator oracle.

    ``gpaw`` (DFT), ``xtb`` (GFN1-xTB via tblite, a cheap stand-in for DFT) or ``emt`` (tests only).
    """
    from defectml.dft.shortlist import THEORY, dft_calculator

    if name in ("xtb", "gfn1-xtb"):
        try:
            from tblite.ase import TBLite
        except ImportError:
            raise InputError("--oracle xtb needs tblite: pip install 'defectml[xtb]'") from None

        def xtb(charge: int):
            return TBLite(method="GFN1-xTB", charge=float(charge), verbosity=0)

        return CalculatorOracle(xtb, "tblite GFN1-xTB (a stand-in for DFT)", fmax, max_steps)
    if name not in THEORY:
        raise InputError(f"unknown oracle calculator {name!r}: use gpaw, xtb (GFN1-xTB) or emt")
    dft_calculator(name)  # fails now, with the install hint, if the code is missing
    return CalculatorOracle(lambda q: dft_calculator(name, q), THEORY[name], fmax, max_steps)


class ReplayOracle:
    """Answers from a finished ShakeNBreak search (``<folder>/<defect>_<charge>/<trial>/``).

    The relaxed structure is the trial's CONTCAR (or the last frame of its vasprun/OUTCAR), the
    energy the one in ``<defect>_<charge>.yaml``; without forces in the outputs the end point is
    a converged relaxation (ShakeNBreak keeps only those), so its forces are zero.
    """

    kind = "replay"

    def __init__(self, folder: str | Path, theory: str | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"replay oracle: not a folder: {self.folder}")
        self.theory = theory or f"replay of {self.folder.name} (ShakeNBreak DFT)"

    def trials(self, label: str) -> list[str]:
        """The trial names the replay data hold for one defect label."""
        from defectml.dft.ingest import TRIAL_FOLDER, normalise_trial_name

        base = self.folder / label
        if not base.is_dir():
            return []
        return sorted(normalise_trial_name(p.name) for p in base.iterdir()
                      if p.is_dir() and TRIAL_FOLDER.match(p.name))

    def _trial_dir(self, label: str, trial: str) -> Path | None:
        names = ["Bond_Distortion_0.0%", "Bond_Distortion_-0.0%"] if trial == "Rattled" else [trial]
        return next((self.folder / label / n for n in names if (self.folder / label / n).is_dir()), None)

    def ask(self, requests: list[Request]) -> tuple[list[Answer], list[str]]:
        """Look each request up; an unknown trial fails with the reason."""
        from defectml.dft.ingest import read_snb_energies, read_vasp_relaxation

        answers = []
        for q in requests:
            tdir = self._trial_dir(q.label, q.trial)
            yaml_files = sorted((self.folder / q.label).glob("*.yaml"))
            energies = read_snb_energies(yaml_files[0]) if yaml_files else {}
            if tdir is None or q.trial not in energies:
                answers.append(Answer(q, FAILED, theory=self.theory,
                                      reason=f"no {q.trial} in the replay data for {q.label}"))
                continue
            frames, _ = read_vasp_relaxation(tdir)
            if not frames:
                answers.append(Answer(q, FAILED, theory=self.theory, reason=f"{tdir}: no CONTCAR"))
                continue
            final = frames[-1]
            forces = final.calc.results.get("forces") if final.calc is not None else None
            forces = np.zeros((len(final), 3)) if forces is None else forces
            end = _with_energy(final, energies[q.trial], forces)
            answers.append(Answer(q, CONVERGED, [end], energies[q.trial], self.theory,
                                  "replayed: converged end point (zero forces)"))
        return answers, []


class FolderOracle:
    """Writes inputs for people who run DFT elsewhere, and reads their results back.

    For each request: ``FOLDER/<defect>_<charge>/<trial>/`` with VASP inputs (INCAR, KPOINTS,
    POSCAR with the charge's NELECT note) and ``start.extxyz``. Results are read from
    ``vasprun.xml``/``OUTCAR`` (gzipped too) or ``result.extxyz`` (any trajectory with energies,
    last frame relaxed) in that folder. Missing results are returned as pending.
    """

    kind = "folder"

    def __init__(self, folder: str | Path, fmax: float = 0.05, theory: str | None = None,
                 overrides: dict | None = None):
        self.folder = Path(folder)
        self.fmax, self.theory, self.overrides = fmax, theory, overrides

    def path(self, q: Request) -> Path:
        """Where one request's inputs and results live."""
        return self.folder / q.label / q.trial

    def _read(self, where: Path) -> list[Atoms]:
        from ase.io import read

        from defectml.dft.ingest import read_vasp_relaxation

        if (where / "result.extxyz").exists():
            try:
                return list(read(where / "result.extxyz", ":"))
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"cannot read {where / 'result.extxyz'}: {exc}") from None
        if any((where / n).exists() for n in ("vasprun.xml", "vasprun.xml.gz", "OUTCAR", "OUTCAR.gz")):
            frames, _ = read_vasp_relaxation(where)
            return [f for f in frames if f.calc is not None]
        return []

    def ask(self, requests: list[Request]) -> tuple[list[Answer], list[str]]:
        """Answers for the results that are there; inputs written (once) for the others."""
        from ase.io import write

        from defectml.dft.ingest import dft_status, dft_theory
        from defectml.dft.inputs import write_vasp

        answers, pending = [], []
        for q in requests:
            where = self.path(q)
            frames = self._read(where) if where.is_dir() else []
            if frames and "energy" in frames[-1].calc.results:
                status, note = dft_status(frames[-1], self.fmax)
                answers.append(Answer(q, status, frames, float(frames[-1].get_potential_energy()),
                                      dft_theory(frames, where, self.theory), note))
                continue
            if not (where / "start.extxyz").exists():
                where.mkdir(parents=True, exist_ok=True)
                write_vasp(q.start, q.charge, where, self.overrides)
                write(where / "start.extxyz", q.start, format="extxyz")
            pending.append(str(where))
        return answers, pending


def parse_oracle(spec: str, fmax: float = 0.05, max_steps: int = 300):
    """An oracle from ``replay:DIR``, ``folder:DIR`` or ``calculator:NAME`` (gpaw, xtb, emt)."""
    kind, _, arg = spec.partition(":")
    if not arg:
        raise InputError(f"--oracle {spec!r}: use replay:DIR, folder:DIR or calculator:NAME "
                         "(gpaw, xtb, emt)")
    if kind == "replay":
        return ReplayOracle(arg)
    if kind == "folder":
        return FolderOracle(arg, fmax)
    if kind == "calculator":
        return calculator_oracle(arg, fmax, max_steps)
    raise InputError(f"--oracle {spec!r}: unknown kind {kind!r}; use replay:DIR, folder:DIR or "
                     "calculator:NAME")
