"""What a person reads: the minima table, the JSON summary, structures and plots."""

from __future__ import annotations

import json
from pathlib import Path

from pymatgen.io.ase import AseAtomsAdaptor

from defectml.search.summary import DefectSummary
from defectml.structure_io import write_structure


def table(summaries: list[DefectSummary]) -> str:
    """A plain-text table of the unique minima of every defect and charge state."""
    lines = []
    width = max([34] + [len(m.label) for s in summaries for m in s.minima])
    for s in summaries:
        n_ok = sum(t.status == "converged" for t in s.trials)
        lines.append(f"{s.label}  ({s.model}; {len(s.trials)} trials, {n_ok} converged, "
                     f"{len(s.minima)} unique minim{'um' if len(s.minima) == 1 else 'a'})")
        lines.append(f"  {'#':>2}  {'dE (eV)':>8}  {'spread':>6}  {'minimum':<{width}} trials")
        for m in s.minima:
            names = ", ".join(_short(t) for t in m.trials)
            lines.append(f"  {m.rank:>2}  {signed(m.delta_e):>8}  {s.spread(m):>6.3f}  {m.label:<{width}} "
                         f"{names}{_trust(s, m)}")
        for m in s.minima:
            if m.identity_change:
                lines.append(f"   !  #{m.rank} is no longer the defect it started as: {m.identity_change}")
        for t, reason in s.quarantined:
            lines.append(f"   !  quarantined {t.name}: {reason}")
        polished = [t for t in s.trials if t.polish_fmax is not None]
        if polished:
            fmax = max(t.polish_fmax for t in polished)
            lines.append(f"      ranked on {len(polished)} relaxation{'s' if len(polished) > 1 else ''} "
                         f"continued to fmax {fmax:g} eV/Å (a spread is over a minimum's polished ones)")
        if not s.minima:
            lines.append("      no converged relaxation to rank")
        lines.append("")
    if summaries and not any(s.scored for s in summaries):
        lines.append("trust: not scored (one model, not a committee: a universal model cannot score "
                     "itself; `defectml loop` trains committees that do)")
    return "\n".join(lines).rstrip() + "\n"


def _trust(s: DefectSummary, m) -> str:
    t = s.trust(m)
    if t is None:
        return ""
    flag = "  UNTRUSTED" if s.untrusted(m) else ""
    return f"  [spread {t['force'] * 1000:.0f} meV/Å{flag}]"


