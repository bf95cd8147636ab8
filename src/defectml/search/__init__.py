"""The search stage: host → defects → trials → relaxations (stored) → minima → summaries.

One module per step: :mod:`.defects` (which defects, which supercell), :mod:`.distort` (trial
structures), :mod:`.engine` (where relaxations run) and :mod:`.relax` (the one relaxer),
:mod:`.fingerprint` and :mod:`.landscape` (SOAP-unique minima), :mod:`.summary` (per defect and
charge, from the store), :mod:`.report` (tables, plots, files); :mod:`.alloy` for disordered
hosts; :mod:`.pipeline` ties them together as :func:`search`.
"""

from defectml.search.pipeline import DefectCharge, SearchResult, SearchSettings, plan, search

__all__ = ["DefectCharge", "SearchResult", "SearchSettings", "plan", "search"]
