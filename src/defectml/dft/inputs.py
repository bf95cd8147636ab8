"""DFT input files for shortlisted minima: VASP (pymatgen input sets), Quantum ESPRESSO and CP2K.

Defect relaxations at the shortlisting stage follow the seed paper: Γ-point only, no symmetry,
spin-polarised, fixed cell. Codes are written side by side::

    <out>/<defect>_<charge>/<rank>_<trial>/vasp/{INCAR, KPOINTS, POSCAR, POTCAR or POTCAR.spec}
                                          /qe/espresso.pwi
                                          /cp2k/cp2k.inp
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms

from defectml.errors import InputError

CODES = ("vasp", "qe", "cp2k")

VASP_DEFAULTS = {"ISYM": 0, "ISPIN": 2, "IBRION": 2, "ISIF": 2, "NSW": 300, "EDIFF": 1e-5,
                 "EDIFFG": -0.01, "LCHARG": False, "LWAVE": False, "LREAL": "Auto"}


def load_overrides(path: str | Path | None) -> dict:
    """INCAR (or other) overrides from a YAML file (``{}`` when no file is given)."""
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"overrides file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"cannot parse {p} as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{p} must hold a mapping of INCAR tags to values")
    return data


def standard_valence(symbols: list[str], functional: str = "PBE_54") -> float:
    """Σ ZVAL of the POTCARs pymatgen's MPRelaxSet picks, from pymatgen's POTCAR summary table.

    For NELECT of a charged cell when no POTCARs are configured here; the ZVALs are those of the
    standard VASP POTCARs named in ``POTCAR.spec``.

    Raises:
        InputError: an element without a standard POTCAR in the table.
    """
    import bz2
    import json

    import pymatgen.io.vasp as vasp_io
    from pymatgen.io.vasp.sets import MPRelaxSet

    table = json.loads(bz2.open(Path(vasp_io.__file__).parent / "potcar-summary-stats.json.bz2").read())
    zval = {e["symbol"]: float(e["ZVAL"]) for entries in table[functional].values() for e in entries}
    choice = MPRelaxSet.CONFIG["POTCAR"]
    missing = sorted({s for s in symbols if choice.get(s) not in zval})
    if missing:
        raise InputError(f"no standard {functional} POTCAR valence for {', '.join(missing)}: set NELECT "
                         "by hand (sum of ZVAL) - charge")
    return sum(zval[choice[s]] for s in symbols)


def write_vasp(atoms: Atoms, charge: int, folder: Path, overrides: dict | None = None) -> list[Path]:
    """VASP inputs from pymatgen's ``MPRelaxSet`` with defect-search settings.

    NELECT of a charged cell comes from the POTCARs when pymatgen has them; otherwise from the
    standard valence counts of the POTCARs named in ``POTCAR.spec`` (:func:`standard_valence`),
    and ``NELECT.txt`` says so.
    """
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.vasp.inputs import Kpoints
    from pymatgen.io.vasp.sets import MPRelaxSet

    structure = AseAtomsAdaptor.get_structure(atoms)
    incar = {**VASP_DEFAULTS, **(overrides or {})}
    folder.mkdir(parents=True, exist_ok=True)

    def input_set(extra: dict) -> MPRelaxSet:
        return MPRelaxSet(structure, user_incar_settings={**incar, **extra},
                          user_kpoints_settings=Kpoints.gamma_automatic((1, 1, 1)),
                          user_potcar_functional="PBE_54")

    vis = input_set({})
    try:
        if charge:
            vis = input_set({"NELECT": vis.nelect - charge})
        vis.write_input(str(folder))
    except (OSError, RuntimeError, ValueError, KeyError):
        if charge:
            neutral = standard_valence(atoms.get_chemical_symbols())
            vis = input_set({"NELECT": neutral - charge})
            (folder / "NELECT.txt").write_text(
                f"NELECT = {neutral - charge:g}: {neutral:g} valence electrons of the standard PBE_54 "
                f"POTCARs in POTCAR.spec (pymatgen's table, no POTCAR files here) minus the charge "
                f"{charge:+d}. Check it against the POTCARs you use.\n")
        vis.write_input(str(folder), potcar_spec=True)
    return sorted(folder.iterdir())


def write_qe(atoms: Atoms, charge: int, folder: Path, overrides: dict | None = None) -> list[Path]:
    """Quantum ESPRESSO ``pw.x`` relax input (ASE writer), Γ-point, spin-polarised."""
    from ase.io import write

    folder.mkdir(parents=True, exist_ok=True)
    a = atoms.copy()
    a.set_initial_magnetic_moments(np.full(len(a), 0.5))
    input_data = {
        "control": {"calculation": "relax", "prefix": "defect", "pseudo_dir": "./pseudo",
                    "forc_conv_thr": 1e-3},
        "system": {"ecutwfc": 40, "ecutrho": 320, "occupations": "smearing",
                   "smearing": "gaussian", "degauss": 0.005, "nspin": 2, "tot_charge": charge},
        "electrons": {"conv_thr": 1e-6, "mixing_beta": 0.3},
        "ions": {},
    }
    for section, values in (overrides or {}).items():
        if section != "pseudos":
            input_data.setdefault(section, {}).update(values)
    elements = sorted(set(a.get_chemical_symbols()))
    library = qe_pseudopotentials(elements, (overrides or {}).get("pseudos"))
    if library:
        input_data["system"]["ecutwfc"] = max(v["cutoff_wfc"] for v in library.values())
        input_data["system"]["ecutrho"] = max(v["cutoff_rho"] for v in library.values())
        for section, values in (overrides or {}).items():  # the user's own cutoffs still win
            if section != "pseudos":
                input_data.setdefault(section, {}).update(values)
        pseudos = {el: library[el]["filename"] for el in elements}
    else:
        pseudos = {el: f"{el}.upf" for el in elements}
        (folder / "PSEUDOS.txt").write_text(
            "No pseudopotential library was given: the names X.upf and the cutoffs are placeholders. "
            "Pass an SSSP table (qe: {pseudos: SSSP_1.3.0_PBE_efficiency.json} in --overrides, or set "
            "$DEFECTML_SSSP) to get its file names and cutoffs.\n")
    path = folder / "espresso.pwi"
    write(path, a, format="espresso-in", input_data=input_data, pseudopotentials=pseudos, kpts=None)
    return [path]


def qe_pseudopotentials(elements: list[str], table: str | None = None) -> dict[str, dict] | None:
    """File name and cutoffs (Ry) per element from an SSSP table (its JSON, as SSSP ships it).

    ``table``: the JSON file (or ``$DEFECTML_SSSP``); ``None`` when neither is given.

    Raises:
        InputError: an unreadable table or an element it does not hold.
    """
    import json
    import os

    path = table or os.environ.get("DEFECTML_SSSP")
    if not path:
        return None
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the pseudopotential table {path}: {exc}") from None
    missing = [el for el in elements if el not in doc or "filename" not in doc[el]]
    if missing:
        raise InputError(f"the pseudopotential table {path} has no {', '.join(missing)}")
    return {el: {"filename": doc[el]["filename"], "cutoff_wfc": float(doc[el].get("cutoff_wfc", 40)),
                 "cutoff_rho": float(doc[el].get("cutoff_rho", 320))} for el in elements}


def _cp2k_global_motion(max_iter: int) -> str:
    """The ``&GLOBAL`` and ``&MOTION`` sections: a geometry optimisation of ``max_iter`` steps."""
    return f"""&GLOBAL
  PROJECT defect
  RUN_TYPE GEO_OPT
  PRINT_LEVEL LOW
