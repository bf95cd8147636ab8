"""`defectml dataset | finetune | model-metrics | learning-curve`: datasets, fine-tuned models, errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from defectml.errors import InputError
from defectml.train.strategy import STRATEGIES


def add_parsers(sub) -> None:
    """Add this area's commands to the ``defectml`` subparsers."""
    from defectml.train.dataset import SPLIT_BY, SplitSettings
    ds = sub.add_parser(
        "dataset", help="defect datasets for fine-tuning: sample, clean and split DFT (or ML) frames",
        description="Read relaxations (extxyz files, defectml stores, VASP outputs), drop frames far "
                    "above their relaxation's minimum or with absurd forces, sample frames (evenly "
                    "spaced per relaxation by default, or DIRECT / farthest-point on CHGNet features), "
                    "and write OUT/{train,val,test}.extxyz with energy, forces, stress, charge, "
                    "functional, host and defect in each frame, split so that a relaxation, defect or "
                    "host stays on one side; OUT/dataset.json says what went where.",
    )
    ds.add_argument("sources", nargs="+",
                    help="extxyz files, stores (results.db or its folder), VASP folders")
    ds.add_argument("--out", required=True, help="output folder")
    ds.add_argument("--sample", choices=("all", "even", "fps", "direct"), default="even",
                    help="even: N evenly spaced frames per relaxation (default, the seed paper's MS); "
                         "direct / fps: over all frames on CHGNet crystal features; all")
    ds.add_argument("--per-relaxation", type=int, default=10, help="frames per relaxation for even (10)")
    ds.add_argument("--total", type=int, default=None,
                    help="frames for direct/fps (default: --per-relaxation x relaxations)")
    ds.add_argument("--energy-window", type=float, default=5.0,
                    help="drop frames more than this (eV) above their relaxation's lowest (5)")
    ds.add_argument("--max-force", type=float, default=50.0,
                    help="drop frames with a larger force, eV/Å (50)")
    d = SplitSettings()
    ds.add_argument("--split-by", choices=SPLIT_BY, default=None,
                    help=f"keep each relaxation / defect (all charges) / host on one side ({d.by})")
    ds.add_argument("--fractions", default=None,
                    help=f"train,val,test shares ({','.join(map(str, d.fractions))})")
    ds.add_argument("--hold-out", action="append", default=None, metavar="KIND:NAME",
                    help="put a group in test: host:SrTiO3, defect:ZnS/vac_S (repeatable)")
    ds.add_argument("--bulk", choices=("train", "split", "drop"), default=None,
                    help="the hosts' bulk frames: all in train (default), split like the rest, or drop")
    ds.add_argument("--charge", type=int, default=None, help="supercell charge of VASP-folder sources")
    ds.add_argument("--theory", default=None, help="level of theory of VASP-folder sources (default: INCAR)")
    ds.add_argument("--seed", type=int, default=None,
                    help=f"random seed of the split and sampling ({d.seed})")
    ds.add_argument("--quiet", "-q", action="store_true", help="no progress messages")

    ft = sub.add_parser(
        "finetune", help="fine-tune an MLIP on a defect dataset (the package's own trainer)",
        description="Fine-tune a CHGNet or SevenNet model (built-in or a weights file: a warm start) "
                    "on DATA/train.extxyz with the package's own trainer, early-stopped on "
                    "DATA/val.extxyz; write OUT (weights, atomically) and OUT.card.json. A killed run "
                    "resumes. search, thermo and dynamics take the result as --model OUT. Strategies: "
                    "standard; replay (original-domain frames mixed in: crystals labelled by the base "
                    "model, i.e. self-distillation, not DFT); multihead (SevenNet with heads: a new "
                    "head learns the defects while the base head keeps the replay frames); "
                    "multifidelity (SevenNet with heads: PBE frames train the base head, e.g. HSE06 "
                    "frames a new head).",
    )
    ft.add_argument("data", help="a `defectml dataset` folder (train.extxyz, val.extxyz) or a train extxyz")
    ft.add_argument("--val", default=None, help="validation extxyz (default: DATA/val.extxyz)")
    ft.add_argument("--out", required=True,
                    help="weights file to write: NAME.pth.tar (CHGNet) or NAME.pth (SevenNet)")
    add_training_options(ft)
    ft.add_argument("--quiet", "-q", action="store_true", help="no progress messages")

    mm = sub.add_parser(
        "model-metrics", help="a model against DFT frames: errors by host and charge, parity plot, "
                              "relaxation test",
        description="Energy (per atom, and relative within each relaxation), force and stress MAE/RMSE "
                    "overall, per host and per charge, a parity plot, and with --relax the relaxation "
                    "test: from each DFT relaxation's first frame, relax with the model and compare "
                    "with DFT's end point (RMSD, energy).",
    )
    mm.add_argument("model", help="built-in name or weights file (as --model of search)")
    mm.add_argument("data", nargs="+",
                    help="extxyz files, a `defectml dataset` folder (its test.extxyz), stores")
    mm.add_argument("--out", default=None,
                    help="folder for metrics.json and parity.png (default: print only)")
    mm.add_argument("--relax", action="store_true", help="also the relaxation test")
    mm.add_argument("--fmax", type=float, default=0.05, help="force threshold of the relaxation test (0.05)")
    mm.add_argument("--no-stress", action="store_true", help="skip stresses (one batched pass per frame)")
    mm.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    mm.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores)")

    lc = sub.add_parser(
        "learning-curve", help="fine-tune on growing shares of the training relaxations; test errors",
        description="How much DFT does a system need: fine-tune (every finetune option applies) on "
                    "nested, seeded shares of DS/train.extxyz's relaxations, early-stopped on "
                    "DS/val.extxyz, and report DS/test.extxyz's force and relative-energy MAE per "
                    "share (the base model at 0) in OUT/learning_curve.{json,png}. Each point is a "
                    "resumable finetune run in OUT.",
    )
    lc.add_argument("data", help="a `defectml dataset` folder (train, val and test .extxyz)")
    lc.add_argument("--out", required=True, help="work and output folder")
    lc.add_argument("--shares", default="0.25,0.5,1", help="shares of the training relaxations (0.25,0.5,1)")
    add_training_options(lc)
    lc.add_argument("--quiet", "-q", action="store_true", help="no progress messages")


