"""From a host crystal to the defects to search: site finding, naming, charges, supercells.

Site finding is pymatgen-analysis-defects' (vacancy, substitution and Voronoi interstitial
generators); this module adds the field's naming (``v_Cd``, ``Se_Te``, ``Te_i_C3v``), oxidation
states with user overrides, default charge states, the excess-electron count that sets how many
neighbours are distorted, and a near-cubic supercell with periodic images at least
``min_length`` apart.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field

import numpy as np
import spglib
from pymatgen.core import Element, Structure

from defectml.errors import InputError

HM_TO_SCHOENFLIES = {
    "1": "C1", "-1": "Ci", "2": "C2", "m": "Cs", "2/m": "C2h", "222": "D2", "mm2": "C2v",
    "m2m": "C2v", "2mm": "C2v", "mmm": "D2h", "4": "C4", "-4": "S4", "4/m": "C4h", "422": "D4",
    "4mm": "C4v", "-42m": "D2d", "-4m2": "D2d", "4/mmm": "D4h", "3": "C3", "-3": "C3i",
    "32": "D3", "321": "D3", "312": "D3", "3m": "C3v", "3m1": "C3v", "31m": "C3v", "-3m": "D3d",
    "-3m1": "D3d", "-31m": "D3d", "6": "C6", "-6": "C3h", "6/m": "C6h", "622": "D6",
    "6mm": "C6v", "-6m2": "D3h", "-62m": "D3h", "6/mmm": "D6h", "23": "T", "m-3": "Th",
    "432": "O", "-43m": "Td", "m-3m": "Oh",
}

DEFECT_SPEC = re.compile(
    r"^(?:v_(?P<vac>[A-Z][a-z]?)|(?P<sub>[A-Z][a-z]?)_(?P<host>[A-Z][a-z]?)"
    r"|(?P<int>[A-Z][a-z]?)_i)(?:_(?P<tag>[A-Za-z0-9.]+))?$"
)


@dataclass
class Defect:
    """One symmetry-inequivalent point defect in its supercell (any charge state).

    Attributes:
        name: Field-standard name, e.g. ``v_Cd``, ``Se_Te``, ``Te_i_C3v``.
        kind: ``vacancy``, ``substitution`` or ``interstitial``.
        added: Element added (substituent or interstitial), ``None`` for vacancies.
        removed: Host element removed (vacancy or substituted), ``None`` for interstitials.
        oxi_change: Oxidation-state change at the site (new minus old; 0 for none).
        multiplicity: Equivalent sites per primitive host cell.
        site_symmetry: Schoenflies symbol of the site in the host.
        supercell: The unrelaxed defect supercell.
        bulk_supercell: The same supercell without the defect.
        site: Cartesian coordinates of the defect site in the supercell.
        defect_index: Index of the defect atom in ``supercell`` (``None`` for a vacancy).
        sc_matrix: Supercell matrix relative to the host cell given.
        default_charges: Charge states to search when none are given.
    """

    name: str
    kind: str
    added: str | None
    removed: str | None
    oxi_change: int
    multiplicity: int
    site_symmetry: str
    supercell: Structure
    bulk_supercell: Structure
    site: np.ndarray
    defect_index: int | None
    sc_matrix: np.ndarray
    default_charges: list[int] = field(default_factory=list)

    def excess_electrons(self, charge: int) -> int:
        """Excess electrons (negative: holes) of this defect in charge state ``charge``."""
        return self.oxi_change - int(charge)

    def check_charge(self, charge: int) -> None:
        """Raise ``InputError`` if ``charge`` is physically impossible for this defect."""
        n = self.excess_electrons(charge)
        if abs(n) > 8:
            raise InputError(
                f"impossible charge {charge:+d} for {self.name}: it would leave {abs(n)} "
                f"{'holes' if n < 0 else 'excess electrons'} at the site (more than a full "
                f"shell of 8); default charges are {self.default_charges}"
            )


def parse_oxi(text: str | None) -> dict[str, int] | None:
    """``--oxi``: Cd=2,Te=-2."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        try:
            el, val = part.split("=")
            out[el.strip()] = int(val)
        except ValueError:
            raise InputError(f"cannot parse --oxi {part!r}: use e.g. Cd=2,Te=-2") from None
    return out


