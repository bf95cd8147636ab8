"""Low-fidelity labels for the multi-fidelity benchmark: GPAW PBE single points on ZnS HSE06 frames.

The shared defect data have no structure with both a PBE-type and a hybrid label, so this makes
them: GPAW (LCAO, dzp basis, PBE, Γ point, grid spacing 0.25 Å, spin-paired, Fermi–Dirac 0.05 eV,
the cell's charge from the frame) on a subset of the 64-atom ZnS HSE06 frames of
``../shared/data/defect-dft/ZnS.extxyz.gz``. Cheap on purpose: a low fidelity, ~1.5 min a frame on
one core here (the HSE06 labels it sits under came from VASP, 8 k-points, spin-polarised).

Which frames: only relaxations on the *training* side of :data:`TEST_DEFECTS` (the multi-fidelity
benchmark tests on those; they get no low-fidelity label). First the high-fidelity training subset
(every :data:`HI_STRIDE`-th training frame: the pairs Δ-learning needs), then the frames between,
spread over the relaxations, until ``--max-frames`` or the time runs out. Every label is appended
as it is made (``data/multifidelity/ZnS_gpaw_pbe.extxyz``), so a killed run resumes; the cost of
each sits in its frame (``gpaw_wall_s``).

    python benchmarks/gpaw_pbe_labels.py [--max-frames 40]

Each written frame keeps the HSE06 frame's ``info`` (host, defect, charge, run_id, ...) with
``functional="PBE"``, ``fidelity="PBE"``, ``source_frame`` (its index in ZnS.extxyz.gz) and the
GPAW settings; energies and forces are GPAW's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "defect-dft" / "ZnS.extxyz.gz"
OUT = ROOT / "data" / "multifidelity" / "ZnS_gpaw_pbe.extxyz"
#: defects the multi-fidelity benchmark tests on (no low-fidelity label, no training frame)
TEST_DEFECTS = ("vac_2_S", "sub_1_Al_on_Zn")
#: every HI_STRIDE-th training frame is in the high-fidelity training subset
HI_STRIDE = 8
GPAW_SETTINGS = {"mode": "lcao", "basis": "dzp", "xc": "PBE", "kpts": [1, 1, 1], "h": 0.25,
                 "spinpol": False, "occupations": {"name": "fermi-dirac", "width": 0.05},
                 "convergence": {"energy": 1e-4, "density": 1e-3}}


def is_test(frame) -> bool:
    """A frame of a defect the benchmark tests on."""
    return str(frame.info["defect"]).startswith(TEST_DEFECTS)


def split(frames: list) -> tuple[list[int], list[int], list[int]]:
    """(high-fidelity training subset, other training frames, test frames): indices into ``frames``.

    Training frames are ordered by relaxation and ionic step; the high-fidelity subset is every
    :data:`HI_STRIDE`-th of them; the others are ordered so that any prefix spreads over the
    relaxations (a bit-reversal order of their positions).
    """
    order = sorted(range(len(frames)), key=lambda i: (str(frames[i].info["run_id"]),
                                                       str(frames[i].info.get("segment", "")),
                                                       int(frames[i].info.get("ionic_step", 0))))
    train = [i for i in order if not is_test(frames[i])]
    test = [i for i in order if is_test(frames[i])]
    hi = train[::HI_STRIDE]
    rest = [i for i in train if i not in set(hi)]
    spread = sorted(range(len(rest)), key=lambda k: _bit_reverse(k, max(1, (len(rest) - 1).bit_length())))
    return hi, [rest[k] for k in spread], test


def _bit_reverse(k: int, bits: int) -> int:
    return int(format(k, f"0{bits}b")[::-1], 2)


def calculator(charge: int):
    from gpaw import GPAW, FermiDirac

    s = dict(GPAW_SETTINGS)
    s["occupations"] = FermiDirac(s["occupations"]["width"])
    s["kpts"] = tuple(s["kpts"])
    return GPAW(charge=charge, txt=None, **s)


def main() -> None:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-frames", type=int, default=40)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    frames = read(DATA, ":")
    hi, rest, _ = split(frames)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    done = {int(f.info["source_frame"]) for f in read(OUT, ":")} if OUT.exists() else set()
    todo = [i for i in hi + rest if i not in done][: max(0, a.max_frames - len(done))]
    print(f"{len(done)} labelled, {len(todo)} to go", flush=True)
    for n, i in enumerate(todo, 1):
        src = frames[i]
        atoms = src.copy()
        atoms.calc = calculator(int(src.info["charge"]))
        t0 = time.perf_counter()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        wall = time.perf_counter() - t0
        out = src.copy()
        keep = {k: v for k, v in src.info.items()
                if not k.startswith("REF_") and k not in ("energy", "stress")}
        out.info = {**keep, "functional": "PBE", "fidelity": "PBE", "aexx": 0.0, "hfscreen": 0.0,
                    "source_frame": i, "calculator": "gpaw", "gpaw_settings": json.dumps(GPAW_SETTINGS),
                    "gpaw_wall_s": round(wall, 1), "nkpts": 1, "ispin": 1, "encut": 0}
        out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
        write(OUT, out, append=True, format="extxyz")
        print(f"[{n}/{len(todo)}] frame {i} {src.info['defect']} q={int(src.info['charge']):+d}: "
              f"E {energy:.3f} eV, {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
