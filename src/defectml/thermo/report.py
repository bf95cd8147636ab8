"""Tables and plots of g_f(T), its terms and the concentration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ase.units import kB

from defectml.thermo.freeenergy import ThermoResult


def table(r: ThermoResult, every: int = 1) -> str:
    """Text table: the terms of the ground state, the configurational sum and c(T)."""
    gs = r.configs[0]
    anh = r.g_f_anh is not None
    head = (
        f"{'T/K':>6} {'u_f':>8} {'f_vib':>8} {'-Ts_spin':>8} {'-Ts_or':>8} {'-Ts_conf':>8} {'-Ts_el':>8} "
        f"{'g_f':>8} {'c/cm-3':>10}" + (f" {'g_f(TI)':>8} {'c(TI)':>10}" if anh else "")
    )
    lines = [head]
    for i in range(0, len(r.temperatures), every):
        t = r.temperatures[i]
        row = (
            f"{t:6.0f} {gs.u_f:8.3f} {gs.f_vib[i]:8.3f} {-kB * t * np.log(gs.spin):8.3f} "
            f"{-kB * t * np.log(gs.orientational):8.3f} {-t * r.s_conf[i]:8.3f} {-t * r.s_el[i]:8.3f} "
            f"{r.g_f[i]:8.3f} {r.concentration[i]:10.3e}"
        )
        if anh:
            row += f" {r.g_f_anh[i]:8.3f} {r.concentration_anh[i]:10.3e}"
        lines.append(row)
    return "\n".join(lines) + "\n"


def plot(r: ThermoResult, path: Path) -> Path | None:
    """Two panels: each term and g_f vs T; concentration vs T (log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    from defectml.search.report import save_figure

    t = r.temperatures
    gs = r.configs[0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(t, gs.f_vib, label="f_vib (harmonic)")
    a.plot(t, -kB * t * np.log(gs.spin) * np.ones_like(t), label="-T s_spin")
    a.plot(t, -kB * t * np.log(gs.orientational) * np.ones_like(t), label="-T s_orient")
    a.plot(t, -t * r.s_conf, label="-T s_conf")
    if np.any(r.s_el):
        a.plot(t, -t * r.s_el, label="-T s_el")
    a.plot(t, r.g_f - gs.u_f, "k", lw=2, label="g_f - u_f (harmonic route)")
    if r.g_f_anh is not None:
        a.plot(t, r.g_f_anh - gs.u_f, "k--", lw=2, label="g_f - u_f (TI route)")
    a.set_xlabel("T (K)")
    a.set_ylabel("eV")
    a.set_title(f"{r.label} ({r.model}); u_f = {gs.u_f:.2f} eV")
    a.legend(fontsize=7)
    b.semilogy(t, r.concentration, "k", label="harmonic route")
    static = r.concentration * np.exp((r.g_f - gs.u_f) / (kB * t))
    b.semilogy(t, static, "0.6", label="u_f only (0 K approximation)")
    if r.concentration_anh is not None:
        b.semilogy(t, r.concentration_anh, "k--", label="TI route")
    b.set_xlabel("T (K)")
    b.set_ylabel("concentration (cm$^{-3}$)")
    b.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def write(r: ThermoResult, out: Path) -> dict:
    """thermo.json, thermo.md and thermo.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    doc = r.to_dict()
    (out / "thermo.json").write_text(json.dumps(doc, indent=2))
    md = [f"# {r.label}: formation free energy ({r.model})", "", "```", table(r).rstrip(), "```", ""]
    md += [
        f"- {c.name}: {c.label}, U - U_gs = {c.energy - r.configs[0].energy:+.3f} eV, "
        f"Omega_spin {c.spin}, Omega_orient {c.orientational:g}"
        for c in r.configs
    ]
    md += [f"- note: {n}" for n in r.notes]
    (out / "thermo.md").write_text("\n".join(md) + "\n")
    plot(r, out / "thermo.png")
    return doc
