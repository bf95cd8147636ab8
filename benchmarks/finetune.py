"""Fine-tuning on real defect DFT: base vs fine-tuned, per model and strategy, with forgetting.

    python benchmarks/finetune.py --epochs 4 --exclude-host MgO     # every run below, CPU
    python benchmarks/finetune.py --runs chgnet:standard,sevennet-mf-0:multihead

Data: ../shared/data/defect-dft (450 VASP ionic steps, 10 hosts). Split by defect (all charges and
equivalent sites of a defect on one side), with a whole defect of a seen host (ZnS V_S, all
charges) and a whole host (SrTiO3, its bulk too) held out for test; 10 evenly spaced frames per
relaxation; bulk frames in train.

Per model and strategy: held-out force MAE and relative-energy MAE, base vs fine-tuned; the
relaxation test (from each held-out relaxation's first DFT frame, relax with the model; within
0.1 Å RMSD of DFT's end point or not); CPU time per epoch; and forgetting: the force error on an
original-domain set training never saw, before vs after (crystals of the forgetting side of
``defectml.train.original_domain``, labelled by the base model, i.e. self-distillation, plus the
real DFT bulk frames of the held-out and left-out hosts). A multi-head model is judged on the
defects with its new head and on the original domain with the base's head.

Each run's result is kept in --work as it finishes (a rerun skips what is done; delete the
file to redo it); the JSON and Markdown are rewritten from all finished runs every time.
The JSON holds, per model and strategy under "heldout": force_mae, force_mae_base,
relax_within_0.1A and relax_within_0.1A_base (fractions) and original_domain_error_change
(fraction; 0.05 = 5% worse).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "defect-dft"
HOLD_OUT = ("host:SrTiO3", "defect:ZnS/vac_S")
RUNS = ("chgnet:standard", "chgnet:replay", "sevennet-0:standard", "sevennet-mf-0:multihead",
        "sevennet-0:replay")
SUFFIX = {"chgnet": ".pth.tar", "sevennet-0": ".pth", "sevennet-mf-0": ".pth"}


def evaluate(model_name: str, test: Path, threads: int) -> dict:
    """Errors on the held-out frames and the relaxation test."""
    from defectml.models import load_model
    from defectml.train import metrics
    from defectml.train.dataset import read_extxyz

    model = load_model(model_name, threads=threads)
    sets = read_extxyz(test)
    t0 = time.perf_counter()
    rows = metrics.predict(model, sets, stress=False)
    tests = metrics.relaxation_test(model, sets)
    return {"model": model.name, "key": model.key, "errors": metrics.grouped_errors(rows),
            "relaxation_test": tests, "within_0.1A": metrics.within(tests),
            "seconds": time.perf_counter() - t0}


def cached(path: Path, make):
    """``make()``'s result, kept in ``path`` (JSON) once made."""
    if path.is_file():
        return json.loads(path.read_text())
    doc = make()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    os.replace(tmp, path)
    return doc


