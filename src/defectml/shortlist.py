"""Which minima go to DFT: the unique low-energy ones, plus the unperturbed one as a control."""

from __future__ import annotations

from defectml.errors import InputError
from defectml.landscape import Minimum
from defectml.summary import DefectSummary


def select(summary: DefectSummary, max_per_defect: int = 5, window: float = 0.5) -> list[Minimum]:
    """The minima of one defect and charge to relax with DFT.

    Args:
        summary: The defect's MLIP landscape.
        max_per_defect: At most this many minima from the energy window (lowest first).
        window: Keep minima within this many eV of the lowest.

    Returns:
        The chosen minima, lowest first; the minimum holding the ``Unperturbed`` trial is always
        appended as a control (so DFT can tell whether the reconstruction is real).
    """
    if max_per_defect < 1:
        raise InputError(f"--max-per-defect must be at least 1, got {max_per_defect}")
    if window < 0:
        raise InputError(f"--window must be non-negative, got {window}")
    if not summary.minima:
        return []
    lowest = summary.minima[0].energy
    chosen = [m for m in summary.minima if m.energy - lowest <= window][:max_per_defect]
    control = next((m for m in summary.minima if m.contains_unperturbed), None)
    if control is not None and control not in chosen:
        chosen.append(control)
    return chosen