&END GLOBAL
&MOTION
  &GEO_OPT
    MAX_ITER {max_iter}
    MAX_FORCE 4.5E-04
  &END GEO_OPT
&END MOTION
"""


def _cp2k_dft(charge: int, cutoff: float, rel_cutoff: float) -> str:
    """The opening of ``&FORCE_EVAL`` and its ``&DFT`` section: PBE, UKS, OT, the grid cutoffs (Ry)."""
    return f"""&FORCE_EVAL
  METHOD QS
  &DFT
    BASIS_SET_FILE_NAME BASIS_MOLOPT
    POTENTIAL_FILE_NAME GTH_POTENTIALS
    CHARGE {charge}
    UKS T
    &MGRID
      CUTOFF {cutoff}
      REL_CUTOFF {rel_cutoff}
    &END MGRID
    &SCF
      EPS_SCF 1.0E-6
      MAX_SCF 100
      &OT
        MINIMIZER DIIS
      &END OT
    &END SCF
    &XC
      &XC_FUNCTIONAL PBE
      &END XC_FUNCTIONAL
    &END XC
  &END DFT
"""


def _cp2k_subsys(atoms: Atoms, basis: str) -> str:
    """The ``&SUBSYS`` section (cell, coordinates, a ``&KIND`` per element) and the end of ``&FORCE_EVAL``."""
    cell = atoms.cell.array
    symbols = atoms.get_chemical_symbols()
    coords = "\n".join(f"      {s:3s} {x:14.8f} {y:14.8f} {z:14.8f}"
                       for s, (x, y, z) in zip(symbols, atoms.positions, strict=True))
    kinds = "\n".join(
        f"    &KIND {el}\n      BASIS_SET {basis}\n      POTENTIAL GTH-PBE\n    &END KIND"
        for el in sorted(set(symbols)))
    return f"""  &SUBSYS
    &CELL
      A {cell[0][0]:.8f} {cell[0][1]:.8f} {cell[0][2]:.8f}
      B {cell[1][0]:.8f} {cell[1][1]:.8f} {cell[1][2]:.8f}
      C {cell[2][0]:.8f} {cell[2][1]:.8f} {cell[2][2]:.8f}
    &END CELL
    &COORD
{coords}
    &END COORD
{kinds}
  &END SUBSYS
