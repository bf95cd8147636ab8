"""defectml: ground-state and metastable point-defect structures with ML interatomic potentials.

The pipeline, one way: host → :func:`make_defects` → :func:`make_trials` →
:func:`relax_structures` (stored in a :class:`ResultStore`) → :func:`find_minima`.
:func:`search` runs it end to end::

    from pymatgen.core import Structure
    from defectml import search

    result = search(Structure.from_file("CdTe.cif"), "v_Cd", [0], out="runs/cdte")
    for summary in result.summaries:
        for m in summary.minima:
            print(summary.label, m.rank, round(m.delta_e, 3), m.label)
"""

from defectml.core.relax import Relaxation, relax_structures
from defectml.errors import DefectMLError, InputError, ModelError, StoreError
from defectml.models import Model, load_model, wrap_calculator
from defectml.search import SearchResult, SearchSettings, plan, search
from defectml.search.defects import Defect, make_defects
from defectml.search.distort import Trial, TrialSettings, make_trials
from defectml.search.fingerprint import SoapSettings, soap_fingerprints
from defectml.search.landscape import Minimum, RelaxedTrial, find_minima
from defectml.search.summary import DefectSummary, summarise
from defectml.store import ResultStore
from defectml.structure_io import read_structure

__version__ = "0.1.0"

__all__ = [
    "Defect", "DefectMLError", "DefectSummary", "InputError", "Minimum", "Model", "ModelError",
    "Relaxation", "RelaxedTrial", "ResultStore", "SearchResult", "SearchSettings", "SoapSettings",
    "StoreError", "Trial", "TrialSettings", "find_minima", "load_model", "make_defects",
    "make_trials", "plan", "read_structure", "relax_structures", "search", "soap_fingerprints",
    "summarise", "wrap_calculator",
]
