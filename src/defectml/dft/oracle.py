"""Oracles: who answers the active loop's questions with a (DFT) relaxation.

Every oracle takes :class:`Request` s (relax this trial of this defect and charge, starting from
this structure) and answers with :class:`Answer` s: the relaxation's frames (the last is the
relaxed structure; energies, and forces where the oracle gives them), its status and its level
of theory. A request the oracle cannot answer is answered ``failed`` with a reason (the loop
records it and goes on); a request whose answer is not there *yet* (the folder oracle) is
returned as pending and the loop stops cleanly until it is.

* :class:`CalculatorOracle`: any ASE calculator (GPAW; tblite's GFN1-xTB or a shipped model as
  a cheap stand-in, named as such), relaxing from the requested start;
* :class:`FolderOracle`: writes VASP inputs (and the starting structure as ``start.extxyz``)
  under ``FOLDER/<defect>_<charge>/<trial>/`` and reads back what the user ran there on a
  cluster: ``vasprun.xml``/``OUTCAR`` (gzipped too) or a ``result.extxyz`` trajectory;
* :class:`ReplayOracle`: answers from a finished ShakeNBreak DFT search, for benchmarks, and only
  what it was asked: a request whose start is that trial's own POSCAR there (``search
  --trials-from`` the same folder, ``loop --dft-start trial``). Any other start is refused in one
  line: DFT from there could end elsewhere, and the replay cannot say where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from defectml.core.relax import CONVERGED, FAILED
from defectml.errors import InputError
from defectml.search.summary import charge_label


@dataclass
class Request:
    """Relax one trial of one defect in one charge state.

    Attributes:
        defect: Defect name (``Mg_O``).
        charge: Supercell charge.
        trial: Trial name (``Bond_Distortion_-30.0%``).
        start: Where the relaxation starts.
        initial: The trial's unrelaxed structure.
        start_kind: What ``start`` is: ``trial`` (the trial's own unrelaxed start, as
            ShakeNBreak starts DFT) or ``minimum`` (the model's minimum the trial fell into).
    """

    defect: str
    charge: int
    trial: str
    start: Atoms
    initial: Atoms | None = None
    start_kind: str = "trial"

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

    def key(self) -> str:
        """Content key of what decides the answers: the level of theory, fmax and max_steps."""
        from defectml.store import content_key

        return content_key(self.kind, self.theory, self.fmax, self.max_steps)

    def ask(self, requests: list[Request]) -> tuple[list[Answer], list[str]]:
        """Relax each request; a calculator error fails that request only."""
        from defectml.core.relax import relax_one

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


def calculator_oracle(name: str, fmax: float = 0.05, max_steps: int = 300, *, device: str = "cpu",
                      threads: int | None = None) -> CalculatorOracle:
    """A built-in calculator oracle.

    ``gpaw`` (DFT), ``xtb`` (GFN1-xTB via tblite, a cheap stand-in for DFT), ``emt`` (tests only),
    or a shipped model as a stand-in for DFT (:mod:`defectml.dft.standin`): ``chgnet-0.2.0``,
    ``sevennet-mf-0@R2SCAN``, any spelling ``parse_model`` accepts, optionally plus stated pair
    wells, ``chgnet+well:Se-Se:0.4:2.45:0.35`` (``well:A-B:DEPTH:R0:WIDTH``, eV, Å, Å).
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
    if name in THEORY:
        dft_calculator(name)  # fails now, with the install hint, if the code is missing
        return CalculatorOracle(lambda q: dft_calculator(name, q), THEORY[name], fmax, max_steps)
    from defectml.dft.standin import parse_standin

    try:
        return parse_standin(name, fmax, max_steps, device, threads)
    except InputError as exc:
        raise InputError(f"oracle calculator {name!r}: {exc} (a model is a stand-in for DFT, optionally "
                         "+well:A-B:DEPTH:R0:WIDTH; the other calculators: gpaw, xtb, emt)") from None


class ReplayOracle:
    """Answers from a finished ShakeNBreak search (``<folder>/<defect>_<charge>/<trial>/``).

    The relaxed structure is the trial's CONTCAR (or the last frame of its vasprun/OUTCAR), the
    energy the one in ``<defect>_<charge>.yaml``; without forces in the outputs the end point is
    a converged relaxation (ShakeNBreak keeps only those), so its forces are zero.
    """

    kind = "replay"
    starts = ("trial",)  # it holds DFT from ShakeNBreak's own starts only
    #: Largest displacement (Å) of any atom between a request's start and the replay's POSCAR.
    tolerance = 0.01

    def __init__(self, folder: str | Path, theory: str | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"replay oracle: not a folder: {self.folder}")
        self.theory = theory or f"replay of {self.folder.name} (ShakeNBreak DFT)"

    def key(self) -> str:
        """Content key of the replay data: every file in the folder (relative name, sha256)."""
        from defectml.models.ref import sha256_file
        from defectml.store import content_key

        files = sorted(p for p in self.folder.rglob("*") if p.is_file())
        return content_key(self.kind, self.theory,
                           [[str(p.relative_to(self.folder)), sha256_file(p)] for p in files])

    def trials(self, label: str) -> list[str]:
        """The trial names the replay data hold for one defect label."""
        from defectml.core.readers import TRIAL_FOLDER, normalise_trial_name

        base = self.folder / label
        if not base.is_dir():
            return []
        return sorted(normalise_trial_name(p.name) for p in base.iterdir()
                      if p.is_dir() and TRIAL_FOLDER.match(p.name))

    def _trial_dir(self, label: str, trial: str) -> Path | None:
        rattled = ["Rattled", "Bond_Distortion_0.0%", "Bond_Distortion_-0.0%"]  # ShakeNBreak's names
        names = rattled if trial == "Rattled" else [trial]
        return next((self.folder / label / n for n in names if (self.folder / label / n).is_dir()), None)

    def ask(self, requests: list[Request]) -> tuple[list[Answer], list[str]]:
        """Look each request up; an unknown trial fails with the reason.

        Every request is checked first: a defect the replay does not hold, or a start that is not
        the replay's POSCAR, is refused (one line) before anything is answered.
        """
        from defectml.core.readers import read_snb_energies, read_vasp_relaxation

        for q in requests:
            if not (self.folder / q.label).is_dir():
                held = sorted(p.name for p in self.folder.iterdir() if p.is_dir())
                raise InputError(f"replay oracle: {self.folder} holds no {q.label} (it has "
                                 f"{', '.join(held) or 'no defect folders'}): a replay answers only its own "
                                 "defects' trials")
            tdir = self._trial_dir(q.label, q.trial)
            if tdir is not None:
                self.check_start(q, tdir)
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


    def check_start(self, q: Request, tdir: Path) -> None:
        """Refuse (one line, naming the trial) a request that does not start at the replay's POSCAR."""
        from ase.io import read

        poscar = tdir / "POSCAR"
        if not poscar.exists():
            raise InputError(f"replay oracle: {poscar} is missing: cannot tell where DFT started {q.trial}")
        moved = start_mismatch(read(poscar), q.start)
        if moved > self.tolerance:
            how = "the model's minimum" if q.start_kind == "minimum" else "a start"
            raise InputError(
                f"replay oracle: {q.label} {q.trial} was asked from {how} {moved:.3f} Å (max atom "
                f"displacement) away from the replay's POSCAR ({poscar}); it answers only those starts: "
                f"search with --trials-from {self.folder} and loop with --dft-start trial")


def start_mismatch(reference: Atoms, start: Atoms) -> float:
    """Largest distance (Å) of a ``reference`` atom to its nearest same-element atom in ``start``.

    Atoms are matched by element and nearest position under periodic images (the two may list
    atoms in another order); a different cell, atom count or composition is ``inf``.
    """
    if len(reference) != len(start) or sorted(reference.numbers) != sorted(start.numbers):
        return float("inf")
    if not np.allclose(reference.cell.array, start.cell.array, atol=1e-3):
        return float("inf")
    inv = np.linalg.inv(reference.cell.array)
    worst = 0.0
    for z in set(reference.numbers.tolist()):
        a = reference.positions[reference.numbers == z]
        b = start.positions[start.numbers == z]
        frac = (a[:, None, :] - b[None, :, :]) @ inv
        frac -= np.round(frac)
        d = np.linalg.norm(frac @ reference.cell.array, axis=2)
        worst = max(worst, float(d.min(axis=1).max()))
    return worst


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

    def key(self) -> str:
        """Content key of the folder (its path) and what decides how its results are read."""
        from defectml.store import content_key

        return content_key(self.kind, str(self.folder.resolve()), self.fmax, self.theory, self.overrides)

    def path(self, q: Request) -> Path:
        """Where one request's inputs and results live."""
        return self.folder / q.label / q.trial

    def _read(self, where: Path) -> list[Atoms]:
        from defectml.core.readers import VASP_OUTPUTS, read_trajectory, read_vasp_relaxation

        if (where / "result.extxyz").exists():
            return read_trajectory(where / "result.extxyz")
        if any((where / n).exists() for n in VASP_OUTPUTS):
            frames, _ = read_vasp_relaxation(where)
            return [f for f in frames if f.calc is not None]
        return []

    def ask(self, requests: list[Request]) -> tuple[list[Answer], list[str]]:
        """Answers for the results that are there; inputs written (once) for the others."""
        from ase.io import write

        from defectml.core.readers import dft_theory
        from defectml.dft.ingest import dft_status
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
                start = q.start.copy()
                start.info["dft_start"] = q.start_kind  # which start this is: the trial's or the model's
                write(where / "start.extxyz", start, format="extxyz")
                (where / "DFT_START").write_text(
                    f"{q.start_kind}: " + ("the trial's own unrelaxed start (as ShakeNBreak starts DFT)\n"
                                           if q.start_kind == "trial" else
                                           "the model's minimum this trial relaxed into\n"))
            pending.append(str(where))
        return answers, pending


def parse_oracle(spec: str, fmax: float = 0.05, max_steps: int = 300, *, device: str = "cpu",
                 threads: int | None = None):
    """An oracle from ``replay:DIR``, ``folder:DIR`` or ``calculator:NAME``.

    ``NAME``: gpaw, xtb, emt, or a model as a stand-in for DFT with optional pair wells
    (``chgnet-0.2.0``, ``chgnet+well:Se-Se:0.4:2.45:0.35``; :func:`calculator_oracle`).
    ``device`` and ``threads`` are where a stand-in's model runs.
    """
    kind, _, arg = spec.partition(":")
    if not arg:
        raise InputError(f"--oracle {spec!r}: use replay:DIR, folder:DIR or calculator:NAME "
                         "(gpaw, xtb, emt, or a model such as chgnet-0.2.0 as a stand-in for DFT)")
    if kind == "replay":
        return ReplayOracle(arg)
    if kind == "folder":
        return FolderOracle(arg, fmax)
    if kind == "calculator":
        return calculator_oracle(arg, fmax, max_steps, device=device, threads=threads)
    raise InputError(f"--oracle {spec!r}: unknown kind {kind!r}; use replay:DIR, folder:DIR or "
                     "calculator:NAME")
