"""Content keys are always storable: ASE's database refuses string values that read as numbers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from ase import Atoms

from defectml.store import ResultStore, content_key


def _find_parts(numeric: bool, start: int = 0):
    """Parts whose plain sha1[:16] does (or does not) read as a number."""
    for i in range(start, start + 200_000):
        head = hashlib.sha1(json.dumps([i], sort_keys=True).encode()).hexdigest()[:16]
        try:
            float(head)
            is_num = True
        except ValueError:
            is_num = False
        if is_num == numeric:
            return [i], head
    raise AssertionError("no such parts found")


def test_a_key_that_would_read_as_a_number_gets_a_letter_and_is_stored(tmp_path):
    parts, head = _find_parts(True)
    key = content_key(*parts)
    assert key != head and key.startswith("k") and len(key) == 16
    assert content_key(*parts) == key  # still deterministic
    store = ResultStore(tmp_path / "r.db")
    store.db.write(Atoms("H", positions=np.zeros((1, 3))), key_value_pairs={"trial_key": key})
    assert store.first(trial_key=key) is not None
    store.unlock()


def test_other_keys_are_unchanged():
    parts, head = _find_parts(False)
    assert content_key(*parts) == head
