"""Direct relaxed-structure predictor on the 2DMD pairs: model vs Dummy vs CHGNet relaxation.

Trains one small model per material on its published training ids (as the reference work does; CPU,
``--jobs`` materials at a time, one torch thread each; ``--joint`` trains one model on all six instead),
then on each material's 50 test ids reports the coordinate MAE (A; mean over real atoms and x/y/z,
periodic-image aware) over all atoms and within 3/4/5/6 A of any defect site, for the model and for
"Dummy" (the unrelaxed positions), with the inference time per structure. On the first
``--chgnet-per-material`` test structures of each material, CHGNet (default model) relaxes from the
unrelaxed and from the predicted positions: its coordinate MAE and the FIRE steps saved (CHGNet's
relaxations from the unrelaxed cells are cached in the work folder, so a rerun only redoes those
that depend on the model).

    python benchmarks/direct_predictor.py [--epochs 30] [--seeds 3] [--features 64] [--noise 0.03]
        [--layers 5] [--jobs 2] [--local-weight 0] [--models ensemble_l5]

The combined levers of ``predictor_variants.py`` (7 layers, a virtual node, a weight average, batch 4),
one seed per material, written under their own name:

    python benchmarks/direct_predictor.py --layers 7 --virtual-node --ema 0.99 --batch-size 4 \
        --seeds 1 --models ensemble_l7_vn --name direct_predictor_l7_vn_single

``--seeds K`` trains K models per material (seeds 0..K-1) and scores their averaging ensemble, with
each member's own score alongside. Writes benchmarks/results/<name>.{json,md} (``--name``, default
direct_predictor); models land
in runs/definet/<models>/<m>.pt (``--models`` defaults to ``ensemble_l<layers>``; seed k > 0: <m>_s<k>.pt;
runs/definet/model.pt with ``--joint``);
rerunning resumes (or extends) their training.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.geometry import find_mic

from defectml.errors import DefectMLError
from defectml.predictor.data import MATERIALS, material_split, unpack
from defectml.predictor.metrics import coordinate_mae, mean_metrics
from defectml.predictor.model import Batch, Ensemble, ModelConfig
from defectml.predictor.train import (
    TrainSettings,
    evaluate,
    load_checkpoint,
    train,
    validation_loss,
)

ROOT = Path(__file__).resolve().parents[1]
FAILED = "FAILED"


def graph_atoms(g, disp: np.ndarray | None = None) -> Atoms:
    """The real atoms of a graph as ASE Atoms (optionally displaced)."""
    n = g.n_atoms
    pos = g.pos.numpy()[:n] + (0 if disp is None else disp[:n])
    return Atoms(numbers=g.z.numpy()[:n], positions=pos, cell=g.cell.numpy(), pbc=True)


def chgnet_relax(atoms: Atoms, calc, fmax: float, steps: int) -> tuple[Atoms, int]:
    from ase.optimize import FIRE

    work = atoms.copy()
    work.calc = calc
    opt = FIRE(work, logfile=None)
    opt.run(fmax=fmax, steps=steps)
    return work, int(opt.nsteps)


def _train_material(job: dict) -> str:
    """Train one material's model in its own process (one torch thread); returns its log."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    split = material_split(Path(job["root"]), job["material"], job["cutoff"], Path(job["cache"]))
    lines: list[str] = []
    log_path = Path(job["checkpoint"]).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        lines.append(f"{job['material']}: {message}")
        with log_path.open("a") as fh:
            fh.write(lines[-1] + "\n")

    try:
        train(
            split.train,
            split.val,
            job["checkpoint"],
            ModelConfig(**job["config"]),
            TrainSettings(**job["settings"]),
            log=log,
        )
    except DefectMLError as exc:  # the other members go on; the run reports this one at the end
        log(f"FAILED: {exc}")
        return f"{FAILED} {job['checkpoint']}: {exc}"
    return lines[-1] if lines else f"{job['material']}: nothing to do"