def forgetting_sets(base_name: str, work: Path, real_frames: list, threads: int):
    """The forgetting side's crystals labelled by the base (kept in ``work``) and the real bulk frames."""
    from ase.io import read, write

    from defectml.models import load_model
    from defectml.train.original_domain import CrystalSettings, base_labelled

    path = work / f"forgetting_{base_name}.extxyz"
    if not path.is_file():
        base = load_model(base_name, threads=threads)
        write(path, base_labelled(base, "forgetting", CrystalSettings(variants=2, seed=0), stress=False))
    return read(path, ":"), real_frames


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"MODEL:STRATEGY,... ({','.join(RUNS)})")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exclude-host", action="append", default=[],
                   help="leave a host out of training and test (MgO: its 216-atom cells need ~1.6 GB "
                        "each in CHGNet, 66k angles; batches of them ran out of 24 GB in training). Its "
                        "bulk frames still join the forgetting set.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--work", default="runs/bench_finetune")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()

    from defectml.models import load_model
    from defectml.train.dataset import SplitSettings, build_dataset, read_extxyz
    from defectml.train.finetune import FinetuneSettings, finetune
    from defectml.train.original_domain import forgetting

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    every = [fs for f in sorted(DATA.glob("*.extxyz.gz")) for fs in read_extxyz(f)]
    sets = [fs for fs in every if fs.host not in a.exclude_host]
    report = build_dataset(sets, work / "data", splits=SplitSettings(by="defect", hold_out=HOLD_OUT))
    frames = {k: v["frames"] for k, v in report.counts.items()}
    print(json.dumps(frames), flush=True)
    test, train, val = (work / "data" / f"{n}.extxyz" for n in ("test", "train", "val"))
    # real bulk DFT frames training never saw: held-out hosts' and left-out hosts'
    trained_hosts = {fs.host for fs in read_extxyz(train)}
    real_bulk = [f for fs in every if fs.defect == "bulk" and fs.host not in trained_hosts for f in fs.frames]

    runs = [tuple(r.split(":")) for r in a.runs.split(",") if r]
    for model, strategy in runs:
        base_doc = cached(work / f"base_{model}.json", lambda m=model: evaluate(m, test, a.threads))
        print(f"{model} base: force MAE {base_doc['errors']['overall']['force']['mae']:.3f} eV/Å, within "
              f"0.1 Å {base_doc['within_0.1A']}", flush=True)
        pseudo, real = forgetting_sets(model, work, real_bulk, a.threads)

        def run(model=model, strategy=strategy, pseudo=pseudo, real=real, base_doc=base_doc):
            s = FinetuneSettings(base=model, strategy=strategy, epochs=a.epochs, lr=a.lr, patience=a.patience,
                                 threads=a.threads, batch_size=a.batch_size)
            t0 = time.perf_counter()
            ft = finetune(train, val, work / f"{model}_{strategy}{SUFFIX[model]}", s,
                          log=lambda m: print(f"  {model} {strategy}: {m}", flush=True))
            wall = time.perf_counter() - t0
            tuned = evaluate(str(ft.weights), test, a.threads)
            # the original domain with the base model's head (a multi-head model's other heads)
            base_head = ft.card.get("base_head")
            spec = f"{ft.weights}@{base_head}" if base_head else str(ft.weights)
            original = load_model(spec, threads=a.threads)
            forgot = forgetting(load_model(model, threads=a.threads), original, pseudo, real,
                                scale=base_doc["errors"]["overall"]["force"]["mae"])
            return {"tuned": tuned, "card_metrics": ft.card["metrics"], "training_wall_s": wall,
                    "forgetting": forgot, "replay": ft.card.get("replay"), "heads": ft.card.get("heads"),
                    "settings": ft.card["settings"]}

        doc = cached(work / f"run_{model}_{strategy}.json", run)
        print(f"{model} {strategy}: force MAE {doc['tuned']['errors']['overall']['force']['mae']:.3f} eV/Å, "
              f"within 0.1 Å {doc['tuned']['within_0.1A']}, forgetting {doc['forgetting']['change']}",
              flush=True)
    write_results(a, work, frames)


