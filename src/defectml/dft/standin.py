"""Stand-in oracles: a shipped MLIP, optionally plus a stated pair well, answering in DFT's place.

Real DFT landscapes with several basins are scarce, so benchmarks of the active loop also need an
oracle whose answers differ from the surrogate's in a known, stated way. A stand-in oracle relaxes
the requested start (fixed cell, FIRE, like every relaxation here) with

* another model: ``calculator:chgnet-0.2.0``, ``calculator:sevennet-mf-0@R2SCAN``, any spelling
  :func:`defectml.models.parse_model` accepts (a built-in name or a weights file); or
* a model plus one or more Gaussian pair wells between two species,
  ``calculator:MODEL+well:A-B:DEPTH:R0:WIDTH`` (eV, Å, Å), e.g.
  ``calculator:chgnet+well:Se-Se:0.4:2.45:0.35``:

  E_pair = −DEPTH · Σ_{pairs A–B} exp(−(r − R0)² / (2 WIDTH²)),

  with analytic forces and stress (:class:`PairWellCalculator`), summed onto the model's
  (:class:`WellCalculator`). A positive depth is an attraction centred on R0 (an anion–anion
  bond that DFT would form and the model under-binds); several ``+well:`` terms add up.

Its answers are never DFT: every answer's ``theory`` says ``stand-in for DFT: <model>`` (and the
wells), and the oracle's :meth:`StandInOracle.key` is a content key of the model's weights
(:attr:`ModelRef.key`), the wells, ``fmax`` and ``max_steps``, so results of two stand-ins are
never mixed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from defectml.dft.oracle import CalculatorOracle
from defectml.errors import InputError, ModelError
from defectml.store import content_key
from defectml.structure_io import with_charge

WELL_PREFIX = "well:"
#: The well is cut at R0 + CUTOFF_WIDTHS · WIDTH, where exp(−CUTOFF_WIDTHS²/2) < 2e-8 of DEPTH.
CUTOFF_WIDTHS = 6.0


@dataclass(frozen=True)
class PairWell:
    """One Gaussian pair term between species ``a`` and ``b`` (``a == b``: like pairs).

    Attributes:
        a, b: Element symbols.
        depth: eV per pair at ``r0`` (positive: attractive).
        r0: Centre of the well (Å).
        width: Gaussian standard deviation (Å).
    """

    a: str
    b: str
    depth: float
    r0: float
    width: float

    def __post_init__(self) -> None:
        from pymatgen.core import Element

        for sym in (self.a, self.b):
            if not Element.is_valid_symbol(sym):
                raise InputError(f"pair well: {sym!r} is not an element symbol")
        if not np.isfinite(self.depth):
            raise InputError(f"pair well {self.a}-{self.b}: depth must be finite, got {self.depth}")
        if not (self.r0 > 0 and self.width > 0):
            raise InputError(f"pair well {self.a}-{self.b}: R0 and WIDTH must be positive Å, got "
                             f"{self.r0} and {self.width}")

    @property
    def cutoff(self) -> float:
        """Distance (Å) beyond which the term is dropped."""
        return self.r0 + CUTOFF_WIDTHS * self.width

    @property
    def spec(self) -> str:
        """The spelling :func:`parse_well` reads back."""
        return f"{WELL_PREFIX}{self.a}-{self.b}:{self.depth:g}:{self.r0:g}:{self.width:g}"

    def describe(self) -> str:
        """For people: ``Se-Se Gaussian well (depth 0.4 eV at 2.45 Å, width 0.35 Å)``."""
        return (f"{self.a}-{self.b} Gaussian well (depth {self.depth:g} eV at {self.r0:g} Å, "
                f"width {self.width:g} Å)")

    def to_dict(self) -> dict:
        """JSON form (what keys the oracle)."""
        return asdict(self)


def parse_well(text: str) -> PairWell:
    """A :class:`PairWell` from ``well:A-B:DEPTH:R0:WIDTH`` (eV, Å, Å).

    Raises:
        InputError: for any other spelling.
    """
    body = text[len(WELL_PREFIX):] if text.startswith(WELL_PREFIX) else text
    parts = body.split(":")
    pair = parts[0].split("-") if parts else []
    if len(parts) != 4 or len(pair) != 2 or not all(pair):
        raise InputError(f"pair well {text!r}: use well:A-B:DEPTH:R0:WIDTH (eV, Å, Å), "
                         "e.g. well:Se-Se:0.4:2.45:0.35")
    try:
        depth, r0, width = (float(x) for x in parts[1:])
    except ValueError:
        raise InputError(f"pair well {text!r}: DEPTH, R0 and WIDTH must be numbers") from None
    return PairWell(pair[0], pair[1], depth, r0, width)


def pair_well_terms(atoms: Atoms, wells, stress: bool = False):
    """Energy (eV), forces (eV/Å) and, with ``stress`` on a 3D cell, stress (eV/Å³, Voigt) of the wells.

    Periodic images count (ASE's neighbour list); each pair once.
    """
    from ase.neighborlist import neighbor_list

    n = len(atoms)
    energy, forces, virial = 0.0, np.zeros((n, 3)), np.zeros((3, 3))
    symbols = np.array(atoms.get_chemical_symbols())
    for w in wells:
        if not ({w.a, w.b} <= set(symbols.tolist())):
            continue
        i, j, d, vec = neighbor_list("ijdD", atoms, w.cutoff)
        si, sj = symbols[i], symbols[j]
        mask = ((si == w.a) & (sj == w.b)) | ((si == w.b) & (sj == w.a))
        i, j, d, vec = i[mask], j[mask], d[mask], vec[mask]
        if not len(d):
            continue
        g = np.exp(-((d - w.r0) ** 2) / (2 * w.width**2))
        # the full list holds every pair twice (i→j and j→i): half the energy per entry
        energy += -0.5 * w.depth * float(g.sum())
        de_dr = w.depth * g * (d - w.r0) / w.width**2  # dE/dr of one pair
        # r = |x_j - x_i| (vec = x_j - x_i): -dE/dx_i = dE/dr · vec / r, one entry per direction
        np.add.at(forces, i, (de_dr / d)[:, None] * vec)
        virial += 0.5 * np.einsum("k,ka,kb->ab", de_dr / d, vec, vec)
    result = {"energy": energy, "forces": forces}
    if stress and atoms.cell.rank == 3 and all(atoms.pbc):
        result["stress"] = full_3x3_to_voigt_6_stress(virial / atoms.get_volume())
    return result


class PairWellCalculator(Calculator):
    """The pair wells alone, as an ASE calculator (energy, forces; stress on periodic 3D cells)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, wells, **kwargs):
        super().__init__(**kwargs)
        self.wells = tuple(wells)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """The wells' energy and forces (and stress when asked, on a periodic 3D cell)."""
        super().calculate(atoms, properties, system_changes)
        r = pair_well_terms(self.atoms, self.wells, stress="stress" in properties)
        self.results = {"energy": r["energy"], "free_energy": r["energy"], "forces": r["forces"]}
        if "stress" in r:
            self.results["stress"] = r["stress"]