&END FORCE_EVAL
"""


def write_cp2k(atoms: Atoms, charge: int, folder: Path, overrides: dict | None = None) -> list[Path]:
    """CP2K GEO_OPT input: PBE, GTH pseudopotentials, DZVP-MOLOPT-SR basis, Γ-point, UKS."""
    o = {"cutoff": 400, "rel_cutoff": 50, "basis": "DZVP-MOLOPT-SR-GTH", "max_iter": 300,
         **(overrides or {})}
    folder.mkdir(parents=True, exist_ok=True)
    text = (_cp2k_global_motion(o["max_iter"]) + _cp2k_dft(charge, o["cutoff"], o["rel_cutoff"])
            + _cp2k_subsys(atoms, o["basis"]))
    path = folder / "cp2k.inp"
    path.write_text(text)
    return [path]


WRITERS = {"vasp": write_vasp, "qe": write_qe, "cp2k": write_cp2k}


def write_inputs(
    atoms: Atoms, charge: int, folder: Path, codes=CODES, overrides: dict | None = None
) -> dict[str, list[Path]]:
    """Write inputs for every code in ``codes`` under ``folder/<code>/``.

    ``overrides`` maps a code to its overrides (VASP: INCAR tags; QE: namelist sections;
    CP2K: cutoff, rel_cutoff, basis, max_iter).
    """
    unknown = set(codes) - set(WRITERS)
    if unknown:
        raise InputError(f"unknown DFT code(s) {sorted(unknown)}: choose from {', '.join(CODES)}")
    overrides = overrides or {}
    return {code: WRITERS[code](atoms, charge, folder / code, overrides.get(code))
            for code in codes}


def write_trial_folders(items, out: Path) -> list[tuple[str, int, Path]]:
    """Every trial as ``out/<defect>_<charge>/<trial>/POSCAR``, ShakeNBreak's layout.

    Each defect folder gets a ``distortion_metadata.json`` (site, defect index, each trial's seed,
    distortion and distorted atoms, and the trials dropped).

    Args:
        items: The planned defects and charges with their trials (:func:`defectml.search.plan`).
        out: Where to write.

    Returns:
        ``(label, number of trials, folder)`` per defect and charge.
    """
    import json

    from defectml.structure_io import to_structure

    written = []
    for it in items:
        folder = out / it.label
        meta = {"defect": it.defect.name, "charge": it.charge, "site": it.defect.site.tolist(),
                "defect_index": it.defect.defect_index, "trials": {}, "dropped": it.dropped}
        for t in it.trials:
            (folder / t.name).mkdir(parents=True, exist_ok=True)
            to_structure(t.atoms).to(filename=str(folder / t.name / "POSCAR"), fmt="poscar")
            meta["trials"][t.name] = {"seed": t.seed, "distortion": t.distortion,
                                      "distorted_indices": list(t.distorted_indices)}
        (folder / "distortion_metadata.json").write_text(json.dumps(meta, indent=2))
        written.append((it.label, len(it.trials), folder))
    return written
