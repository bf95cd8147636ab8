"""The active loop: learn each target defect from its own DFT until the model reproduces it.

Starting from a finished search (round 0: the universal model's landscape), each round

1. **picks** up to ``k`` trials per defect and charge for DFT (the rules below), never one
   already asked;
2. asks the **oracle** (:mod:`defectml.dft.oracle`) from where ``dft_start`` says: the trial's
   own unrelaxed, distorted start (``trial``, the default, as ShakeNBreak does, so DFT explores
   independently of the model's errors), the model's minimum the trial fell into (``minimum``:
   fewer ionic steps, only worth it where the model is right), or ``auto``: ``trial`` until the
   model reproduces its DFT for that defect, then ``minimum`` where the oracle can start there
   (measured on the stand-in ZnSe V_Zn: reproducing the basins DFT has seen says nothing of the
   ones it has not; from the model's dimer minimum the −60% trial never reached the ground state,
   and ``auto`` converged on the wrong answer where ``trial`` found it). Every
   answer is stored as a ``fidelity="dft"`` row (with its start kind; a failed one too, with its
   reason: it is never asked again);
3. **fits** the lead model from the last round's on every DFT relaxation so far, its path as
   well as its end point (``frames_per_relaxation`` evenly spaced frames of each trajectory: the
   path into a basin teaches the basin). Energies are anchored once per round, one shift per
   defect and charge on the round's starting model, shared by every member. Then it **checks**
   the lead against its DFT (:func:`defectml.dft.agreement.reproduction`): every DFT end point
   re-relaxed with it must stay in its DFT basin, and the DFT minima must come out in DFT's
   order. A failed check trains it further along :data:`FIT_SCHEDULE`, up to ``fit_attempts``;
   a defect that still fails is reported "model cannot reproduce its DFT" and is never
   converged. The other committee members (:mod:`defectml.train.committee`) then start from the
   final lead and learn bootstrap resamples of the relaxations: their spread is the disagreement
   the data leave around the model the loop relaxes with, not offsets;
4. **re-relaxes** every trial of the unfinished defects from its start with the lead model (in
   the search's batched engine), after the DFT end points (trials that reach a known basin stop
   early); each relaxation is stored with its committee trust score;
5. **calibrates** the trust score on the held-out DFT relaxations (rank correlation of the force
   spread with the real force error; a threshold only where it ranks them,
   :func:`defectml.dft.agreement.calibrate_threshold`);
6. **assesses** each defect and charge. It is *converged* only when the model reproduces its DFT,
   the DFT lowest has not dropped by more than ``tolerance`` for ``patience`` rounds, and every
   minimum of the lead model within ``window`` of its lowest is *settled*: confirmed (a DFT
   relaxation ended in that basin: a trial asked whose DFT went elsewhere does not confirm it,
   nor does a DFT end point the model re-relaxed into it), refuted (every trial of it was asked
   and none of their DFT relaxations stayed) or trusted by a *calibrated* score. It is
   *exhausted* when nothing is left to ask. The loop stops when every defect is converged or
   exhausted, or at ``budget`` or ``max_rounds``.

The answer for each defect is DFT's lowest structure, with the model's agreement stated.

Rules for picking (``rule``); "unsettled" minima are those neither confirmed nor refuted:

* ``lowest``: trials by their predicted energy, lowest first;
* ``unvisited``: one trial per unsettled minimum, lowest minimum first;
* ``uncertain``: the unsettled minima with the largest committee force spread first (with no
  committee, as ``unvisited``);
* ``mix``: alternately ``unvisited`` and ``uncertain``.

When a rule yields fewer than ``k`` (a model that misses a reconstruction folds most trials into
one minimum), the rest are trials of a kind not yet asked (a Dimer, an Off_Centre, a bond
distortion), then those whose bond distortion lies farthest from every one asked.
When it yields none (every minimum of the model within reach is settled), the round only explores
blindly, and asks ``explore_k`` such trials (default one): the model gives no reason to spend more,
and the next round's model decides on the next (measured on the stand-in zoo, ``benchmarks/loop_zoo.py``).

State lives in ``OUT/loop.json`` (one :class:`Round` per round) and the store (every relaxation,
keyed). A killed loop resumes at the step it was in: answers already stored are not asked again,
committee members already written are not retrained, relaxations already stored are not redone.
A folder oracle whose results are not there yet stops the loop cleanly (the pending folders are
listed); run it again when they are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from defectml.core.relax import CONVERGED, FAILED, UNCONVERGED, RelaxSettings
from defectml.dft.agreement import (
    DEFAULT_MAX_RMSD,
    DEFAULT_ORDER_TOL,
    Geometry,
    Point,
    Reproduction,
    TrustCalibration,
    calibrate_threshold,
    confirming,
    reproduction,
)
from defectml.dft.oracle import Request
from defectml.errors import InputError, ModelError
from defectml.records import RelaxationRecord, Trajectory, trial_key
from defectml.search.summary import DefectSummary, charge_label, defect_context, summarise, trial_start
from defectml.settings import FromOptions
from defectml.store import ResultStore, content_key
from defectml.structure_io import bare_atoms, with_charge, write_frames, write_json
from defectml.train.committee import DEFAULT_THRESHOLD, NO_COMMITTEE, Trust
from defectml.train.finetune import FinetuneSettings

RULES = ("lowest", "unvisited", "uncertain", "mix")
STARTS = ("trial", "minimum", "auto")
DFT_PREFIX = "dft:"  # ML relaxations that start from a DFT end point
#: How a failed reproduction check trains further: attempt ``a`` warm-starts from attempt
#: ``a - 1`` with (epochs, learning rate, energy weight) = the settings' values times these.
#: The starting points are the measurements on a held-out CdTe vacancy (2 × 10 epochs at 3e-4
#: re-relaxed DFT's dimers open; 150 epochs at 1e-3 kept them): more epochs first, then a larger
#: step, then the energies weighted up.
FIT_SCHEDULE = ((1.0, 1.0, 1.0), (3.0, 1.0, 1.0), (3.0, 3.0, 1.0), (3.0, 3.0, 3.0))


#: The loop's fine-tuning: its own absolute labels, energies weighted up (see LoopSettings).
LOOP_TRAINING = FinetuneSettings(epochs=20, lr=3e-4, energy_weight=10.0, batch_size=4, patience=5,
                                 energies="absolute", refit_refs="no")
#: Which option sets which fine-tuning field (the loop's own ``--patience`` counts rounds).
TRAINING_OPTIONS = {"epochs": "epochs", "lr": "lr", "energy_weight": "energy_weight",
                    "force_weight": "force_weight", "batch_size": "batch_size",
                    "patience": "train_patience", "strategy": "strategy"}
#: The re-relaxations stop in a known basin by default.
LOOP_RELAXATION = RelaxSettings(early_stop=True)
RELAXATION_OPTIONS = {"fmax": "fmax", "max_steps": "max_steps", "batch_size": "relax_batch",
                      "early_stop": "early_stop"}


@dataclass
class LoopSettings(FromOptions):
    """How the loop picks, learns, checks and stops (see the module).

    Attributes:
        k: DFT relaxations per defect and charge per round.
        explore_k: DFT relaxations in a round where every minimum of the model is settled (blind
            exploration only, as :func:`fill_up` picks).
        rule: ``lowest``, ``unvisited``, ``uncertain`` or ``mix``.
        dft_start: ``trial``, ``minimum`` or ``auto`` (where DFT starts).
        budget: DFT relaxations in all (every defect); ``None``: no limit.
        max_rounds: Stop after this many rounds whatever else.
        patience: Rounds the DFT lowest must stay unchanged.
        tolerance: A new DFT lowest counts as a change when this much lower (eV).
        window: Energy window (eV) of the lead model's minima that must be settled.
        threshold: Force spread (eV/Å) above which a minimum is flagged in tables (the trust
            that can stand in for DFT is the calibrated one, see ``trust_error``).
        trust_error: Force error (eV/Å) a calibrated-trusted structure may have at most.
        max_rmsd: Largest RMSD (Å) of the defect's neighbourhood within one basin.
        order_tol: Tolerance (eV) of the model's order of the DFT minima.
        fit_attempts: Trainings per round at most while the model does not reproduce its DFT.
        committee: Models per round (1: no trust score).
        base: The model round 1 starts from (default: the search's model).
        training: Fine-tuning settings of a round's first attempt (options ``--epochs``, ``--lr``,
            ``--energy-weight``, ``--force-weight``, ``--batch-size``, ``--train-patience``,
            ``--strategy``); energies are the loop's own absolute labels and weighted up (a 1 eV
            defect energy is ~5 meV/atom in a 200-atom cell). Later attempts scale it
            (:data:`FIT_SCHEDULE`); base, seed, device and threads are set per model.
        max_batch_atoms: Fewer frames per training batch when they are large (a batch of 216-atom
            MgO cells costs CHGNet several GB each): at most this many atoms, at least one frame.
        frames_per_relaxation: Trajectory frames learnt per DFT relaxation (evenly spaced from the
            start, the end point always); 0: every frame.
        holdout: Share of DFT relaxations held back for early stopping (with four or more; by
            default none: the model must reproduce every DFT relaxation, and the trust score is
            calibrated on each round's new answers instead, which no model has seen).
        relaxation: The MLIP re-relaxations (options ``--fmax``, ``--max-steps``, ``--relax-batch``,
            ``--early-stop``): by default they stop in a known basin.
        device, threads: Where the models run.
        seed: Committee seeds and hold-out draws.
    """

    k: int = 2
    explore_k: int = 1
    rule: str = "mix"
    dft_start: str = "trial"
    budget: int | None = None
    max_rounds: int = 6
    patience: int = 1
    tolerance: float = 0.05
    window: float = 0.5
    threshold: float = DEFAULT_THRESHOLD
    trust_error: float = 0.05
    max_rmsd: float = DEFAULT_MAX_RMSD
    order_tol: float = DEFAULT_ORDER_TOL
    fit_attempts: int = 3
    committee: int = 3
    base: str | None = None
    training: FinetuneSettings = field(default_factory=lambda: LOOP_TRAINING,
                                       metadata={"options": TRAINING_OPTIONS})
    max_batch_atoms: int = 256
    frames_per_relaxation: int = 20
    holdout: float = 0.0
    relaxation: RelaxSettings = field(default_factory=lambda: LOOP_RELAXATION,
                                      metadata={"options": RELAXATION_OPTIONS})
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise ``InputError`` for values out of range."""
        if self.k < 1 or self.explore_k < 1:
            raise InputError(f"--k and --explore-k must be at least 1, got {self.k} and {self.explore_k}")
        if self.rule not in RULES:
            raise InputError(f"--rule must be one of {', '.join(RULES)}, not {self.rule!r}")
        if self.dft_start not in STARTS:
            raise InputError(f"--dft-start must be one of {', '.join(STARTS)}, not {self.dft_start!r}")
        if self.budget is not None and self.budget < 1:
            raise InputError(f"--budget must be at least 1 DFT relaxation, got {self.budget}")
        if self.max_rounds < 1 or self.patience < 1 or self.committee < 1:
            raise InputError("--max-rounds, --patience and --committee must be at least 1")
        self.training.validate()
        self.relaxation.validate()
        if not 1 <= self.fit_attempts <= len(FIT_SCHEDULE):
            raise InputError(f"--fit-attempts must be 1 to {len(FIT_SCHEDULE)}, got {self.fit_attempts}")
        if min(self.tolerance, self.window, self.threshold, self.trust_error, self.max_rmsd,
               self.order_tol) < 0:
            raise InputError("--tolerance, --window, --threshold, --trust-error, --max-rmsd and "
                             "--order-tol must be non-negative")
        if self.frames_per_relaxation < 0:
            raise InputError("--frames-per-relaxation must be 0 (every frame) or more")
        if not 0 <= self.holdout < 1:
            raise InputError(f"--holdout must be in [0, 1), got {self.holdout}")

    def key(self) -> str:
        """What decides the loop's results (device, threads and limits do not).

        The nested settings enter under the names of their options, as they did when the loop
        held copies of them, so loops already stored keep their keys.
        """
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("training", "relaxation", "device", "threads", "budget", "max_rounds")}
        for nested, names in (("training", TRAINING_OPTIONS), ("relaxation", RELAXATION_OPTIONS)):
            d.update({option: getattr(getattr(self, nested), name) for name, option in names.items()
                      if option != "relax_batch"})
        return content_key(d)

    def finetune(self, base: str, seed: int, attempt: int = 0, n_atoms: int = 0):
        """The fine-tuning settings of one attempt (frames of ``n_atoms`` atoms).

        Energies are the loop's own anchored labels (shared by every member), so the trainer
        takes them as they are.
        """
        t = self.training
        ep, lr, ew = FIT_SCHEDULE[attempt]
        batch = min(t.batch_size, max(1, self.max_batch_atoms // max(n_atoms, 1)))
        return replace(t, base=base, epochs=max(1, int(round(t.epochs * ep))), lr=t.lr * lr,
                       batch_size=batch, energy_weight=t.energy_weight * ew, seed=seed,
                       device=self.device, threads=self.threads)


# --- pure pieces ------------------------------------------------------------------------------
def choose(summary: DefectSummary, trust: dict[str, Trust], asked: set[str], k: int, rule: str,
           settled: set[str] | None = None, explore: int | None = None) -> list[str]:
    """The next ``k`` trials of one defect and charge to relax with DFT (see the module's rules).

    Args:
        summary: The current landscape.
        trust: Trust score by trial name (of the relaxation that represents each minimum).
        asked: Trials already asked (answered or failed): never asked again.
        k: How many.
        rule: One of :data:`RULES`.
        settled: Representative trials of the minima DFT has confirmed or refuted.
        explore: At most this many when the rule yields nothing (blind exploration only).
    """
    settled = settled or set()
    energy = {t.name: t.energy for t in summary.trials if t.energy is not None}

    def askable(names):
        return [n for n in names if n not in asked and not n.startswith(DFT_PREFIX)]

    fresh = [m for m in summary.minima if m.trial not in settled and askable(m.trials)]
    # one trial per unsettled minimum: its lowest askable member
    per_min = [(m, min(askable(m.trials), key=lambda n: energy.get(n, np.inf))) for m in fresh]
    unvisited = [t for _, t in per_min]
    spread = {t: trust.get(m.trial, NO_COMMITTEE).force for m, t in per_min}
    uncertain = sorted(unvisited, key=lambda t: -(spread[t] if spread[t] is not None else -np.inf)) \
        if any(v is not None for v in spread.values()) else list(unvisited)
    if rule == "lowest":
        order = sorted(askable(energy), key=lambda n: energy[n])
    elif rule == "unvisited":
        order = unvisited
    elif rule == "uncertain":
        order = uncertain
    else:
        order = [t for pair in zip(unvisited, uncertain, strict=True) for t in pair]
    picked: list[str] = []
    for t in order:
        if len(picked) == k:
            break
        if t not in picked:
            picked.append(t)
    if not picked and explore is not None:
        k = min(k, explore)
    return fill_up(picked, summary, asked, k)


def trial_kind(name: str) -> str:
    """How a trial explores: ``Bond_Distortion``, ``Off_Centre``, ``Dimer``, or ``Rattled``.

    ``Unperturbed`` counts as ``Rattled`` (the same start without the noise); any other name (a
    ShakeNBreak folder's own) is a kind of its own.
    """
    for prefix in ("Bond_Distortion", "Off_Centre"):
        if name.startswith(prefix):
            return prefix
    return "Rattled" if name == "Unperturbed" else name


def fill_up(picked: list[str], summary: DefectSummary, asked: set[str], k: int) -> list[str]:
    """Fewer than ``k`` picked: add trials DFT has explored least like.

    First a trial of a kind (:func:`trial_kind`) not yet asked, then the trial whose bond
    distortion is farthest from every one asked, the model's lowest on a tie. What a model that
    misses a reconstruction does is fold most trials into few minima; DFT then explores,
    ShakeNBreak's reason for trying many distortions and a dimer. Measured on the stand-in ZnSe
    V_Zn (``benchmarks/loop_zoo.py``): by distortion alone, the Dimer trial (distortion 0, like
    Rattled) came last, and the loop converged on the open vacancy, 0.07 eV above the oracle's
    dimer, before asking it.
    """
    picked = list(picked)
    energy = {t.name: t.energy for t in summary.trials if t.energy is not None}
    distortion = {t.name: t.distortion or 0.0 for t in summary.trials}
    rest = [n for n in energy if n not in asked and n not in picked and not n.startswith(DFT_PREFIX)]
    while len(picked) < k and rest:
        seen = [n for n in (*asked, *picked) if not n.startswith(DFT_PREFIX)]
        kinds = {trial_kind(n) for n in seen}
        far = max(rest, key=lambda n: (trial_kind(n) not in kinds,
                                       min((abs(distortion[n] - distortion.get(d, 0.0)) for d in seen),
                                           default=0.0),
                                       -energy[n]))
        picked.append(far)
        rest.remove(far)
    return picked


def lowest_changed_round(history: list[float | None], tolerance: float) -> int | None:
    """The last round (index into ``history``) whose DFT lowest energy dropped by > ``tolerance``."""
    best, changed = None, None
    for i, e in enumerate(history):
        if e is None:
            continue
        if best is None or e < best - tolerance:
            changed = i
        best = e if best is None else min(best, e)
    return changed


@dataclass
class Settling:
    """How each minimum of the lead model stands against DFT (by representative trial)."""

    confirmed: dict[str, str] = field(default_factory=dict)  # minimum -> the DFT trial in its basin
    refuted: set[str] = field(default_factory=set)  # every trial asked, none of their DFT stayed

    @property
    def settled(self) -> set[str]:
        """Confirmed or refuted."""
        return set(self.confirmed) | self.refuted

    def state(self, name: str) -> str:
        """``confirmed``, ``refuted`` or ``open``."""
        return "confirmed" if name in self.confirmed else "refuted" if name in self.refuted else "open"


def settle(summary: DefectSummary, dft: list[Point], asked: set[str], geo: Geometry,
           max_rmsd: float = DEFAULT_MAX_RMSD) -> Settling:
    """Which minima DFT confirms (a DFT end point in the basin) or refutes (all trials asked)."""
    out = Settling()
    for m in summary.minima:
        hit = confirming(m.atoms, dft, geo, max_rmsd)
        if hit is not None:
            out.confirmed[m.trial] = hit
        elif all(t in asked for t in m.trials if not t.startswith(DFT_PREFIX)):
            out.refuted.add(m.trial)
    return out


@dataclass
class Assessment:
    """Where one defect and charge stands after a round.

    ``status``: ``converged``, ``exhausted`` (nothing left to ask), ``cannot_reproduce`` (the
    model still contradicts its DFT after every fit attempt) or ``open``.
    """

    finished: bool
    status: str
    reason: str
    dft_lowest: dict | None
    stable_rounds: int
    model_reproduces_dft: bool | None
    open_minima: list[str] = field(default_factory=list)  # unsettled, untrusted, within the window
    minima: list[dict] = field(default_factory=list)


def assess(summary: DefectSummary, trust: dict[str, Trust], asked: set[str], dft: dict[str, float],
           history: list[float | None], s: LoopSettings, settling: Settling | None = None,
           repro: Reproduction | None = None, calibrated: float | None = None) -> Assessment:
    """Is this defect and charge finished (see the module)?

    Args:
        summary: The lead model's landscape after this round's re-relaxation.
        trust: Trust score by trial name.
        asked: Trials asked so far.
        dft: DFT energies by trial (answered ones).
        history: DFT lowest energy after each round so far (this one last).
        s: Settings.
        settling: Which minima DFT confirmed or refuted (``None``: none).
        repro: The reproduction check of this round's lead model (``None``: not checked).
        calibrated: The calibrated force-spread threshold (``None``: the score trusts nothing).
    """
    settling = settling or Settling()
    changed = lowest_changed_round(history, s.tolerance)
    stable = len(history) - 1 - changed if changed is not None else 0
    lowest = min(dft.items(), key=lambda kv: kv[1]) if dft else None
    minima = summary.minima
    top = minima[0].energy if minima else 0.0
    rows, blocking = [], []
    for m in minima:
        t = trust.get(m.trial, NO_COMMITTEE)
        trusted = calibrated is not None and t.force is not None and t.force <= calibrated
        state = settling.state(m.trial)
        rows.append({"rank": m.rank, "trial": m.trial, "energy_eV": round(m.energy, 4),
                     "delta_e_eV": round(m.delta_e, 4) + 0.0, "label": m.label, "trials": m.trials,
                     "bonds": [[a, b, d] for a, b, d in m.bonds], "visited": state,
                     "confirmed_by": settling.confirmed.get(m.trial), "trust": t.to_dict(),
                     "trusted": trusted, "untrusted": t.untrusted(s.threshold)})
        if state == "open" and m.energy - top <= s.window and not trusted:
            blocking.append(m.trial)
    reproduces = None if repro is None else repro.ok
    dft_lowest = {"trial": lowest[0], "energy_eV": lowest[1]} if lowest else None

    def done(status, reason, finished=True):
        return Assessment(finished, status, reason, dft_lowest, stable, reproduces, blocking, rows)

    if not choose(summary, trust, asked, 1, s.rule, settling.settled):
        if reproduces is False:
            return done("cannot_reproduce", "model cannot reproduce its DFT; nothing left to ask: "
                        + repro.reason)
        return done("exhausted", "nothing left to ask: every trial has DFT")
    why = []
    if lowest is None:
        why.append("no DFT answer yet")
    elif stable < s.patience:
        why.append(f"DFT lowest changed {stable} round(s) ago")
    if reproduces is not True:
        why.append("model cannot reproduce its DFT: " + (repro.reason if repro else "not checked"))
    if blocking:
        why.append(f"{len(blocking)} minimum/minima in the window unconfirmed by DFT and untrusted "
                   f"({', '.join(blocking)})")
    if not why:
        return done("converged", f"the model reproduces its DFT, DFT lowest ({lowest[0]}) "
                    f"unchanged for {stable} round(s), every minimum within {s.window} eV settled")
    return done("cannot_reproduce" if reproduces is False else "open", "; ".join(why), finished=False)


# --- the record --------------------------------------------------------------------------------
@dataclass
class Round:
    """One round of the loop, as ``loop.json`` keeps it (see the module for the stages)."""

    round: int
    complete: bool = False
    rule: str = ""
    started: str = ""
    picks: dict[str, list[str]] | None = None
    starts: dict[str, str] = field(default_factory=dict)  # label -> trial | minimum
    answered: bool = False
    failed: list[str] = field(default_factory=list)
    oracle_seconds: float = 0.0
    training: dict = field(default_factory=dict)
    fits: list[dict] = field(default_factory=list)  # one per attempt: models, ml_key, reproduces
    fitted: bool = False
    models: list[str] = field(default_factory=list)  # the final attempt's committee
    ml_key: str | None = None
    relax_seconds: float = 0.0
    calibration: dict | None = None
    items: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> Round:
        """Back from ``loop.json``."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


@dataclass
class LoopResult:
    """How a call of :func:`run_loop` ended.

    ``defects``: per label, what ``defectml loop --json`` prints (status, DFT relaxations and
    ionic steps, the answer, whether the model reproduces its DFT, the final minima).
    """

    status: str  # finished | waiting | stopped
    reason: str
    rounds: list[dict]
    pending: list[str] = field(default_factory=list)
    out: Path | None = None
    defects: dict[str, dict] = field(default_factory=dict)

    @property
    def dft_relaxations(self) -> int:
        """DFT relaxations asked in all."""
        return sum(len(v) for r in self.rounds for v in (r.get("picks") or {}).values())

    def to_dict(self) -> dict:
        """The loop's status and reason, and each defect's record."""
        return {"status": self.status, "reason": self.reason, "dft_relaxations": self.dft_relaxations,
                "defects": self.defects}


def _model_spec(ref) -> str:
    """The text ``parse_model`` turns back into ``ref``."""
    if ref.builtin:
        return ref.source + (f"@{ref.head}" if ref.head and ref.head != ref.builtin.head else "")
    return f"{ref.family}:{ref.source}" + (f"@{ref.head}" if ref.head else "")


def oracle_key(oracle) -> str:
    """What defines the oracle's answers: its own ``key()``, else its kind and level of theory."""
    own = getattr(oracle, "key", None)
    if callable(own):
        return str(own())
    return content_key(getattr(oracle, "kind", type(oracle).__name__), getattr(oracle, "theory", None))


def oracle_starts(oracle) -> tuple[str, ...]:
    """The start kinds an oracle can answer (a replay: only the trials it replays)."""
    return tuple(getattr(oracle, "starts", ("trial", "minimum")))


# --- the loop ---------------------------------------------------------------------------------
class _Loop:
    """One loop over one search run (state in ``out/loop.json``)."""

    def __init__(self, store: ResultStore, run_key: str, oracle, s: LoopSettings, out: Path,
                 only: set[str] | None, log: Callable[[str], None], progress: bool):
        self.store, self.run_key, self.oracle, self.s, self.out = store, run_key, oracle, s, out
        self.log, self.progress = log, progress
        if s.dft_start == "minimum" and "minimum" not in oracle_starts(oracle):
            raise InputError(f"--dft-start minimum: the {getattr(oracle, 'kind', 'oracle')} oracle answers "
                             "only the trials' own starts; use --dft-start trial (or auto)")
        everything = summarise(store, run_key)
        self.items = {x.label: x for x in everything if only is None or x.label in only}
        if only is not None and set(only) - set(self.items):
            missing = ", ".join(sorted(set(only) - set(self.items)))
            raise InputError(f"--defect {missing}: not in run {run_key} (it has "
                             f"{', '.join(sorted(x.label for x in everything))})")
        if not self.items:
            raise InputError(f"run {run_key} has no relaxed defects to learn")
        self.start_ref = self._start_ref(next(iter(self.items.values())))
        self.key = content_key("loop", run_key, s.key(), oracle_key(oracle), sorted(self.items))
        self.dft_key = content_key("loop-dft", self.key)
        self.state_path = out / "loop.json"
        out.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else None
        if state is not None and state.get("loop_key") != self.key:
            raise InputError(f"{out} holds another loop (other run, settings, oracle or defects); "
                             "choose another --out, or delete it to start afresh")
        self.state = state or {"loop_key": self.key, "run_key": run_key, "dft_key": self.dft_key,
                               "settings": asdict(s), "oracle": oracle_key(oracle),
                               "oracle_theory": getattr(oracle, "theory", None),
                               "start_model": _model_spec(self.start_ref), "rounds": [], "finished": {}}
        self.rounds = [Round.from_dict(d) for d in self.state["rounds"]]
        self.starts = {label: self._trial_starts(x) for label, x in self.items.items()}
        self.geometry = {label: self._geometry(x) for label, x in self.items.items()}
        self._landscapes: dict[tuple[str, str], tuple[DefectSummary, dict[str, Trust]]] = {}

    def _start_ref(self, summary: DefectSummary):
        from defectml.models.ref import check_key, parse_model
        from defectml.train.finetune import SUFFIX

        if self.s.base:
            ref = parse_model(self.s.base, self.s.device)
        elif summary.model_ref:
            ref = check_key(summary.model_ref)
        else:
            raise ModelError(f"run {self.run_key} does not record its model: pass --base MODEL")
        if ref.family not in SUFFIX:
            raise ModelError(f"the loop fine-tunes its model, and {ref.label} ({ref.family}) cannot be "
                             "fine-tuned here: pass --base with a CHGNet or SevenNet model")
        return ref

    def _trial_starts(self, summary: DefectSummary) -> dict[str, Atoms]:
        """Each trial's unrelaxed structure (its stored starting positions)."""
        return {row.trial: trial_start(row, or_end=True)
                for row in self.store.select(kind="relaxation", settings_key=self.run_key,
                                             defect_key=summary.defect_key, charge_state=summary.charge)}

    def _geometry(self, summary: DefectSummary) -> Geometry:
        ctx = defect_context(self.store, summary.defect_key)
        first = summary.trials[0]
        return Geometry.of(ctx.bulk, ctx.oxidation_states, first.site, first.defect_index)

    def save(self) -> None:
        self.state["rounds"] = [r.to_dict() for r in self.rounds]
        write_json(self.state_path, self.state)

    # --- DFT rows ---------------------------------------------------------------------------
    def dft_rows(self, summary: DefectSummary | None = None) -> list:
        query = {"kind": "relaxation", "settings_key": self.dft_key, "fidelity": "dft"}
        if summary is not None:
            query.update(defect_key=summary.defect_key, charge_state=summary.charge)
        return self.store.select(**query)

    def asked(self, summary: DefectSummary) -> set[str]:
        return {r.trial for r in self.dft_rows(summary)}

    def dft_points(self, summary: DefectSummary) -> list[Point]:
        """The converged DFT end points of one defect and charge (what basins and answers use)."""
        return [Point(r.trial, r.toatoms(), float(r.energy)) for r in self.dft_rows(summary)
                if r.status == CONVERGED and r.get("energy") is not None]

    def dft_energies(self, summary: DefectSummary) -> dict[str, float]:
        return {p.name: p.energy for p in self.dft_points(summary)}

    def store_answer(self, summary: DefectSummary, answer, round_no: int) -> None:
        trial = next((t for t in summary.trials if t.name == answer.request.trial), None)
        final = answer.final if answer.final is not None else answer.request.start
        forces = None
        if answer.final is not None and answer.final.calc is not None:
            forces = answer.final.calc.results.get("forces")
        traj = None
        if len(answer.frames) > 1 and all(f.calc is not None for f in answer.frames):
            traj = Trajectory.from_frames(answer.frames)
        self.store.add(RelaxationRecord(
            final, answer.energy, forces, "dft", answer.theory, summary.defect, summary.defect_key,
            summary.charge, answer.request.trial,
            trial_key(self.dft_key, summary.defect_key, summary.charge, answer.request.trial),
            self.dft_key, answer.status, getattr(self.oracle, "kind", "oracle"), max(len(answer.frames), 1),
            trial.site if trial else np.zeros(3), trial.defect_index if trial else None,
            trajectory=traj, distortion=trial.distortion if trial else None,
            extra={"reason": answer.reason, "seconds": answer.seconds, "loop_round": round_no,
                   "loop_key": self.key, "initial_positions": answer.request.start.positions,
                   "dft_start": answer.request.start_kind,
                   "ionic_steps": len(answer.frames) if traj is not None else None},
        ))

    # --- stage 1: pick ------------------------------------------------------------------------
    def start_kind(self, label: str) -> str:
        """Where this round's DFT starts for ``label`` (``auto``: see the module)."""
        if self.s.dft_start != "auto":
            return self.s.dft_start
        last = next((r for r in reversed(self.rounds) if r.complete and label in r.items), None)
        trusted = last is not None and last.items[label].get("model_reproduces_dft") is True
        return "minimum" if trusted and "minimum" in oracle_starts(self.oracle) else "trial"

    def settling(self, label: str, land: DefectSummary) -> Settling:
        summ = self.items[label]
        return settle(land, self.dft_points(summ), self.asked(summ), self.geometry[label], self.s.max_rmsd)

    def pick(self, rd: Round, prev_key: str) -> None:
        s, st = self.s, self.state
        picks = {}
        left = None if s.budget is None else s.budget - self.spent()
        for lb in [lb for lb in self.items if lb not in st["finished"]]:
            land, trust = self.landscape(self.items[lb], prev_key)
            chosen = choose(land, trust, self.asked(self.items[lb]), s.k, s.rule,
                            self.settling(lb, land).settled, s.explore_k)
            if not chosen:
                st["finished"][lb] = {"round": rd.round - 1, "status": "exhausted",
                                      "reason": "nothing left to ask: every trial has DFT"}
                self.log(f"{lb}: finished, {st['finished'][lb]['reason']}")
                continue
            if left is not None:
                chosen = chosen[:max(0, left)]
                left -= len(chosen)
            picks[lb] = chosen
            rd.starts[lb] = self.start_kind(lb)
        rd.picks, rd.rule = picks, s.rule
        rd.started = time.strftime("%Y-%m-%d %H:%M:%S")

    # --- stage 2: ask -------------------------------------------------------------------------
    def request(self, label: str, trial: str, kind: str, prev_key: str) -> Request:
        summ = self.items[label]
        start = self.starts[label].get(trial)
        if kind == "minimum":
            land, _ = self.landscape(summ, prev_key)
            m = next((m for m in land.minima if trial in m.trials), None)
            ml = {t.name: t for t in land.trials}
            start = m.atoms if m is not None else ml[trial].atoms
        return Request(summ.defect, summ.charge, trial, bare_atoms(start), self.starts[label].get(trial),
                       kind)

    def ask(self, rd: Round, prev_key: str) -> list[str]:
        """Ask the oracle for this round's picks; the pending ones (a folder oracle) are returned."""
        requests = []
        for lb, trials in rd.picks.items():
            have = self.asked(self.items[lb])
            requests += [self.request(lb, t, rd.starts.get(lb, "trial"), prev_key) for t in trials
                         if t not in have]
        t0 = time.perf_counter()
        answers, pending = self.oracle.ask(requests) if requests else ([], [])
        for a in answers:
            self.store_answer(self.items[a.request.label], a, rd.round)
        failed = [f"{a.request.label} {a.request.trial}: {a.reason}" for a in answers if a.status == FAILED]
        rd.failed.extend(failed)
        rd.oracle_seconds += time.perf_counter() - t0
        for f in failed:
            self.log(f"oracle failed: {f} (recorded; going on)")
        return pending

    # --- stage 3: fit and check ---------------------------------------------------------------
    def training_frames(self) -> list[Atoms]:
        """Every answered DFT relaxation: its path (evenly spaced frames) and its end point."""
        from defectml.train.dataset import evenly_spaced

        frames = []
        for row in self.dft_rows():
            if row.status not in (CONVERGED, UNCONVERGED) or row.get("energy") is None:
                continue
            info = {"host": "loop", "functional": row.theory,
                    "defect": charge_label(row.defect, int(row.charge_state)),
                    "charge": int(row.charge_state), "run_id": row.trial_key}
            picked = []
            if "trajectory" in row.data:
                traj = Trajectory.from_data(row.data["trajectory"], row.cell)
                n = self.s.frames_per_relaxation or len(traj)
                if traj.forces is not None and len(traj) > 1:
                    picked = [traj.frame(i, row.numbers) for i in evenly_spaced(len(traj) - 1, n)]
            end = row.toatoms()
            forces = end.calc.results.get("forces") if end.calc is not None else None
            if forces is None:
                if row.status != CONVERGED:
                    continue  # an unconverged end point without forces says too little
                forces = np.zeros((len(end), 3))
            a = Atoms(end.numbers, end.positions, cell=end.cell, pbc=True)
            a.calc = SinglePointCalculator(a, energy=float(row.energy), forces=np.asarray(forces))
            picked.append(a)
            for i, a in enumerate(picked):
                a.info.update(info, ionic_step=i)
            frames.extend(picked)
        return frames

    def round_start(self, round_no: int) -> str:
        """The model this round's training starts from: the last round's lead (round 1: the search's)."""
        if round_no == 1:
            return _model_spec(self.start_ref)
        return f"{self.start_ref.family}:{self.rounds[round_no - 2].models[0]}"

    def write_data(self, rd: Round, folder: Path) -> tuple[Path, Path]:
        """The round's training and validation frames, energies anchored once for every member."""
        from defectml.models import load_model
        from defectml.train.finetune import anchored_energies, predicted_energies

        paths = folder / "train.extxyz", folder / "val.extxyz"
        if all(p.exists() for p in paths):
            return paths
        frames = self.training_frames()
        if not frames:
            raise InputError("no DFT answer to learn from (every request failed): see the oracle's "
                             "reasons in loop.json")
        start = load_model(self.round_start(rd.round), self.s.device, self.s.threads)
        labels, shifts = anchored_energies(frames, predicted_energies(start, frames))
        frames = [_relabel(f, e) for f, e in zip(frames, labels, strict=True)]
        ids = sorted({f.info["run_id"] for f in frames})
        held: set[str] = set()
        if len(ids) >= 4 and self.s.holdout > 0:
            n = max(1, int(round(self.s.holdout * len(ids))))
            rng = np.random.default_rng(self.s.seed + rd.round)
            held = set(rng.choice(ids, size=n, replace=False).tolist())
        train = [f for f in frames if f.info["run_id"] not in held]
        val = [f for f in frames if f.info["run_id"] in held] or train
        rd.training = {"frames": len(train), "val_frames": len(val), "relaxations": len(ids),
                       "anchor_shifts_eV": {k: round(v, 4) for k, v in shifts.items()},
                       "validation": (f"{len(held)} of {len(ids)} DFT relaxations held back for early "
                                      "stopping" if held else f"validation = training frames ({len(ids)} "
                                      "DFT relaxations, every one learnt)")}
        write_frames(paths[0], train)
        write_frames(paths[1], val)
        return paths

    def fit(self, rd: Round, active: list[str]) -> None:
        """Train the lead, check it against its DFT, train it further while it fails; then the committee.

        The fit attempts train the lead model alone (member 0: every frame), each warm-started
        from the last; the other members then start from the final lead and learn bootstrap
        resamples of the relaxations (the first attempt's schedule), so their spread is the
        disagreement the data leave around the model the loop relaxes with.
        """
        from defectml.train.committee import Committee, train_committee

        folder = self.out / f"round_{rd.round:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        train, val = self.write_data(rd, folder)
        self.save()
        n_atoms = max(len(a) for a in self.starts[active[0]].values()) if active else 0
        while True:
            a = len(rd.fits)
            base = self.round_start(rd.round) if a == 0 else \
                f"{self.start_ref.family}:{rd.fits[-1]['models'][0]}"
            t0 = time.perf_counter()
            fs = self.s.finetune(base, self.s.seed, a, n_atoms)
            (lead,) = train_committee(train, val, folder / f"fit_{a}", fs, 1, log=self.log)
            seconds = time.perf_counter() - t0
            key = content_key("loop-ml", self.key, rd.round, a)
            checks = self.check_all(Committee.load([lead], self.s.device, self.s.threads), active, key,
                                    rd.round)
            rd.fits.append({"attempt": a, "epochs": fs.epochs, "lr": fs.lr, "energy_weight": fs.energy_weight,
                            "models": [str(lead)], "ml_key": key,
                            "train_seconds": round(seconds, 1), "reproduces": checks})
            self.save()
            if all(c["ok"] is not False for c in checks.values()) or a + 1 >= self.s.fit_attempts:
                break
        lead = rd.fits[-1]["models"][0]
        t0 = time.perf_counter()
        members = [Path(lead)]
        if self.s.committee > 1:
            fs = self.s.finetune(f"{self.start_ref.family}:{lead}", self.s.seed, 0, n_atoms)
            members += train_committee(train, val, folder / "committee", fs, self.s.committee, log=self.log,
                                       first=1)
        rd.models = [str(m) for m in members]
        rd.ml_key, rd.fitted = content_key("loop-ml", self.key, rd.round, "final"), True
        rd.training["seconds"] = round(sum(f["train_seconds"] for f in rd.fits) + time.perf_counter() - t0, 1)

    def check_all(self, committee, active: list[str], key: str, round_no: int) -> dict[str, dict]:
        """Relax every active defect's DFT end points with the lead model; check each against its DFT."""
        checks = {}
        for lb in active:
            self.relax(committee, self.items[lb], key, round_no, dft_only=True)
            checks[lb] = self.check(lb, key).to_dict()
            if checks[lb]["ok"] is False:
                self.log(f"round {round_no}: {lb}: the model does not reproduce its DFT "
                         f"({checks[lb]['reason']})")
        return checks

    def check(self, label: str, ml_key: str) -> Reproduction:
        """The model (``ml_key``'s relaxations of the DFT end points) against its DFT."""
        summ = self.items[label]
        rows = {r.trial[len(DFT_PREFIX):]: r for r in self.store.select(
            kind="relaxation", settings_key=ml_key, defect_key=summ.defect_key, charge_state=summ.charge)
            if r.trial.startswith(DFT_PREFIX)}
        model = {name: (Point(name, r.toatoms(), float(r.energy))
                        if r.status != FAILED and r.get("energy") is not None else None)
                 for name, r in rows.items()}
        return reproduction(self.dft_points(summ), model, self.geometry[label],
                            max_rmsd=self.s.max_rmsd, order_tol=self.s.order_tol)

    # --- stage 4: relax -----------------------------------------------------------------------
    def relax(self, committee, summary: DefectSummary, ml_key: str, round_no: int,
              dft_only: bool = False) -> int:
        """Re-relax the DFT end points, then (unless ``dft_only``) every trial, with the lead model."""
        jobs = [(DFT_PREFIX + r.trial, bare_atoms(r.toatoms())) for r in self.dft_rows(summary)
                if r.status in (CONVERGED, UNCONVERGED)]
        if not dft_only:
            jobs += sorted(self.starts[summary.label].items())
        first = summary.trials[0]
        meta = TrialMeta(summary.defect, summary.defect_key, summary.charge, np.asarray(first.site),
                         first.defect_index, {t.name: t.distortion for t in summary.trials})
        r = self.s.relaxation
        return relax_trials(self.store, committee, jobs, meta, ml_key, fmax=r.fmax, max_steps=r.max_steps,
                            early_stop=r.early_stop, batch_size=r.batch_size,
                            extra={"loop_round": round_no, "loop_key": self.key},
                            progress=self.progress, desc=f"round {round_no} {summary.label}")

    def landscape(self, summary: DefectSummary, ml_key: str) -> tuple[DefectSummary, dict[str, Trust]]:
        """The landscape of one defect under ``ml_key`` (round 0: the search) and its trust scores."""
        if ml_key == self.run_key:
            return summary, {}
        if (summary.label, ml_key) in self._landscapes:
            return self._landscapes[(summary.label, ml_key)]
        found = summarise(self.store, ml_key, only={(summary.defect_key, summary.charge)})
        if not found:
            return summary, {}
        trust = {}
        for row in self.store.select(kind="relaxation", settings_key=ml_key,
                                     defect_key=summary.defect_key, charge_state=summary.charge):
            t = row.data.get("trust")
            if t:
                trust[row.trial] = Trust(t.get("force"), t.get("energy"), int(t.get("members", 1)))
        self._landscapes[(summary.label, ml_key)] = found[0], trust
        return found[0], trust

    # --- stage 5: calibrate -------------------------------------------------------------------
    def calibration_points(self, rd: Round) -> None:
        """The last round's committee on this round's new DFT frames (never trained on): spread, error."""
        from defectml.train.committee import Committee

        prev = self.rounds[rd.round - 2] if rd.round > 1 else None
        if prev is None or len(prev.models) < 2 or "points" in (rd.calibration or {}):
            return
        frames = [f for f in self.training_frames() if f.info["run_id"] in self.round_ids(rd)]
        points = []
        if frames:
            committee = Committee.load(prev.models, self.s.device, self.s.threads)
            preds = committee.predictions(frames)
            from defectml.train.committee import spread

            for f, t, lead in zip(frames, spread(preds), preds[0], strict=True):
                err = float(np.linalg.norm(np.asarray(lead[1]) - f.get_forces(), axis=1).mean())
                points.append([t.force, err])
        rd.calibration = {"points": points, "committee_round": prev.round}

    def round_ids(self, rd: Round) -> set[str]:
        return {r.trial_key for r in self.dft_rows() if r.data.get("loop_round") == rd.round}

    def calibrate(self, rd: Round) -> TrustCalibration:
        """The threshold from every round's out-of-sample points so far (see the module)."""
        pts = [p for r in self.rounds[:rd.round] for p in (r.calibration or {}).get("points", [])]
        cal = calibrate_threshold([p[0] for p in pts], [p[1] for p in pts], self.s.trust_error)
        rd.calibration = {**(rd.calibration or {}), "threshold": cal.to_dict()}
        return cal

    # --- stage 6: assess ----------------------------------------------------------------------
    def assess_all(self, rd: Round, active: list[str], cal: TrustCalibration) -> None:
        st = self.state
        for lb in active:
            summ = self.items[lb]
            land, trust = self.landscape(summ, rd.ml_key)
            dft = self.dft_energies(summ)
            hist = [r.items[lb]["dft_lowest"]["energy_eV"] if lb in r.items and r.items[lb]["dft_lowest"]
                    else None for r in self.rounds[:rd.round - 1]]
            hist.append(min(dft.values()) if dft else None)
            fit = rd.fits[-1]["reproduces"].get(lb) if rd.fits else None
            repro = Reproduction(fit["ok"], fit["reason"], fit["points"], fit["order"]) if fit else None
            a = assess(land, trust, self.asked(summ), dft, hist, self.s, self.settling(lb, land), repro,
                       cal.threshold)
            rd.items[lb] = asdict(a)
            if a.finished:
                st["finished"][lb] = {"round": rd.round, "status": a.status, "reason": a.reason}
            self.log(f"round {rd.round} {lb}: {a.status}: {a.reason}")

    # --- one round ----------------------------------------------------------------------------
    def ml_key(self, round_no: int) -> str:
        return self.run_key if round_no == 0 else self.rounds[round_no - 1].ml_key

    def next_round(self) -> Round | LoopResult:
        """The round to work on: an unfinished one, a new one, or how the loop ended."""
        s, st = self.s, self.state
        if self.rounds and not self.rounds[-1].complete:
            return self.rounds[-1]
        if all(lb in st["finished"] for lb in self.items):
            return self._end("finished", "every defect and charge state is finished")
        if len(self.rounds) >= s.max_rounds:
            return self._end("stopped", f"--max-rounds {s.max_rounds} reached")
        if s.budget is not None and self.spent() >= s.budget:
            return self._end("stopped", f"DFT budget spent ({self.spent()} of {s.budget})")
        self.rounds.append(Round(len(self.rounds) + 1))
        return self.rounds[-1]

    def run(self) -> LoopResult:
        from defectml.train.committee import Committee

        while True:
            rd = self.next_round()
            if isinstance(rd, LoopResult):
                return rd
            prev_key = self.ml_key(rd.round - 1)
            if rd.picks is None:
                self.pick(rd, prev_key)
                if not any(rd.picks.values()):
                    self.rounds.pop()
                    self.save()
                    continue
                self.save()
                listed = "; ".join(f"{lb}: {', '.join(p) or '-'} (from the {rd.starts.get(lb)})"
                                   for lb, p in rd.picks.items())
                self.log(f"round {rd.round}: asking the oracle for {sum(map(len, rd.picks.values()))} "
                         f"relaxation(s) ({self.s.rule}): {listed}")
            # this round's defects (one finished in this round's assessment stays, for a resume)
            active = [lb for lb in self.items
                      if lb not in self.state["finished"] or self.state["finished"][lb]["round"] == rd.round]
            if not rd.answered:
                pending = self.ask(rd, prev_key)
                if pending:
                    self.save()
                    return self._end("waiting", f"{len(pending)} DFT result(s) not there yet; run the "
                                     "loop again when they are", pending)
                rd.answered = True
                self.save()
            self.calibration_points(rd)
            if not rd.fitted:
                self.fit(rd, active)
                self.save()
            committee = Committee.load(rd.models, self.s.device, self.s.threads)
            t0 = time.perf_counter()
            for lb in active:
                self.relax(committee, self.items[lb], rd.ml_key, rd.round)
                self._landscapes.pop((lb, rd.ml_key), None)
            rd.relax_seconds = round(rd.relax_seconds + time.perf_counter() - t0, 1)
            self.assess_all(rd, active, self.calibrate(rd))
            rd.complete = True
            self.save()
            if self.s.budget is not None and self.spent() >= self.s.budget and \
                    any(lb not in self.state["finished"] for lb in self.items):
                return self._end("stopped", f"DFT budget spent ({self.spent()} of {self.s.budget})")

    def spent(self) -> int:
        return len(self.dft_rows())

    # --- the answer ---------------------------------------------------------------------------
    def defect_record(self, label: str) -> dict:
        """What ``--json`` prints for one defect (see :class:`LoopResult`)."""
        summ, geo = self.items[label], self.geometry[label]
        rows = self.dft_rows(summ)
        last = next((r for r in reversed(self.rounds) if r.complete and label in r.items), None)
        item = last.items[label] if last else None
        fin = self.state["finished"].get(label)
        status = fin["status"] if fin else (item["status"] if item else "not started")
        steps = [r.data.get("ionic_steps") for r in rows]
        points = self.dft_points(summ)
        answer = None
        if points:
            best = min(points, key=lambda p: p.energy)
            row = next(r for r in rows if r.trial == best.name)
            lead = item["minima"][0] if item and item["minima"] else None
            answer = {"trial": best.name, "energy_eV": round(best.energy, 6), "label": geo.label(best.atoms),
                      "bonds": [[a, b, d] for a, b, d in geo.bonds(best.atoms)],
                      "dft_start": row.data.get("dft_start"),
                      "model_agrees": bool(lead and lead.get("confirmed_by") is not None
                                           and self._same(geo, lead["confirmed_by"], best, points))}
        return {"status": status, "reason": fin["reason"] if fin else (item["reason"] if item else ""),
                "dft_relaxations": len(rows),
                "dft_ionic_steps": sum(steps) if steps and all(x is not None for x in steps) else None,
                "answer": answer,
                "model_reproduces_dft": item["model_reproduces_dft"] if item else None,
                "final_minima": [{"label": m["label"], "delta_e_eV": m["delta_e_eV"], "bonds": m["bonds"],
                                  "visited": m["visited"], "trust": m["trust"]}
                                 for m in (item["minima"] if item else [])]}

    @staticmethod
    def _same(geo: Geometry, name: str, best: Point, points: list[Point]) -> bool:
        other = next((p for p in points if p.name == name), None)
        return other is not None and geo.same_basin(other.atoms, best.atoms)

    def _end(self, status: str, reason: str, pending: list[str] | None = None) -> LoopResult:
        defects = {lb: self.defect_record(lb) for lb in self.items}
        self.state["status"] = {"status": status, "reason": reason, "dft_relaxations": self.spent(),
                                "defects": defects}
        self.save()
        return LoopResult(status, reason, self.state["rounds"], pending or [], self.out, defects)


def _relabel(frame: Atoms, energy: float) -> Atoms:
    """The frame with ``energy`` as its label (the DFT energy kept in ``info``)."""
    a = Atoms(frame.numbers, frame.positions, cell=frame.cell, pbc=frame.pbc)
    a.info.update(frame.info, dft_energy=float(frame.get_potential_energy()))
    res = frame.calc.results
    a.calc = SinglePointCalculator(a, energy=float(energy), forces=res.get("forces"),
                                   stress=res.get("stress"))
    return a


@dataclass
class TrialMeta:
    """What the stored rows of one defect and charge share."""

    defect: str
    defect_key: str
    charge: int
    site: np.ndarray
    defect_index: int | None
    distortions: dict[str, float | None] = field(default_factory=dict)


def relax_trials(store: ResultStore, committee, jobs: list[tuple[str, Atoms]], meta: TrialMeta, ml_key: str,
                 *, fmax: float = 0.05, max_steps: int = 1500, early_stop: bool = True, batch_size: int = 1,
                 extra: dict | None = None, progress: bool = False, desc: str = "relaxing") -> int:
    """Relax named structures with a committee's lead model in the search's engine; store each.

    Jobs run in order (``batch_size`` together, one model call per step), each stored with its
    trust score the moment it finishes (a rerun skips those already stored under ``ml_key``).
    With ``early_stop``, a job that reaches the basin of one already relaxed stops there
    (``in_basin``); jobs named ``dft:...`` (DFT end points) never stop early: they are the basins
    the others stop in. Returns the number relaxed now.
    """
    from tqdm.auto import tqdm

    from defectml.core.engine import Job, ModelSpec, run_jobs
    from defectml.search.landscape import BasinWatch

    lead = committee.lead
    done = {r.trial: r for r in store.select(kind="relaxation", settings_key=ml_key,
                                              defect_key=meta.defect_key, charge_state=meta.charge)}
    watch = None
    if early_stop and jobs:
        species = tuple(sorted(set(jobs[0][1].get_chemical_symbols())))
        watch = BasinWatch(species, np.asarray(meta.site), meta.defect_index)
        for name, row in done.items():
            if row.status == CONVERGED:
                watch.add(name, row.toatoms(), row.energy)
    todo = [Job(with_charge(a, meta.charge), tag=(n, a), watch=None if n.startswith(DFT_PREFIX) else watch)
            for n, a in jobs if n not in done]
    bar = tqdm(total=len(todo), disable=not progress or not todo, unit="trial", desc=desc)
    for job, r in run_jobs(todo, ModelSpec(lead.ref), fmax=fmax, max_steps=max_steps, batch_size=batch_size,
                           model=lead):
        name, atoms = job.tag
        trust = committee.trust([r.atoms])[0] if r.energy is not None else NO_COMMITTEE
        store.add(RelaxationRecord(
            r.atoms, r.energy, r.forces, "mlip", lead.key, meta.defect, meta.defect_key, meta.charge,
            name, trial_key(ml_key, meta.defect_key, meta.charge, name), ml_key, r.status, lead.name,
            r.steps, meta.site, meta.defect_index, trajectory=r.trajectory, model_key=lead.key,
            distortion=meta.distortions.get(name),
            extra={"initial_positions": atoms.positions, "reason": r.reason, "seconds": r.seconds,
                   "model_ref": lead.ref.to_dict(), "model_version": lead.version,
                   "basin_of": r.basin_of, "trust": trust.to_dict(), "fmax": fmax,
                   "max_steps": max_steps, **(extra or {})},
        ))
        if watch is not None and r.status == CONVERGED:
            watch.add(name, r.atoms, r.energy)
        bar.update(1)
    bar.close()
    return len(todo)


def loop_text(state: dict) -> str:
    """A loop's record (``loop.json``) for people.

    Rounds and picks, the model's check against its DFT, the trust score's calibration and each
    defect's answer.
    """
    status = state.get("status") or {}
    lines = [f"loop {status.get('status', 'running')}: {status.get('reason', '')} "
             f"({status.get('dft_relaxations', 0)} DFT relaxations asked)"]
    for rd in state.get("rounds", []):
        starts = rd.get("starts", {})
        asked = "; ".join(f"{lb}: {', '.join(p)} (from the {starts.get(lb, 'trial')})"
                          for lb, p in (rd.get("picks") or {}).items() if p)
        shown = f" (its landscape: defectml show RUN --run {rd['ml_key']})" if rd.get("ml_key") else ""
        lines.append(f"round {rd['round']}: asked {asked or 'nothing'}{shown}")
        for fit in rd.get("fits", []):
            verdict = ", ".join(f"{lb} {_verdict(c)}" for lb, c in fit["reproduces"].items())
            lines.append(f"  fit {fit['attempt'] + 1} ({fit['epochs']} epochs, lr {fit['lr']:g}): {verdict}")
        cal = (rd.get("calibration") or {}).get("threshold")
        if cal:
            lines.append(f"  trust score: {cal['note']}")
        for lb, it in rd.get("items", {}).items():
            low = it.get("dft_lowest")
            best = f"DFT lowest {low['trial']} {low['energy_eV']:.3f} eV" if low else "no DFT answer"
            lines.append(f"  {lb}: {best}; {it['status']}: {it['reason']}")
            lines += [_minimum_line(m) for m in it.get("minima", [])[:6]]
    for lb, d in (status.get("defects") or {}).items():
        ans = d.get("answer")
        what = (f"{ans['trial']} {ans['label']} ({ans['energy_eV']:.3f} eV; the model "
                f"{'agrees' if ans['model_agrees'] else 'does not hold it as its lowest minimum'})"
                if ans else "no DFT answer")
        lines.append(f"{lb}: {d['status']}; answer (DFT's lowest): {what}; {d['dft_relaxations']} DFT "
                     f"relaxation(s)")
    return "\n".join(lines)


def _verdict(check: dict) -> str:
    if check["ok"] is None:
        return "nothing to check"
    return "reproduces its DFT" if check["ok"] else "does not reproduce its DFT: " + check["reason"]


def _minimum_line(m: dict) -> str:
    from defectml.search.report import signed

    spread = m["trust"]["force"]
    trust = "no committee" if spread is None else f"spread {spread * 1000:.0f} meV/Å"
    state = {"confirmed": f"DFT: {m.get('confirmed_by')}", "refuted": "refuted by DFT"}.get(m["visited"], "")
    flag = " UNTRUSTED" if m["untrusted"] and m["visited"] == "open" else ""
    return f"    {signed(m['delta_e_eV'])} eV  {m['label']:<32} {state:<28} {trust}{flag}"


def run_loop(store: ResultStore, run_key: str, oracle, settings: LoopSettings | None = None,
             out: str | Path | None = None, *, only: set[str] | None = None,
             log: Callable[[str], None] = lambda m: None, progress: bool = False) -> LoopResult:
    """Run (or resume) the active loop on one search run.

    Args:
        store: The search's store (the loop's DFT and ML rows join it).
        run_key: The search run (round 0).
        oracle: Answers DFT requests (:mod:`defectml.dft.oracle`).
        settings: Loop settings.
        out: Where the loop's state and models go.
        only: Defect labels (``Mg_O_+2``) to learn; default every one in the run.
        log: Progress messages.
        progress: Progress bars for the relaxations.

    Returns:
        How it ended (``finished``, ``waiting`` for a folder oracle, or ``stopped`` by budget or
        rounds) with every round's record and each defect's answer.
    """
    s = settings or LoopSettings()
    s.validate()
    store.lock()
    try:
        return _Loop(store, run_key, oracle, s, Path(out or "loop"), only, log, progress).run()
    finally:
        store.unlock()
