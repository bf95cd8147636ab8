"""`defectml search HOST --trials-from SNB_DIR`: a ShakeNBreak folder's POSCARs as the trials.

A small ShakeNBreak folder is built here from fcc Cu (EMT relaxes it in seconds); the real MgO
Mg_O folder of ``../shared/data`` is only read (its 216-atom relaxations are too slow for a test).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.io import read, write

from defectml import ResultStore, SearchSettings, TrialSettings, search
from defectml.cli import main
from defectml.search import plan
from defectml.search.distort import distort_bonds, mc_rattle, neighbours_by_distance

MGO = Path(__file__).resolve().parents[2] / "shared" / "data" / "snb-mgo-mg_o"
EMT = ["--model", "emt", "--quiet"]


def _cu_supercell():
    """32-atom fcc Cu (2x2x2 conventional) and the index of the atom at its centre."""
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    frac = cell.get_scaled_positions() - 0.5
    return cell, int(np.argmin(np.linalg.norm(frac - np.round(frac), axis=1)))


def write_snb_folder(root: Path, defect: str = "v_Cu", charges=(0, -1), one_based: bool = False,
                     meta_per_charge: bool = False) -> Path:
    """A ShakeNBreak-style folder: Unperturbed, -30% (2 neighbours), 0.0% (Rattled), a _High_Energy.

    ``defect``: ``v_Cu`` (the centre atom removed) or ``Ag_Cu`` (it replaced by Ag). The
    metadata is ShakeNBreak's (``unique_site``, per-charge ``distorted_atoms``), 0-based as the
    current ShakeNBreak writes it or 1-based as older versions did.
    """
    cell, centre = _cu_supercell()
    site = cell.positions[centre].copy()
    unique_site = cell.get_scaled_positions()[centre].tolist()
    if defect == "v_Cu":
        del cell[centre]
        index = None
    else:
        cell[centre].symbol = "Ag"
        index = centre
    order, _ = neighbours_by_distance(cell, site, exclude=index)
    near = tuple(int(i) for i in order[:2])
    frozen = near + ((index,) if index is not None else ())
    metadata = {"distortion_parameters": {"bond_distortions": [-0.3, 0.0, 0.2],
                                          "mc_rattle_parameters": {"stdev": 0.25}},
                "defects": {defect: {"unique_site": unique_site, "charges": {}}}}
    for q in charges:
        folder = root / (f"{defect}_{q:+d}" if q else f"{defect}_0")
        trials = {
            "Unperturbed": cell.copy(),
            "Bond_Distortion_-30.0%": mc_rattle(distort_bonds(cell, site, near, -0.3), 0.25, 2.0,
                                                seed=70 + q, frozen=frozen),
            "Bond_Distortion_0.0%": mc_rattle(cell, 0.25, 2.0, seed=100 + q,
                                              frozen=() if index is None else (index,)),
            "Bond_Distortion_20.0%_High_Energy": distort_bonds(cell, site, near, 0.2),
        }
        for name, atoms in trials.items():
            (folder / name).mkdir(parents=True)
            write(folder / name / "POSCAR", atoms, format="vasp", direct=True)
        entry = {"num_nearest_neighbours": 2,
                 "distorted_atoms": [[i + one_based, "Cu"] for i in near]}
        metadata["defects"][defect]["charges"][str(q)] = entry
        if meta_per_charge:
            own = json.loads(json.dumps(metadata))
            own["defects"][defect]["charges"] = {str(q): entry}
            (folder / "distortion_metadata.json").write_text(json.dumps(own))
    if not meta_per_charge:
        (root / "distortion_metadata.json").write_text(json.dumps(metadata))
    return root


@pytest.fixture
def snb(tmp_path) -> Path:
    return write_snb_folder(tmp_path / "snb")


def _run(capsys, *argv) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_stored_starts_are_the_poscars_bit_for_bit(tmp_path, copper_cif, snb, capsys):
    out = tmp_path / "run"
    code, _ = _run(capsys, "search", str(copper_cif), "--trials-from", str(snb), "--out", str(out), *EMT)
    assert code == 0
    rows = ResultStore(out / "results.db").select(kind="relaxation")
    assert sorted((r.defect, r.charge_state, r.trial) for r in rows) == sorted(
        ("v_Cu", q, t) for q in (0, -1) for t in ("Unperturbed", "Rattled", "Bond_Distortion_-30.0%"))
    for r in rows:
        folder = snb / (f"v_Cu_{r.charge_state:+d}" if r.charge_state else "v_Cu_0")
        name = "Bond_Distortion_0.0%" if r.trial == "Rattled" else r.trial
        poscar = read(folder / name / "POSCAR", format="vasp")
        start = np.asarray(r.data["initial_positions"])
        assert start.dtype == np.float64 and np.array_equal(start, poscar.positions)
        assert np.array_equal(r.toatoms().cell.array, poscar.cell.array)
        assert r.toatoms().get_chemical_symbols() == poscar.get_chemical_symbols()
        assert r.data["source"] == str(folder / name / "POSCAR")
        expected = {"Unperturbed": None, "Rattled": 0.0, "Bond_Distortion_-30.0%": -0.3}[r.trial]
        assert r.get("distortion") == expected  # ASE's database leaves a None out
        assert r.status == "converged"
    # the -30% trial's distorted atoms are the metadata's, and the defect row is the POSCAR's cell
    bonded = next(r for r in rows if r.trial == "Bond_Distortion_-30.0%")
    meta = json.loads((snb / "distortion_metadata.json").read_text())
    assert bonded.data["distorted_indices"] == [i for i, _ in meta["defects"]["v_Cu"]["charges"]["0"]
                                                ["distorted_atoms"]]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted((d["defect"], d["charge"], d["n_trials"]) for d in summary["defects"]) == [
        ("v_Cu", -1, 3), ("v_Cu", 0, 3)]
    assert summary["defects"][0]["supercell"]["atoms"] == 31
    assert any("_High_Energy" in note for note in summary["dropped_trials"]["v_Cu_0"])
    assert (out / "report.html").exists()
    settings = yaml.safe_load((out / "settings.yaml").read_text())
    assert settings["trials_from"] == str(snb.resolve())


def test_rerun_and_config_resume_and_keys_differ_from_generated(tmp_path, copper_cif, snb, capsys):
    from defectml.structure_io import read_structure

    copper = read_structure(copper_cif)  # the host exactly as the CLI reads it
    out = tmp_path / "run"
    settings = SearchSettings(model="emt", trials_from=str(snb))
    first = search(copper, "all", None, out=out, settings=settings, progress=False)
    assert first.relaxed == 6 and first.skipped == 0
    again = search(copper, "all", None, out=out, settings=settings, progress=False)
    assert again.relaxed == 0 and again.skipped == 6 and again.settings_key == first.settings_key
    # the settings file the CLI writes back reruns it: nothing left to do
    code, _ = _run(capsys, "search", str(copper_cif), "--trials-from", str(snb), "--out", str(out), *EMT)
    assert code == 0
    code, _ = _run(capsys, "search", str(copper_cif), "--config", str(out / "settings.yaml"))
    assert code == 0
    store = ResultStore(out / "results.db")
    assert store.count(kind="relaxation") == 6
    # --charge picks folders; a changed POSCAR is a new start, relaxed anew
    only = search(copper, "v_Cu", [0], out=out, settings=settings, progress=False)
    assert only.relaxed == 0 and [s.label for s in only.summaries] == ["v_Cu_0"]
    poscar = snb / "v_Cu_0" / "Bond_Distortion_-30.0%" / "POSCAR"
    moved = read(poscar, format="vasp")
    moved.positions[5] += 0.05
    write(poscar, moved, format="vasp", direct=True)
    changed = search(copper, "all", None, out=out, settings=settings, progress=False)
    assert changed.relaxed == 3 and changed.skipped == 3
    # generated trials of the same names and supercell are another run: nothing shared
    generated = search(copper, "v_Cu", [0], out=out, progress=False,
                       settings=SearchSettings(model="emt", min_length=7.0))
    assert generated.settings_key != first.settings_key and generated.skipped == 0
    keys = [r.trial_key for r in ResultStore(out / "results.db").select(kind="relaxation")]
    assert len(keys) == len(set(keys)) == 9 + generated.relaxed


def test_substitution_atom_found_and_one_based_metadata(tmp_path, copper):
    root = write_snb_folder(tmp_path / "snb", defect="Ag_Cu", charges=(0,), one_based=True,
                            meta_per_charge=True)
    (item,) = plan(copper, "all", None, SearchSettings(model="emt", trials_from=str(root)))
    d = item.defect
    unperturbed = read(root / "Ag_Cu_0" / "Unperturbed" / "POSCAR", format="vasp")
    assert d.kind == "substitution" and unperturbed[d.defect_index].symbol == "Ag"
    assert np.allclose(d.site, unperturbed.positions[d.defect_index])
    assert d.site_symmetry == "Oh" and d.multiplicity == 1 and len(d.supercell) == 32
    assert [t.name for t in item.trials] == ["Unperturbed", "Rattled", "Bond_Distortion_-30.0%"]
    meta = json.loads((root / "Ag_Cu_0" / "distortion_metadata.json").read_text())
    listed = [i - 1 for i, _ in meta["defects"]["Ag_Cu"]["charges"]["0"]["distorted_atoms"]]
    assert list(item.trials[2].distorted_indices) == listed  # 1-based site numbers told apart
    assert item.notes == []  # the distortions are centred on the defect


def test_generate_output_round_trips(tmp_path, copper_cif):
    """`defectml generate`'s folders (its own metadata) come back as the trials it planned."""
    from defectml.structure_io import read_structure

    args = ["--defect", "v_Cu", "--charge", "0", "--min-length", "7", "--oxi", "Cu=2",
            "--distortions", "-0.4,0.3"]
    assert main(["generate", str(copper_cif), *args, "--out", str(tmp_path / "t"), "--quiet"]) == 0
    host = read_structure(copper_cif)
    settings = SearchSettings(min_length=7.0, oxidation_states={"Cu": 2},
                              trials=TrialSettings(distortions=(-0.4, 0.3)))
    (planned,) = plan(host, "v_Cu", [0], settings, reference=host)
    (read_back,) = plan(host, "all", None, SearchSettings(oxidation_states={"Cu": 2},
                                                          trials_from=str(tmp_path / "t")))
    assert [t.name for t in read_back.trials] == [t.name for t in planned.trials]
    for mine, back in zip(planned.trials, read_back.trials, strict=True):
        assert (back.seed, back.distortion, back.distorted_indices) == (
            mine.seed, mine.distortion, mine.distorted_indices)
        delta = back.atoms.get_scaled_positions() - mine.atoms.get_scaled_positions()
        assert np.abs(delta - np.round(delta)).max() < 1e-6
    assert read_back.defect.defect_index is None and np.allclose(read_back.defect.site, planned.defect.site)
    assert read_back.defect.oxi_change == planned.defect.oxi_change == -2


