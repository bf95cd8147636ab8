"""Alloy search results per composition and local environment: rows, table and plot."""

from __future__ import annotations

from pathlib import Path

from defectml.search.alloy import bond_kind
from defectml.search.report import save_figure


def alloy_rows(x: float, result) -> list[dict]:
    """One row per (environment, charge) of a search on an alloy of fraction ``x``."""
    rows = []
    for s in result.summaries:
        low = s.minima[0] if s.minima else None
        env = s.defect.split("_", 2)[-1]
        rows.append({
            "x": x, "defect": s.defect, "environment": env, "charge": s.charge,
            "n_trials": len(s.trials), "n_minima": len(s.minima),
            "lowest_delta_e_eV": round(low.delta_e, 4) if low else None,
            "lowest_label": low.label if low else None,
            "bond_kind": bond_kind(low.bonds) if low else None,
            "mixed_bond": bool(low and any(a != b for a, b, _ in low.bonds)),
        })
    return rows


def alloy_table(rows: list[dict]) -> str:
    """Plain-text table of the lowest minimum per composition and environment."""
    lines = [f"{'x':>5} {'defect (environment)':<26} {'q':>3} {'trials':>6} {'minima':>6} "
             f"{'dE (eV)':>8}  {'bond':<10} lowest minimum"]
    for r in rows:
        de = f"{r['lowest_delta_e_eV']:+.3f}" if r["lowest_delta_e_eV"] is not None else "n/a"
        lines.append(f"{r['x']:>5g} {r['defect']:<26} {r['charge']:>+3d} {r['n_trials']:>6} "
                     f"{r['n_minima']:>6} {de:>8}  {r['bond_kind'] or 'n/a':<10} "
                     f"{r['lowest_label'] or ''}")
    mixed = sum(r["mixed_bond"] for r in rows)
    lines.append("")
    lines.append(f"{len(rows)} environments; lowest minimum with a mixed bond in {mixed}")
    return "\n".join(lines) + "\n"


def plot_alloy(rows: list[dict], path: Path) -> Path | None:
    """Lowest-minimum energy (vs unperturbed) against local environment, one series per x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["lowest_delta_e_eV"] is not None]
    if not rows:
        return None
    envs = sorted({r["environment"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers = {"none": "o"}
    for x in sorted({r["x"] for r in rows}):
        sel = [r for r in rows if r["x"] == x]
        ax.plot([envs.index(r["environment"]) for r in sel],
                [r["lowest_delta_e_eV"] for r in sel], "--", lw=0.8, alpha=0.6)
        for r in sel:
            ax.scatter(envs.index(r["environment"]), r["lowest_delta_e_eV"],
                       marker=markers.get(r["bond_kind"], "*" if r["mixed_bond"] else "s"),
                       s=60, label=f"x={x:g}" if r is sel[0] else None)
    ax.set_xticks(range(len(envs)))
    ax.set_xticklabels(envs, rotation=30)
    ax.set_xlabel("first-shell environment of the defect site")
    ax.set_ylabel("lowest minimum vs unperturbed (eV)")
    ax.set_title("o: no new bond, s: homo-element bond, *: mixed bond", fontsize=8)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