class WellCalculator(Calculator):
    """A model's calculator plus pair wells: energy, forces and (where both give it) stress add up.

    The base calculator is asked only for what is asked of this one (a fixed-cell relaxation
    asks energy and forces: no stress backward pass).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, base: Calculator, wells, **kwargs):
        super().__init__(**kwargs)
        self.base, self.wells = base, tuple(wells)

    def check_state(self, atoms, tol=1e-15):
        """ASE's changes, plus the cell's charge (``info["charge"]``)."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and atoms.info.get("charge") != self.atoms.info.get("charge"):
            changes = [*changes, "charge"]  # a charge-aware base model reads it
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """The base model's results plus the wells'."""
        super().calculate(atoms, properties, system_changes)
        want_stress = "stress" in properties
        well = pair_well_terms(self.atoms, self.wells, stress=want_stress)
        probe = self.atoms.copy()
        energy = float(self.base.get_potential_energy(probe)) + well["energy"]
        forces = np.asarray(self.base.get_forces(probe), dtype=float) + well["forces"]
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
        if want_stress:
            self.results["stress"] = np.asarray(self.base.get_stress(probe), dtype=float) + well["stress"]


class StandInOracle(CalculatorOracle):
    """Relaxes each request with a shipped model (plus stated pair wells): a stand-in for DFT.

    The model is loaded on the first request. Each answer's ``theory`` is
    ``stand-in for DFT: <model label>[ + <well>]``.

    Args:
        model: Any spelling :func:`defectml.models.parse_model` accepts, or a ``ModelRef``.
        wells: Pair wells added to the model's energy.
        fmax: Force threshold (eV/Å).
        max_steps: Step limit.
        device: ``cpu`` or ``cuda``.
        threads: Torch threads (default: the free cores).
    """

    kind = "calculator"

    def __init__(self, model, wells=(), fmax: float = 0.05, max_steps: int = 300,
                 device: str = "cpu", threads: int | None = None):
        from defectml.models.ref import parse_model

        try:
            self.ref = parse_model(model, device)
        except ModelError as exc:
            raise InputError(str(exc)) from None
        self.wells = tuple(wells)
        self.device, self.threads = device, threads
        self._calc: Calculator | None = None
        super().__init__(self._calculator_for, self.describe(), fmax, max_steps)

    def describe(self) -> str:
        """The level of theory stored with every answer."""
        text = f"stand-in for DFT: {self.ref.label}"
        return text + "".join(f" + {w.describe()}" for w in self.wells)

    @property
    def spec(self) -> str:
        """The ``--oracle`` spelling of this oracle."""
        return "calculator:" + "+".join([self.ref.label, *(w.spec for w in self.wells)])

    def key(self) -> str:
        """Content key of what decides the answers: the weights, the wells, fmax, max_steps."""
        return content_key("calculator", "stand-in", self.ref.key, [w.to_dict() for w in self.wells],
                           self.fmax, self.max_steps)

    def calculator(self) -> Calculator:
        """The model's calculator with the wells (loaded once)."""
        if self._calc is None:
            from defectml.models import load_model

            model = load_model(self.ref, self.device, self.threads)
            self._calc = WellCalculator(model.calculator, self.wells) if self.wells else model.calculator
        return self._calc

    def _calculator_for(self, charge: int) -> Calculator:
        return self.calculator()

    def ask(self, requests):
        """Relax each request from its start (the cell's charge travels in ``info``)."""
        charged = [replace(q, start=with_charge(q.start, q.charge)) for q in requests]
        answers, pending = super().ask(charged)
        for a, q in zip(answers, requests, strict=True):
            a.request = q
        return answers, pending


def parse_standin(text: str, fmax: float = 0.05, max_steps: int = 300, device: str = "cpu",
                  threads: int | None = None) -> StandInOracle:
    """A stand-in oracle from ``MODEL[+well:A-B:DEPTH:R0:WIDTH ...]`` (see the module).

    Raises:
        InputError: an unknown model or a badly spelled well.
    """
    model, *rest = text.split("+" + WELL_PREFIX)
    if not model.strip():
        raise InputError(f"stand-in oracle {text!r}: name a model first (chgnet+well:...)")
    wells = [parse_well(WELL_PREFIX + w) for w in rest]
    return StandInOracle(model.strip(), wells, fmax, max_steps, device, threads)
