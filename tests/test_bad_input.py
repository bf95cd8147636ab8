"""Each kind of bad input: one clear line on stderr, exit code 2, nothing stored lost."""

import sqlite3

import pytest

from defectml.cli import main

EMT = ["--model", "emt", "--min-length", "7", "--oxi", "Cu=2", "--distortions", "-0.4",
       "--quiet"]


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("content", [None, "", "garbage\n"])
def test_bad_structure_file(tmp_path, capsys, content):
    path = tmp_path / "host.cif"
    if content is not None:
        path.write_text(content)
    code, err = _run(capsys, "search", str(path), "--defect", "v_Cu", "--out", str(tmp_path / "o"), *EMT)
    assert code == 2 and len(err) == 1 and err[0].startswith("defectml: error:")


def test_defect_species_not_in_host(tmp_path, capsys, copper_cif):
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Zn",
                     "--out", str(tmp_path / "o"), *EMT)
    assert code == 2 and err == ["defectml: error: cannot make v_Zn: Zn is not in the host "
                                 "(elements ['Cu'])"]


def test_element_not_covered_by_model(tmp_path, capsys, cdte):
    cif = tmp_path / "CdTe.cif"
    cdte.to(filename=str(cif))
    code, err = _run(capsys, "search", str(cif), "--defect", "v_Cd", "--model", "emt",
                     "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2 and len(err) == 1 and "does not cover element(s) Cd, Te" in err[0]


def test_substituent_not_covered_by_model(tmp_path, capsys, copper_cif):
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "Te_Cu",
                     "--out", str(tmp_path / "o"), *EMT)
    assert code == 2 and "does not cover element(s) Te" in err[0]


def test_unknown_model(tmp_path, capsys, copper_cif):
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--model", "nonsense",
                     "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2 and "unknown model 'nonsense'" in err[0]


def test_impossible_charge(tmp_path, capsys, copper_cif):
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--charge", "9",
                     "--out", str(tmp_path / "o"), *EMT)
    assert code == 2 and len(err) == 1 and "impossible charge +9 for v_Cu" in err[0]


def test_unparsable_charge(tmp_path, capsys, copper_cif):
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--charge", "one",
                     "--out", str(tmp_path / "o"), *EMT)
    assert code == 2 and "cannot parse --charge" in err[0]


def test_supercell_request_host_cannot_satisfy(tmp_path, capsys, copper_cif):
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--out",
                     str(tmp_path / "o"), "--model", "emt", "--min-length", "30",
                     "--max-atoms", "40", "--quiet")
    assert code == 2 and "no supercell" in err[0]


def test_unwritable_output_folder(tmp_path, capsys, copper_cif):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu",
                     "--out", str(blocker / "run"), *EMT)
    assert code == 2 and len(err) == 1 and "cannot create output folder" in err[0]


def test_corrupted_database_is_reported_and_left_untouched(tmp_path, capsys, copper_cif):
    out = tmp_path / "run"
    out.mkdir()
    db = out / "results.db"
    junk = b"SQLite format 3\x00" + b"\x17" * 4000
    db.write_bytes(junk)
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--out", str(out),
                     *EMT)
    assert code == 2 and len(err) == 1 and "corrupted" in err[0]
    assert db.read_bytes() == junk
    code, err = _run(capsys, "show", str(out))
    assert code == 2 and "corrupted" in err[0]


def test_non_ase_sqlite_database(tmp_path, capsys, copper_cif):
    out = tmp_path / "run"
    out.mkdir()
    con = sqlite3.connect(out / "results.db")
    con.execute("CREATE TABLE other (x)")
    con.commit()
    con.close()
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--out", str(out), *EMT)
    assert code == 2 and len(err) == 1, err
    assert "not an ASE database (no ASE 'systems' table)" in err[0] and "left untouched" in err[0], err
    con = sqlite3.connect(out / "results.db")  # and it was: no ASE tables added to someone's database
    assert {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")} == {"other"}
    con.close()


def test_show_without_results(tmp_path, capsys):
    code, err = _run(capsys, "show", str(tmp_path / "nothing"))
    assert code == 2 and "no results database" in err[0]


def test_error_after_work_keeps_finished_results(tmp_path, capsys, copper_cif):
    out = tmp_path / "run"
    assert main(["search", str(copper_cif), "--defect", "v_Cu", "--charge", "0",
                 "--out", str(out), *EMT]) == 0
    capsys.readouterr()
    from defectml import ResultStore

    before = ResultStore(out / "results.db").count(kind="relaxation")
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--charge", "12",
                     "--out", str(out), *EMT)
    assert code == 2
    assert ResultStore(out / "results.db").count(kind="relaxation") == before > 0