def add_training_options(p) -> None:
    """The fine-tuning options (``finetune`` and ``learning-curve`` share them).

    Named for :class:`~defectml.train.finetune.FinetuneSettings`' fields; defaults ``None``: the
    dataclass decides, and the help quotes it.
    """
    from defectml.train.finetune import FinetuneSettings

    d = FinetuneSettings()
    p.add_argument("--base", default=None,
                    help=f"model to start from: {d.base} (default), chgnet-0.2.0, chgnet-r2scan, sevennet-0, "
                         "sevennet-l3i5, sevennet-mf-0 (its PBE head; @R2SCAN for the other) or a "
                         "weights file")
    p.add_argument("--strategy", choices=tuple(STRATEGIES), default=None,
                    help="standard (default): defect frames only; replay: plus original-domain frames; "
                         "multihead: a new SevenNet head for the defects, the base head kept on replay; "
                         "multifidelity: frames of mixed fidelity (info['fidelity'] or functional), the "
                         "base head (e.g. sevennet-mf-0@PBE) on its own, a new head named for the other "
                         "(e.g. HSE06; predict with OUT@HSE06)")
    p.add_argument("--replay", default=None, metavar="EXTXYZ",
                    help="replay frames (default: crystals of the data's elements labelled by the "
                         "base model)")
    p.add_argument("--replay-variants", type=int, default=None,
                    help=f"strained, rattled structures per replay prototype ({d.replay_variants})")
    p.add_argument("--head", default=None,
                    help=f"name of the new head with --strategy multihead ({d.head})")
    p.add_argument("--epochs", type=int, default=None, help=f"at most this many epochs ({d.epochs})")
    p.add_argument("--lr", type=float, default=None, help=f"initial learning rate, cosine decay ({d.lr})")
    p.add_argument("--batch-size", type=int, default=None, help=f"frames per step ({d.batch_size})")
    p.add_argument("--energy-weight", type=float, default=None,
                   help=f"loss weight of energies ({d.energy_weight})")
    p.add_argument("--force-weight", type=float, default=None,
                   help=f"loss weight of forces ({d.force_weight})")
    p.add_argument("--stress-weight", type=float, default=None,
                   help=f"loss weight of stresses ({d.stress_weight})")
    p.add_argument("--patience", type=int, default=None,
                    help=f"stop after this many epochs without a better validation error ({d.patience})")
    p.add_argument("--energies", choices=("anchored", "absolute"), default=None,
                    help="anchored (default): one constant shift per host/functional/defect/charge group "
                         "to the base model's mean, so a charge-blind model learns DFT's energy "
                         "differences within a charge state; absolute: the DFT totals as they are")
    p.add_argument("--refit-refs", choices=("auto", "yes", "no"), default=None,
                    help="with --energies absolute: refit per-element reference energies first "
                         "(auto: when the functional is not the base's)")
    p.add_argument("--charge-aware", action="store_true",
                   help="a charge-aware CHGNet: the cell charge (every frame's info['charge']) as an "
                        "input, energies anchored per defect across its charge states")
    p.add_argument("--charge-lr", type=float, default=None,
                   help=f"with --charge-aware: the charge terms' learning rate as a multiple of --lr "
                        f"({d.charge_lr})")
    p.add_argument("--seed", type=int, default=None,
                   help=f"random seed (several seeds make a committee) ({d.seed})")
    p.add_argument("--device", default=None, help=f"cpu or cuda ({d.device})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores)")


