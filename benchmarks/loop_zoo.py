"""Many landscapes, a stand-in oracle: does the active loop find what the base model misses?

Real DFT landscapes with several basins are scarce, so the oracle here is a **stand-in for DFT**
(never DFT): CHGNet 0.3.0 plus one stated anion–anion Gaussian pair well per host
(:mod:`defectml.dft.standin`, ``calculator:chgnet+well:A-B:DEPTH:R0:WIDTH``), an attraction
centred on the anion–anion single-bond length that the base model under-binds (see ``HOSTS`` for
each value and its reason). The surrogate (base) model is CHGNet 0.3.0 (``chgnet``) as shipped.
CdTe and its alloys are excluded (kept for independent checks).

Candidates are the defects the well can act on: cation vacancies (an anion shell), anion
antisites and anion interstitials (every interstitial site). Anion vacancies, cation antisites and
cation interstitials are searched as *controls* (``--controls``): no anion pair comes near the
well in their trials, so there the oracle is the base model itself and the base cannot miss (a
check of the basin test). Per defect (neutral; hosts from ``ase.build.bulk`` at experimental
lattice constants, relaxed by the base model as every search does; host supercells of at most
72 atoms, 73 with a GaN interstitial):

1. **base** search: every trial relaxed by CHGNet 0.3.0 (the loop's round 0);
2. **oracle** full search: every trial relaxed by the stand-in oracle *from the trial's own
   unrelaxed start*, on the base search's lattice (exactly what ``--dft-start trial`` sends).
   The defect is kept when that landscape has two or more minima within 1 eV of its lowest;
   the lowest is the reference ground state (GS);
3. **base miss**: the oracle relaxes the base model's lowest minimum (its relaxed structure,
   as a plain shortlist sends it); the base misses when that relaxation ends outside the GS basin.
   A structure is in the GS basin when it forms the same new like-ion bonds as the GS
   (:func:`defectml.search.landscape.new_bonds`) and its defect-site SOAP vector lies within the
   search's threshold (0.005 cosine distance) of the GS's or of one of its member trials';
4. **loop** (``defectml.dft.loop.run_loop``) on the base search with the stand-in oracle, for
   ``dft_start`` in ``trial`` and ``auto``; its answer (DFT's lowest structure) is correct when
   it lies in the GS basin. Oracle relaxations and ionic steps are counted by a recording
   wrapper around the oracle (every answer, with the start it was asked from);
5. **baselines at the loop's budget B**: random order, exactly 1 − C(n−g, B)/C(n, B) (n trials,
   g of them relax into the GS from their own start); the base shortlist: its lowest B minima
   oracle-relaxed from the model's minimum structures, correct when the lowest answer is in the
   GS basin.

Every piece is stored under ``--work`` (runs/loop_zoo: the base store per host, the oracle's
answers per defect as extxyz, a record per defect) and a rerun resumes; results are rewritten
after each defect to benchmarks/results/loop_zoo.{json,md}.

    python benchmarks/loop_zoo.py search [--hosts ZnSe,GaAs] [--defects v_Zn,Se_i] [--max-defects N]
        [--controls]
    python benchmarks/loop_zoo.py loop [--starts trial,auto] [--committee 3 --epochs 20]
    python benchmarks/loop_zoo.py report
    python benchmarks/loop_zoo.py scan --hosts ZnSe --defects v_Zn --wells 0.3:0.25,0.5:0.35
        (how the well was chosen: the oracle's landscape of one defect per DEPTH:WIDTH)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "runs" / "loop_zoo"

DISTORTIONS = (-0.6, -0.4, -0.2, 0.2, 0.4, 0.6)
MAX_ATOMS = 72
FMAX = 0.05
MAX_STEPS = 1500  # the oracle's step limit: the search's, so the two landscapes compare
KEEP_WINDOW = 1.0  # eV: kept when the oracle's landscape has >= 2 minima this close to its lowest
BASE_MODEL = "chgnet"
ORACLE_MODEL = "chgnet"
ORACLE_WHY = "the base model itself: the oracle differs from it by the well alone"


@dataclass(frozen=True)
class Well:
    """One stated pair well and why."""

    a: str
    b: str
    depth: float
    r0: float
    width: float
    why: str

    @property
    def spec(self) -> str:
        return f"well:{self.a}-{self.b}:{self.depth:g}:{self.r0:g}:{self.width:g}"


@dataclass(frozen=True)
class Host:
    """A host: how it is built, its supercell bound, its well and its candidate defects."""

    name: str
    structure: str  # crystalstructure for ase.build.bulk
    a: float
    c: float | None
    min_length: float
    well: Well
    defects: tuple[str, ...]
    note: str = ""
    scan: tuple[str, ...] = ()  # defects only scanned (part ``scan``), not candidates
    #: Searched as controls, not benchmark defects: no anion-anion pair comes near the well in
    #: any of their trials, so the oracle there is the base model itself (and the base cannot miss)
    controls: tuple[str, ...] = ()
    oracle_model: str = ORACLE_MODEL

    def atoms(self):
        from ase.build import bulk

        kw = {"a": self.a} | ({"c": self.c} if self.c else {})
        return bulk(self.name, self.structure, **kw)

    @property
    def oracle_spec(self) -> str:
        """The stand-in oracle (a zero-depth well: the model alone)."""
        return f"calculator:{self.oracle_model}" + (f"+{self.well.spec}" if self.well.depth else "")


#: Every host's well: 0.3 eV deep, 0.25 Å wide (0.15 Å for N-N, a stiffer, shorter bond), at the
#: anion-anion single-bond length. Chosen on ZnSe V_Zn and GaAs V_Ga (``scan``; well_scan in the
#: results): 0.3 eV gives DFT-like gaps (tenths of an eV between the motifs, several minima
#: within 1 eV), while 0.5-0.8 eV and 0.35 Å wells collapse the vacancy into As4/Se4 clusters or
#: put the open vacancy 1-2 eV up. Oxides were tried and left out: an O-O peroxide well (1.48 Å)
#: changes nothing in MgO V_Mg at 0.3 or 0.5 eV (no trial comes near 1.5 Å, and DFT's holes in
#: oxides localise on single O ions, not in O-O bonds).
DEPTH, WIDTH = 0.3, 0.25


def _w(a: str, r0: float, why: str, width: float = WIDTH) -> Well:
    return Well(a, a, DEPTH, r0, width, why)


SE = "Se-Se single bond (trigonal Se 2.37 Å; Se-Se dimers at cation vacancies of selenides 2.4-2.5 Å)"
S = "S-S single bond (S8 2.05 Å; disulfide ions 2.05-2.15 Å)"
AS = "As-As single bond (grey As 2.52 Å; As-As pairs at Ga vacancies and As antisites)"
P = "P-P single bond (black P 2.22 Å, P4 2.21 Å)"
N = "N-N single bond (hydrazine 1.45 Å; split N interstitials in nitrides 1.3-1.4 Å in DFT)"


def _zb(name: str, a: float, cat: str, an: str, well: Well) -> Host:
    return Host(name, "zincblende", a, None, 9.0, well, (f"v_{cat}", f"{an}_{cat}", f"{an}_i"),
                controls=(f"v_{an}", f"{cat}_{an}", f"{cat}_i"))


HOSTS: dict[str, Host] = {h.name: h for h in (
    _zb("ZnSe", 5.668, "Zn", "Se", _w("Se", 2.45, SE)),
    _zb("ZnS", 5.41, "Zn", "S", _w("S", 2.10, S)),
    _zb("GaAs", 5.653, "Ga", "As", _w("As", 2.50, AS)),
    _zb("InP", 5.869, "In", "P", _w("P", 2.22, P)),
    _zb("AlP", 5.463, "Al", "P", _w("P", 2.22, P)),
    _zb("GaP", 5.451, "Ga", "P", _w("P", 2.22, P)),
    _zb("AlAs", 5.661, "Al", "As", _w("As", 2.50, AS)),
    Host("GaN", "wurtzite", 3.189, 5.185, 9.0, _w("N", 1.40, N, 0.15),
         ("v_Ga", "N_Ga", "N_i"), controls=("v_N", "Ga_N", "Ga_i")),
    # scanned only (see above): not a candidate host
    Host("MgO", "rocksalt", 4.212, None, 8.0,
         Well("O", "O", DEPTH, 1.48, 0.20, "O-O peroxide bond (O2^2- 1.49 Å)"), (), scan=("v_Mg",)),
)}
EXCLUDED = ("CdTe", "Cd", "Te")  # CdTe and its alloys: never here


def _check_hosts() -> None:
    for h in HOSTS.values():
        if any(x in h.name for x in EXCLUDED):
            raise SystemExit(f"{h.name}: CdTe and its alloys are excluded from this benchmark")


# --- storing the oracle's answers ---------------------------------------------------------------
def _write_answer(path: Path, name: str, answer, start, extra: dict | None = None) -> dict:
    """Append one oracle answer (its end point, energy, steps, start) to an extxyz file."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    final = answer.final if answer.final is not None else start
    a = final.copy()
    a.calc = None
    forces = None
    if answer.final is not None and answer.final.calc is not None:
        forces = answer.final.calc.results.get("forces")
    info = {"name": name, "trial": answer.request.trial, "status": answer.status,
            "oracle_energy": float(answer.energy) if answer.energy is not None else float("nan"),
            "ionic_steps": len(answer.frames), "seconds": round(float(answer.seconds), 2),
            "reason": answer.reason or "", "theory": answer.theory, **(extra or {})}
    a.info.update(info)
    if answer.energy is not None:
        a.calc = SinglePointCalculator(a, energy=float(answer.energy),
                                       forces=None if forces is None else np.asarray(forces))
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, a, format="extxyz", append=True)
    return info