def signed(x: float, digits: int = 3) -> str:
    """``+0.123``; a value that rounds to zero is ``+0.000``, never ``-0.000``."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"


def _short(trial: str) -> str:
    return trial.replace("Bond_Distortion_", "")


def write_outputs(summaries: list[DefectSummary], out: Path, extra: dict | None = None) -> dict:
    """Write minima structures (CIF + POSCAR), plots and ``summary.json`` under ``out``.

    Returns:
        The JSON summary written.
    """
    out.mkdir(parents=True, exist_ok=True)
    doc = {**(extra or {}), "defects": []}
    for s in summaries:
        entry = s.to_dict()
        folder = out / s.label
        for m, m_entry in zip(s.minima, entry["minima"], strict=True):
            structure = AseAtomsAdaptor.get_structure(m.atoms)
            stem = folder / "minima" / f"{m.rank:02d}_{m.trial.replace('%', 'pc')}"
            files = write_structure(structure, stem)
            m_entry["files"] = [str(f.relative_to(out)) for f in files]
        if s.trials:
            plot = plot_energy_vs_distortion(s, folder / "energy_vs_distortion.png")
            entry["plot"] = str(plot.relative_to(out)) if plot else None
        doc["defects"].append(entry)
    (out / "summary.json").write_text(json.dumps(doc, indent=2))
    (out / "summary.txt").write_text(table(summaries))
    return doc


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _trial_colour(colour: tuple, trial, polished: bool) -> tuple:
    """A trial's marker colour: its minimum's, faint where others were polished and it was not."""
    if polished and trial.polish_fmax is None:
        return (*colour[:3], 0.35)
    return colour


def _plot_distortion_trials(ax, points: list[tuple]) -> list[tuple[str, float, tuple]]:
    """Draw ``Unperturbed`` (diamond), ``Rattled`` (square) and bond distortions (circles).

    Args:
        ax: The matplotlib axes.
        points: ``(trial, energy on the plot's scale, colour)`` per ranked trial.

    Returns:
        ``(name, energy, colour)`` of the other trials (``Dimer``, ...), for
        :func:`_plot_other_trials`.
    """
    specials = []
    for t, de, colour in points:
        if t.name == "Unperturbed":
            ax.scatter(0.0, de, color=colour, marker="D", s=46, zorder=4, edgecolor="k", linewidth=0.6)
            ax.annotate("Unperturbed", (0.0, de), textcoords="offset points", xytext=(5, -11), fontsize=7)
        elif t.distortion is not None and t.name.startswith(("Bond_Distortion", "Rattled")):
            marker = "s" if t.name == "Rattled" else "o"
            ax.scatter(100 * t.distortion, de, color=colour, marker=marker, s=40, zorder=3)
            if t.name == "Rattled":
                ax.annotate("Rattled", (0.0, de), textcoords="offset points", xytext=(5, 4), fontsize=7)
        else:
            specials.append((t.name, de, colour))
    return specials


def _plot_other_trials(ax, specials: list[tuple[str, float, tuple]], right: float) -> None:
    """Draw the other trials as labelled stars, 10 % apart from ``right`` (% axis) on."""
    for k, (name, de, colour) in enumerate(specials):
        ax.scatter(right + 10 * k, de, color=colour, marker="*", s=90, zorder=3)
        ax.annotate(name, (right + 10 * k, de), textcoords="offset points", xytext=(4, 4), fontsize=8)


def _legend_handles(summary: DefectSummary, ranked: list, cmap, scale: float, unit: str,
                    polished: bool) -> list:
    """Legend entries: each minimum (up to 10) with its spread, the markers, the faint ones.

    Args:
        summary: The defect in one charge state.
        ranked: Its trials drawn (those in a minimum, with an energy).
        cmap: The minima's colour map.
        scale: Energy factor of the plot (1000 for meV).
        unit: ``meV`` or ``eV``.
        polished: Whether some trials were polished (then the others are drawn faint).

    Returns:
        The matplotlib ``Line2D`` handles.
    """
    from matplotlib.lines import Line2D

    handles = []
    for m in summary.minima[:10]:
        flag = ", untrusted" if summary.untrusted(m) else ""
        spread = summary.spread(m) * scale
        handles.append(Line2D([], [], color=cmap(m.rank % 10), marker="o", ls="",
                              label=f"#{m.rank}: {m.label} (spread {spread:.3g} {unit}{flag})"))
    handles += [Line2D([], [], color="grey", marker=mk, ls="", label=what) for mk, what in
                (("o", "bond distortion"), ("s", "Rattled (0%)"), ("D", "Unperturbed (dashed: its energy)"),
                 ("*", "other trials"))]
    if polished:
        fmax = max(t.polish_fmax for t in ranked if t.polish_fmax is not None)
        handles.append(Line2D([], [], color="grey", alpha=0.35, marker="o", ls="",
                              label=f"faint: not polished to fmax {fmax:g} eV/Å"))
    return handles


def plot_energy_vs_distortion(summary: DefectSummary, path: Path) -> Path | None:
    """ShakeNBreak-style plot: ΔE vs bond distortion, coloured by the minimum each trial fell in.

    Every marker says what it is: circles are bond distortions (at their %), the square at 0% is
    ``Rattled`` and the diamond on the dashed zero line ``Unperturbed`` (both labelled), stars to
    the right the other trials (``Dimer``, ...), each labelled. The energy axis is in meV when the
    whole range is under 0.1 eV. The legend gives each minimum's energy spread (the range of its
    relaxations' energies) and flags untrusted ones. Where some relaxations were polished to a
    tighter force threshold (:mod:`~defectml.search.polish`), the others are drawn faint: their
    energies carry the search's convergence noise.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary.minima:
        return None
    reference = summary.minima[0].energy - summary.minima[0].delta_e
    basin = {name: m.rank for m in summary.minima for name in m.trials}
    ranked = [t for t in summary.trials if t.name in basin and t.energy is not None]
    span = max((abs(t.energy - reference) for t in ranked), default=0.0)
    scale, unit = (1000.0, "meV") if span < 0.1 else (1.0, "eV")
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=120)
    polished = any(t.polish_fmax is not None for t in ranked)
    points = [(t, scale * (t.energy - reference), _trial_colour(cmap(basin[t.name] % 10), t, polished))
              for t in ranked]
    specials = _plot_distortion_trials(ax, points)
    xs = [100 * t.distortion for t in summary.trials if t.distortion is not None] or [0.0]
    _plot_other_trials(ax, specials, max(xs) + 15)
    ax.axhline(0.0, color="grey", ls="--", lw=1)
    ax.legend(handles=_legend_handles(summary, ranked, cmap, scale, unit, polished), fontsize=6.5, loc="best")
    ax.set_xlabel("Bond distortion (%)")
    ax.set_ylabel(f"Energy relative to unperturbed ({unit})")
    ax.set_title(f"{summary.label} ({summary.model})")
    return save_figure(fig, path)
