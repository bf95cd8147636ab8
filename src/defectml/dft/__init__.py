"""The DFT stage: what goes to DFT and what comes back.

:mod:`.shortlist` picks the minima worth a DFT relaxation (and can relax them with an ASE DFT
calculator), :mod:`.inputs` writes VASP, Quantum ESPRESSO and CP2K inputs and ShakeNBreak-style
trial folders, :mod:`.ingest` reads DFT results into the store, :mod:`.evaluate` sets a search
against them.
"""