def _read_answers(path: Path) -> dict:
    """Stored answers by name (the last one of a name wins)."""
    from ase.io import read

    if not path.exists() or path.stat().st_size == 0:
        return {}
    return {a.info["name"]: a for a in read(path, ":", format="extxyz")}


def _energy(a) -> float | None:
    e = float(a.info.get("oracle_energy", float("nan")))
    return None if not math.isfinite(e) else e


class RecordingOracle:
    """Any oracle, with every answer it gives appended to a file (counts, steps, starts).

    Everything else (``kind``, ``theory``, ``key()``, ...) is the wrapped oracle's.
    """

    def __init__(self, oracle, path: Path):
        self._oracle, self._path = oracle, path

    def __getattr__(self, name):
        return getattr(self._oracle, name)

    def key(self) -> str:
        return self._oracle.key()

    def ask(self, requests):
        answers, pending = self._oracle.ask(requests)
        n = len(_read_answers(self._path))
        for i, a in enumerate(answers):
            q = a.request
            start = "unknown"  # what the request says it is, checked against the trial's own start
            if q.initial is not None and len(q.initial) == len(q.start):
                same = np.abs(np.asarray(q.initial.positions) - np.asarray(q.start.positions)).max() < 1e-6
                start = "trial" if same else "minimum"
            said = getattr(q, "start_kind", None)
            if said is not None and said != start:
                start = f"{said} (start differs: {start})"
            _write_answer(self._path, f"{n + i:04d}:{q.trial}", a, q.start, {"start": start})
        return answers, pending


# --- landscapes ---------------------------------------------------------------------------------
@dataclass
class Context:
    """What the landscape analysis of one defect needs (from the base store)."""

    summary: object  # DefectSummary of the base search
    bulk: object
    oxi: dict
    reference: object
    vacancy: bool
    species: tuple = ()
    trials: dict = field(default_factory=dict)  # name -> RelaxedTrial of the base search
    starts: dict = field(default_factory=dict)  # name -> unrelaxed Atoms

    @property
    def like(self):
        from defectml.search.landscape import like_pair_distances

        return like_pair_distances(self.bulk)


def _context(store, summary) -> Context:
    from ase.build import make_supercell

    defect_row = store.first(kind="defect", defect_key=summary.defect_key)
    host_row = store.first(kind="host", host_key=defect_row.host_key)
    bulk = make_supercell(host_row.toatoms(), np.asarray(defect_row.data["sc_matrix"]))
    starts = {}
    for row in store.select(kind="relaxation", settings_key=summary.settings_key,
                            defect_key=summary.defect_key, charge_state=summary.charge):
        a = row.toatoms()
        a.calc = None
        a.positions = np.asarray(row.data["initial_positions"], dtype=float)
        starts[row.trial] = a
    ref = defect_row.toatoms()
    return Context(summary, bulk, dict(host_row.data["oxidation_states"]), ref,
                   defect_row.data.get("kind") == "vacancy",
                   tuple(sorted(set(ref.get_chemical_symbols()))),
                   {t.name: t for t in summary.trials}, starts)


def _relaxed(ctx: Context, name: str, atoms, energy, status: str, reason: str = ""):
    from defectml.search.landscape import RelaxedTrial

    t = ctx.trials.get(name) or next(iter(ctx.trials.values()))
    return RelaxedTrial(name, status, energy, atoms, np.asarray(t.site), t.defect_index,
                        ctx.trials[name].distortion if name in ctx.trials else None, reason)


def oracle_landscape(ctx: Context, answers: dict):
    """The oracle's minima from its answers for every trial."""
    from defectml.search.landscape import find_minima

    trials = []
    for name, a in answers.items():
        e = _energy(a)
        bare = a.copy()
        bare.calc = None
        trials.append(_relaxed(ctx, name, bare, e, a.info["status"], a.info.get("reason", "")))
    minima, bad = find_minima(trials, bulk=ctx.bulk, oxidation_states=ctx.oxi,
                              reference=ctx.reference, vacancy=ctx.vacancy)
    return minima, bad, trials