def write_results(a, work: Path, frames: dict) -> None:
    """JSON and Markdown from every finished run in ``work``."""
    from defectml.train.original_domain import error_change

    heldout, per_host, relax, forgot, bases = {}, {}, {}, {}, {}
    for path in sorted(work.glob("run_*.json")):
        model, strategy = path.stem[4:].rsplit("_", 1)
        doc = json.loads(path.read_text())
        base = json.loads((work / f"base_{model}.json").read_text())
        bases[model] = base
        ob, ot = base["errors"]["overall"], doc["tuned"]["errors"]["overall"]
        m = doc["card_metrics"]
        heldout.setdefault(model, {})[strategy] = {
            "force_mae": ot["force"]["mae"], "force_mae_base": ob["force"]["mae"],
            "force_mae_change": ot["force"]["mae"] / ob["force"]["mae"] - 1,
            "relative_energy_mae_per_atom": ot["relative_energy_per_atom"]["mae"],
            "relative_energy_mae_per_atom_base": ob["relative_energy_per_atom"]["mae"],
            "relax_within_0.1A": doc["tuned"]["within_0.1A"], "relax_within_0.1A_base": base["within_0.1A"],
            "original_domain_error_change": error_change(doc["forgetting"]["before"],
                                                         doc["forgetting"]["after"], ob["force"]["mae"]),
            "epochs_run": m["epochs_run"], "best_epoch": m["best_epoch"],
            "cpu_seconds_per_epoch": m["seconds_per_epoch"], "training_wall_s": doc["training_wall_s"],
            "val_base": m["val_base"], "val_best": m["val_best"],
        }
        tuned = doc["tuned"]
        per_host.setdefault(model, {"base": base["errors"]["host"]})[strategy] = tuned["errors"]["host"]
        relax.setdefault(model, {"base": base["relaxation_test"]})[strategy] = doc["tuned"]["relaxation_test"]
        f = doc["forgetting"]
        # the yardstick: the base model's force error against the held-out DFT (see original_domain)
        f["scale"] = ob["force"]["mae"]
        f["change"] = error_change(f["before"], f["after"], f["scale"])
        forgot.setdefault(model, {})[strategy] = f
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} torch threads"
    doc = {"machine": machine,
           "data": {"split": "by defect", "hold_out": list(HOLD_OUT), "frames": frames,
                    "excluded_hosts": a.exclude_host},
           "settings": {"epochs": a.epochs, "lr": a.lr, "patience": a.patience, "batch_size": a.batch_size},
           "heldout": heldout, "forgetting": forgot, "per_host": per_host, "relaxation_tests": relax}
    out = Path(a.out)
    (out / "finetune.json").write_text(json.dumps(doc, indent=2, default=float))
    pct = lambda x: "n/a" if x is None else f"{x:+.0%}"  # noqa: E731
    frac = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731
    lines = [
        "# Fine-tuning on real defect DFT (held-out: SrTiO3 whole, ZnS V_S all charges)", "",
        f"Machine: {machine}. Rerun: `python benchmarks/finetune.py --epochs {a.epochs}"
        f"{''.join(f' --exclude-host {h}' for h in a.exclude_host)}`.", "",
        f"Frames: {frames} (10 evenly spaced per relaxation, split by defect)"
        + (f"; hosts left out of training and test: {', '.join(a.exclude_host)} (memory: see the script's "
           "--exclude-host)" if a.exclude_host else "") + ". At most "
        f"{a.epochs} epochs (patience {a.patience}), lr {a.lr}, batch {a.batch_size}, anchored energies.", "",
        "| model | strategy | held-out force MAE (meV/Å) | base | change | relative energy MAE (meV/atom) "
        "| base | relaxations within 0.1 Å | base | original-domain error change | validation forces, "
        "base → best (meV/Å) | s/epoch (CPU) | epochs (best) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, by in heldout.items():
        for strategy, e in by.items():
            lines.append(
                f"| {model} | {strategy} | {e['force_mae'] * 1000:.0f} | {e['force_mae_base'] * 1000:.0f} | "
                f"{pct(e['force_mae_change'])} | {e['relative_energy_mae_per_atom'] * 1000:.3f} | "
                f"{e['relative_energy_mae_per_atom_base'] * 1000:.3f} | {frac(e['relax_within_0.1A'])} | "
                f"{frac(e['relax_within_0.1A_base'])} | {pct(e['original_domain_error_change'])} | "
                f"{e['val_base']['f'] * 1000:.0f} → {e['val_best']['f'] * 1000:.0f} | "
                f"{e['cpu_seconds_per_epoch']:.0f} | {e['epochs_run']} ({e['best_epoch']}) |")
    lines += ["", " ".join((
        "Original domain (force MAE, meV/Å, before → after): base-labelled crystals never trained on",
        "(self-distillation labels: the base's error there is zero, so 'after' is the drift from the",
        "base model) and real DFT bulk frames of hosts never trained on. The error against true labels",
        "can grow by at most that drift, so the change given is the union's (atoms weighted) error",
        "increase divided by the base model's held-out force MAE against DFT (the yardstick in",
        "brackets): an upper bound on the relative growth of the original-domain error.")), ""]
    for model, by in forgot.items():
        for strategy, f in by.items():
            parts = []
            for name, label in (("pseudo", "crystals"), ("real", "real bulk")):
                if name in f:
                    parts.append(f"{label} ({f[f'{name}_frames']}) {f[name]['before'] * 1000:.0f} → "
                                 f"{f[name]['after'] * 1000:.0f}")
            lines.append(f"- {model} {strategy}: " + "; ".join(parts)
                         + f"; change {pct(f['change'])} (yardstick {f['scale'] * 1000:.0f} meV/Å)")
    lines += ["", "Per held-out host (force MAE meV/Å, base → fine-tuned):", ""]
    for model, by in per_host.items():
        for strategy, hosts in by.items():
            if strategy == "base":
                continue
            lines.append(f"- {model} {strategy}: " + ", ".join(
                f"{h} {by['base'][h]['force']['mae'] * 1000:.0f} → {hosts[h]['force']['mae'] * 1000:.0f}"
                for h in sorted(hosts)))
    lines += ["", "Relaxation tests (RMSD to DFT's end point, Å; base → fine-tuned per strategy):", ""]
    fmt = lambda x: "failed" if x is None else f"{x:.3f}"  # noqa: E731
    for model, by in relax.items():
        strategies = [k for k in by if k != "base"]
        lines.append(f"{model} ({', '.join(strategies)}):")
        lines.append("")
        for i, b in enumerate(by["base"]):
            after = ", ".join(fmt(by[k][i]["rmsd_A"]) for k in strategies)
            lines.append(f"- {b['host']} {b['defect']}: {fmt(b['rmsd_A'])} → {after} "
                         f"(DFT moved {b['dft_rmsd_start_to_end_A']:.3f})")
        lines.append("")
    (out / "finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
