"""One self-contained HTML page per run: what a scientist opens first (``report.html``).

Per defect and charge state: every warning (quarantined trials, a charge-blind model on charged
cells, identity changes, untrusted minima), the minima table, an interactive energy-vs-distortion
plot and a 3D view of each minimum's defect neighbourhood (the defect site marked, new like-ion
bonds drawn). Then whatever else the run folder holds: DFT evaluation, thermodynamics, the
active loop's rounds. plotly's JavaScript is embedded once, so the file opens offline.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from defectml.search.summary import DefectSummary

#: Å around the defect shown in the 3D views.
VIEW_RADIUS = 5.0
#: Minima per defect given a 3D view.
MAX_VIEWS = 4

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.4em 0.8em; margin: 0.5em 0; }
.meta { color: #666; font-size: 0.9em; } .views { display: flex; flex-wrap: wrap; gap: 8px; }
.untrusted { color: #b00; font-weight: bold; } pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
"""

ELEMENT_COLOURS = {"O": "#e0301e", "N": "#3050f8", "C": "#555555", "S": "#d8c020", "Se": "#b07020",
                   "Te": "#9a6fb0", "Cd": "#ffd98f", "Zn": "#7d80b0", "Mg": "#5ad15a", "Ga": "#c28f8f",
                   "Si": "#f0c8a0", "Cu": "#c88033", "Sr": "#00ff27", "Ti": "#bfc2c7", "H": "#cccccc"}


def _colour(symbol: str) -> str:
    return ELEMENT_COLOURS.get(symbol, "#8fa0b0")


def _esc(x) -> str:
    return html.escape(str(x))


def _figure_html(fig, first: list[bool]) -> str:
    """A plotly figure as a <div>; the first one on the page carries plotly.js itself."""
    out = fig.to_html(full_html=False, include_plotlyjs=first[0], config={"displaylogo": False})
    first[0] = False
    return out


def energy_figure(s: DefectSummary):
    """Interactive ΔE vs bond distortion, one colour per minimum, every point named on hover."""
    import plotly.graph_objects as go

    reference = s.minima[0].energy - s.minima[0].delta_e
    basin = {name: m.rank for m in s.minima for name in m.trials}
    ranked = [t for t in s.trials if t.name in basin and t.energy is not None]
    span = max((abs(t.energy - reference) for t in ranked), default=0.0)
    scale, unit = (1000.0, "meV") if span < 0.1 else (1.0, "eV")
    xs = [100 * t.distortion for t in ranked if t.distortion is not None] or [0.0]
    right = max(xs) + 15
    fig = go.Figure()
    for m in s.minima:
        pts = [t for t in ranked if basin[t.name] == m.rank]
        x, specials = [], 0
        for t in pts:
            if t.name == "Unperturbed":
                x.append(0.0)
            elif t.distortion is not None and t.name.startswith(("Bond_Distortion", "Rattled")):
                x.append(100 * t.distortion)
            else:
                x.append(right + 10 * specials)
                specials += 1
        symbols = ["diamond" if t.name == "Unperturbed" else "square" if t.name == "Rattled" else
                   "circle" if t.name.startswith("Bond_Distortion") else "star" for t in pts]
        fig.add_trace(go.Scatter(
            x=x, y=[scale * (t.energy - reference) for t in pts], mode="markers+text",
            text=["" if t.name.startswith("Bond") else t.name for t in pts],
            textposition="top center", marker={"size": 10, "symbol": symbols},
            name=f"#{m.rank}: {m.label}", hovertext=[t.name for t in pts], hoverinfo="text+y"))
    fig.add_hline(y=0, line_dash="dash", line_color="grey")
    fig.update_layout(height=380, width=720, margin={"l": 60, "r": 10, "t": 30, "b": 40},
                      xaxis_title="Bond distortion (%)",
                      yaxis_title=f"Energy relative to unperturbed ({unit})",
                      legend={"font": {"size": 10}}, title=f"{s.label} ({s.model})")
    return fig