def _bonds(ctx: Context, atoms, centre) -> list:
    from defectml.search.landscape import new_bonds

    like = ctx.like
    return new_bonds(atoms, centre, _defect_index(ctx), ctx.oxi, like, 1.5 * min(like.values()))


def _defect_index(ctx: Context):
    return next(iter(ctx.trials.values())).defect_index


def _centre(ctx: Context, atoms):
    t = next(iter(ctx.trials.values()))
    return np.asarray(t.site) if t.defect_index is None else atoms.positions[t.defect_index]


def in_basin(ctx: Context, atoms, gs_members: list) -> dict:
    """Whether ``atoms`` lies in the basin of the GS (same new bonds; SOAP within the threshold).

    ``gs_members``: the GS minimum's structures (its representative first).
    """
    from defectml.search.fingerprint import cosine_distances, soap_fingerprints
    from defectml.search.landscape import DEFAULT_SOAP_THRESHOLD, bond_signature

    sig = bond_signature(_bonds(ctx, atoms, _centre(ctx, atoms)))
    ref_sig = bond_signature(_bonds(ctx, gs_members[0], _centre(ctx, gs_members[0])))
    structures = [atoms, *gs_members]
    fps = soap_fingerprints(structures, [_centre(ctx, s) for s in structures], species=ctx.species)
    d = cosine_distances(fps)[0, 1:]
    return {"in_gs_basin": bool(sig == ref_sig and float(d.min()) <= DEFAULT_SOAP_THRESHOLD),
            "same_bonds": sig == ref_sig, "soap_distance_to_gs": round(float(d[0]), 5),
            "soap_distance_min": round(float(d.min()), 5)}


def _members(minimum, answers: dict) -> list:
    out = []
    for name in [minimum.trial, *[t for t in minimum.trials if t != minimum.trial]]:
        if name in answers:
            a = answers[name].copy()
            a.calc = None
            out.append(a)
    return out


def _minimum_dict(m) -> dict:
    return {"trial": m.trial, "energy_eV": round(m.energy, 4), "delta_e_eV": round(m.delta_e, 4),
            "label": m.label, "bonds": [list(b) for b in m.bonds], "trials": list(m.trials),
            "identity_change": m.identity_change or None}


# --- the searches -------------------------------------------------------------------------------
def _settings(host: Host, threads: int):
    from defectml.search.distort import TrialSettings
    from defectml.search.pipeline import SearchSettings

    return SearchSettings(model=BASE_MODEL, threads=threads, fmax=FMAX, max_steps=1500,
                          min_length=host.min_length, max_atoms=MAX_ATOMS,
                          trials=TrialSettings(distortions=DISTORTIONS))


def _oracle(host: Host, threads: int):
    from defectml.dft.oracle import parse_oracle

    return parse_oracle(host.oracle_spec, FMAX, MAX_STEPS, threads=threads)


_KEYS: dict[str, str] = {}


def defect_folder(host: Host, defect: str) -> Path:
    """Where one defect's oracle answers and records live: under the oracle's content key."""
    if host.oracle_spec not in _KEYS:
        _KEYS[host.oracle_spec] = _oracle(host, 1).key()
    return WORK / host.name / f"oracle_{_KEYS[host.oracle_spec]}" / defect


def _base_search(host: Host, spec: str, threads: int, log):
    """The base model's search of every defect ``spec`` names (``Se_i``: every interstitial site)."""
    from defectml.search.pipeline import search

    r = search(host.atoms(), spec, [0], out=WORK / host.name, settings=_settings(host, threads),
               progress=False, log_fn=lambda m: log(f"{host.name} {spec}: {m}"))
    return r.summaries, r


def _oracle_relax(oracle, ctx: Context, path: Path, jobs: list, log, what: str) -> dict:
    """Oracle relaxations of ``(name, trial, start)`` jobs not yet in ``path``; all answers by name."""
    from defectml.dft.oracle import Request

    done = _read_answers(path)
    s = ctx.summary
    for name, trial, start in jobs:
        if name in done:
            continue
        start = start.copy()
        start.calc = None
        q = Request(s.defect, s.charge, trial, start, ctx.starts.get(trial))
        (a,), _ = oracle.ask([q])
        info = _write_answer(path, name, a, start)
        log(f"  {what} {name}: {a.status}, E {info['oracle_energy']:.3f} eV, "
            f"{info['ionic_steps']} steps, {info['seconds']:.0f} s")
    return _read_answers(path)


