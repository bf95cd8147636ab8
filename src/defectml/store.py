"""The results store: one ASE database (SQLite file by default, or a PostgreSQL URL).

Four kinds of row, each written from one typed record of :mod:`defectml.records` through
:meth:`ResultStore.add` (the only write path):

* ``kind="host"``: the (relaxed) host cell, its energy, oxidation states and supercell matrix;
* ``kind="defect"``: the unrelaxed defect supercell, defect site and metadata;
* ``kind="relaxation"``: one finished relaxation of one trial, ML or DFT: final structure,
  energy, forces, status and reason, level of theory, model key and reference, seed, steps, the
  starting positions and the per-frame trajectory;
* ``kind="thermo"``: a cached phonon or TI result.

The database's metadata holds the schema version (:data:`~defectml.records.SCHEMA_VERSION`).

Every row carries a content key (``host_key``, ``defect_key``, ``trial_key``) derived from the
inputs that determine it, so a rerun finds what is already done and skips it. Each relaxation is
written (and committed) the moment it finishes: killing a run loses at most the relaxations in
flight. Minima are not stored: they are recomputed from the relaxations, deterministically.

One process writes an SQLite store at a time: a writer holds an exclusive lock on
``<db>.lock`` (``flock``: the kernel drops it when the process ends, however it ends, so a killed
run never leaves a stale lock) and a second writer is refused with a message naming the first.
Readers (``show``) take no lock. A PostgreSQL server takes no file lock here: its transactions
keep rows whole, but two searches of the same defect into one database would both relax it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from defectml.errors import StoreError
from defectml.records import SCHEMA_VERSION, DefectRecord, HostRecord, Record


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=_json_default)
    digest = hashlib.sha1(text.encode()).hexdigest()
    key = digest[:16]
    if _reads_as_number(key):
        # ASE's database refuses a string value that reads as a number (all digits, or digits
        # around one 'e', about 1 key in 800): such a key could never be stored, so a letter first
        key = "k" + digest[:15]
    return key


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _json_default(obj: Any):
    if isinstance(obj, np.ndarray):
        return np.round(obj, 6).tolist()
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    raise TypeError(f"not serialisable: {type(obj).__name__}")


def is_url(target: str | Path) -> bool:
    """Whether ``target`` is a database URL (e.g. ``postgresql://...``) rather than a path."""
    return "://" in str(target)


class ResultStore:
    """An ASE database holding hosts, defects and relaxations.

    Args:
        target: Path of an SQLite file (created if missing) or a PostgreSQL URL.

    Raises:
        StoreError: if the folder is not writable or the file is not a readable ASE database.
    """

    def __init__(self, target: str | Path):
        self.target = str(target)
        self._locked = False
        # a new SQLite file seen while another process is still creating its tables: wait for it
        for attempt in range(20):
            try:
                self._open(target)
                break
            except StoreError as exc:
                if attempt == 19 or is_url(target) or not _being_created(str(exc)):
                    raise
                time.sleep(0.25)

    def _open(self, target: str | Path) -> None:
        import ase.db

        if not is_url(target):
            path = Path(target)
            if path.exists() and path.stat().st_size > 0:
                _check_sqlite(path)  # an existing store is read wherever it is (a writer checks in lock)
            else:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot create output folder {path.parent}: {exc.strerror}") from None
                if not os.access(path.parent, os.W_OK):
                    raise StoreError(f"output folder is not writable: {path.parent}")
        try:
            # No ASE lock file: a run killed mid-write would leave it behind and block the next
            # run forever; SQLite and PostgreSQL do their own locking.
            self.db = ase.db.connect(self.target, use_lock_file=False)
            self.db.count()
        except StoreError:
            raise
        except ModuleNotFoundError as exc:
            raise StoreError(
                f"cannot open {self.target}: {exc}; database servers need "
                "pip install 'defectml[postgres]'"
            ) from None
        except Exception as exc:  # noqa: BLE001 - ase/sqlite/psycopg errors
            raise StoreError(f"cannot open results database {self.target}: {exc}") from None
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.target} was written by a newer defectml (store schema {version}; this one "
                f"reads up to {SCHEMA_VERSION}): upgrade defectml to use it"
            )

    # --- schema ----------------------------------------------------------------------------
    def schema_version(self) -> int:
        """The store's schema version (an unstamped store with rows is version 1)."""
        try:
            version = (self.db.metadata or {}).get("defectml_schema")
        except Exception:  # noqa: BLE001 - a backend without metadata support
            version = None
        if version is not None:
            return int(version)
        return SCHEMA_VERSION if self.db.count() == 0 else 1

    def _stamp(self) -> None:
        """Stamp a new store, or migrate a version-1 store in place (rows gain ``theory``)."""
        version = self.schema_version()
        if version == 1:
            import logging

            n = 0
            for row in self.db.select(kind="relaxation"):
                if row.get("theory") is None:
                    fidelity = row.get("fidelity", "mlip")
                    what = "functional" if fidelity == "dft" else "weights"
                    self.db.update(row.id, theory=f"{row.get('model', fidelity)} ({what} not recorded)")
                    n += 1
            logging.getLogger("defectml").warning(
                "migrated %s from store schema 1 to %d (%d relaxations gained a level of theory); its "
                "runs stay readable, but a new search keys on the model's weights and redoes them",
                self.target, SCHEMA_VERSION, n)
        if version < SCHEMA_VERSION or "defectml_schema" not in (self.db.metadata or {}):
            self.db.metadata = {**(self.db.metadata or {}), "defectml_schema": SCHEMA_VERSION}

    # --- the writer's lock ---------------------------------------------------------------
    def lock(self) -> None:
        """Become this store's only writer (a no-op for database URLs, or when already held).

        Raises:
            StoreError: another process is writing to it (the message names that process).
        """
        if self._locked:
            return
        if not is_url(self.target):
            folder = Path(self.target).parent
            if not os.access(folder, os.W_OK):
                raise StoreError(f"output folder is not writable: {folder} (reading its results works; "
                                 "choose another --out to write)")
            _acquire(Path(self.target))
        self._locked = True
        try:
            self._stamp()
        except Exception as exc:  # noqa: BLE001 - sqlite/psycopg errors
            self.unlock()
            raise StoreError(f"cannot write to results database {self.target}: {exc}") from None

    def unlock(self) -> None:
        """Let another process write (every finished result is already committed)."""
        if self._locked:
            if not is_url(self.target):
                _release(Path(self.target))
            self._locked = False

    def __del__(self):
        try:
            self.unlock()
        except Exception:  # noqa: BLE001, S110 - at interpreter exit the kernel drops the lock anyway
            pass

    # --- generic -------------------------------------------------------------------------
    def _write(self, atoms: Atoms, energy, forces, kvp: dict, data: dict) -> int:
        self.lock()
        atoms = atoms.copy()
        if energy is not None:
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        kvp = {k: v for k, v in kvp.items() if v is not None}
        try:
            return self.db.write(atoms, key_value_pairs=kvp, data=data)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot write to results database {self.target}: {exc}") from None

    def select(self, **query) -> list:
        """Rows matching ``query`` (ASE db selection keywords)."""
        try:
            return list(self.db.select(**query))
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot read results database {self.target}: {exc}") from None

    def first(self, **query):
        """The first row matching ``query`` or ``None``."""
        rows = self.select(limit=1, **query)
        return rows[0] if rows else None

    # --- the one write path --------------------------------------------------------------
    def add(self, record: Record) -> int | None:
        """Write one record (committed at once); a host or defect already stored is not repeated.

        Returns:
            The new row's id, or ``None`` for a host/defect already there.
        """
        if isinstance(record, HostRecord) and self.first(kind="host", host_key=record.host_key):
            return None
        if isinstance(record, DefectRecord) and self.first(kind="defect", defect_key=record.defect_key):
            return None
        kvp, data = record.row()
        return self._write(record.atoms, getattr(record, "energy", None), getattr(record, "forces", None),
                           kvp, data)

    def done_trial_keys(self, settings_key: str) -> set[str]:
        """Keys of the relaxations already finished under ``settings_key``."""
        return {r.trial_key for r in self.select(kind="relaxation", settings_key=settings_key)}

    def count(self, **query) -> int:
        """Number of rows matching ``query``."""
        try:
            return self.db.count(**query)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot read results database {self.target}: {exc}") from None