def _neighbourhood(atoms, centre: np.ndarray, radius: float):
    """Indices and positions (unwrapped around ``centre``) of the atoms within ``radius`` Å."""
    from defectml.search.landscape import _mic

    vec = _mic(atoms, centre, range(len(atoms)))
    idx = np.flatnonzero(np.linalg.norm(vec, axis=1) <= radius)
    return idx, vec[idx]


def structure_figure(s: DefectSummary, m):
    """3D view of one minimum around the defect: atoms, the defect site, new like-ion bonds."""
    import plotly.graph_objects as go

    trial = next(t for t in s.trials if t.name == m.trial)
    atoms = m.atoms
    centre = trial.centre()
    idx, pos = _neighbourhood(atoms, centre, VIEW_RADIUS)
    symbols = [atoms.get_chemical_symbols()[i] for i in idx]
    fig = go.Figure()
    for el in sorted(set(symbols)):
        sel = [k for k, sym in enumerate(symbols) if sym == el]
        fig.add_trace(go.Scatter3d(
            x=pos[sel, 0], y=pos[sel, 1], z=pos[sel, 2], mode="markers", name=el,
            marker={"size": 7, "color": _colour(el), "line": {"width": 1, "color": "#333"}},
            hovertext=[f"{el} {idx[k]}" for k in sel], hoverinfo="text"))
    fig.add_trace(go.Scatter3d(x=[0.0], y=[0.0], z=[0.0], mode="markers", name="defect site",
                               marker={"size": 12, "color": "rgba(255,0,0,0.25)", "symbol": "diamond",
                                       "line": {"width": 2, "color": "red"}}))
    # the new bonds the label names: like pairs at those lengths
    wanted = [(a, b, d) for a, b, d in m.bonds]
    lines_x, lines_y, lines_z = [], [], []
    for i in range(len(idx)):
        for j in range(i + 1, len(idx)):
            d = float(np.linalg.norm(pos[i] - pos[j]))
            pair = tuple(sorted((symbols[i], symbols[j])))
            if any(pair == (a, b) and abs(d - bd) < 0.01 for a, b, bd in wanted):
                lines_x += [pos[i, 0], pos[j, 0], None]
                lines_y += [pos[i, 1], pos[j, 1], None]
                lines_z += [pos[i, 2], pos[j, 2], None]
    if lines_x:
        fig.add_trace(go.Scatter3d(x=lines_x, y=lines_y, z=lines_z, mode="lines", name="new bonds",
                                   line={"width": 8, "color": "#d00"}))
    fig.update_layout(height=340, width=360, margin={"l": 0, "r": 0, "t": 30, "b": 0},
                      title={"text": f"#{m.rank}: {m.label}", "font": {"size": 11}},
                      scene={"xaxis": {"visible": False}, "yaxis": {"visible": False},
                             "zaxis": {"visible": False}, "aspectmode": "data"},
                      legend={"font": {"size": 9}})
    return fig


def warnings_for(s: DefectSummary) -> list[str]:
    """Everything a reader must not miss about one defect's landscape."""
    out = [f"quarantined {t.name}: {reason}" for t, reason in s.quarantined]
    out += [f"minimum #{m.rank} is no longer the defect it started as: {m.identity_change}"
            for m in s.minima if m.identity_change]
    out += [f"minimum #{m.rank} is untrusted: committee force spread "
            f"{s.trust(m)['force'] * 1000:.0f} meV/Å" for m in s.minima if s.untrusted(m)]
    if s.charge != 0 and not _charge_aware(s):
        out.append(f"{s.model} has no charge input: this charged state was relaxed on the neutral "
                   "surface (its trials differ, its energies do not know the charge)")
    if s.minima and not s.scored:
        out.append("no trust score: one universal model cannot score itself (the active loop's "
                   "committees can)")
    return out