def _chgnet_from_unrelaxed(g, key: str, cache: dict, calc, fmax: float) -> tuple[np.ndarray, int, float]:
    """CHGNet relaxation from the unrelaxed cell: (displacements, FIRE steps, seconds), cached by test id."""
    if key not in cache:
        t1 = time.perf_counter()
        relaxed, n_u = chgnet_relax(graph_atoms(g), calc, fmax, 500)
        dt = time.perf_counter() - t1
        d = find_mic(relaxed.positions - g.pos.numpy()[: g.n_atoms], g.cell.numpy(), True)[0]
        cache[key] = {"disp": d.tolist(), "steps": n_u, "seconds": dt}
    c = cache[key]
    full = np.zeros((len(g.z), 3))
    full[: g.n_atoms] = np.asarray(c["disp"])
    return full, int(c["steps"]), float(c["seconds"])


def _chgnet_subset(model, split, calc, fmax: float, n: int, cache: dict, cache_path: Path) -> dict | None:
    sub = list(zip(split.test[:n], split.test_ids[:n], strict=True))
    if not sub:
        return None
    c_rows, m_rows, d_rows, steps_u, steps_p, t_c = [], [], [], [], [], 0.0
    for g, gid in sub:
        with torch.no_grad():
            disp = model(Batch([g])).numpy()
        full, n_u, dt = _chgnet_from_unrelaxed(g, f"{split.material}/{gid}/fmax{fmax:g}", cache, calc, fmax)
        cache_path.write_text(json.dumps(cache))
        t_c += dt
        _, n_p = chgnet_relax(graph_atoms(g, disp), calc, fmax, 500)
        c_rows.append(coordinate_mae(full, g))
        m_rows.append(coordinate_mae(disp, g))
        d_rows.append(coordinate_mae(np.zeros((len(g.z), 3)), g))
        steps_u.append(n_u)
        steps_p.append(n_p)
    return {
        "n": len(sub),
        "chgnet": mean_metrics(c_rows),
        "model": mean_metrics(m_rows),
        "dummy": mean_metrics(d_rows),
        "chgnet_s_per_structure": t_c / len(sub),
        "steps_from_unrelaxed": float(np.mean(steps_u)),
        "steps_from_predicted": float(np.mean(steps_p)),
        "steps_saved": 1 - float(np.sum(steps_p)) / max(1, float(np.sum(steps_u))),
    }


def _train_joint(work: Path, splits: dict, config: ModelConfig, settings: TrainSettings) -> Path:
    """Train (or resume) one model on every material; returns its checkpoint."""
    train(
        [g for s in splits.values() for g in s.train],
        [g for s in splits.values() for g in s.val],
        work / "model.pt",
        config,
        settings,
    )
    return work / "model.pt"


def member_path(folder: Path, material: str, seed: int) -> Path:
    """Checkpoint of one ensemble member: <m>.pt for seed 0 (the single-model path), <m>_s<k>.pt else."""
    return folder / (f"{material}.pt" if seed == 0 else f"{material}_s{seed}.pt")


def _train_all(
    a, root: Path, work: Path, splits: dict, config: ModelConfig, settings: TrainSettings
) -> tuple[dict, list[str]]:
    """Train (or resume) the model(s): ({material: [checkpoint path per seed]}, failed members left out)."""
    if a.joint:
        return dict.fromkeys(splits, [_train_joint(work, splits, config, settings)]), []
    paths = {m: [member_path(work / a.models, m, k) for k in range(a.seeds)] for m in splits}
    jobs = [
        {
            "root": str(root),
            "material": m,
            "cutoff": a.cutoff,
            "cache": str(work / "cache"),
            "checkpoint": str(paths[m][k]),
            "config": config.to_dict(),
            "settings": {
                "epochs": a.epochs,
                "batch_size": a.batch_size,
                "lr": a.lr,
                "threads": 1,
                "noise": a.noise,
                "compile": a.compile,
                "seed": k,
                "local_weight": a.local_weight,
                "ema": a.ema,
            },
        }
        for m in splits
        for k in range(a.seeds)
    ]
    ctx = multiprocessing.get_context("spawn")
    failed = []
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx) as pool:
        for line in pool.map(_train_material, jobs):
            print(line, flush=True)
            if line.startswith(FAILED):
                failed.append(line)
    if failed and not a.drop_failed:
        raise SystemExit(
            "training failed for " + "; ".join(failed)
            + ". Every finished epoch is checkpointed: rerun to resume (or --drop-failed)."
        )
    dropped = [line.split(" ", 1)[1] for line in failed]
    for m in paths:
        paths[m] = [q for q in paths[m] if not any(d.startswith(f"{q}:") for d in dropped)]
        if not paths[m]:
            raise SystemExit(f"training failed for every model of {m}: " + "; ".join(failed))
    return paths, dropped