_LOCKS: dict[Path, list] = {}  # lock file -> [open file, holders in this process]


def _being_created(message: str) -> bool:
    """Whether an open failed because another process is creating the tables at the same moment."""
    return any(s in message for s in ("no such table", "no tables yet", "already exists"))


def _lock_path(db: Path) -> Path:
    return db.with_name(db.name + ".lock")


def _acquire(db: Path) -> None:
    """Take the exclusive writer's lock of ``db`` for this process (shared by its stores)."""
    path = _lock_path(db).resolve()
    if path in _LOCKS:
        _LOCKS[path][1] += 1
        return
    try:
        fh = open(path, "a+")  # noqa: SIM115 - held open for as long as the lock is
    except OSError as exc:
        raise StoreError(f"cannot lock results database {db}: {exc.strerror}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StoreError(
            f"{db} is being written by {holder}; wait for it to finish (every result it "
            "finishes is kept) or choose another --out"
        ) from None
    fh.seek(0)
    fh.truncate()
    command = " ".join(["defectml", *sys.argv[1:3]])
    fh.write(f"defectml pid {os.getpid()} ({command}, since {time.strftime('%H:%M:%S')})")
    fh.flush()
    _LOCKS[path] = [fh, 1]


def _release(db: Path) -> None:
    path = _lock_path(db).resolve()
    held = _LOCKS.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _LOCKS[path]
        held[0].close()  # closing the file drops the flock


def _check_sqlite(path: Path) -> None:
    """Raise ``StoreError`` unless ``path`` is an SQLite file with ASE's tables."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(16)
        if header != b"SQLite format 3\x00":
            raise sqlite3.DatabaseError("not an SQLite file")
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            con.execute("PRAGMA quick_check").fetchone()
        finally:
            con.close()
        if not tables:
            raise sqlite3.DatabaseError("no tables yet")
        if "systems" not in tables:
            raise sqlite3.DatabaseError("no ASE 'systems' table")
    except (sqlite3.DatabaseError, OSError) as exc:
        raise StoreError(
            f"results database {path} is corrupted or not an ASE database ({exc}); "
            "it was left untouched: move it aside or choose another --out"
        ) from None
