"""Kill a search with SIGKILL mid-way; the rerun must finish without redoing any relaxation."""

import json
import os
import signal
import subprocess
import sys
import time

from defectml import ResultStore

ARGS = ["--defect", "v_Cu", "--charge", "0", "--model", "emt", "--min-length", "10",
        "--oxi", "Cu=2", "--quiet", "--json"]


def _count(db) -> int:
    try:
        return ResultStore(db).count(kind="relaxation")
    except Exception:  # noqa: BLE001 - not created yet, or locked by the writer
        return 0


def test_kill_and_resume(tmp_path, copper_cif):
    out = tmp_path / "run"
    db = out / "results.db"
    cmd = [sys.executable, "-m", "defectml", "search", str(copper_cif), "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _count(db) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "search finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    store = ResultStore(db)
    before = {r.trial_key: (r.id, r.mtime) for r in store.select(kind="relaxation")}
    assert 3 <= len(before) < 15

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["skipped_already_done"] == len(before)
    assert doc["relaxed_this_run"] == 15 - len(before)

    rows = ResultStore(db).select(kind="relaxation")
    keys = [r.trial_key for r in rows]
    assert len(rows) == 15 and len(set(keys)) == 15  # nothing done twice
    after = {r.trial_key: (r.id, r.mtime) for r in rows}
    assert all(after[k] == v for k, v in before.items())  # nothing finished was rewritten


def test_sigterm_says_what_is_kept_and_exits_143(tmp_path, copper_cif):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "defectml", "search", str(copper_cif), "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _count(out / "results.db") < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "search finished before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "terminated (SIGTERM); finished relaxations are saved" in err
    assert "Traceback" not in err and _count(out / "results.db") >= 1


def test_a_reader_that_leaves_early_gets_no_traceback(emt_vacancy_run):
    proc = subprocess.Popen([sys.executable, "-m", "defectml", "show", str(emt_vacancy_run), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has already gone when defectml writes
    err = proc.communicate(timeout=120)[1].decode()
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_version_and_one_unique_minimum(emt_vacancy_run, capsys):
    from defectml.cli import main

    assert main(["show", str(emt_vacancy_run)]) == 0
    assert "1 unique minimum)" in capsys.readouterr().out
    try:
        main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert capsys.readouterr().out.strip() == "defectml 0.1.0"
