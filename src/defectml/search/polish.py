"""Minima ranked on converged energies: a few relaxations continued to a tight force threshold.

A search relaxes every trial to ``--fmax 0.05`` eV/Å: enough to tell basins apart, not to rank
them. Measured on the README's run (CdTe V_Cd⁰, CHGNet, 15 trials), the members of its one
minimum ended 0.08 eV apart at 0.05 eV/Å and within 0.004 eV of each other when continued to
0.01 eV/Å (ShakeNBreak's DFT stops there): at the search's threshold every ΔE carries convergence
noise as large as the gaps it ranks (``benchmarks/results/polish_cost.md``). Continuing every trial
costs about half the search again, so only what the ranking rests on is continued:

* two relaxations of each minimum: the lowest (its representative) and the highest, so that
  the polished spread spans the minimum rather than being assumed (on ZnSe V_Zn⁰ two of the 14
  relaxations of the open-vacancy minimum stay 0.043 eV up when polished: a state the SOAP
  threshold groups with it);
* the ``Unperturbed`` relaxation, the reference of every ΔE.

Each continuation is stored as its own row (:class:`~defectml.records.PolishRecord`, nothing is
overwritten) and a summary uses it in the relaxation's place (:func:`polished_rows`), so the
trials are grouped again on the polished structures: a shallow minimum that relaxes on into
another basin joins that basin. A continuation that does not converge is stored and not used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from defectml.core.optimizers import DEFAULT_OPTIMIZER
from defectml.core.relax import CONVERGED
from defectml.records import PolishRecord
from defectml.structure_io import with_charge

if TYPE_CHECKING:
    from defectml.search.summary import DefectSummary

log = logging.getLogger("defectml")

DEFAULT_POLISH_FMAX = 0.01  # eV/Å: ShakeNBreak's DFT relaxations stop here (EDIFFG = -0.01)
DEFAULT_POLISH_MEMBERS = 2  # the lowest (representative) and the highest: the spread spans the minimum


def to_polish(summary: DefectSummary, fmax: float, members: int = DEFAULT_POLISH_MEMBERS) -> list[str]:
    """The trials of one landscape to continue to ``fmax`` (eV/Å), lowest first per minimum.

    Per minimum, ``members`` of its converged relaxations: the lowest (its representative) and
    the highest, so that the polished spread spans the minimum (a state that the fingerprint
    groups with it but that stays apart when polished shows up there), then the next lowest;
    ``0``: all of them. And the ``Unperturbed`` one. Less those already continued to ``fmax``
    or tighter (a resumed run continues nothing twice).
    """
    by_name = {t.name: t for t in summary.trials}
    names: list[str] = []
    for m in summary.minima:
        ranked = sorted((by_name[n] for n in m.trials
                         if by_name[n].status == CONVERGED and by_name[n].energy is not None),
                        key=_search_energy)
        names += [t.name for t in _ends(ranked, members)]
    in_minima = {n for m in summary.minima for n in m.trials}
    if "Unperturbed" in in_minima and by_name["Unperturbed"].status == CONVERGED:
        names.append("Unperturbed")
    return [n for n in dict.fromkeys(names)
            if by_name[n].polish_fmax is None or by_name[n].polish_fmax > fmax]


def _search_energy(t) -> float:
    """Where a relaxation stopped in the search: the order :func:`to_polish` picks in.

    The same before and after polishing, so a resumed run picks the same relaxations.
    """
    return t.energy if t.search_energy is None else t.search_energy


def _ends(ranked: list, members: int) -> list:
    """The lowest ``members - 1`` and the highest of ``ranked`` (lowest first); all for 0."""
    if members == 0 or len(ranked) <= members:
        return ranked
    return ranked[:members - 1] + ranked[-1:] if members > 1 else ranked[:1]


def polished_rows(rows) -> dict[str, object]:
    """The polish row to use per trial key: the converged one with the tightest threshold."""
    best: dict[str, object] = {}
    for r in rows:
        if r.status != CONVERGED or r.get("energy") is None:
            continue
        old = best.get(r.trial_key)
        if old is None or float(r.polish_fmax) < float(old.polish_fmax):
            best[r.trial_key] = r
    return best


@dataclass
class PolishReport:
    """What one polishing pass did."""

    relaxations: int = 0
    converged: int = 0
    steps: int = 0
    seconds: float = 0.0

    def describe(self, fmax: float) -> str:
        """One line for people."""
        left = self.relaxations - self.converged
        return (f"polished {self.relaxations} relaxation{'s' if self.relaxations != 1 else ''} to fmax "
                f"{fmax:g} eV/Å for the ranking ({self.steps} more steps, {self.seconds:.0f} s)"
                + (f"; {left} did not converge and keep the search's energy" if left else ""))


def polish_minima(store, summaries: list[DefectSummary], model, spec, *, fmax: float, members: int,
                  max_steps: int, execution: dict, optimizer: str = DEFAULT_OPTIMIZER, progress: bool = False,
                  log_fn: Callable[[str], None] = log.info) -> PolishReport:
    """Continue :func:`to_polish`'s trials of every summary to ``fmax``; store each as it finishes.

    Args:
        store: The run's :class:`~defectml.store.ResultStore`.
        summaries: The landscapes as the search left them (one run, ``settings_key`` each).
        model: The search's loaded :class:`~defectml.models.Model`.
        spec: How workers load it (:class:`~defectml.core.engine.ModelSpec`).
        fmax: The tight force threshold (eV/Å).
        members: Relaxations continued per minimum (0: all).
        max_steps: Step limit of each continuation.
        execution: ``workers``, ``executor``, ``scheduler``, ``batch_size``, ``batch_memory`` as
            for the search.
        optimizer: The search's optimiser.
        progress: Show a progress bar.
        log_fn: Where messages go.
    """
    from tqdm.auto import tqdm

    from defectml.core.engine import Job, run_jobs

    jobs = []
    for s in summaries:
        wanted = to_polish(s, fmax, members)
        if not wanted:
            continue
        rows = {r.trial: r for r in store.select(kind="relaxation", settings_key=s.settings_key,
                                                 defect_key=s.defect_key, charge_state=s.charge)}
        for name in wanted:
            row = rows[name]
            atoms = row.toatoms()
            atoms.calc = None
            jobs.append(Job(with_charge(atoms, s.charge), tag=(row, s.settings_key)))
    report = PolishReport()
    if not jobs:
        return report
    bar = tqdm(total=len(jobs), disable=not progress, unit="trial", desc="polishing")
    for job, r in run_jobs(jobs, spec, fmax=fmax, max_steps=max_steps, model=model, optimizer=optimizer,
                           **execution):
        row, skey = job.tag
        store.add(PolishRecord(r.atoms, r.energy, r.forces, row.trial_key, skey, fmax, r.status, r.steps,
                               model.key, {"seconds": r.seconds, "reason": r.reason,
                                           "search_energy": row.get("energy")}))
        report.relaxations += 1
        report.converged += r.status == CONVERGED
        report.steps += r.steps
        report.seconds += r.seconds
        bar.update(1)
    bar.close()
    log_fn(report.describe(fmax))
    return report