def _break(root: Path, how: str) -> tuple[Path, list[str]]:
    """A broken --trials-from folder (or option) and the path its error must name."""
    if how == "no folder":
        return root / "missing", [str(root / "missing")]
    write_snb_folder(root)
    if how == "no charge folders":
        empty = root / "empty"
        empty.mkdir()
        return empty, [str(empty)]
    if how == "no POSCARs":
        for p in (root / "v_Cu_0").rglob("POSCAR"):
            p.unlink()
        return root, [str(root / "v_Cu_0")]
    if how == "no metadata":
        (root / "distortion_metadata.json").unlink()
        return root, [str(root / "v_Cu_-1"), "no distortion_metadata.json"]
    if how == "defect not in host":
        (root / "v_Cu_0").rename(root / "v_Zn_0")
        return root, [str(root / "v_Zn_0"), "Zn is not in the host"]
    if how == "no site for the defect":
        meta = json.loads((root / "distortion_metadata.json").read_text())
        meta["defects"] = {}
        (root / "distortion_metadata.json").write_text(json.dumps(meta))
        return root, ["distortion_metadata.json", "v_Cu"]
    if how == "another lattice":
        poscar = root / "v_Cu_0" / "Unperturbed" / "POSCAR"
        atoms = read(poscar, format="vasp")
        atoms.set_cell(atoms.cell * 1.2, scale_atoms=True)
        write(poscar, atoms, format="vasp", direct=True)
        return root, [str(poscar), "no supercell of the host"]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no folder", "no charge folders", "no POSCARs", "no metadata",
                                 "defect not in host", "no site for the defect", "another lattice"])