def guess_oxidation_states(structure: Structure, overrides: dict[str, int] | None = None):
    """Oxidation state of each host element: pymatgen's best guess, then ``overrides``.

    Raises:
        InputError: if an override names an element that is not in the host.
    """
    elements = sorted({sp.symbol for sp in structure.composition.elements})
    overrides = dict(overrides or {})
    for el in overrides:
        if el not in elements:
            raise InputError(f"oxidation state given for {el}, which is not in the host {elements}")
    oxi: dict[str, int] = {}
    missing = [el for el in elements if el not in overrides]
    if missing:
        guesses = structure.composition.oxi_state_guesses(max_sites=-1)
        if guesses:
            oxi = {el: int(round(v)) for el, v in guesses[0].items()}
        else:
            oxi = {el: 0 for el in elements}
    oxi.update({el: int(v) for el, v in overrides.items()})
    return {el: oxi.get(el, 0) for el in elements}


def _foreign_oxi(element: str, like: int) -> int:
    """Oxidation state of a foreign element, the common one closest to ``like``."""
    common = Element(element).common_oxidation_states or (0,)
    return int(min(common, key=lambda o: (abs(o - like), -o)))


def default_charge_states(oxi_change: int) -> list[int]:
    """Charges from fully ionised to neutral: e.g. v_Cd (Δox −2) → [−2, −1, 0]."""
    lo, hi = sorted((0, oxi_change))
    return list(range(lo, hi + 1))


def site_symmetry(
    structure: Structure, frac: np.ndarray, species: str | None = None, symprec: float = 0.01
) -> str:
    """Schoenflies symbol of the point symmetry of the site at ``frac``.

    An empty site (vacancy, interstitial position) gets a placeholder atom of a type no real atom
    has; with ``species`` given, an atom already at the site is given that unique type too (so
    a substituent or interstitial is not mapped onto host atoms).
    """
    lattice = structure.lattice.matrix
    positions = [s.frac_coords for s in structure]
    numbers = [s.specie.Z for s in structure]
    idx = None
    for i, p in enumerate(positions):
        d = p - frac
        d -= np.round(d)
        if np.linalg.norm(d @ lattice) < 1e-3:
            idx = i
            break
    if idx is None:
        positions.append(np.asarray(frac))
        numbers.append(200)  # a type no real atom has: the interstitial
        idx = len(positions) - 1
    elif species is not None:
        numbers[idx] = 200
    data = spglib.get_symmetry_dataset((lattice, positions, numbers), symprec=symprec)
    if data is None:
        return "C1"
    hm = data.site_symmetry_symbols[idx].replace(".", "")
    return HM_TO_SCHOENFLIES.get(hm, hm)