def _changed_options(parser: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    """The options of this run that differ from the defaults (paths left out; --models if not the default)."""
    skip = {"help", "data", "work", "out", "models", "threads", "jobs"}
    out = f" --models {a.models}" if a.models != f"ensemble_l{a.layers}" else ""
    for action in parser._actions:
        value = getattr(a, action.dest, None)
        if action.dest in skip or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(value, bool):  # --joint, or --no-compile (the last spelling of a negatable flag)
            out += f" {flag if value else action.option_strings[-1]}"
        else:
            out += f" {flag} {value:g}" if isinstance(value, float) else f" {flag} {value}"
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "2dmd-high-density-pairs.tar.gz"))
    p.add_argument("--work", default=str(ROOT / "runs" / "definet"))
    p.add_argument("--joint", action="store_true", help="one model for all six materials")
    p.add_argument("--jobs", type=int, default=2, help="materials trained at a time (per-material mode)")
    p.add_argument(
        "--compare-joint",
        action="store_true",
        help="also train (or resume) the joint model and pick, per material, the lower validation loss",
    )
    p.add_argument("--joint-epochs", type=int, default=45, help="epochs of the joint model (--compare-joint)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--noise", type=float, default=0.03, help="input-noise regulariser width (A)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile training"
    )
    p.add_argument(
        "--models", default=None, help="folder under --work for the per-material models (ensemble_l<layers>)"
    )
    p.add_argument("--seeds", type=int, default=3, help="models per material, averaged as an ensemble")
    p.add_argument(
        "--drop-failed",
        action="store_true",
        help="leave a member whose training diverged out of its ensemble (listed in the result), not stop",
    )
    p.add_argument(
        "--local-weight", type=float, default=0.0, help="extra loss weight of atoms within 3 A of a defect"
    )
    p.add_argument("--ema", type=float, default=0.0, help="weight moving-average decay per step (0: off)")
    p.add_argument("--virtual-node", action="store_true", help="a global node mixed in at every layer")
    p.add_argument("--name", default="direct_predictor", help="stem of the result files under --out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chgnet-per-material", type=int, default=5)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    a.models = a.models or f"ensemble_l{a.layers}"
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    root = unpack(a.data, work / "cache")
    t0 = time.perf_counter()
    splits = {m: material_split(root, m, a.cutoff, work / "cache") for m in MATERIALS}
    t_graphs = time.perf_counter() - t0
    config = ModelConfig(features=a.features, layers=a.layers, cutoff=a.cutoff, virtual_node=a.virtual_node)
    settings = TrainSettings.from_options(a)  # epochs, batch size, lr, threads, noise, compile, ...
    t0 = time.perf_counter()
    paths, dropped = _train_all(a, root, work, splits, config, settings)
    joint = None
    if a.compare_joint and not a.joint:
        joint_settings = replace(settings, epochs=a.joint_epochs)
        joint, joint_ck = load_checkpoint(_train_joint(work, splits, config, joint_settings))
    t_train = time.perf_counter() - t0
    torch.set_num_threads(a.threads)
    from defectml.models import load_model

    chg = load_model("chgnet", threads=a.threads)
    cache_path = work / "chgnet_from_unrelaxed.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows, epoch_times, best_val = {}, {}, {}
    for m, s in splits.items():
        loaded = [load_checkpoint(path) for path in paths[m]]
        cks = [ck for _, ck in loaded]
        model = Ensemble([net for net, _ in loaded]) if len(loaded) > 1 else loaded[0][0]
        epoch_times[m] = [h["time_s"] for ck in cks for h in ck["history"]]
        best_val[m] = [ck["best_val"] for ck in cks]
        res, t_inf = evaluate(model, s.test)
        dummy = mean_metrics([coordinate_mae(np.zeros((len(g.z), 3)), g) for g in s.test])
        members = [evaluate(net, s.test)[0] for net, _ in loaded] if len(loaded) > 1 else []
        row = {
            "checkpoints": [str(path) for path in paths[m]],
            "seeds": [k for k in range(a.seeds) if member_path(work / a.models, m, k) in paths[m]],
            "epochs": len(cks[0]["history"]),
            "model": res,
            "members_improvement_A3": [1 - r["A3"] / dummy["A3"] for r in members],
            "dummy": dummy,
            "inference_s": t_inf,
            "n_train": len(s.train),
            "n_test": len(s.test),
            "improvement_A3": 1 - res["A3"] / dummy["A3"],
            "improvement_all": 1 - res["all"] / dummy["all"],
        }
        if joint is not None:
            res_j, _ = evaluate(joint, s.test)
            val_pm, val_j = validation_loss(model, s.val), validation_loss(joint, s.val)
            pick = res_j if val_j < val_pm else res
            row["joint"] = {
                "epochs": len(joint_ck["history"]),
                "model": res_j,
                "improvement_A3": 1 - res_j["A3"] / dummy["A3"],
                "val_loss_A": val_j,
            }
            row["val_loss_A"] = val_pm
            row["selected"] = {
                "which": "joint" if val_j < val_pm else "per_material",
                "model": pick,
                "improvement_A3": 1 - pick["A3"] / dummy["A3"],
            }
        c = _chgnet_subset(model, s, chg.calculator, a.fmax, a.chgnet_per_material, cache, cache_path)
        if c:
            row["chgnet_subset"] = c
        rows[m] = row
        print(
            m,
            json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row["model"].items()}),
            "dummy A3",
            round(dummy["A3"], 4),
            flush=True,
        )
    mean_gain = float(np.mean([r["improvement_A3"] for r in rows.values()]))
    compared = joint is not None
    mean_joint = float(np.mean([r["joint"]["improvement_A3"] for r in rows.values()])) if compared else None
    mean_sel = float(np.mean([r["selected"]["improvement_A3"] for r in rows.values()])) if compared else None
    all_epochs = [t for ts in epoch_times.values() for t in ts]
    doc = {
        "mode": "joint" if a.joint else "per_material",
        "config": config.to_dict(),
        "train_settings": {
            "epochs": a.epochs,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "noise_A": a.noise,
            "compiled": a.compile,
            "seeds": a.seeds,
            "local_weight": a.local_weight,
            "ema": a.ema,
            "threads_per_model": a.threads if a.joint else 1,
            "parallel_jobs": 1 if a.joint else a.jobs,
        },
        "n_train": sum(len(s.train) for s in splits.values()),
        "graph_build_s": t_graphs,
        "train_wall_s_this_run": t_train,
        "epoch_time_s": epoch_times,
        "best_val_loss_A": best_val,
        "materials": rows,
        "mean_improvement_A3": mean_gain,
        "mean_improvement_A3_joint": mean_joint,
        "mean_improvement_A3_selected_by_val": mean_sel,
        "dropped_members": dropped,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(doc, indent=2))
    what = (
        f"One model trained jointly on {doc['n_train']} pairs"
        if a.joint
        else f"One model per material ({min(len(s.train) for s in splits.values())}-"
        f"{max(len(s.train) for s in splits.values())} training pairs each, {a.jobs} trained at a time, "
        "one thread each)"
    )
    md = [
        "# Direct relaxed-structure predictor on 2DMD (test split, 50 per material)",
        "",
        f"{what}: {a.features} features, {a.layers} layers{', a virtual node' if a.virtual_node else ''}, "
        f"cutoff {a.cutoff} A, input noise {a.noise} A, batch {a.batch_size}"
        f"{f', weight average (decay {a.ema:g} per step)' if a.ema else ''}, "
        f"{max(r['epochs'] for r in rows.values())} epochs on this CPU"
        f"{' (torch.compile)' if a.compile else ''}, {np.mean(all_epochs):.0f} s/epoch "
        f"per model on average"
        f"{f', loss weight {1 + a.local_weight:g} on atoms within 3 A of a defect' if a.local_weight else ''}"
        f"{f'; the averaging ensemble of {a.seeds} models (seeds) per material' if a.seeds > 1 else ''}. "
        f"Rerun: `python benchmarks/direct_predictor.py{_changed_options(p, a)}`.",
        "",
        "Coordinate MAE (A), mean over real atoms and x/y/z; A3..A6 = atoms within 3..6 A of a defect site.",
        "",
        "| material | Dummy all | model all | Dummy A3 | model A3 | A4 | A5 | A6 | A3 gain | ms/structure "
        "| single-model A3 gains |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        singles = ", ".join(f"{x:.1%}" for x in r["members_improvement_A3"]) or "-"
        md.append(
            f"| {m} | {r['dummy']['all']:.4f} | {r['model']['all']:.4f} | {r['dummy']['A3']:.4f} | "
            f"{r['model']['A3']:.4f} | {r['model']['A4']:.4f} | {r['model']['A5']:.4f} | "
            f"{r['model']['A6']:.4f} | {r['improvement_A3']:.1%} | {1e3 * r['inference_s']:.0f} | {singles} |"
        )
    md += ["", f"Mean A3 improvement over Dummy: **{mean_gain:.1%}** (target 70%)."]
    per_seed = {k: [] for k in range(a.seeds)}
    for r in rows.values():
        for k, gain in zip(r["seeds"], r["members_improvement_A3"], strict=False):
            per_seed[k].append(gain)
    if any(per_seed.values()):
        md.append(
            "Mean over materials of each seed's single model: "
            + ", ".join(
                f"{np.mean(g):.1%}"
                + (f" (seed {k}: the {len(g)} materials it trained on)" if len(g) < len(rows) else "")
                for k, g in per_seed.items()
                if g
            )
            + " (the ensemble's gain over its members is measured in this same run)."
        )
    if dropped:
        md.append(
            "Left out of their ensembles (`--drop-failed`), training stopped as diverged: "
            + "; ".join(f"`{Path(d.split(':', 1)[0]).name}`:{d.split(':', 1)[1]}" for d in dropped)
            + "."
        )
    md.append("")
    if compared:
        md += [
            f"Against the joint model ({rows[MATERIALS[0]]['joint']['epochs']} epochs on all six materials; "
            "`--compare-joint`), and the one of the two with the lower loss on each material's validation "
            "ids (never the test ids):",
            "",
            "| material | per-material A3 gain | joint A3 gain | val loss per-material / joint (A) "
            "| selected | selected A3 gain |",
            "|---|---|---|---|---|---|",
        ]
        for m, r in rows.items():
            md.append(
                f"| {m} | {r['improvement_A3']:.1%} | {r['joint']['improvement_A3']:.1%} | "
                f"{r['val_loss_A']:.4f} / {r['joint']['val_loss_A']:.4f} | {r['selected']['which']} | "
                f"{r['selected']['improvement_A3']:.1%} |"
            )
        md += [
            "",
            f"Mean A3 improvement: per-material {mean_gain:.1%}, joint {mean_joint:.1%}, "
            f"selected by validation loss **{mean_sel:.1%}** (target 70%).",
            "",
        ]
    md += [
        f"CHGNet (0.3.0, FIRE fmax {a.fmax}) on the first {a.chgnet_per_material} test structures "
        "per material:",
        "",
        "| material | Dummy A3 | CHGNet A3 | model A3 | Dummy all | CHGNet all | model all | "
        "CHGNet s/structure | FIRE steps from unrelaxed | from predicted | steps saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        c = r.get("chgnet_subset")
        if c:
            md.append(
                f"| {m} | {c['dummy']['A3']:.4f} | {c['chgnet']['A3']:.4f} | {c['model']['A3']:.4f} | "
                f"{c['dummy']['all']:.4f} | {c['chgnet']['all']:.4f} | {c['model']['all']:.4f} | "
                f"{c['chgnet_s_per_structure']:.1f} | {c['steps_from_unrelaxed']:.0f} | "
                f"{c['steps_from_predicted']:.0f} | {c['steps_saved']:.0%} |"
            )
    (out / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