def test_bad_folder_is_one_line_naming_the_path(tmp_path, copper_cif, capsys, how):
    folder, named = _break(tmp_path / "snb", how)
    out = tmp_path / "run"
    code, err = _run(capsys, "search", str(copper_cif), "--trials-from", str(folder), "--out", str(out),
                     *EMT)
    assert code == 2 and len(err) == 1 and err[0].startswith("defectml: error:"), err
    assert all(part in err[0] for part in named), err
    assert not (out / "results.db").exists()


@pytest.mark.parametrize(("option", "says"), [
    (["--defect", "v_Zn"], "Zn is not in the host"),
    (["--defect", "Ag_Cu"], "no Ag_Cu_<charge>/ folder (defects there: v_Cu)"),
    (["--charge", "2"], "no folder for charge +2 (charges there: -1, 0)"),
])
def test_filter_naming_what_is_not_there(tmp_path, copper_cif, snb, capsys, option, says):
    code, err = _run(capsys, "search", str(copper_cif), "--trials-from", str(snb), *option,
                     "--out", str(tmp_path / "run"), *EMT)
    assert code == 2 and len(err) == 1 and says in err[0], err


def test_defect_still_required_without_trials_from(tmp_path, copper_cif, capsys):
    code, err = _run(capsys, "search", str(copper_cif), "--out", str(tmp_path / "run"), *EMT)
    assert code == 2 and len(err) == 1 and "--defect is required" in err[0]


