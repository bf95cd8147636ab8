"""What each ``--strategy`` of fine-tuning means, in one place.

The substitutional-defects paper's question is how to learn defects without forgetting; the
charged-defect paper's, how to learn a higher fidelity from few frames. Each answer is a
:class:`Strategy`: which head the defect frames train, and what is replayed beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

from defectml.errors import InputError


@dataclass(frozen=True)
class Strategy:
    """One way to fine-tune.

    Attributes:
        name: The ``--strategy`` value.
        new_head: The defect frames train a new head (a sevenn modal appended to a SevenNet base
            with heads), not the base model's; energies are anchored on that head as it starts.
        replay: What the base model's head keeps learning beside them: ``none``, ``crystals``
            (original-domain frames: a ``--replay`` file or base-labelled crystals) or
            ``low_fidelity`` (the data's own frames of the base head's fidelity, real DFT).
        summary: One line for people.
    """

    name: str
    new_head: bool
    replay: str
    summary: str


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("standard", False, "none", "the defect frames only"),
    Strategy("replay", False, "crystals", "plus original-domain frames, on the one head"),
    Strategy("multihead", True, "crystals",
             "a new head learns the defect frames; the base head keeps learning the replay frames"),
    Strategy("multifidelity", True, "low_fidelity",
             "the base head learns the low-fidelity frames, a new head the high-fidelity ones"),
)}


def strategy(name: str) -> Strategy:
    """The strategy called ``name``.

    Raises:
        InputError: no such strategy.
    """
    if name not in STRATEGIES:
        raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {name!r}")
    return STRATEGIES[name]