def cmd_dataset(a: argparse.Namespace) -> int:
    """`defectml dataset`: read, clean, sample, split, write."""
    from defectml.train.dataset import SplitSettings, build_dataset, read_source

    splits = SplitSettings.from_options(a)  # validated before anything is read
    sets = [fs for src in a.sources for fs in read_source(src, charge=a.charge, functional=a.theory)]
    report = build_dataset(sets, Path(a.out), method=a.sample, per_relaxation=a.per_relaxation,
                           total=a.total, energy_window=a.energy_window, max_force=a.max_force,
                           splits=splits)
    if not a.quiet:
        for name, c in report.counts.items():
            print(f"{name}: {c['frames']} frames from {c['relaxations']} relaxations "
                  f"({', '.join(sorted(c['hosts']))}) -> {report.files[name]}", file=sys.stderr)
        dropped = report.cleaned
        if dropped["above_window"] or dropped["absurd_forces"]:
            print(f"cleaned: {dropped['above_window']} frames above the energy window, "
                  f"{dropped['absurd_forces']} with absurd forces", file=sys.stderr)
    print(json.dumps({"files": report.files, "sha256": report.sha256}, indent=2))
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    """`defectml finetune`: the dataset's train split in, a keyed weights file and its card out."""
    from defectml.train.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings.from_options(a)
    data = Path(a.data)
    train = data / "train.extxyz" if data.is_dir() else data
    val = Path(a.val) if a.val else (data / "val.extxyz" if data.is_dir() else None)
    if val is None:
        raise InputError("give --val VAL.extxyz (or a dataset folder with train.extxyz and val.extxyz)")
    for f in (train, val):
        if not f.is_file():
            raise InputError(f"no such file: {f}")
    say = (lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr))
    result = finetune(train, val, Path(a.out), settings, log=say)
    m = result.card["metrics"]
    print(json.dumps({"weights": str(result.weights), "best_epoch": m["best_epoch"],
                      "val_base": m["val_base"], "val_after_refit": m["val_after_refit"],
                      "val_best": m["val_best"]}, indent=2))
    return 0


def cmd_model_metrics(a: argparse.Namespace) -> int:
    """`defectml model-metrics`: errors, parity plot and (with --relax) the relaxation test."""
    from defectml.models import load_model
    from defectml.train import metrics
    from defectml.train.dataset import read_source

    model = load_model(a.model, a.device, a.threads)
    paths = [Path(d) / "test.extxyz" if (Path(d) / "test.extxyz").is_file() else Path(d) for d in a.data]
    sets = [fs for p in paths for fs in read_source(p)]
    model.check_elements({s for fs in sets for f in fs.frames for s in f.get_chemical_symbols()})
    rows = metrics.predict(model, sets, stress=not a.no_stress)
    doc = {"model": model.name, "model_key": model.key, "data": [str(p) for p in paths],
           "errors": metrics.grouped_errors(rows)}
    if a.relax:
        tests = metrics.relaxation_test(model, sets, fmax=a.fmax)
        doc["relaxation_test"] = {"within_0.1A": metrics.within(tests), "relaxations": tests}
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(doc, indent=2))
        metrics.parity_plot(rows, out / "parity.png", f"{model.name} on {len(rows)} frames")
    e = doc["errors"]["overall"]
    print(f"{model.name}: {e['frames']} frames; force MAE {e['force']['mae'] * 1000:.0f} meV/Å, relative "
          f"energy MAE {e['relative_energy_per_atom']['mae'] * 1000:.1f} meV/atom"
          + (f"; relaxations within 0.1 Å of DFT: {doc['relaxation_test']['within_0.1A']:.0%}"
             if a.relax and doc["relaxation_test"]["within_0.1A"] is not None else ""))
    return 0


def cmd_learning_curve(a: argparse.Namespace) -> int:
    """`defectml learning-curve`: finetune on nested shares of the training relaxations."""
    from defectml.train.finetune import FinetuneSettings
    from defectml.train.learning_curve import learning_curve, plot

    settings = FinetuneSettings.from_options(a)
    try:
        shares = [float(x) for x in a.shares.split(",") if x]
    except ValueError:
        raise InputError(f"--shares must be numbers like 0.25,0.5,1, not {a.shares!r}") from None
    data = Path(a.data)
    splits = [data / f"{n}.extxyz" for n in ("train", "val", "test")]
    for f in splits:
        if not f.is_file():
            raise InputError(f"{data} is not a dataset folder: no {f.name} (`defectml dataset` makes one)")
    say = (lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr))
    out = Path(a.out)
    doc = learning_curve(*splits, out, shares, settings, log=say)
    plot(doc, out / "learning_curve.png", f"{settings.base} ({settings.strategy}) on {data.name}")
    points = [{"share": p["share"], "frames": p["frames"], "force_mae": p["errors"]["force"]["mae"]}
              for p in doc["points"]]
    print(json.dumps({"base_force_mae": doc["base"]["force"]["mae"], "points": points}, indent=2))
    return 0
