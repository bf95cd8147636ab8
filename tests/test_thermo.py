"""Finite-temperature thermodynamics: each term checked against a case with a known answer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.neighborlist import neighbor_list
from ase.units import kB

from defectml.cli import main
from defectml.errors import DefectMLError
from defectml.thermo import (
    concentration,
    configurational_entropy,
    effective_formation_energy,
    formation_energy,
    orientational_degeneracy,
    populations,
    spin_degeneracy,
)
from defectml.thermo.electronic import band_fermi_level, effective_dos, electronic_entropy
from defectml.thermo.formation import Configuration
from defectml.thermo.integration import (
    HBAR,
    einstein_free_energy,
    frenkel_ladd,
    harmonic_reference,
    switching,
)
from defectml.thermo.vibrations import classical_free_energy, harmonic, quantum_free_energy


# --- harmonic crystal: the known answer for thermodynamic integration ------------------------------
def spring_hessian(atoms: Atoms, kappa: float = 1.5, cutoff: float = 3.0) -> np.ndarray:
    """Translationally invariant Hessian of nearest-neighbour springs (linearised)."""
    i, j, d = neighbor_list("ijD", atoms, cutoff)
    n = len(atoms)
    h = np.zeros((3 * n, 3 * n))
    for a, b, v in zip(i, j, d, strict=True):
        e = v / np.linalg.norm(v)
        blk = kappa * np.outer(e, e)
        h[3 * a : 3 * a + 3, 3 * b : 3 * b + 3] -= blk
        h[3 * a : 3 * a + 3, 3 * a : 3 * a + 3] += blk
    return h


@pytest.fixture()
def harmonic_crystal():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.set_masses([63.5 if k % 2 else 112.0 for k in range(len(atoms))])  # unequal masses
    h = spring_hessian(atoms)
    x0, e0 = atoms.positions.copy(), -10.0

    def evaluate(x):
        u = (x - x0).ravel()
        return e0 + 0.5 * u @ h @ u, -(h @ u).reshape(-1, 3)

    return atoms, h, e0, evaluate


def test_ti_reproduces_harmonic_free_energy(harmonic_crystal):
    atoms, h, e0, evaluate = harmonic_crystal
    res = frenkel_ladd(
        atoms, evaluate, 300, t_final=600, repeats=4, equilibration=300, switch_steps=1500, seed=3
    )
    for t in (300, 600):
        exact = e0 + harmonic_reference(h, atoms.get_masses(), t)
        f, err = res.at(t)
        assert abs(f - exact) < 3 * err + 2e-3, (t, f, err, exact)
    assert res.dissipation < 0.05  # the switch is slow enough to be near-reversible
    # a wrong answer is caught: the Einstein reference alone is far off
    assert abs(einstein_free_energy(atoms.get_masses(), res.springs, 300) - res.free_energy) > 0.05


def test_einstein_free_energy_equal_oscillators():
    n, m, k, t = 10, 50.0, 2.0, 400.0
    f = einstein_free_energy(np.full(n, m), np.full(n, k), t)
    omega = np.sqrt(k / m)
    assert f == pytest.approx((3 * n - 3) * kB * t * np.log(HBAR * omega / (kB * t)), rel=1e-10)


def test_switching_function_ends():
    lam = switching(np.array([0.0, 0.5, 1.0]))
    assert lam[0] == 0 and lam[2] == pytest.approx(1.0) and lam[1] == pytest.approx(0.5)


# --- degeneracies ------------------------------------------------------------------------------------
def test_orientational_degeneracy_known_cases():
    assert orientational_degeneracy("Td", "C2v") == 6  # V_Cd with a Te-Te dimer in CdTe
    assert orientational_degeneracy("Td", "Td") == 1
    assert orientational_degeneracy("C3v", "Cs") == 3
    assert orientational_degeneracy("Cs", "C2v") == 0.5  # the paper's Te_i: symmetry rises
    with pytest.raises(DefectMLError):
        orientational_degeneracy("Td", "X9")


def test_spin_degeneracy_from_electron_count(cdte):
    from pymatgen.io.ase import AseAtomsAdaptor

    cell = AseAtomsAdaptor.get_atoms(cdte * (2, 2, 2))
    del cell[0]  # V_Cd: Cd has 48 electrons, so the count stays even in q = 0
    assert spin_degeneracy(cell, 0) == 1
    assert spin_degeneracy(cell, -1) == 2
    assert spin_degeneracy(cell, -2) == 1
    assert spin_degeneracy(cell, 0, magnetic_moment=2.0) == 3
    with pytest.raises(DefectMLError):
        spin_degeneracy(cell, 0, magnetic_moment=1.0)


# --- configurations, concentrations -----------------------------------------------------------------
def test_configurational_entropy_and_populations():
    p = populations(np.array([0.0, 0.0]), 500)
    assert configurational_entropy(p) == pytest.approx(kB * np.log(2))
    p = populations(np.array([0.0, 0.3]), 300, degeneracy=np.array([1, 6]))
    assert p[1] == pytest.approx(6 * np.exp(-0.3 / (kB * 300)) / (1 + 6 * np.exp(-0.3 / (kB * 300))))
    assert populations(np.array([0.0, 0.1]), 0)[0] == 1.0


def test_concentration_and_effective_formation_energy():
    t = np.array([300.0, 800.0])
    one = [Configuration("gs", 1, np.array([1.0, 1.0]))]
    c = concentration(one, t, volume=68.0)
    assert c == pytest.approx(1 / 68.0 * np.exp(-1.0 / (kB * t)) * 1e24)
    assert effective_formation_energy(c, t, 68.0, 1) == pytest.approx([1.0, 1.0])
    # two degenerate configurations at the same site count: g_eff lower by kT ln 2 (Eq. 15-16)
    two = one + [Configuration("meta", 1, np.array([1.0, 1.0]))]
    g = effective_formation_energy(concentration(two, t, 68.0), t, 68.0, 1)
    assert g == pytest.approx(1.0 - kB * t * np.log(2))


def test_formation_energy_needs_chemical_potentials():
    assert formation_energy(-100.0, -103.0, {"Cd": -1}, {"Cd": -1.0}) == pytest.approx(2.0)
    assert formation_energy(
        -100.0, -103.0, {"Cd": -1}, {"Cd": -1.0}, charge=-2, fermi_level=0.5, vbm=1.0, correction=0.1
    ) == pytest.approx(2.0 - 3.0 + 0.1)
    with pytest.raises(DefectMLError, match="--mu Cd"):
        formation_energy(-100.0, -103.0, {"Cd": -1}, {})


# --- electronic --------------------------------------------------------------------------------------
def test_electronic_entropy_two_level_system():
    # one state exactly at the Fermi level: f = 1/2, S = k ln 2 per (spin-resolved) state
    e = np.linspace(-1, 1, 20001)
    dos = np.exp(-((e / 0.002) ** 2)) / (0.002 * np.sqrt(np.pi))  # one state, narrow
    assert electronic_entropy(e, dos, 0.0, 1000) == pytest.approx(kB * np.log(2), rel=0.02)
    # gap of 2 eV around E_F: no entropy at 300 K
    gap = np.where(np.abs(e) > 0.99, 1.0, 0.0)
    assert electronic_entropy(e, gap, 0.0, 300) < 1e-12
    assert effective_dos(300) == pytest.approx(2.51e19, rel=0.01)  # N_c for m* = 1 at 300 K
    assert band_fermi_level(1.0, 300, 2.51e19) == pytest.approx(1.0, abs=1e-3)


# --- phonons on a tiny cell ---------------------------------------------------------------------------
def test_phonopy_harmonic_on_tiny_cell():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    t = np.array([50.0, 300.0, 2000.0])
    res = harmonic(atoms, EMT(), t, mesh=(1, 1, 1))
    assert res.n_imaginary == 0 and res.n_displacements == 1
    assert np.all(np.abs(res.gamma_frequencies[:3]) < 0.05)  # acoustic modes at zero
    # phonopy's Gamma-only free energy is the quantum harmonic sum over our frequencies
    assert res.free_energy[1] == pytest.approx(quantum_free_energy(res.gamma_frequencies, 300), abs=1e-4)
    # classical and quantum free energies meet at high T
    freqs = res.gamma_frequencies
    q, c = quantum_free_energy(freqs, 2000), classical_free_energy(freqs, 2000)
    assert abs(q - c) < 0.01 * abs(c)
    assert np.all(np.diff(res.free_energy) < 0)  # F decreases with T
    # a vacancy cell keeps its Oh site symmetry: phonopy needs only the symmetry-reduced displacements
    cell = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    del cell[0]
    res = harmonic(cell, EMT(), np.array([300.0]), mesh=(2, 2, 2))
    assert res.n_displacements < 3 * len(cell) / 4  # symmetry-reduced


# --- dynamics ------------------------------------------------------------------------------------------
@pytest.fixture()
def cu_vacancy():
    from ase.optimize import FIRE

    host = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    a = host.copy()
    del a[0]
    a.calc = EMT()
    FIRE(a, logfile=None).run(fmax=0.01)
    a.calc = None
    return host, a


def test_neb_vacancy_hop_and_rate(cu_vacancy):
    from ase.optimize import FIRE

    from defectml.thermo.dynamics import attempt_frequency, neb, tst_rate

    host, initial = cu_vacancy
    final = host.copy()
    final.positions[1] = host.positions[0]  # a neighbour jumps into the vacancy
    del final[0]
    final.calc = EMT()
    FIRE(final, logfile=None).run(fmax=0.01)
    final.calc = None
    res = neb(initial, final, EMT(), n_images=3, fmax=0.1)
    assert 0.2 < res.barrier < 1.5
    assert res.barrier == pytest.approx(res.reverse_barrier, abs=0.05)  # symmetric hop
    direction = res.images[1].positions - res.images[0].positions
    nu = attempt_frequency(initial, direction, EMT())
    assert 1e11 < nu < 1e14
    assert tst_rate(res.barrier, nu, 900) > tst_rate(res.barrier, nu, 300)


def test_md_analysis_and_inherent_structures(cu_vacancy):
    from defectml.thermo.dynamics import analyse_trajectory, defect_centre, inherent_structures, run_md

    host, vac = cu_vacancy
    frames = run_md(vac, EMT(), 300, 60, timestep=2.0, interval=20, seed=1)
    assert len(frames) >= 3 and all(np.isfinite(f.info["energy"]) for f in frames)
    out = analyse_trajectory(frames, host, "vacancy")
    assert out["n_hops"] == 0 and set(out["site"]) == {0}  # the vacancy stays at site 0 at 300 K
    assert all(len(d) == 12 for d in out["neighbour_distances"])  # fcc: 12 neighbours of the site
    centres = [defect_centre(f, host, "vacancy") for f in frames]
    res = inherent_structures(frames, EMT(), [vac], [host.positions[0]], centres)
    assert res["populations"][0] == 1.0


# --- the command ---------------------------------------------------------------------------------------
def test_thermo_cli_on_emt_search(emt_vacancy_run, capsys):
    run = emt_vacancy_run
    assert main(["thermo", str(run), "--T", "300,600,900", "--mesh", "2", "--quiet"]) == 0
    doc = json.loads((run / "thermo" / "v_Cu_0" / "thermo.json").read_text())
    g, c = np.array(doc["g_f_eV"]), np.array(doc["concentration_cm3"])
    cfg = doc["configurations"][0]
    assert cfg["vibrations"]["n_imaginary"] == 0 and "EMT" in cfg["vibrations"]["model"]
    assert np.all(np.diff(c) > 0)  # more vacancies when hotter
    assert g[0] == pytest.approx(
        cfg["u_f_eV"]
        + cfg["f_vib_eV"][0]
        - 300 * kB * np.log(cfg["spin_degeneracy"] * cfg["orientational_degeneracy"]),
        abs=1e-6,
    )
    assert (run / "thermo" / "v_Cu_0" / "thermo.png").exists()
    # u_f recomputed by hand: E(defect) - E(bulk) + mu_Cu with the model's own fcc Cu; in Cu the
    # bulk energy per atom is mu_Cu, so u_f = E(defect) - (N - 1) mu_Cu (a bulk cell of another size
    # is off by |mu| per atom, a flipped sign of mu by 2|mu| = 0.014 eV with EMT)
    from ase.db import connect

    from defectml.thermo.reference import elemental_mu

    n_defect = connect(run / "results.db").get(kind="defect").natoms
    mu = elemental_mu("Cu", EMT())
    assert cfg["u_f_eV"] == pytest.approx(cfg["energy_eV"] - n_defect * mu, abs=1e-3)
    assert 0.5 < cfg["u_f_eV"] < 2.0  # EMT's Cu vacancy: about 1 eV
    # a rerun takes the phonons from the store
    rows = len(list(__import__("ase.db").db.connect(run / "results.db").select(kind="thermo")))
    assert main(["thermo", str(run), "--T", "300,600,900", "--mesh", "2", "--quiet"]) == 0
    assert len(list(__import__("ase.db").db.connect(run / "results.db").select(kind="thermo"))) == rows


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vib", "bogus"], "invalid choice"),
        (["--T", "hot"], "--T must be"),
        (["--T", "-5,300"], "temperatures must be positive"),
        (["--mu", "Cd"], "--mu must look like"),
        (["--defect", "v_Zn"], "no search results for v_Zn"),
    ],
)
def test_thermo_bad_input(emt_vacancy_run, capsys, args, message):
    run = emt_vacancy_run
    with pytest.raises(SystemExit) if message == "invalid choice" else _nothing():
        code = main(["thermo", str(run), "--vib", "none", *args, "--quiet"])
        assert code == 2
    assert message in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dynamics_cli(emt_vacancy_run, capsys):
    run = emt_vacancy_run
    assert (
        main(
            [
                "dynamics",
                str(run),
                "--defect",
                "v_Cu",
                "--T",
                "300",
                "--steps",
                "40",
                "--interval",
                "10",
                "--quench",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    doc = json.loads((run / "dynamics" / "v_Cu_0" / "dynamics.json").read_text())
    assert doc["analysis"]["n_hops"] == 0 and doc["inherent_structures"]["populations"]["0"] == 1.0
    assert (run / "dynamics" / "v_Cu_0" / "trajectory.extxyz").exists()
    assert main(["dynamics", str(run), "--defect", "v_Cu", "--neb-to", "3", "--steps", "2", "--quiet"]) == 2
    assert "--neb-to 3 is not one" in capsys.readouterr().err


def test_inherent_structure_entropy_two_level_system():
    from defectml.thermo.configurational import inherent_structure_entropy

    # two minima 0.1 eV apart: <e_IS>(T) = 0.1 p_1(T); Eq. 14 must give S(T) - S(T0) of the
    # two-level system, -k sum p ln p
    t = np.linspace(200, 1200, 401)
    p = np.array([populations(np.array([0.0, 0.1]), x) for x in t])
    e = p[:, 1] * 0.1
    s = np.array([configurational_entropy(x) for x in p])
    got = inherent_structure_entropy(t, e, s0=s[0])
    assert got[-1] == pytest.approx(s[-1], rel=1e-3)


def test_thermo_qha_route(emt_vacancy_run):
    run = emt_vacancy_run
    assert main(["thermo", str(run), "--T", "300,900", "--vib", "qha", "--mesh", "2", "--quiet"]) == 0
    doc = json.loads((run / "thermo" / "v_Cu_0" / "thermo.json").read_text())
    f = np.array(doc["configurations"][0]["f_vib_eV"])
    assert np.all(np.isfinite(f)) and f[1] < f[0]  # the vacancy's vibrational entropy raises it with T


# --- elemental references ---------------------------------------------------------------------------
@pytest.mark.parametrize("element, bond", [("Se", 2.37), ("Te", 2.83)])
def test_trigonal_chalcogen_references(element, bond):
    from defectml.thermo.reference import elemental_reference

    atoms = elemental_reference(element)  # ASE names them hcp without a basis: bulk() cannot build them
    assert len(atoms) == 3 and atoms.get_chemical_symbols() == [element] * 3
    i, d = neighbor_list("id", atoms, 3.0)
    assert np.bincount(i).tolist() == [2, 2, 2]  # helical chains: two neighbours each
    assert d.min() == pytest.approx(bond, abs=0.03)


def test_reference_not_built_here_is_a_readable_error():
    from defectml.thermo.reference import elemental_reference

    with pytest.raises(DefectMLError, match="give --mu B="):
        elemental_reference("B")