def _charge_aware(s: DefectSummary) -> bool:
    from defectml.models.ref import ModelRef

    if not s.model_ref:
        return False
    try:
        card = ModelRef.from_dict(s.model_ref).card
    except Exception:  # noqa: BLE001 - a moved weights file: say it is not known to be charge-aware
        return False
    return bool(card and card.get("charge_aware"))


def _minima_table(s: DefectSummary) -> str:
    rows = ["<table><tr><th>#</th><th>ΔE (eV)</th><th>spread (eV)</th><th>minimum</th><th>trust</th>"
            "<th>trials</th></tr>"]
    from defectml.search.report import signed

    for m in s.minima:
        t = s.trust(m)
        trust = "—" if t is None else f"{t['force'] * 1000:.0f} meV/Å"
        cls = ' class="untrusted"' if s.untrusted(m) else ""
        trials = ", ".join(n.replace("Bond_Distortion_", "") for n in m.trials)
        rows.append(f"<tr><td>{m.rank}</td><td class='num'>{signed(m.delta_e)}</td>"
                    f"<td class='num'>{s.spread(m):.3f}</td><td>{_esc(m.label)}"
                    + (" <b>(identity changed)</b>" if m.identity_change else "")
                    + f"</td><td{cls}>{trust}</td><td>{_esc(trials)}</td></tr>")
    rows.append("</table>")
    polished = [t.polish_fmax for t in s.trials if t.polish_fmax is not None]
    if polished:
        rows.append(f"<p class='meta'>Ranked on {len(polished)} relaxations continued to fmax "
                    f"{max(polished):g} eV/Å; a spread is over a minimum's polished members.</p>")
    return "\n".join(rows)


def _num(x, fmt: str = ".3f") -> str:
    return "" if x is None else format(x, fmt)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_esc(path.name)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _extras(folder: Path | None) -> str:
    """DFT evaluation, thermodynamics and active-loop results the run folder holds."""
    if folder is None or not folder.is_dir():
        return ""
    parts = []
    ev = folder / "evaluation.json"
    if ev.exists():
        doc = json.loads(ev.read_text())
        s = doc.get("summary", {})
        rows = "".join(f"<tr><td>{_esc(r['defect'])} {r['charge']:+d}</td><td>{r['gs_hit']}</td>"
                       f"<td class='num'>{r['dft_saved']:.0%}</td><td class='num'>{_num(r['gs_rmsd'])}"
                       "</td></tr>" for r in doc.get("defects", []))
        parts.append("<h2>Against DFT</h2><table><tr><th>defect</th><th>ground state found</th>"
                     f"<th>DFT saved</th><th>GS RMSD (Å)</th></tr>{rows}</table>"
                     f"<p class='meta'>ground-state hit rate {s.get('gs_hit_rate')}, DFT relaxations "
                     f"saved {s.get('dft_relaxations_saved')}</p>")
        if (folder / "evaluation_parity.png").exists():
            parts.append(_image(folder / "evaluation_parity.png"))
    for md in sorted((folder / "thermo").rglob("thermo.md")) if (folder / "thermo").is_dir() else []:
        parts.append(f"<h2>Thermodynamics: {_esc(md.parent.name)}</h2><pre>{_esc(md.read_text())}</pre>")
        if (md.parent / "thermo.png").exists():
            parts.append(_image(md.parent / "thermo.png"))
    loop = folder / "loop" / "loop.json"
    if loop.exists():
        parts.append(_loop_section(json.loads(loop.read_text())))
    return "\n".join(parts)


def _verdict(check: dict) -> str:
    if check["ok"] is None:
        return "nothing to check"
    return "reproduces its DFT" if check["ok"] else f"does not reproduce its DFT ({check['reason']})"