def test_overlapping_atoms_are_refused_before_any_work(tmp_path, capsys):
    from pymatgen.core import Lattice, Structure

    cif = tmp_path / "bad.cif"
    Structure(Lattice.cubic(3.61), ["Cu", "Cu"], [[0, 0, 0], [0.02, 0, 0]]).to(filename=str(cif))
    out = tmp_path / "o"
    code, err = _run(capsys, "search", str(cif), "--defect", "v_Cu", "--out", str(out), *EMT)
    assert code == 2 and len(err) == 1 and "overlapping atoms" in err[0] and "0.07 Å apart" in err[0]
    assert not out.exists()  # refused before a folder or database was made


def test_search_needs_defect_named(tmp_path, capsys, copper_cif):
    # --defect may be left out only with --trials-from (the folder names the defects)
    code, err = _run(capsys, "search", str(copper_cif), "--out", str(tmp_path / "o"), *EMT)
    assert code == 2 and len(err) == 1 and "--defect is required" in err[0] and "--trials-from" in err[0]
    assert not (tmp_path / "o").exists()


def test_supercell_too_large_is_refused_before_the_host_is_relaxed(tmp_path, capsys, copper_cif):
    out = tmp_path / "o"
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--min-length", "1000",
                     "--out", str(out), "--model", "emt", "--quiet")
    assert code == 2 and len(err) == 1 and "no supercell" in err[0]
    assert not out.exists()


def test_a_run_that_fails_before_storing_anything_leaves_nothing(tmp_path, capsys, copper_cif, copper):
    from ase.calculators.emt import EMT

    from defectml import search
    from defectml.errors import DefectMLError

    out = tmp_path / "o"
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--model", "nonsense",
                     "--out", str(out))
    assert code == 2 and not out.exists()

    class Broken(EMT):
        def calculate(self, *args, **kw):
            raise RuntimeError("the model broke")

    with pytest.raises(DefectMLError, match="host relaxation"):
        search(copper, "v_Cu", [0], out=out, calculator=Broken(), progress=False)
    assert not out.exists()  # the folder and results.db it made are gone again
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DefectMLError):
        search(copper, "v_Cu", [0], out=kept, calculator=Broken(), progress=False)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # a folder it did not make stays


def test_show_reads_a_finished_run_in_a_folder_it_cannot_write(emt_vacancy_run, copper_cif, capsys,
                                                                monkeypatch):
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real(p, mode))
    assert main(["show", str(emt_vacancy_run)]) == 0
    assert "v_Cu_0" in capsys.readouterr().out
    code, err = _run(capsys, "search", str(copper_cif), "--defect", "v_Cu", "--charge", "0",
                     "--model", "emt", "--out", str(emt_vacancy_run))
    assert code == 2 and len(err) == 1 and "not writable" in err[0] and "reading its results works" in err[0]


def test_no_minus_zero_in_tables():
    from defectml.search.report import signed

    assert signed(-0.00004) == "+0.000" and signed(-0.0012) == "-0.001" and signed(0.25) == "+0.250"


def test_chgnet_warnings_do_not_reach_an_api_user():
    import subprocess
    import sys

    code = ("from ase.build import bulk\nfrom defectml.models import load_model\n"
            "a = bulk('Cu', 'fcc', a=3.61, cubic=True)\na.calc = load_model('chgnet', threads=1).calculator\n"
            "a.get_forces()\nprint('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr
    assert "Warning" not in run.stderr, run.stderr
