"""The active loop: learn each target defect from a few DFT relaxations, guided by a trust score.

Starting from a finished search (round 0: the universal model's landscape), each round

1. **picks** up to ``k`` trials per defect and charge for DFT by a stated rule (below), never one
   already asked;
2. asks the **oracle** (:mod:`defectml.dft.oracle`) and stores every answer as a ``fidelity="dft"``
   row of the run's store (a failed one too, with its reason: it is never asked again);
3. **fine-tunes** a committee (:mod:`defectml.train.committee`) from the last round's lead model
   (a warm start) on every DFT answer so far: the relaxed end point (its forces, or zero forces for
   a converged end point without them: a DFT minimum is a valid zero-force label) and up to
   ``frames_per_relaxation`` evenly spaced frames of its trajectory where the oracle gives one.
   Energies are anchored per defect and charge (:mod:`defectml.train.finetune`): the model learns
   DFT's energy *differences* between the structures of one charge state. With four or more DFT
   relaxations a quarter of them (at least one) is held back for early stopping; with fewer the
   training frames are the validation frames (said in the round's record);
4. **re-relaxes** every trial of the unfinished defects from its starting structure with the new
   lead model, after the DFT end points themselves (so trials that reach a DFT basin stop early,
   ``early_stop``); each relaxation is stored with its committee trust score;
5. **assesses** each defect and charge: it is finished when its DFT lowest energy has not dropped
   by more than ``tolerance`` for ``patience`` rounds, the model's lowest minimum has DFT in it,
   and no minimum within ``window`` of the lowest is both unvisited by DFT and untrusted (force
   spread above ``threshold``, or no committee to say); or when nothing is left to ask; or when
   the DFT ``budget`` is spent.

Rules for picking (``rule``):

* ``lowest``: trials by their predicted energy, lowest first;
* ``unvisited``: one trial per minimum that holds no DFT relaxation yet, lowest minimum first;
* ``uncertain``: the unvisited minima with the largest committee force spread first (with no
  committee, as ``unvisited``);
* ``mix``: alternately ``unvisited`` and ``uncertain``.

When a rule yields fewer than ``k`` (a model that misses a reconstruction folds most trials into
one minimum), the rest are the trials whose bond distortion lies farthest from every one asked.

State lives in ``OUT/loop.json`` (the rounds, their picks, models and assessments) and the store
(every relaxation, keyed). A killed loop resumes at the step it was in: answers already stored are
not asked again, committee members already written are not retrained, relaxations already
stored are not redone. A folder oracle whose results are not there yet stops the loop cleanly
(the pending folders are listed); run it again when they are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from defectml.dft.oracle import Request
from defectml.errors import InputError, ModelError
from defectml.records import RelaxationRecord, Trajectory
from defectml.search.relax import CONVERGED, FAILED, UNCONVERGED
from defectml.search.summary import DefectSummary, charge_label, summarise
from defectml.settings import FromOptions
from defectml.store import ResultStore, content_key
from defectml.structure_io import with_charge, write_frames, write_json
from defectml.train.committee import DEFAULT_THRESHOLD, NO_COMMITTEE, Trust

RULES = ("lowest", "unvisited", "uncertain", "mix")
DFT_PREFIX = "dft:"  # ML relaxations that start from a DFT end point


@dataclass
class LoopSettings(FromOptions):
    """How the loop picks, learns and stops (see the module).

    Attributes:
        k: DFT relaxations per defect and charge per round.
        rule: ``lowest``, ``unvisited``, ``uncertain`` or ``mix``.
        budget: DFT relaxations in all (every defect); ``None``: no limit.
        max_rounds: Stop after this many rounds whatever else.
        patience: Rounds the DFT lowest must stay unchanged.
        tolerance: A new DFT lowest counts as a change when this much lower (eV).
        window: Energy window (eV) of the minima that must be trusted or visited.
        threshold: Force spread (eV/Å) above which a minimum is untrusted.
        committee: Models per round (1: no trust score).
        base: The model round 1 starts from (default: the search's model).
        epochs, lr, energy_weight, force_weight, batch_size, train_patience, strategy: Fine-tuning
            settings (energy weighted up: a 1 eV defect energy is ~5 meV/atom in a 200-atom cell).
        max_batch_atoms: Fewer frames per training batch when they are large (a batch of 216-atom
            MgO cells costs CHGNet several GB each): at most this many atoms, at least one frame.
        frames_per_relaxation: Trajectory frames learnt per DFT relaxation (besides its end point).
        holdout: Share of DFT relaxations held back for early stopping (with four or more).
        fmax, max_steps: The MLIP relaxations' force threshold (eV/Å) and step limit.
        early_stop: Stop re-relaxations that reach a known basin.
        device, threads: Where the models run.
        seed: Committee seeds and hold-out draws.
    """

    k: int = 2
    rule: str = "mix"
    budget: int | None = None
    max_rounds: int = 6
    patience: int = 1
    tolerance: float = 0.05
    window: float = 0.5
    threshold: float = DEFAULT_THRESHOLD
    committee: int = 3
    base: str | None = None
    epochs: int = 20
    lr: float = 3e-4
    energy_weight: float = 10.0
    force_weight: float = 1.0
    batch_size: int = 4
    max_batch_atoms: int = 256
    train_patience: int = 5
    strategy: str = "standard"
    frames_per_relaxation: int = 5
    holdout: float = 0.25
    fmax: float = 0.05
    max_steps: int = 1500
    early_stop: bool = True
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise ``InputError`` for values out of range."""
        if self.k < 1:
            raise InputError(f"--k must be at least 1, got {self.k}")
        if self.rule not in RULES:
            raise InputError(f"--rule must be one of {', '.join(RULES)}, not {self.rule!r}")
        if self.budget is not None and self.budget < 1:
            raise InputError(f"--budget must be at least 1 DFT relaxation, got {self.budget}")
        if self.max_rounds < 1 or self.patience < 1 or self.committee < 1:
            raise InputError("--max-rounds, --patience and --committee must be at least 1")
        if min(self.tolerance, self.window, self.threshold) < 0:
            raise InputError("--tolerance, --window and --threshold must be non-negative")
        if not 0 <= self.holdout < 1:
            raise InputError(f"--holdout must be in [0, 1), got {self.holdout}")

    def key(self) -> str:
        """What decides the loop's results (device and threads do not)."""
        d = asdict(self)
        for name in ("device", "threads", "budget", "max_rounds"):
            d.pop(name)
        return content_key(d)

    def finetune(self, base: str, seed: int, n_atoms: int = 0):
        """The fine-tuning settings of one round (frames of ``n_atoms`` atoms)."""
        from defectml.train.finetune import FinetuneSettings

        batch = min(self.batch_size, max(1, self.max_batch_atoms // max(n_atoms, 1)))
        return FinetuneSettings(base=base, epochs=self.epochs, lr=self.lr, batch_size=batch,
                                energy_weight=self.energy_weight, force_weight=self.force_weight,
                                patience=self.train_patience, strategy=self.strategy, seed=seed,
                                device=self.device, threads=self.threads)


# --- pure pieces ------------------------------------------------------------------------------
def visited(minimum, asked: set[str]) -> bool:
    """Whether a minimum holds a DFT relaxation (a trial asked, or a DFT end point re-relaxed)."""
    return any(t in asked or t.startswith(DFT_PREFIX) for t in minimum.trials)


def choose(summary: DefectSummary, trust: dict[str, Trust], asked: set[str], k: int, rule: str) -> list[str]:
    """The next ``k`` trials of one defect and charge to relax with DFT (see the module's rules).

    Args:
        summary: The current landscape.
        trust: Trust score by trial name (of the relaxation that represents each minimum).
        asked: Trials already asked (answered or failed): never asked again.
        k: How many.
        rule: One of :data:`RULES`.
    """
    energy = {t.name: t.energy for t in summary.trials if t.energy is not None}

    def askable(names):
        return [n for n in names if n not in asked and not n.startswith(DFT_PREFIX)]

    fresh = [m for m in summary.minima if not visited(m, asked) and askable(m.trials)]
    # one trial per unvisited minimum: its lowest askable member
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
    # Fewer than k from the rule (the model folds most trials into few minima, which is what a
    # model that misses a reconstruction does): fill up with the trials whose bond distortion is
    # farthest from every one asked or picked, ShakeNBreak's reason for trying many distortions.
    distortion = {t.name: t.distortion or 0.0 for t in summary.trials}
    rest = [n for n in askable(energy) if n not in picked]
    while len(picked) < k and rest:
        seen = [distortion.get(n, 0.0) for n in (*asked, *picked) if not n.startswith(DFT_PREFIX)]
        far = max(rest, key=lambda n: (min((abs(distortion[n] - d) for d in seen), default=0.0),
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
class Assessment:
    """Where one defect and charge stands after a round."""

    finished: bool
    reason: str
    dft_lowest: dict | None
    stable_rounds: int
    untrusted: list[str] = field(default_factory=list)  # representative trials of untrusted minima
    lowest_visited: bool = False
    minima: list[dict] = field(default_factory=list)


def assess(summary: DefectSummary, trust: dict[str, Trust], asked: set[str], dft: dict[str, float],
           history: list[float | None], s: LoopSettings) -> Assessment:
    """Is this defect and charge finished (see the module)?

    Args:
        summary: The landscape after this round's re-relaxation.
        trust: Trust score by trial name.
        asked: Trials asked so far.
        dft: DFT energies by trial (answered ones).
        history: DFT lowest energy after each round so far (this one last).
        s: Settings.
    """
    changed = lowest_changed_round(history, s.tolerance)
    stable = len(history) - 1 - changed if changed is not None else 0
    lowest = min(dft.items(), key=lambda kv: kv[1]) if dft else None
    minima = summary.minima
    top = minima[0].energy if minima else 0.0
    rows, untrusted = [], []
    for m in minima:
        t = trust.get(m.trial, NO_COMMITTEE)
        seen = visited(m, asked)
        flag = t.untrusted(s.threshold)
        rows.append({"rank": m.rank, "trial": m.trial, "energy_eV": round(m.energy, 4),
                     "delta_e_eV": round(m.delta_e, 4) + 0.0, "label": m.label, "trials": m.trials,
                     "visited": seen, "trust": t.to_dict(), "untrusted": flag})
        if not seen and m.energy - top <= s.window and flag is not False:
            untrusted.append(m.trial)
    lowest_visited = bool(minima) and visited(minima[0], asked)
    dft_lowest = {"trial": lowest[0], "energy_eV": lowest[1]} if lowest else None
    if not choose(summary, trust, asked, 1, s.rule):
        return Assessment(True, "nothing left to ask: every trial has DFT", dft_lowest, stable,
                          untrusted, lowest_visited, rows)
    if lowest is not None and stable >= s.patience and not untrusted and lowest_visited:
        return Assessment(True, f"converged: DFT lowest ({lowest[0]}) unchanged for {stable} round(s), "
                          "the model's lowest minimum has DFT, no untrusted minimum in the window",
                          dft_lowest, stable, untrusted, lowest_visited, rows)
    why = []
    if lowest is None:
        why.append("no DFT answer yet")
    elif stable < s.patience:
        why.append(f"DFT lowest changed {stable} round(s) ago")
    if not lowest_visited:
        why.append("the model's lowest minimum has no DFT")
    if untrusted:
        why.append(f"{len(untrusted)} untrusted minimum/minima in the window")
    return Assessment(False, "; ".join(why), dft_lowest, stable, untrusted, lowest_visited, rows)


# --- the loop ---------------------------------------------------------------------------------
@dataclass
class LoopResult:
    """How a call of :func:`run_loop` ended."""

    status: str  # finished | waiting | stopped
    reason: str
    rounds: list[dict]
    pending: list[str] = field(default_factory=list)
    out: Path | None = None

    @property
    def dft_relaxations(self) -> int:
        """DFT relaxations asked in all."""
        return sum(len(v) for r in self.rounds for v in r.get("picks", {}).values())


def _model_spec(ref) -> str:
    """The text ``parse_model`` turns back into ``ref``."""
    if ref.builtin:
        return ref.source + (f"@{ref.head}" if ref.head and ref.head != ref.builtin.head else "")
    return f"{ref.family}:{ref.source}" + (f"@{ref.head}" if ref.head else "")


class _Loop:
    """One loop over one search run (state in ``out/loop.json``)."""

    def __init__(self, store: ResultStore, run_key: str, oracle, s: LoopSettings, out: Path,
                 only: set[str] | None, log: Callable[[str], None], progress: bool):
        self.store, self.run_key, self.oracle, self.s, self.out = store, run_key, oracle, s, out
        self.log, self.progress = log, progress
        self.items = {x.label: x for x in summarise(store, run_key)
                      if only is None or x.label in only}
        if only is not None and set(only) - set(self.items):
            missing = ", ".join(sorted(set(only) - set(self.items)))
            raise InputError(f"--defect {missing}: not in run {run_key} (it has "
                             f"{', '.join(sorted(x.label for x in summarise(store, run_key)))})")
        if not self.items:
            raise InputError(f"run {run_key} has no relaxed defects to learn")
        first = next(iter(self.items.values()))
        self.start_ref = self._start_ref(first)
        oracle_id = [getattr(oracle, "kind", type(oracle).__name__), getattr(oracle, "theory", None)]
        self.key = content_key("loop", run_key, s.key(), oracle_id, sorted(self.items))
        self.dft_key = content_key("loop-dft", self.key)
        self.state_path = out / "loop.json"
        out.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else None
        if state is not None and state.get("loop_key") != self.key:
            raise InputError(f"{out} holds another loop (other run, settings, oracle or defects); "
                             "choose another --out, or delete it to start afresh")
        self.state = state or {"loop_key": self.key, "run_key": run_key, "dft_key": self.dft_key,
                               "settings": asdict(s), "oracle": oracle_id,
                               "start_model": _model_spec(self.start_ref), "rounds": [],
                               "finished": {}}
        self.starts = {label: self._trial_starts(x) for label, x in self.items.items()}
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
        out = {}
        for row in self.store.select(kind="relaxation", settings_key=self.run_key,
                                     defect_key=summary.defect_key, charge_state=summary.charge):
            atoms = row.toatoms()
            atoms.calc = None
            start = row.data.get("initial_positions")
            if start is not None:
                atoms.positions = np.asarray(start, dtype=float)
            out[row.trial] = atoms
        return out

    def save(self) -> None:
        write_json(self.state_path, self.state)

    # --- DFT rows ---------------------------------------------------------------------------
    def dft_rows(self, summary: DefectSummary | None = None) -> list:
        query = {"kind": "relaxation", "settings_key": self.dft_key, "fidelity": "dft"}
        if summary is not None:
            query.update(defect_key=summary.defect_key, charge_state=summary.charge)
        return self.store.select(**query)

    def asked(self, summary: DefectSummary) -> set[str]:
        return {r.trial for r in self.dft_rows(summary)}

    def dft_energies(self, summary: DefectSummary) -> dict[str, float]:
        return {r.trial: float(r.energy) for r in self.dft_rows(summary)
                if r.status in (CONVERGED, UNCONVERGED) and r.get("energy") is not None}

    def store_answer(self, summary: DefectSummary, answer, round_no: int) -> None:
        trial = next((t for t in summary.trials if t.name == answer.request.trial), None)
        tkey = content_key(self.dft_key, summary.defect_key, summary.charge, answer.request.trial)
        final = answer.final if answer.final is not None else answer.request.start
        forces = None
        if answer.final is not None and answer.final.calc is not None:
            forces = answer.final.calc.results.get("forces")
        traj = None
        if len(answer.frames) > 1 and all(f.calc is not None for f in answer.frames):
            traj = Trajectory.from_frames(answer.frames)
        self.store.add(RelaxationRecord(
            final, answer.energy, forces, "dft", answer.theory, summary.defect, summary.defect_key,
            summary.charge, answer.request.trial, tkey, self.dft_key, answer.status,
            getattr(self.oracle, "kind", "oracle"), max(len(answer.frames), 1),
            trial.site if trial else np.zeros(3), trial.defect_index if trial else None,
            trajectory=traj, distortion=trial.distortion if trial else None,
            extra={"reason": answer.reason, "seconds": answer.seconds, "loop_round": round_no,
                   "loop_key": self.key, "initial_positions": answer.request.start.positions},
        ))

    # --- learning ----------------------------------------------------------------------------
    def training_frames(self) -> list[Atoms]:
        """Every answered DFT relaxation: sampled trajectory frames and the end point."""
        from defectml.train.dataset import evenly_spaced

        frames = []
        for row in self.dft_rows():
            if row.status not in (CONVERGED, UNCONVERGED) or row.get("energy") is None:
                continue
            info = {"host": "loop", "functional": row.theory,
                    "defect": charge_label(row.defect, int(row.charge_state)),
                    "charge": int(row.charge_state), "run_id": row.trial_key}
            picked = []
            if "trajectory" in row.data and self.s.frames_per_relaxation > 0:
                traj = Trajectory.from_data(row.data["trajectory"], row.cell)
                if traj.forces is not None and len(traj) > 1:
                    for i in evenly_spaced(len(traj) - 1, self.s.frames_per_relaxation):
                        picked.append(traj.frame(i, row.numbers))
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

    def train(self, round_no: int, base: str) -> tuple[list[Path], dict]:
        from defectml.train.committee import train_committee

        folder = self.out / f"round_{round_no:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        frames = self.training_frames()
        if not frames:
            raise InputError("no DFT answer to learn from (every request failed): see the oracle's "
                             "reasons in loop.json")
        ids = sorted({f.info["run_id"] for f in frames})
        held: set[str] = set()
        if len(ids) >= 4 and self.s.holdout > 0:
            n = max(1, int(round(self.s.holdout * len(ids))))
            rng = np.random.default_rng(self.s.seed + round_no)
            held = set(rng.choice(ids, size=n, replace=False).tolist())
        train = [f for f in frames if f.info["run_id"] not in held]
        val = [f for f in frames if f.info["run_id"] in held] or train
        note = (f"{len(held)} of {len(ids)} DFT relaxations held back for early stopping" if held else
                f"validation = training frames ({len(ids)} DFT relaxations: too few to hold any back)")
        for name, part in (("train", train), ("val", val)):
            if not (folder / f"{name}.extxyz").exists():
                write_frames(folder / f"{name}.extxyz", part)
        paths = train_committee(folder / "train.extxyz", folder / "val.extxyz", folder / "models",
                                self.s.finetune(base, self.s.seed, max(len(f) for f in frames)),
                                self.s.committee, log=self.log)
        return paths, {"frames": len(train), "val_frames": len(val), "relaxations": len(ids),
                       "validation": note}

    # --- relaxing ----------------------------------------------------------------------------
    def relax(self, committee, summary: DefectSummary, ml_key: str, round_no: int) -> int:
        """Re-relax the DFT end points, then every trial, with the round's lead model."""
        jobs = [(DFT_PREFIX + r.trial, _bare(r.toatoms())) for r in self.dft_rows(summary)
                if r.status in (CONVERGED, UNCONVERGED)]
        jobs += sorted(self.starts[summary.label].items())
        first = summary.trials[0]
        meta = TrialMeta(summary.defect, summary.defect_key, summary.charge, np.asarray(first.site),
                         first.defect_index, {t.name: t.distortion for t in summary.trials})
        return relax_trials(self.store, committee, jobs, meta, ml_key, fmax=self.s.fmax,
                            max_steps=self.s.max_steps, early_stop=self.s.early_stop,
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

    # --- one round ---------------------------------------------------------------------------
    def ml_key(self, round_no: int) -> str:
        return self.run_key if round_no == 0 else content_key("loop-ml", self.key, round_no)

    def run(self) -> LoopResult:
        from defectml.train.committee import Committee

        s, st = self.s, self.state
        while True:
            rounds = st["rounds"]
            if rounds and rounds[-1].get("complete") is not True:
                rd = rounds[-1]
            else:
                unfinished = [lb for lb in self.items if lb not in st["finished"]]
                if not unfinished:
                    return self._end("finished", "every defect and charge state is finished")
                if len(rounds) >= s.max_rounds:
                    return self._end("stopped", f"--max-rounds {s.max_rounds} reached")
                spent = self.spent()
                if s.budget is not None and spent >= s.budget:
                    return self._end("stopped", f"DFT budget spent ({spent} of {s.budget})")
                rd = {"round": len(rounds) + 1, "complete": False}
                rounds.append(rd)
            r = rd["round"]
            prev_key = self.ml_key(r - 1)
            if "picks" not in rd:
                picks = {}
                left = None if s.budget is None else s.budget - self.spent()
                for lb in [lb for lb in self.items if lb not in st["finished"]]:
                    summ, trust = self.landscape(self.items[lb], prev_key)
                    chosen = choose(summ, trust, self.asked(self.items[lb]), s.k, s.rule)
                    if not chosen:
                        st["finished"][lb] = {"round": r - 1,
                                              "reason": "nothing left to ask: every trial has DFT"}
                        self.log(f"{lb}: finished, {st['finished'][lb]['reason']}")
                        continue
                    if left is not None:
                        chosen = chosen[:max(0, left)]
                        left -= len(chosen)
                    picks[lb] = chosen
                if not any(picks.values()):
                    rounds.pop()
                    self.save()
                    continue
                rd["picks"], rd["rule"] = picks, s.rule
                rd["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
                self.save()
                listed = "; ".join(f"{lb}: {', '.join(p) or '-'}" for lb, p in picks.items())
                self.log(f"round {r}: asking the oracle for {sum(map(len, picks.values()))} "
                         f"relaxation(s) ({s.rule}): {listed}")
            # this round's defects (one finished in this round's assessment stays, for a resume)
            active = [lb for lb in self.items
                      if lb not in st["finished"] or st["finished"][lb]["round"] == r]
            # oracle
            if not rd.get("answered"):
                requests = []
                for lb, trials in rd["picks"].items():
                    summ = self.items[lb]
                    prev, _ = self.landscape(summ, prev_key)
                    ml = {t.name: t for t in prev.trials}
                    have = self.asked(summ)
                    for t in trials:
                        if t in have:
                            continue
                        start = ml[t].atoms if t in ml else self.starts[lb][t]
                        requests.append(Request(summ.defect, summ.charge, t, _bare(start),
                                                self.starts[lb].get(t)))
                t0 = time.perf_counter()
                answers, pending = self.oracle.ask(requests) if requests else ([], [])
                for a in answers:
                    self.store_answer(self.items[a.request.label], a, r)
                failed = [f"{a.request.label} {a.request.trial}: {a.reason}" for a in answers
                          if a.status == FAILED]
                rd.setdefault("failed", []).extend(failed)
                rd.setdefault("oracle_seconds", 0.0)
                rd["oracle_seconds"] += time.perf_counter() - t0
                for f in failed:
                    self.log(f"oracle failed: {f} (recorded; going on)")
                if pending:
                    self.save()
                    return self._end("waiting", f"{len(pending)} DFT result(s) not there yet; run the "
                                     "loop again when they are", pending)
                rd["answered"] = True
                self.save()
            # learn
            if "models" not in rd:
                base = _model_spec(self.start_ref) if r == 1 else \
                    f"{self.start_ref.family}:{rounds[-2]['models'][0]}"
                t0 = time.perf_counter()
                paths, info = self.train(r, base)
                rd["models"] = [str(p) for p in paths]
                rd["training"] = {**info, "base": base, "seconds": round(time.perf_counter() - t0, 1)}
                self.save()
            committee = Committee.load(rd["models"], s.device, s.threads)
            ml_key = self.ml_key(r)
            rd["ml_key"] = ml_key
            t0 = time.perf_counter()
            for lb in active:
                self.relax(committee, self.items[lb], ml_key, r)
                self._landscapes.pop((lb, ml_key), None)
            rd["relax_seconds"] = round(rd.get("relax_seconds", 0.0) + time.perf_counter() - t0, 1)
            # assess
            rd.setdefault("items", {})
            for lb in active:
                summ = self.items[lb]
                land, trust = self.landscape(summ, ml_key)
                dft = self.dft_energies(summ)
                hist = [x["items"][lb]["dft_lowest"]["energy_eV"]
                        if lb in x.get("items", {}) and x["items"][lb]["dft_lowest"] else None
                        for x in rounds[:-1]]
                hist.append(min(dft.values()) if dft else None)
                a = assess(land, trust, self.asked(summ), dft, hist, s)
                rd["items"][lb] = asdict(a)
                if a.finished:
                    st["finished"][lb] = {"round": r, "reason": a.reason}
                self.log(f"round {r} {lb}: " + ("finished, " if a.finished else "") + a.reason)
            over_budget = s.budget is not None and self.spent() >= s.budget
            rd["complete"] = True
            self.save()
            if over_budget and any(lb not in st["finished"] for lb in self.items):
                return self._end("stopped", f"DFT budget spent ({self.spent()} of {s.budget})")

    def spent(self) -> int:
        return len(self.dft_rows())

    def _end(self, status: str, reason: str, pending: list[str] | None = None) -> LoopResult:
        self.state["status"] = {"status": status, "reason": reason, "dft_relaxations": self.spent()}
        self.save()
        return LoopResult(status, reason, self.state["rounds"], pending or [], self.out)


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
                 *, fmax: float = 0.05, max_steps: int = 1500, early_stop: bool = True,
                 extra: dict | None = None, progress: bool = False, desc: str = "relaxing") -> int:
    """Relax named structures with a committee's lead model; store each with its trust score.

    Jobs run in order, each stored the moment it finishes (a rerun skips those already stored
    under ``ml_key``). With ``early_stop``, a job that reaches the basin of one already relaxed
    stops there (``in_basin``); jobs named ``dft:...`` (DFT end points) never stop early: they
    are the basins the others stop in. Returns the number relaxed now.
    """
    from tqdm.auto import tqdm

    from defectml.search.landscape import BasinWatch
    from defectml.search.relax import relax_one

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
    todo = [(n, a) for n, a in jobs if n not in done]
    bar = tqdm(total=len(todo), disable=not progress or not todo, unit="trial", desc=desc)
    for name, atoms in todo:
        w = None if name.startswith(DFT_PREFIX) else watch
        r = relax_one(with_charge(atoms, meta.charge), lead.calculator, fmax=fmax, max_steps=max_steps,
                      watch=w)
        trust = committee.trust([r.atoms])[0] if r.energy is not None else NO_COMMITTEE
        store.add(RelaxationRecord(
            r.atoms, r.energy, r.forces, "mlip", lead.key, meta.defect, meta.defect_key, meta.charge,
            name, content_key(ml_key, meta.defect_key, meta.charge, name), ml_key, r.status, lead.name,
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


def _bare(atoms: Atoms) -> Atoms:
    return Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


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
        rounds) with every round's record.
    """
    s = settings or LoopSettings()
    s.validate()
    store.lock()
    try:
        return _Loop(store, run_key, oracle, s, Path(out or "loop"), only, log, progress).run()
    finally:
        store.unlock()