def _loop_section(doc: dict) -> str:
    """The active loop: each round's picks and starts, the model's check against its DFT, answers."""
    rows = []
    for rd in doc.get("rounds", []):
        starts = rd.get("starts", {})
        asked = "; ".join(f"{k}: {', '.join(v)} (from the {starts.get(k, 'trial')})"
                          for k, v in (rd.get("picks") or {}).items() if v)
        fits = rd.get("fits") or []
        check = "; ".join(f"{k}: {_verdict(c)}" for k, c in (fits[-1]["reproduces"].items() if fits else []))
        check += f" (after {len(fits)} fit(s))" if fits else ""
        state = "; ".join(f"{k}: {v['status']}: {v['reason']}" for k, v in rd.get("items", {}).items())
        rows.append(f"<tr><td>{rd['round']}</td><td>{_esc(asked)}</td><td>{_esc(check)}</td>"
                    f"<td>{_esc(state)}</td></tr>")
    status = doc.get("status", {})
    answers = []
    for k, d in (status.get("defects") or {}).items():
        a = d.get("answer")
        what = (f"{a['trial']}: {a['label']}, {a['energy_eV']:.3f} eV; the model "
                f"{'agrees' if a['model_agrees'] else 'disagrees'}") if a else "no DFT answer"
        answers.append(f"<tr><td>{_esc(k)}</td><td>{_esc(d['status'])}</td><td>{_esc(what)}</td>"
                       f"<td>{d['dft_relaxations']}</td><td>{_esc(str(d['model_reproduces_dft']))}</td></tr>")
    return ("<h2>Active loop</h2><table><tr><th>round</th><th>asked DFT</th><th>model vs its DFT</th>"
            f"<th>assessment</th></tr>{''.join(rows)}</table>"
            "<table><tr><th>defect</th><th>status</th><th>answer (DFT's lowest)</th><th>DFT relaxations</th>"
            f"<th>model reproduces its DFT</th></tr>{''.join(answers)}</table>"
            f"<p class='meta'>{_esc(status.get('status', ''))}: {_esc(status.get('reason', ''))}</p>")


def write_report(summaries: list[DefectSummary], path: Path, *, title: str = "defectml search",
                 meta: dict | None = None, folder: Path | None = None) -> Path:
    """Write the self-contained report.

    Args:
        summaries: The landscapes (``summarise``).
        path: The HTML file to write.
        title: Page title.
        meta: Lines of run information (model, settings key, wall time, ...).
        folder: The run folder, for DFT evaluation, thermodynamics and loop results.
    """
    from defectml.structure_io import write_atomic

    first = [True]
    body = [f"<h1>{_esc(title)}</h1>"]
    if meta:
        body.append("<p class='meta'>" + " · ".join(f"{_esc(k)}: {_esc(v)}" for k, v in meta.items())
                    + "</p>")
    body.append("<ul>" + "".join(f"<li><a href='#{_esc(s.label)}'>{_esc(s.label)}</a>: "
                                 f"{len(s.minima)} minim{'um' if len(s.minima) == 1 else 'a'}</li>"
                                 for s in summaries) + "</ul>")
    for s in summaries:
        n_ok = sum(t.status == "converged" for t in s.trials)
        body.append(f"<h2 id='{_esc(s.label)}'>{_esc(s.label)}</h2>")
        cell = s.supercell or {}
        body.append(f"<p class='meta'>{_esc(s.model)}; {len(s.trials)} trials, {n_ok} converged; "
                    f"supercell {cell.get('atoms', '?')} atoms, periodic images "
                    f"{cell.get('min_image_distance_A', '?')} Å apart</p>")
        body += [f"<div class='warn'>{_esc(w)}</div>" for w in warnings_for(s)]
        if not s.minima:
            body.append("<p>no converged relaxation to rank</p>")
            continue
        body.append(_minima_table(s))
        body.append(_figure_html(energy_figure(s), first))
        views = [_figure_html(structure_figure(s, m), first) for m in s.minima[:MAX_VIEWS]]
        body.append("<div class='views'>" + "".join(views) + "</div>")
    body.append(_extras(folder))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