def search_spec(host: Host, spec: str, threads: int, log) -> list[dict]:
    """Steps 1-2 for every defect a candidate spec names (resumable); their records."""
    from defectml import ResultStore

    marker = defect_folder(host, "_specs") / f"{spec}.json"
    if marker.exists():
        names = json.loads(marker.read_text())
        recs = [defect_folder(host, n) / "record.json" for n in names]
        if all(r.exists() and json.loads(r.read_text()).get("stage", 0) >= 2 for r in recs):
            return [json.loads(r.read_text()) for r in recs]
    t0 = time.perf_counter()
    summaries, result = _base_search(host, spec, threads, log)
    base_seconds = round(result.seconds, 1) if result.relaxed and len(summaries) == 1 else None
    store = ResultStore(WORK / host.name / "results.db")
    out = []
    for summary in summaries:
        out.append(search_defect(host, spec, summary, store, base_seconds, threads, log))
        log(f"  {host.name} {summary.defect}: {time.perf_counter() - t0:.0f} s so far for {spec}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps([s.defect for s in summaries]))
    return out


def search_defect(host: Host, spec: str, summary, store, base_seconds, threads: int, log) -> dict:
    """Steps 1-2 for one defect of the base search (resumable); its record."""
    defect = summary.defect
    folder = defect_folder(host, defect)
    rec_path = folder / "record.json"
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        if rec.get("stage", 0) >= 2:
            return rec
    t0 = time.perf_counter()
    ctx = _context(store, summary)
    oracle = _oracle(host, threads)
    t1 = time.perf_counter()
    jobs = [(name, name, ctx.starts[name]) for name in sorted(ctx.starts)]
    answers = _oracle_relax(oracle, ctx, folder / "oracle_full.extxyz", jobs, log, "oracle full search")
    oracle_seconds = round(time.perf_counter() - t1, 1)
    minima, bad, _ = oracle_landscape(ctx, answers)
    low = [m for m in minima if m.energy - minima[0].energy <= KEEP_WINDOW] if minima else []
    rec = {"host": host.name, "defect": defect, "spec": spec, "label": summary.label, "stage": 1,
           "oracle": host.oracle_spec, "theory": oracle.theory, "oracle_key": oracle.key(),
           "run_key": summary.settings_key, "supercell": summary.supercell,
           "n_trials": len(ctx.starts),
           "oracle_minima": [_minimum_dict(m) for m in minima],
           "oracle_quarantined": [{"trial": t.name, "reason": r} for t, r in bad],
           "oracle_minima_within_1eV": len(low), "kept": len(low) >= 2,
           "base_minima": [_minimum_dict(m) for m in summary.minima],
           "full_search": {"oracle_relaxations": len(answers),
                           "oracle_ionic_steps": int(sum(a.info["ionic_steps"] for a in answers.values()))},
           "seconds": {"base_search": base_seconds,
                       "base_relaxations_sum": round(sum(
                           float(r.data.get("seconds", 0.0)) for r in store.select(
                               kind="relaxation", settings_key=summary.settings_key,
                               defect_key=summary.defect_key, charge_state=0)), 1),
                       "oracle_full_search_sum": round(sum(float(a.info["seconds"])
                                                           for a in answers.values()), 1),
                       "oracle_full_search_now": oracle_seconds}}
    if minima:
        gs = minima[0]
        rec["gs"] = _minimum_dict(gs)
        rec["gs_trials"] = list(gs.trials)  # g: trials that reach the GS from their own start
        members = _members(gs, answers)
        # step 2: the oracle relaxes the base model's lowest minimum (as a shortlist sends it)
        base_low = summary.minima[0]
        sl = _oracle_relax(oracle, ctx, folder / "shortlist.extxyz",
                           [(base_low.trial, base_low.trial, base_low.atoms)], log,
                           "oracle from base minimum")
        a = sl[base_low.trial]
        bare = a.copy()
        bare.calc = None
        check = in_basin(ctx, bare, members)
        e = _energy(a)
        rec["base_lowest"] = {**_minimum_dict(base_low), "oracle_relaxed": {
            "status": a.info["status"], "energy_eV": e,
            "above_gs_eV": None if e is None else round(e - gs.energy, 4),
            "bonds": [list(b) for b in _bonds(ctx, bare, _centre(ctx, bare))], **check}}
        rec["base_misses"] = not check["in_gs_basin"]
        # secondary: the base model's structure itself against the GS (bonds + SOAP, no relaxation)
        rec["base_lowest_structure_matches_gs"] = in_basin(ctx, base_low.atoms, members)
        # where each trial goes under the oracle from its own start
        rec["oracle_by_trial"] = {n: {"energy_eV": _energy(x), "status": x.info["status"],
                                      "ionic_steps": int(x.info["ionic_steps"]),
                                      "in_gs": n in gs.trials} for n, x in sorted(answers.items())}
    rec["stage"] = 2
    rec["seconds"]["steps_1_2_now"] = round(time.perf_counter() - t0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    rec_path.write_text(json.dumps(rec, indent=2, default=str))
    return rec


def scan_well(host: Host, defect: str, wells: list[tuple[float, float]], threads: int, log,
              models: tuple[str, ...] = (ORACLE_MODEL,)) -> dict:
    """The oracle's landscape of one defect for several models and ``(depth, width)`` wells.

    How the oracle was chosen; a zero depth is the model alone.
    """
    from dataclasses import replace

    from defectml import ResultStore

    summaries, _ = _base_search(host, defect, threads, log)
    summary = next((x for x in summaries if x.defect == defect), summaries[0])
    store = ResultStore(WORK / host.name / "results.db")
    ctx = _context(store, summary)
    out = {}
    for model, (depth, width) in [(m, w) for m in models for w in wells]:
        h = replace(host, well=replace(host.well, depth=depth, width=width), oracle_model=model)
        spec = h.oracle_spec.split(":", 1)[1]
        folder = WORK / "scan" / host.name / defect / spec.replace(":", "_")
        oracle = _oracle(h, threads)
        jobs = [(n, n, ctx.starts[n]) for n in sorted(ctx.starts)]
        answers = _oracle_relax(oracle, ctx, folder / "oracle_full.extxyz", jobs, log, spec)
        minima, _, _ = oracle_landscape(ctx, answers)
        base_low = summary.minima[0]
        sl = _oracle_relax(oracle, ctx, folder / "shortlist.extxyz",
                           [(base_low.trial, base_low.trial, base_low.atoms)], log, "from base minimum")
        bare = sl[base_low.trial].copy()
        bare.calc = None
        members = _members(minima[0], answers)
        unp = next((m for m in minima if "Unperturbed" in m.trials), None)
        out[spec] = r = {
            "oracle": h.oracle_spec,
            "minima": [{"label": m.label, "delta_e_vs_lowest_eV": round(m.energy - minima[0].energy, 4),
                        "trials": m.trials} for m in minima],
            "gs": minima[0].label, "gs_trials": minima[0].trials,
            "unperturbed_minimum_above_gs_eV":
                None if unp is None else round(unp.energy - minima[0].energy, 4),
            "minima_within_1eV": sum(m.energy - minima[0].energy <= KEEP_WINDOW for m in minima),
            "base_misses": not in_basin(ctx, bare, members)["in_gs_basin"]}
        log(f"{host.name} {defect} {spec}: GS {r['gs']} from {r['gs_trials']}; Unperturbed's minimum "
            f"{r['unperturbed_minimum_above_gs_eV']} eV above; base misses {r['base_misses']}")
    path = WORK / "scan.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault(host.name, {}).setdefault(defect, {}).update(out)
    path.write_text(json.dumps(doc, indent=2, default=str))
    return out


# --- the loop and the baselines -----------------------------------------------------------------
def loop_available() -> str | None:
    """Why the loop step cannot run yet (``None``: it can)."""
    from defectml.dft.loop import LoopResult, LoopSettings

    if "dft_start" not in {f.name for f in fields(LoopSettings)}:
        return "LoopSettings has no dft_start field yet"
    if "defects" not in {f.name for f in fields(LoopResult)} and not hasattr(LoopResult, "defects"):
        return "LoopResult has no defects attribute yet"
    return None


def random_correct(n: int, g: int, budget: int) -> float:
    """Chance that B trials drawn at random (no repeats) include one of the g that reach the GS."""
    if g <= 0 or n <= 0:
        return 0.0
    budget = min(budget, n)
    return 1.0 - math.comb(n - g, budget) / math.comb(n, budget)


#: The loop's settings here (the rest: LoopSettings' defaults); --k, --committee, ... override them
#: and name their own results (``loop_<start>_<key>``), so runs with other settings never mix.
#: CPU: one model a round (no committee, so no trust score: every minimum in the window must be
#: confirmed or refuted by the oracle; a committee of two doubled the training, ~45 min a defect
#: here), ten epochs. explore_k named so that the runs before it (two blind picks) never mix.
LOOP_OPTIONS: dict = {"committee": 1, "epochs": 10, "explore_k": 1}


def loop_name(start_mode: str, loop_options: dict) -> str:
    """The file stem of one loop's results: its start mode and a key of the options."""
    from defectml.store import content_key

    return f"loop_{start_mode}_{content_key(sorted(loop_options.items()))[:8]}"


def loop_defect(host: Host, rec: dict, start_mode: str, threads: int, loop_options: dict, log) -> dict:
    """Step 3-4 for one kept defect and one DFT start mode (resumable)."""
    from defectml import ResultStore, summarise
    from defectml.dft.loop import LoopSettings, run_loop

    folder = defect_folder(host, rec["defect"])
    s = LoopSettings.from_options({"threads": threads, "dft_start": start_mode, **loop_options})
    name = loop_name(start_mode, loop_options)
    cache = folder / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    store = ResultStore(WORK / host.name / "results.db")
    summary = next(s for s in summarise(store, rec["run_key"]) if s.label == rec["label"])
    ctx = _context(store, summary)
    oracle = RecordingOracle(_oracle(host, threads), folder / f"{name}_answers.extxyz")
    t0 = time.perf_counter()
    result = run_loop(store, rec["run_key"], oracle, s, folder / name, only={rec["label"]},
                      log=lambda m: log(f"  loop {start_mode}: {m}"))
    seconds = round(time.perf_counter() - t0, 1)
    d = result.defects[rec["label"]]
    asked = _read_answers(folder / f"{name}_answers.extxyz")
    full = _read_answers(folder / "oracle_full.extxyz")
    minima, _, _ = oracle_landscape(ctx, full)
    members = _members(minima[0], full)
    answer = d.get("answer") or {}
    # the answer's structure: the recorded oracle answer of that trial at that energy
    cands = [a for a in asked.values() if a.info["trial"] == answer.get("trial") and _energy(a) is not None]
    check = None
    if cands and answer.get("energy_eV") is not None:
        best = min(cands, key=lambda a: abs(_energy(a) - float(answer["energy_eV"])))
        bare = best.copy()
        bare.calc = None
        check = {**in_basin(ctx, bare, members), "start": best.info.get("start"),
                 "above_gs_eV": round(_energy(best) - minima[0].energy, 4)}
    budget = len(asked)
    steps = int(sum(a.info["ionic_steps"] for a in asked.values()))
    out = {"start_mode": start_mode, "status": d.get("status"), "loop_status": result.status,
           "loop_reason": result.reason, "answer": answer, "answer_check": check,
           "loop_correct": bool(check and check["in_gs_basin"]),
           "model_reproduces_dft": d.get("model_reproduces_dft"),
           "oracle_relaxations": budget, "oracle_ionic_steps": steps,
           "loop_reported_dft_relaxations": d.get("dft_relaxations"),
           "loop_reported_dft_ionic_steps": d.get("dft_ionic_steps"),
           "starts": {k: sum(a.info.get("start") == k for a in asked.values())
                      for k in ("trial", "minimum", "unknown")},
           "final_minima": d.get("final_minima"), "seconds": seconds,
           "settings": {k: v for k, v in vars(s).items() if k not in ("device",)}}
    out["random_correct_at_same_budget"] = round(
        random_correct(rec["n_trials"], len(rec["gs_trials"]), budget), 4)
    out["shortlist"] = shortlist_at(host, rec, ctx, budget, members, threads, log)
    cache.write_text(json.dumps(out, indent=2, default=str))
    return out


def shortlist_at(host: Host, rec: dict, ctx: Context, budget: int, members: list, threads: int, log) -> dict:
    """The base model's lowest ``budget`` minima, oracle-relaxed from its minimum structures."""
    folder = defect_folder(host, rec["defect"])
    chosen = ctx.summary.minima[:budget]
    got = _oracle_relax(_oracle(host, threads), ctx, folder / "shortlist.extxyz",
                        [(m.trial, m.trial, m.atoms) for m in chosen], log, "shortlist")
    ok = [(m.trial, got[m.trial]) for m in chosen if _energy(got[m.trial]) is not None]
    if not ok:
        return {"sent": len(chosen), "correct": False}
    name, best = min(ok, key=lambda x: _energy(x[1]))
    bare = best.copy()
    bare.calc = None
    return {"sent": len(chosen), "base_minima": len(ctx.summary.minima), "answer_trial": name,
            "correct": in_basin(ctx, bare, members)["in_gs_basin"]}


# --- results ------------------------------------------------------------------------------------
def collect(loop_options: dict | None = None) -> dict:
    loop_options = LOOP_OPTIONS if loop_options is None else loop_options
    records, loops, controls = [], {}, []
    for host in HOSTS.values():
        if not host.defects:
            continue
        for p in sorted(defect_folder(host, "_specs").parent.glob("*/record.json")):
            rec = json.loads(p.read_text())
            if rec.get("stage", 0) < 2:
                continue
            if rec.get("spec") in host.controls:
                controls.append(rec)
                continue
            if rec.get("spec") not in host.defects:
                continue
            records.append(rec)
            for mode in ("trial", "auto"):
                lp = p.parent / f"{loop_name(mode, loop_options)}.json"
                if lp.exists():
                    loops.setdefault(mode, {})[f"{host.name}/{rec['defect']}"] = {
                        **json.loads(lp.read_text()),
                        "rounds": _rounds(p.parent / loop_name(mode, loop_options) / "loop.json")}
    earlier = _earlier()
    _carry(records, earlier.get("defects", []))
    _carry(controls, earlier.get("controls", []))
    loops, earlier_loops = _carry_loops(loops, earlier, loop_options)
    order = {(h.name, spec): (i, j) for i, h in enumerate(HOSTS.values())
             for j, spec in enumerate(h.defects + h.controls)}
    records.sort(key=lambda r: (order[(r["host"], _spec(r))], r["defect"]))
    controls.sort(key=lambda r: (order[(r["host"], _spec(r))], r["defect"]))
    kept = [r for r in records if r["kept"]]
    summary = {"candidates": len(records), "defects": len(kept),
               "hosts": sorted({r["host"] for r in kept}),
               "base_misses": sum(bool(r.get("base_misses")) for r in kept),
               # a miss whose basin is nearly degenerate with the GS says less: how many are not
               "base_misses_by_more_than_0.05eV": sum(
                   bool(r.get("base_misses"))
                   and (r["base_lowest"]["oracle_relaxed"]["above_gs_eV"] or 0) > 0.05 for r in kept)}
    summary["controls"] = {"searched": len(controls), "kept": sum(r["kept"] for r in controls),
                           "base_misses": sum(bool(r.get("base_misses")) for r in controls if r["kept"])}
    base_s = [r["seconds"]["base_relaxations_sum"] for r in records + controls]
    oracle_s = [r["seconds"]["oracle_full_search_sum"] for r in records + controls]
    summary["seconds"] = {  # one torch thread, on a 2-core machine shared with other jobs
        "base_searches": round(sum(base_s), 1), "oracle_full_searches": round(sum(oracle_s), 1),
        "per_candidate_median": {"base": round(float(np.median(base_s)), 1) if base_s else None,
                                 "oracle": round(float(np.median(oracle_s)), 1) if oracle_s else None}}
    per_mode = {}
    for mode, by in loops.items():
        rows = [(r, by[f"{r['host']}/{r['defect']}"]) for r in kept if f"{r['host']}/{r['defect']}" in by]
        if not rows:
            continue
        full = sum(r["full_search"]["oracle_relaxations"] for r, _ in rows)
        full_steps = sum(r["full_search"]["oracle_ionic_steps"] for r, _ in rows)
        per_mode[mode] = {
            "defects": len(rows),
            "base_misses": sum(bool(r.get("base_misses")) for r, _ in rows),
            "loop_correct": sum(lp["loop_correct"] for _, lp in rows),
            "oracle_share":
                round(sum(lp["oracle_relaxations"] for _, lp in rows) / full, 4) if full else None,
            "oracle_ionic_steps_share": round(sum(lp["oracle_ionic_steps"] for _, lp in rows) / full_steps, 4)
            if full_steps else None,
            "random_correct_at_same_budget":
                round(sum(lp["random_correct_at_same_budget"] for _, lp in rows), 3),
            "shortlist_correct_at_same_budget": sum(bool(lp["shortlist"]["correct"]) for _, lp in rows),
            "loop_correct_on_base_misses": sum(lp["loop_correct"] for r, lp in rows if r.get("base_misses")),
        }
    summary["per_start"] = per_mode
    for mode, v in per_mode.items():  # the keys, per start mode
        summary[mode] = {k: v[k] for k in ("defects", "base_misses", "loop_correct", "oracle_share",
                                           "random_correct_at_same_budget")}
    return {"benchmark": "loop_zoo",
            "oracle": {"kind": "stand-in for DFT (not DFT)", "model": ORACLE_MODEL,
                       "model_why": ORACLE_WHY,
                       "per_host": {h.name: {"spec": h.oracle_spec, "well": h.well.spec, "why": h.well.why,
                                             "role": "benchmark" if h.defects else "scanned only"}
                                    for h in HOSTS.values()}},
            "base_model": BASE_MODEL,
            "settings": {"distortions": list(DISTORTIONS), "charge": 0, "max_atoms": MAX_ATOMS,
                         "fmax": FMAX, "oracle_max_steps": MAX_STEPS, "keep_window_eV": KEEP_WINDOW,
                         "min_length": {h.name: h.min_length for h in HOSTS.values()},
                         "basin": "same new like-ion bonds and defect-site SOAP cosine distance <= 0.005 "
                                  "to the GS or one of its member trials",
                         "base_miss": "the oracle's relaxation of the base model's lowest minimum structure "
                                      "ends outside the oracle's GS basin",
                         "excluded": "CdTe and its alloys"},
            "summary": summary, "defects": records, "loops": loops,
            # the controls in brief (their full records stay under runs/loop_zoo)
            "controls": [{k: r.get(k) for k in ("host", "spec", "defect", "label", "supercell", "n_trials",
                                                "kept", "oracle_minima_within_1eV", "gs", "gs_trials",
                                                "base_misses", "full_search", "seconds")}
                         | {"base_lowest": {"label": r.get("base_lowest", {}).get("label"),
                                            "oracle_relaxed": r.get("base_lowest", {}).get("oracle_relaxed")}}
                         for r in controls],
            "well_scan": json.loads((WORK / "scan.json").read_text())
            if (WORK / "scan.json").exists() else earlier.get("well_scan", {}),
            "loop_options": loop_options, "loop_status": loop_available() or "available",
            "earlier_loops": earlier_loops}


def _rounds(path: Path) -> list[dict] | None:
    """Each round of one loop in brief: what it asked and how the defect stood after it."""
    if not path.exists():
        return None
    out = []
    for rd in json.loads(path.read_text()).get("rounds", []):
        items = list(rd.get("items", {}).values())
        out.append({"round": rd["round"], "asked": [t for v in (rd.get("picks") or {}).values() for t in v],
                    "fit_attempts": len(rd.get("fits", [])),
                    "reproduces": [f["reproduces"] and all(c.get("ok") is not False
                                                           for c in f["reproduces"].values())
                                   for f in rd.get("fits", [])],
                    "status": items[0]["status"] if items else None,
                    "dft_lowest": (items[0].get("dft_lowest") or {}).get("trial") if items else None,
                    "seconds": {"oracle": round(rd.get("oracle_seconds", 0.0), 1),
                                "training": (rd.get("training") or {}).get("seconds"),
                                "relax": rd.get("relax_seconds")}})
    return out


def _earlier() -> dict:
    """The committed results: candidates whose ``runs/`` folder is not on this machine, earlier loops."""
    path = RESULTS / "loop_zoo.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _spec(rec: dict) -> str:
    """The candidate spec a record came from (older brief records do not name it)."""
    if rec.get("spec"):
        return rec["spec"]
    host = HOSTS[rec["host"]]
    return next(sp for sp in host.defects + host.controls
                if rec["defect"] == sp or rec["defect"].startswith(sp + "_"))


def _carry(records: list[dict], committed: list[dict]) -> None:
    """Add the committed records of candidates not searched on this machine (their runs are elsewhere)."""
    have = {(r["host"], r["defect"]) for r in records}
    records += [r for r in committed if (r["host"], r["defect"]) not in have]


def _carry_loops(loops: dict, earlier: dict, options: dict) -> tuple[dict, list[dict]]:
    """This setting's loops (the committed ones of defects not rerun here) and earlier settings' loops.

    Loops made with other options (``loop_options``) never mix with these: they are kept apart,
    with their own summary, under ``earlier_loops``.
    """
    kept = [e for e in earlier.get("earlier_loops", []) if e.get("options") != options]
    if earlier.get("loops") and earlier.get("loop_options") == options:
        for mode, by in earlier["loops"].items():
            for key, lp in by.items():
                loops.setdefault(mode, {}).setdefault(key, lp)
    elif earlier.get("loops"):
        kept = [e for e in kept if e.get("options") != earlier.get("loop_options")]
        kept.append({"options": earlier.get("loop_options"), "loops": earlier["loops"],
                     "per_start": earlier.get("summary", {}).get("per_start", {})})
    return loops, kept


def markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = ["# Loop zoo: many landscapes, a stand-in oracle", "",
             "The oracle is a **stand-in for DFT, not DFT**: CHGNet 0.3.0 plus one stated anion–anion "
             "Gaussian pair well per host; the base (surrogate) model is CHGNet 0.3.0 as shipped. "
             "Neutral defects, host supercells ≤ 72 atoms (73 with a GaN interstitial), trials: "
             "Unperturbed, Rattled, Dimer (vacancies), "
             "bond distortions " + ", ".join(f"{x:+.0%}" for x in DISTORTIONS) + ". "
             "`python benchmarks/loop_zoo.py search` / `loop` / `report`.", "",
             "## The oracle per host", "", "| host | oracle | why |", "|---|---|---|"]
    for name, o in doc["oracle"]["per_host"].items():
        role = "" if o.get("role", "benchmark") == "benchmark" else f" ({o['role']})"
        lines.append(f"| {name}{role} | `{o['spec']}` | {o['why']} |")
    lines += ["", "## Summary", "",
              f"- candidates searched: {s['candidates']}; kept (oracle landscape with ≥ 2 minima within "
              f"{KEEP_WINDOW:g} eV): **{s['defects']}**, from {len(s['hosts'])} hosts "
              f"({', '.join(s['hosts'])})",
              "- the base model's lowest minimum misses the oracle's ground state in "
              f"**{s['base_misses']}** of "
              f"{s['defects']} kept (oracle relaxation of the base minimum ends outside the GS basin; "
              f"{s['base_misses_by_more_than_0.05eV']} of them more than 0.05 eV above the GS)"]
    for mode, v in s.get("per_start", {}).items():
        lines.append(f"- loop, `dft_start={mode}`: correct {v['loop_correct']} of {v['defects']} "
                     f"({v['loop_correct_on_base_misses']} of {v['base_misses']} base misses), oracle "
                     f"relaxations {v['oracle_share']:.0%} of the full searches' (ionic steps "
                     f"{v['oracle_ionic_steps_share']:.0%}); random order at the same budget "
                     f"{v['random_correct_at_same_budget']:.1f} expected correct; base shortlist "
                     f"{v['shortlist_correct_at_same_budget']}")
    if not s.get("per_start"):
        lines.append(f"- loop: not run yet ({doc['loop_status']})")
    lines.append(f"- loop settings: {json.dumps(doc['loop_options'])} (the rest: `LoopSettings`' defaults)")
    for e in doc.get("earlier_loops", []):
        for mode, v in e.get("per_start", {}).items():
            lines.append(f"- earlier loop settings {json.dumps(e['options'])}, `dft_start={mode}`: correct "
                         f"{v['loop_correct']} of {v['defects']}, oracle relaxations {v['oracle_share']:.0%} "
                         f"of the full searches' ({', '.join(e['loops'].get(mode, {}))})")
    t = s["seconds"]
    lines.append(f"- time (one torch thread, a 2-core machine shared with other jobs): base searches "
                 f"{t['base_searches'] / 60:.0f} min, oracle full searches "
                 f"{t['oracle_full_searches'] / 60:.0f} min "
                 f"in all; per candidate (median) {t['per_candidate_median']['base']} s and "
                 f"{t['per_candidate_median']['oracle']} s")
    scan = doc.get("well_scan") or {}
    if scan:
        lines += ["", "## How the well was chosen (`scan`)", "",
                  "| host | defect | well | oracle GS | from trials | Unperturbed's minimum above GS (eV) | "
                  "minima ≤ 1 eV | base misses |", "|---|---|---|---|---|---|---|---|"]
        for host, by in scan.items():
            for defect, wells in by.items():
                for spec, r in wells.items():
                    trials = ", ".join(r["gs_trials"])
                    lines.append(f"| {host} | {defect} | `{spec}` | {r['gs']} | {trials} | "
                                 f"{r['unperturbed_minimum_above_gs_eV']} | {r['minima_within_1eV']} | "
                                 f"{r['base_misses']} |")
    header = ["| host | defect | atoms | oracle minima ≤1 eV | oracle GS | GS from trials | base lowest | "
              "base misses (its oracle relaxation above GS, eV) | oracle relax. (full) | loop trial | "
              "loop auto | s (base / oracle) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += ["", "## Per defect", "",
              "Loop cells: ✓/✗ correct, oracle relaxations used, the chance that random order finds the GS "
              "with as many, and whether the base shortlist of as many does. `!`: the GS is another defect "
              "than it started as (an anion moved into the cation vacancy: V_cation → anion antisite + "
              "anion vacancy, the complex Baraff and Schlüter proposed for V_Ga in GaAs; an interstitial "
              "pushed a lattice anion off its site).", "", *header]
    lines += [_row(r, doc.get("loops", {})) for r in doc["defects"]]
    lines += _rounds_markdown(doc)
    c = s["controls"]
    lines += ["", "## Controls", "",
              f"Anion vacancies, cation antisites and cation interstitials: no anion-anion pair comes near "
              f"the well in their trials, so there the oracle is the base model itself. {c['searched']} "
              f"searched, {c['kept']} with ≥ 2 oracle minima within 1 eV, the base \"missing\" in "
              f"{c['base_misses']} of those (0 expected: a check of the basin test). Not benchmark defects.",
              "", *header]
    lines += [_row(r, {}) for r in doc.get("controls", [])]
    lines += ["", "## What this cannot show", "",
              "- The oracle is not DFT. It is the base model plus one pair term, so away from the "
              "anion–anion pairs it agrees with the base model exactly: the only error the loop has "
              "to learn is a smooth, short-ranged, two-body one. DFT's errors relative to CHGNet are "
              "many-body, charge-dependent and not confined to one pair type; a loop that learns this "
              "well may still fail on real DFT.",
              "- The well was chosen (one depth, every host) so that the base model misses often, and "
              "the benchmark defects are those it can act on (cation vacancies, anion antisites, anion "
              "interstitials; the others are controls): the miss rate measures the benchmark's design, "
              "not CHGNet's real error rate on these defects.",
              "- Neutral defects only, small (≤ 73-atom) cells, 6–9 trials each: the landscapes are "
              "coarse, and the oracle's own full search (the reference) can miss a ground state that "
              "no trial reaches; \"correct\" means the lowest basin those trials find.",
              "- The oracle relaxes at the base model's lattice with FIRE at fmax 0.05 eV/Å: a real DFT "
              "code with its own optimiser and lattice can end in other basins from the same starts.",
              "- Random and shortlist baselines are at the loop's own budget per defect, so they "
              "inherit its stopping decisions; they say whether the picking helps, not whether the "
              "stop rule is right.", ""]
    return "\n".join(lines)


def _rounds_markdown(doc: dict) -> list[str]:
    """Per loop: what each round asked, whether the model reproduced its DFT, where it stood."""
    gs = {f"{r['host']}/{r['defect']}": set(r.get("gs_trials", [])) for r in doc["defects"]}
    out = []
    for mode, by in doc.get("loops", {}).items():
        rows = [(key, lp) for key, lp in by.items() if lp.get("rounds")]
        if not rows:
            continue
        out += ["", f"## Loop rounds (`dft_start={mode}`)", "",
                "Each round: the trials asked (**bold**: one the oracle's full search takes to its ground "
                "state), fit attempts until the model reproduced its DFT (✓/✗ per attempt), the status "
                "after it, and seconds (oracle / training / relaxations, one thread, shared machine).", "",
                "| defect | round | asked | fits | status | s |", "|---|---|---|---|---|---|"]
        for key, lp in rows:
            for rd in lp["rounds"]:
                asked = ", ".join(f"**{t}**" if t in gs.get(key, ()) else t for t in rd["asked"])
                fits = " ".join("✓" if ok else "✗" for ok in rd["reproduces"])
                sec = rd["seconds"]
                out.append(f"| {key} | {rd['round']} | {asked.replace('Bond_Distortion_', '')} | {fits} | "
                           f"{rd['status']} | {sec['oracle']:.0f} / {sec['training'] or 0:.0f} / "
                           f"{sec['relax'] or 0:.0f} |")
    return out


def _row(r: dict, loops: dict) -> str:
    key = f"{r['host']}/{r['defect']}"
    gs = r.get("gs", {})
    bl = r.get("base_lowest", {})
    cells = []
    for mode in ("trial", "auto"):
        lp = loops.get(mode, {}).get(key)
        cells.append("–" if lp is None else
                     f"{'✓' if lp['loop_correct'] else '✗'} {lp['oracle_relaxations']} "
                     f"(rand {lp['random_correct_at_same_budget']:.2f}, "
                     f"shortlist {'✓' if lp['shortlist']['correct'] else '✗'})")
    miss = "–" if "base_misses" not in r else ("**yes**" if r["base_misses"] else "no")
    if "base_misses" in r:
        miss += f" ({bl['oracle_relaxed']['above_gs_eV']:+.3f})"
    kept = "" if r["kept"] else " (not kept)"
    moved = f" (! {gs['identity_change']})" if gs.get("identity_change") else ""
    return (f"| {r['host']} | {r['defect']}{kept} | {r['supercell']['atoms']} | "
            f"{r['oracle_minima_within_1eV']} | "
            f"{gs.get('label', '–')}{moved} | {len(r.get('gs_trials', []))}/{r['n_trials']} | "
            f"{bl.get('label', '–')} | {miss} | {r['full_search']['oracle_relaxations']} "
            f"({r['full_search']['oracle_ionic_steps']} steps) | {cells[0]} | {cells[1]} | "
            f"{r['seconds'].get('base_relaxations_sum')} / {r['seconds'].get('oracle_full_search_sum')} |")


def write_results(loop_options: dict | None = None) -> dict:
    doc = collect(loop_options)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, default=str)
    # lists of plain values on one line each (bonds, trial names): the file stays readable and small
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (RESULTS / "loop_zoo.json").write_text(text)
    (RESULTS / "loop_zoo.md").write_text(markdown(doc))
    return doc


# --- main ---------------------------------------------------------------------------------------
def _selected(a) -> list[tuple[Host, str]]:
    hosts = [HOSTS[h] for h in a.hosts.split(",")] if a.hosts else list(HOSTS.values())
    wanted = set(a.defects.split(",")) if a.defects else None
    lists = {h.name: h.defects + (h.scan if a.part == "scan" else ())
             + (h.controls if a.part == "scan" or a.controls else ()) for h in hosts}
    # interleaved: each host's first candidate, then each host's second, ... (parts run across hosts)
    order = []
    for i in range(max(len(v) for v in lists.values())):
        for h in hosts:
            names = lists[h.name]
            if i < len(names) and (wanted is None or names[i] in wanted):
                order.append((h, names[i]))
    return order[:a.max_defects] if a.max_defects else order


def _loop_options(a) -> dict:
    given = {k: v for k, v in (("k", a.k), ("committee", a.committee), ("epochs", a.epochs),
                               ("max_rounds", a.max_rounds)) if v is not None}
    return {**LOOP_OPTIONS, **given}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("search", "loop", "report", "scan"))
    p.add_argument("--wells", default="0.3:0.25,0.5:0.25",
                   help="scan: DEPTH:WIDTH pairs (eV:Å) to try, the host's R0 kept (0:0: no well)")
    p.add_argument("--models", default=ORACLE_MODEL, help="scan: the oracle's models to try")
    p.add_argument("--hosts", default=None, help=f"comma-separated, of {', '.join(HOSTS)}")
    p.add_argument("--defects", default=None,
                   help="comma-separated candidate specs (e.g. v_Zn,Se_i: every Se interstitial site)")
    p.add_argument("--max-defects", type=int, default=None, help="at most this many (interleaved by host)")
    p.add_argument("--controls", action="store_true",
                   help="also the control defects (the well cannot act on them: see Host.controls)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--starts", default="trial,auto", help="dft_start modes of the loop")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--committee", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-rounds", type=int, default=None)
    a = p.parse_args()
    _check_hosts()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import warnings

    warnings.filterwarnings("ignore")
    from defectml.models import set_threads

    set_threads(a.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f}s] {msg}", flush=True)

    if a.part == "scan":
        for host, defect in _selected(a):
            wells = [tuple(float(v) for v in x.split(":")) for x in a.wells.split(",")]
            scan_well(host, defect, wells, a.threads, log, tuple(a.models.split(",")))
    elif a.part == "search":
        from defectml.errors import StoreError

        skipped = []
        for host, spec in _selected(a):
            t0 = time.perf_counter()
            try:
                recs = search_spec(host, spec, a.threads, log)
            except StoreError as exc:  # another process (a loop) writes this host's store now
                log(f"{host.name} {spec}: skipped for now: {exc}")
                skipped.append(f"{host.name} {spec}")
                continue
            for rec in recs:
                gs = rec.get("gs", {}).get("label")
                log(f"{host.name} {rec['defect']}: kept {rec['kept']} ({rec['oracle_minima_within_1eV']} "
                    f"oracle minima within 1 eV; GS {gs}); base lowest "
                    f"{rec.get('base_lowest', {}).get('label')}; base misses {rec.get('base_misses')}")
            log(f"{host.name} {spec}: {time.perf_counter() - t0:.0f} s")
            write_results()
        if skipped:
            log(f"skipped (store busy; run again): {', '.join(skipped)}")
    elif a.part == "loop":
        why = loop_available()
        if why:
            raise SystemExit(f"the loop step cannot run yet: {why}")
        opts = _loop_options(a)
        for host, spec in _selected(a):
            for rec in search_spec(host, spec, a.threads, log):
                if not rec["kept"]:
                    continue
                for mode in a.starts.split(","):
                    t0 = time.perf_counter()
                    out = loop_defect(host, rec, mode, a.threads, opts, log)
                    log(f"{host.name} {rec['defect']} loop {mode}: correct {out['loop_correct']}, "
                        f"{out['oracle_relaxations']} oracle relaxations; {time.perf_counter() - t0:.0f} s")
                    write_results(opts)
    doc = write_results(_loop_options(a))
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
