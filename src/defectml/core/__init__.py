"""The ground floor: generic machinery every stage imports from below, knowing nothing of defects.

``relax`` (the one relaxer: batched, checked, every frame recorded), ``optimizers`` (the steps it
can take), ``engine`` (where relaxations run: this process, a process pool, Dask) and ``readers``
(VASP outputs, trajectories, ShakeNBreak energies and trial-folder names). ``search/``,
``dft/``, ``train/`` and ``thermo/`` import from here; nothing here imports from them.
"""
