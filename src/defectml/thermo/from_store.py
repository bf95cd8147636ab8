"""Run the free-energy terms for the defects of a finished search (the store is the input)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ase.build import make_supercell

from defectml.errors import DefectMLError
from defectml.landscape import local_symmetry
from defectml.models import load_model
from defectml.store import ResultStore
from defectml.summary import summarise
from defectml.thermo.freeenergy import ThermoResult, ThermoSettings, exchanged_atoms, formation_free_energy
from defectml.thermo.reference import elemental_mu


def thermo_from_store(
    store: ResultStore, settings: ThermoSettings, *, defect: str | None = None, charge: int | None = None,
    model: str | None = None, log: Callable[[str], None] = print,
) -> list[ThermoResult]:
    """g_f(T) of every (or the selected) defect/charge of the search in ``store``.

    Missing chemical potentials are taken as the element-rich limit of the model's own relaxed
    elemental phase (ASE reference state), and said so.
    """
    summaries = [s for s in summarise(store, fidelity="mlip")
                 if (defect is None or s.defect == defect) and (charge is None or s.charge == charge)]
    if not summaries:
        raise DefectMLError(f"no search results for {defect or 'any defect'}"
                            f"{'' if charge is None else f' in charge state {charge:+d}'} in {store.target}")
    name = model or summaries[0].model
    m = load_model(name)
    results = []
    for s in summaries:
        row = next(r for r in store.select(kind="defect") if r.defect == s.defect)
        host_row = store.first(kind="host", host_key=row.host_key)
        host = host_row.toatoms()
        bulk = make_supercell(host, np.asarray(row.data["sc_matrix"]))
        e_bulk = float(host_row.energy) * len(bulk) / len(host)
        defect_atoms = row.toatoms()
        mu = dict(settings.mu)
        for el in exchanged_atoms(defect_atoms, bulk):
            if el not in mu:
                mu[el] = elemental_mu(el, m.calculator)
                log(f"mu_{el} = {mu[el]:.3f} eV/atom: {el}-rich limit from {name}'s relaxed elemental "
                    "phase (give --mu for other conditions)")
        # Orientational degeneracy compares like with like: the site's symmetry in the unrelaxed
        # defect supercell (a supercell lattice can itself lower the primitive-cell site symmetry).
        site_sym = local_symmetry(defect_atoms, np.asarray(row.data["site"]), row.data["defect_index"])
        if site_sym != row.data["site_symmetry"]:
            log(f"note: the {s.defect} supercell lowers the site symmetry {row.data['site_symmetry']} to "
                f"{site_sym}; orientational degeneracies are counted within the supercell")
        st = ThermoSettings(**{**settings.__dict__, "mu": mu})
        results.append(formation_free_energy(
            s, defect_atoms, bulk, e_bulk, site_symmetry=site_sym,
            multiplicity=float(row.data["multiplicity"]), cell_volume=float(host.get_volume()),
            calculator=m.calculator, model=m.version, settings=st, store=store, log=log))
    return results