def supercell_matrix(
    host: Structure, min_length: float = 10.0, max_atoms: int = 500, force_diagonal: bool = False
) -> np.ndarray:
    """A near-cubic supercell matrix with all periodic images at least ``min_length`` apart.

    Raises:
        InputError: if no such supercell has at most ``max_atoms`` atoms.
    """
    from pymatgen.analysis.defects.supercells import get_sc_fromstruct

    if min_length <= 0:
        raise InputError(f"--min-length must be positive, got {min_length}")
    # No lattice with every image min_length apart has a smaller cell than min_length³/√2 (the
    # fcc lattice: the densest lattice packing). Beyond max_atoms, refuse before pymatgen's search,
    # which for a large min_length allocates tens of GB.
    fewest = min_length**3 / np.sqrt(2) / (host.volume / len(host))
    if fewest > max_atoms:
        raise InputError(
            f"no supercell of the {host.composition.reduced_formula} host ({len(host)} atoms/cell) "
            f"keeps periodic images ≥{min_length:g} Å apart within {max_atoms} atoms (it takes at "
            f"least {fewest:.3g}); lower --min-length or raise --max-atoms"
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            m = get_sc_fromstruct(
                host, min_atoms=1, max_atoms=max_atoms, min_length=min_length,
                force_diagonal=force_diagonal,
            )
    except Exception:  # noqa: BLE001 - pymatgen/ASE raise RuntimeError or ValueError
        m = None
    if m is None:
        raise InputError(
            f"no supercell of the {host.composition.reduced_formula} host ({len(host)} atoms/cell) "
            f"keeps periodic images ≥{min_length:g} Å apart within {max_atoms} atoms; "
            "lower --min-length or raise --max-atoms"
        )
    return np.asarray(m, dtype=int)


def _generate(host: Structure, spec: re.Match | None, elements: list[str]):
    """Yield pymatgen-analysis-defects ``Defect`` objects matching ``spec`` (all if None)."""
    from pymatgen.analysis.defects.generators import (
        SubstitutionGenerator,
        VacancyGenerator,
        VoronoiInterstitialGenerator,
    )

    with contextlib.redirect_stdout(io.StringIO()):
        if spec is None or spec["vac"]:
            for d in VacancyGenerator().generate(host):
                if spec is None or d.site.specie.symbol == spec["vac"]:
                    yield "vacancy", d
        if spec is not None and spec["sub"]:
            for d in SubstitutionGenerator().generate(host, {spec["host"]: spec["sub"]}):
                yield "substitution", d
        if spec is None:  # antisites
            for a in elements:
                for b in elements:
                    if a != b:
                        for d in SubstitutionGenerator().generate(host, {b: a}):
                            yield "substitution", d
        if spec is None or spec["int"]:
            species = elements if spec is None else [spec["int"]]
            for d in VoronoiInterstitialGenerator().generate(wrapped(host), species):
                yield "interstitial", _on_host(d, host)


def wrapped(structure: Structure, tol: float = 1e-8) -> Structure:
    """``structure`` with every fractional coordinate in [0, 1) (within ``tol`` of 0 or 1: 0).

    The Voronoi generator keeps only atoms with 0 <= c < 1 (pymatgen-analysis-defects'
    ``TopographyAnalyzer`` window): an atom at c = -1e-44, as a float32 model's relaxation can
    leave it, drops out of the tessellation, and with it interstitial sites (the C3v site of
    zinc blende). doped wraps and rounds the same way before its own Voronoi search.
    """
    frac = np.mod(structure.frac_coords, 1.0)
    frac[(frac < tol) | (frac > 1.0 - tol)] = 0.0
    return Structure(structure.lattice, structure.species, frac)


def _on_host(d, host: Structure):
    """The interstitial ``d`` (found on a wrapped copy of ``host``) on ``host`` itself.

    Same lattice, so the same fractional site; the supercell is then made from ``host`` as given,
    atom for atom as the vacancies' and substitutions' are.
    """
    from pymatgen.analysis.defects.core import Interstitial
    from pymatgen.core import PeriodicSite

    def on(site):
        return PeriodicSite(site.species, site.frac_coords, host.lattice)

    return Interstitial(host, on(d.site), multiplicity=d.multiplicity,
                        equivalent_sites=[on(e) for e in d.equivalent_sites])


def _validate_spec(spec: re.Match, text: str, elements: list[str]) -> None:
    for key in ("vac", "sub", "host", "int"):
        el = spec[key]
        if el is None:
            continue
        try:
            Element(el)
        except ValueError:
            raise InputError(f"unknown element {el!r} in defect {text!r}") from None
    if spec["vac"] and spec["vac"] not in elements:
        raise InputError(f"cannot make {text}: {spec['vac']} is not in the host (elements {elements})")
    if spec["host"] and spec["host"] not in elements:
        raise InputError(
            f"cannot make {text}: {spec['host']} is not in the host (elements {elements})"
        )
    if spec["sub"] and spec["sub"] == spec["host"]:
        raise InputError(f"cannot make {text}: an element cannot substitute itself")


def parse_defect_specs(text: str, host: Structure) -> list[re.Match | None]:
    """Parse ``"v_Cd,Se_Te"`` or ``"all"`` into specs (``None`` = all native defects)."""
    elements = sorted({sp.symbol for sp in host.composition.elements})
    specs: list[re.Match | None] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if part.lower() == "all":
            specs.append(None)
            continue
        m = DEFECT_SPEC.match(part)
        if m is None:
            raise InputError(
                f"cannot parse defect {part!r}: use v_X (vacancy), A_B (A on a B site), "
                "X_i (interstitial) or all"
            )
        _validate_spec(m, part, elements)
        specs.append(m)
    if not specs:
        raise InputError("no defect given: use e.g. --defect v_Cd, --defect Se_Te or --defect all")
    return specs


def _place(kind: str, pmg_defect, sc: np.ndarray):
    """Defect supercell, bulk supercell, Cartesian defect site and defect atom index.

    The defect supercell is the bulk supercell with the one change made in place (same atom
    order, the interstitial appended last), so the two can be compared atom by atom.
    """
    host = pmg_defect.structure.copy()
    host.remove_oxidation_states()
    bulk = host * sc
    cell = bulk.copy()
    coords = np.asarray(pmg_defect.site.coords, dtype=float)
    frac = bulk.lattice.get_fractional_coords(coords) % 1.0
    index: int | None = None
    if kind == "interstitial":
        cell.append(pmg_defect.site.specie.symbol, frac)
        index = len(cell) - 1
    else:
        d = bulk.frac_coords - frac
        d -= np.round(d)
        dist = np.linalg.norm(d @ bulk.lattice.matrix, axis=1)
        j = int(np.argmin(dist))
        if dist[j] > 0.1:
            raise RuntimeError(f"could not locate the site of {pmg_defect.name} in the supercell")
        if kind == "vacancy":
            cell.remove_sites([j])
        else:
            cell.replace(j, pmg_defect.site.specie.symbol)
            index = j
        frac = bulk[j].frac_coords
    return cell, bulk, bulk.lattice.get_cartesian_coords(frac), index


def make_defects(
    host: Structure,
    defect: str = "all",
    *,
    oxidation_states: dict[str, int] | None = None,
    min_length: float = 10.0,
    max_atoms: int = 500,
    force_diagonal: bool = False,
) -> list[Defect]:
    """All symmetry-inequivalent defects of ``host`` matching ``defect``.

    Args:
        host: The host crystal (any cell; the primitive cell is used for site finding).
        defect: Comma-separated specs: ``v_Cd``, ``Se_Te``, ``Cd_i``, ``Te_i_C3v`` or ``all``
            (all native defects: vacancies, antisites and interstitials).
        oxidation_states: Overrides of the guessed oxidation states, e.g. ``{"Cd": 2}``.
        min_length: Minimum distance (Å) between periodic images of the defect.
        max_atoms: Largest supercell accepted.
        force_diagonal: Only diagonal supercell matrices.

    Returns:
        The defects, in the order found; names are unique.

    Raises:
        InputError: for an unparsable spec, an element not in the host, or no valid supercell.
    """
    host = host.get_primitive_structure()
    host.remove_oxidation_states()
    elements = sorted({sp.symbol for sp in host.composition.elements})
    oxi = guess_oxidation_states(host, oxidation_states)
    specs = parse_defect_specs(defect, host)
    sc = supercell_matrix(host, min_length, max_atoms, force_diagonal)

    found: list[Defect] = []
    for spec in specs:
        matched = 0
        for kind, d in _generate(host, spec, elements):
            made = _defect(kind, d, host, oxi, sc)
            if spec is not None and spec["tag"] and spec["tag"] != made.site_symmetry:
                continue
            found.append(made)
            matched += 1
        if spec is not None and matched == 0:
            raise InputError(f"no site matches defect {spec.string!r} in this host")
    _make_names_unique(found)
    return found


def _defect(kind: str, d, host: Structure, oxi: dict[str, int], sc: np.ndarray) -> Defect:
    """Our :class:`Defect` of a pymatgen-analysis-defects one on ``host`` (its primitive cell)."""
    removed = d.defect_site.specie.symbol if kind != "interstitial" else None
    if kind == "vacancy":
        added, old, new = None, oxi[removed], 0
    elif kind == "substitution":
        added = d.site.specie.symbol
        old = oxi[removed]
        new = oxi.get(added, _foreign_oxi(added, old))
    else:
        added, old = d.site.specie.symbol, 0
        new = oxi.get(added, _foreign_oxi(added, 0))
    frac = host.lattice.get_fractional_coords(d.site.coords)
    sym = site_symmetry(host, frac, added if kind != "vacancy" else None)
    base = {"vacancy": f"v_{removed}", "substitution": f"{added}_{removed}"}.get(kind, f"{added}_i")
    cell, bulk, coords, index = _place(kind, d, sc)
    return Defect(
        name=base if kind != "interstitial" else f"{base}_{sym}",
        kind=kind, added=added, removed=removed, oxi_change=new - old,
        multiplicity=int(d.multiplicity), site_symmetry=sym, supercell=cell,
        bulk_supercell=bulk, site=coords, defect_index=index, sc_matrix=sc,
        default_charges=default_charge_states(new - old),
    )


def object_kind(obj) -> str:
    """The kind of a pymatgen-analysis-defects ``Defect`` (doped's subclass them).

    Returns:
        ``vacancy``, ``substitution`` or ``interstitial``.

    Raises:
        InputError: any other object.
    """
    from pymatgen.analysis.defects.core import Interstitial, Substitution, Vacancy

    for cls, kind in ((Vacancy, "vacancy"), (Substitution, "substitution"), (Interstitial, "interstitial")):
        if isinstance(obj, cls):
            return kind
    raise InputError(f"cannot search {type(obj).__name__} objects: give pymatgen-analysis-defects (or "
                     "doped) Vacancy, Substitution or Interstitial objects, or a spec such as v_Cd")


def resolve_defects(defects):
    """A defect request as a spec string, or as a list of ``Defect`` objects.

    Accepts a spec (``v_Cd,Se_Te``, ``all``: returned as it is); a JSON file (``*.json``) that
    monty reads as a pymatgen-analysis-defects or doped ``Defect``, ``DefectEntry`` (its
    defect), a list of those, or a doped ``DefectsGenerator`` (every defect it generated); or
    such objects themselves.

    Raises:
        InputError: an unreadable file, or anything else.
    """
    from pathlib import Path

    if isinstance(defects, str):
        if not defects.lower().endswith(".json"):
            return defects
        path = Path(defects)
        if not path.is_file():
            raise InputError(f"--defect {defects}: no such file")
        from monty.serialization import loadfn

        try:
            loaded = loadfn(path)
        except ModuleNotFoundError as exc:
            raise InputError(f"{path} needs the package that wrote it ({exc.name}): pip install it") from None
        except Exception as exc:  # noqa: BLE001 - any JSON/monty decoding error
            raise InputError(f"cannot read defects from {path}: {type(exc).__name__}: {exc}") from None
        return resolve_defects(loaded if isinstance(loaded, list | tuple) else [loaded])
    items = list(defects.values()) if isinstance(defects, dict) else \
        [defects] if not isinstance(defects, list | tuple) else list(defects)
    out = []
    for item in items:
        if isinstance(getattr(item, "defects", None), dict):  # doped's DefectsGenerator
            out += [d for group in item.defects.values() for d in group]
        elif isinstance(item, list | tuple):
            out += resolve_defects(item)
        elif hasattr(item, "defect") and hasattr(item, "sc_entry"):  # a DefectEntry
            out.append(item.defect)
        elif isinstance(item, dict) and "@module" not in item:
            raise InputError("a defects JSON must hold Defect, DefectEntry or DefectsGenerator objects "
                             "(monty's @module/@class), not a plain mapping")
        else:
            object_kind(item)  # refuses anything that is not a Defect
            out.append(item)
    if not out:
        raise InputError("no defect given: pass pymatgen/doped Defect objects or a spec such as v_Cd")
    return out


def host_of(objects: list, host: Structure) -> Structure:
    """The crystal the defect objects were made on: their own structure (one for all, ``host``'s).

    Their sites are in that structure's frame (doped's generator works on its own cell and
    orientation), so the search takes it as the host.

    Raises:
        InputError: objects made on different structures, or on another crystal than ``host``.
    """
    first = objects[0].structure.copy()
    first.remove_oxidation_states()
    for obj in objects[1:]:
        other = obj.structure.copy()
        other.remove_oxidation_states()
        if len(other) != len(first) or not np.allclose(other.lattice.matrix, first.lattice.matrix, atol=1e-3):
            raise InputError("the defect objects were made on different host cells: give them one host")
    given = host.composition.reduced_formula
    if first.composition.reduced_formula != given:
        raise InputError(f"the defect objects were made on {first.composition.reduced_formula}, "
                         f"not on the host given ({given})")
    return first


def defects_from_objects(
    host: Structure,
    objects: list,
    *,
    reference: Structure | None = None,
    oxidation_states: dict[str, int] | None = None,
    min_length: float = 10.0,
    max_atoms: int = 500,
    force_diagonal: bool = False,
) -> list[Defect]:
    """Our defects from pymatgen-analysis-defects (or doped) ``Defect`` objects, placed on ``host``.

    Each object's site is taken in Cartesian coordinates of its own structure, which must be the
    crystal of ``reference`` in the same orientation (the host the search was given: any cell of
    it, e.g. the one doped's generator worked on); it is placed on the primitive cell of ``host``
    (``reference`` itself, or ``reference`` relaxed by the model) by fractional coordinates of
    ``reference``'s primitive cell, so a strained host carries its defects along.

    Raises:
        InputError: an object of another kind, or one whose site is no site of this host
            (another crystal, another orientation, another species on it).
    """
    from pymatgen.analysis.defects.core import Interstitial, Substitution, Vacancy
    from pymatgen.core import PeriodicSite

    if not objects:
        raise InputError("no defect given: pass pymatgen/doped Defect objects or a spec such as v_Cd")
    cell = host.get_primitive_structure()
    cell.remove_oxidation_states()
    frame = (reference or host).get_primitive_structure()
    if len(frame) != len(cell) or [s.symbol for s in frame.species] != [s.symbol for s in cell.species]:
        raise InputError("the relaxed host is not the host's primitive cell (site order changed)")
    oxi = guess_oxidation_states(cell, oxidation_states)
    sc = supercell_matrix(cell, min_length, max_atoms, force_diagonal)
    found = []
    for obj in objects:
        kind = object_kind(obj)
        frac = frame.lattice.get_fractional_coords(np.asarray(obj.site.coords, float))
        if kind == "interstitial":
            d = Interstitial(cell, PeriodicSite(obj.site.specie.symbol, frac % 1.0, cell.lattice))
        else:
            delta = cell.frac_coords - frac
            delta -= np.round(delta)
            dist = np.linalg.norm(delta @ cell.lattice.matrix, axis=1)
            j = int(np.argmin(dist))
            wanted = obj.defect_site.specie.symbol
            if dist[j] > 0.3 or cell[j].specie.symbol != wanted:
                raise InputError(f"{obj.name}: no {wanted} site of this host within 0.3 Å of the object's "
                                 f"site ({dist[j]:.2f} Å to {cell[j].specie.symbol}); was it made on "
                                 "another crystal, cell orientation or setting?")
            if kind == "vacancy":
                d = Vacancy(cell, cell[j])
            else:
                site = PeriodicSite(obj.site.specie.symbol, cell[j].frac_coords, cell.lattice)
                d = Substitution(cell, site)
        found.append(_defect(kind, d, cell, oxi, sc))
    _make_names_unique(found)
    return found


def _make_names_unique(defects: list[Defect]) -> None:
    """Suffix clashing names with the nearest-neighbour species and distance, then an index."""
    by_name: dict[str, list[Defect]] = {}
    for d in defects:
        by_name.setdefault(d.name, []).append(d)
    for name, group in by_name.items():
        if len(group) == 1:
            continue
        for d in group:
            cell = d.supercell
            frac = cell.lattice.get_fractional_coords(d.site)
            delta = cell.frac_coords - frac
            delta -= np.round(delta)
            dist = np.linalg.norm(delta @ cell.lattice.matrix, axis=1)
            if d.defect_index is not None:
                dist[d.defect_index] = np.inf
            j = int(np.argmin(dist))
            d.name = f"{name}_{cell[j].specie.symbol}{dist[j]:.2f}"
        seen: dict[str, int] = {}
        for d in group:
            seen[d.name] = seen.get(d.name, 0) + 1
            if seen[d.name] > 1:
                d.name = f"{d.name}_{seen[d.name]}"


def bulk_nn_distance(structure: Structure) -> float:
    """Shortest interatomic distance in the (bulk) structure."""
    r = 1.1 * min(structure.lattice.abc) + 1.0
    dists = [n.nn_distance for nbrs in structure.get_all_neighbors(r) for n in nbrs]
    return float(min(dists))