@pytest.mark.skipif(not MGO.exists(), reason="shared MgO ShakeNBreak data not present")
def test_real_mgo_folder_is_read_as_shakenbreak_made_it():
    from defectml.dft.ingest import read_snb_energies
    from defectml.structure_io import read_structure

    host = read_structure(MGO / "MgO_bulk_relaxed_CONTCAR")
    items = plan(host, "all", None, SearchSettings(trials_from=str(MGO)))
    by_q = {it.charge: it for it in items}
    assert sorted(by_q) == [0, 1, 2, 3, 4] and {it.label for it in items} == {
        "Mg_O_0", "Mg_O_+1", "Mg_O_+2", "Mg_O_+3", "Mg_O_+4"}
    bonds = [f"Bond_Distortion_{x:.1f}%" for x in (-40, -30, -20, -10, 10, 20, 30, 40, 50, 60)]
    for q in (0, 1):  # -50% was abandoned (_High_Energy) at these charges; -60% never made
        assert [t.name for t in by_q[q].trials] == ["Unperturbed", "Rattled", *bonds]
        assert by_q[q].dropped == ["Bond_Distortion_-50.0%_High_Energy: abandoned by ShakeNBreak "
                                   "(no DFT energy to replay)"]
    for q in (2, 3):
        assert [t.name for t in by_q[q].trials] == ["Unperturbed", "Rattled", "Bond_Distortion_-50.0%",
                                                    *bonds]
    assert [t.name for t in by_q[4].trials] == ["Unperturbed", "Rattled"]
    # the trials are exactly the ones the DFT yaml has energies for (what a replay answers)
    for q, it in by_q.items():
        label = it.label
        assert {t.name for t in it.trials} == set(read_snb_energies(MGO / label / f"{label}.yaml")), q
    # the defect: the Mg on the O site at the metadata's unique_site, in the POSCARs' own cell
    meta = json.loads((MGO / "distortion_metadata.json").read_text())
    d = by_q[0].defect
    unperturbed = read(MGO / "Mg_O_0" / "Unperturbed" / "POSCAR", format="vasp")
    assert d.kind == "substitution" and d.defect_index == 108 and unperturbed[108].symbol == "Mg"
    assert np.allclose(d.site, np.asarray(meta["defects"]["Mg_O"]["unique_site"]) @ unperturbed.cell.array)
    assert d.site_symmetry == "Oh" and d.multiplicity == 1 and d.oxi_change == 4
    assert len(d.supercell) == 216 and abs(round(np.linalg.det(d.sc_matrix))) == 108
    # every start is its POSCAR, bit for bit; distortions as the names say
    for t in by_q[0].trials:
        folder = "Bond_Distortion_0.0%" if t.name == "Rattled" else t.name
        poscar = read(MGO / "Mg_O_0" / folder / "POSCAR", format="vasp")
        assert np.array_equal(t.atoms.positions, poscar.positions)
        assert np.array_equal(t.atoms.cell.array, poscar.cell.array)
    assert {t.name: t.distortion for t in by_q[0].trials}["Bond_Distortion_-40.0%"] == -0.4
    assert [t.distortion for t in by_q[0].trials[:2]] == [None, 0.0]
    # the metadata's 1-based distorted atoms (110, 141, 143, 167) are the O atoms that moved; they
    # surround atom 1, a Mg on its own site, not the antisite: the reader says so
    assert by_q[0].trials[2].distorted_indices == (109, 140, 142, 166)
    assert "centred on atom 1 (Mg)" in by_q[0].notes[0]
