"""One writer per store, runs chosen by key: a second writer is refused clearly, concurrent searches
leave a usable folder, and a store holding several runs never mixes them."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import EMT_VACANCY_SEARCH
from pymatgen.core import Lattice, Structure

from defectml import ResultStore
from defectml.cli import main

HOLD = """
import sys, time
from defectml.store import ResultStore
store = ResultStore(sys.argv[1])
store.lock()
print("locked", flush=True)
time.sleep(120)
"""


def _relaxation_keys(db) -> list[str]:
    return [r.trial_key for r in ResultStore(db).select(kind="relaxation")]


def test_a_second_writer_is_refused_and_nothing_is_lost(emt_vacancy_run, copper_cif, capsys):
    db = emt_vacancy_run / "results.db"
    before = _relaxation_keys(db)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        code = main(["search", str(copper_cif), *EMT_VACANCY_SEARCH, "--out", str(emt_vacancy_run)])
        err = capsys.readouterr().err
        assert code == 2 and "is being written by defectml pid" in err and f"{holder.pid}" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert main(["show", str(emt_vacancy_run)]) == 0  # readers take no lock
    finally:
        holder.kill()
        holder.wait()
    assert _relaxation_keys(db) == before
    # the holder died: its lock went with it, and the next writer goes ahead
    assert main(["search", str(copper_cif), *EMT_VACANCY_SEARCH, "--out", str(emt_vacancy_run)]) == 0
    assert _relaxation_keys(db) == before


def test_two_concurrent_searches_into_one_folder(tmp_path, copper_cif):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "defectml", "search", str(copper_cif), *EMT_VACANCY_SEARCH,
           "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for code, err in results:
        assert "Traceback" not in err
        assert code == 0 or (code == 2 and "is being written by" in err), err
    assert any(code == 0 for code, _ in results)
    keys = _relaxation_keys(out / "results.db")
    assert len(keys) == 3 and len(set(keys)) == 3  # every trial (3) once, none twice
    assert ResultStore(out / "results.db").count(kind="host") == 1
    assert main(["show", str(out)]) == 0
    assert main(["search", str(copper_cif), *EMT_VACANCY_SEARCH, "--out", str(out)]) == 0


def test_a_store_holding_another_host_is_named(emt_vacancy_run, tmp_path, capsys):
    silver = tmp_path / "Ag.cif"
    Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.09), ["Ag"], [[0, 0, 0]]).to(filename=str(silver))
    capsys.readouterr()
    args = ["search", str(silver), "--defect", "v_Ag", "--charge", "0", "--model", "emt",
            "--min-length", "5", "--no-rattled", "--distortions", "-0.3", "--out", str(emt_vacancy_run)]
    assert main(args) == 0
    assert "already holds the host(s) Cu; this run adds Ag" in capsys.readouterr().err


def test_two_runs_in_one_folder_are_chosen_by_key(emt_vacancy_run, copper_cif, capsys):
    run = emt_vacancy_run
    first = json.loads((run / "summary.json").read_text())["settings_key"]
    assert main(["search", str(copper_cif), *EMT_VACANCY_SEARCH, "--fmax", "0.02", "--out", str(run)]) == 0
    second = json.loads((run / "summary.json").read_text())["settings_key"]
    assert second != first
    capsys.readouterr()

    def shown(*args):
        assert main(["show", str(run), "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)["defects"]

    # default: the run this folder's summary.json names (the last search written here)
    assert shown() == shown("--run", second)
    assert shown("--run", first[:6])[0]["n_trials"] == 3
    # the two runs' rows are never mixed: each has its own 3 relaxations
    assert len(ResultStore(run / "results.db").select(kind="relaxation", settings_key=first)) == 3
    assert len(ResultStore(run / "results.db").select(kind="relaxation", settings_key=second)) == 3

    (run / "summary.json").unlink()
    assert main(["show", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds 2 mlip runs; choose one with --run KEY" in err and first in err and second in err
    assert main(["thermo", str(run), "--vib", "none", "--T", "300", "--quiet"]) == 2
    assert "choose one with --run KEY" in capsys.readouterr().err
    assert main(["thermo", str(run), "--vib", "none", "--T", "300", "--run", first, "--quiet"]) == 0
    assert main(["show", str(run), "--run", "ffff"]) == 2
    assert "no mlip run matches --run ffff" in capsys.readouterr().err
