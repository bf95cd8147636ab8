"""One material, one training variant of the direct predictor: test-split A3 gain over Dummy.

The experiments behind the benchmark's setup (width, input noise, warm restarts) run one at a time
through this script, each under its own name; a finished run is only re-evaluated. Each result is
merged into benchmarks/results/predictor_variants.{json,md} under its name. The best validation loss
is comparable between runs only at the same A3 loss weight (the weight enters the validation loss).

    python benchmarks/predictor_variants.py MoS2 f64_e60 --features 64 --epochs 60
    python benchmarks/predictor_variants.py MoS2 noise03_e30 --noise 0.03 --epochs 30
    python benchmarks/predictor_variants.py MoS2 restart_e60 --epochs 60 --lr 5e-4 \\
        --init-from runs/definet/per_material_f32_l3/MoS2.pt
    python benchmarks/predictor_variants.py hBN hBN_n40_e150 --features 64 --epochs 150 --limit 40

Fine-tuning from one model pretrained on all six materials (the ``*_pt12_ft*`` rows): the joint model
is ``defectml predictor train --out runs/definet/joint_pt --features 64 --layers 5 --cutoff 5
--epochs 12 --noise 0.03 --compile --threads 2`` (about 3 min per epoch on this CPU), then

    python benchmarks/predictor_variants.py MoS2 MoS2_pt12_ft30 --features 64 --layers 5 --noise 0.03 \
        --epochs 30 --init-from runs/definet/joint_pt/model.pt

Session-8 levers (5 layers, 64 features, noise 0.03, 30 epochs unless named): ``--batch-size 2`` (four
times the optimiser steps), ``--ema 0.99`` (the moving average of the weights is validated and kept),
``--virtual-node`` (a global node: every layer mixes each structure's mean scalar and vector features
into its atoms, as the reference network does), ``--prior`` (CHGNet atom features and forces on the
unrelaxed cell as extra inputs; computed once per structure into WORK/cache/prior_chgnet_<material>.pt),
and 90 epochs:

    python benchmarks/predictor_variants.py MoS2 MoS2_l5_prior_e30 --features 64 --layers 5 \\
        --noise 0.03 --prior
    python benchmarks/predictor_variants.py hBN hBN_l5_e90 --features 64 --layers 5 --noise 0.03 --epochs 90

Session-9 levers: ``--norm`` (LayerNorm on the scalar features each layer's MLPs read) and
``--interpolate F`` (a fraction F of the training inputs moved a random part t of the way to the
relaxed structure, targets shrunk to 1 - t; such a model is also scored with two passes, its prediction
fed back as input), and the levers combined:

    python benchmarks/predictor_variants.py MoS2 MoS2_l5_ln_interp5_e30 --features 64 --layers 5 \
        --noise 0.03 --norm --interpolate 0.5
    python benchmarks/predictor_variants.py MoS2 MoS2_l7_vn_ema_b4_e30 --features 64 --layers 7 \
        --noise 0.03 --virtual-node --ema 0.99 --batch-size 4

The last column of the table scores the first 50 training structures the same way: a train gain far
above the test gain is overfitting, both low is underfitting.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from defectml.predictor.data import material_split, unpack
from defectml.predictor.metrics import coordinate_mae, mean_metrics
from defectml.predictor.model import ModelConfig
from defectml.predictor.train import TrainSettings, evaluate, load_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
TRAIN_EVAL = 50  # training structures scored as well (see the module doc)


def write_tables(doc: dict, out: Path) -> None:
    """predictor_variants.md from all recorded runs."""
    md = [
        "# Direct predictor variants (one material per run, test split, 50 structures)",
        "",
        "Rerun a row: `python benchmarks/predictor_variants.py MATERIAL NAME [options]` (see the script).",
        "",
        "| run | material | train structures | features x layers | cutoff (A) | epochs | lr | weight decay "
        "| batch | EMA | CHGNet inputs | noise (A) | interpolated inputs "
        "| A3 loss weight | init from | best val loss (A) | model A3 | Dummy A3 | A3 gain "
        "| A3 gain, 2 passes | A3 gain on train |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in doc.items():
        c = r["config"]
        md.append(
            f"| {name} | {r['material']} | {r.get('train_structures', '-')} "
            f"| {c['features']} x {c['layers']}{' +VN' if c.get('virtual_node') else ''}"
            f"{' +LN' if c.get('norm') else ''} | {c['cutoff']:g} "
            f"| {r['epochs']} "
            f"| {r['lr']:g} | {r.get('weight_decay', 1e-6):g} "
            f"| {r.get('batch_size', 8)} | {r.get('ema', 0):g} | {'yes' if r.get('prior') else '-'} "
            f"| {r['noise_A']:g} | {r.get('interpolate', 0):g} "
            f"| {r.get('local_weight', 0):g} "
            f"| {'/'.join(Path(r['init_from']).parts[-2:]) if r['init_from'] else '-'} "
            f"| {r['best_val_loss_A']:.4f} | {r['model']['A3']:.4f} | {r['dummy']['A3']:.4f} "
            f"| {r['improvement_A3']:.1%} "
            f"| {format(r['improvement_A3_2pass'], '.1%') if 'improvement_A3_2pass' in r else '-'} "
            f"| {format(r['train_improvement_A3'], '.1%') if 'train_improvement_A3' in r else '-'} |"
        )
    (out / "predictor_variants.md").write_text("\n".join(md) + "\n")


def _scores(model, graphs, passes: int = 1) -> tuple[dict, dict]:
    """Mean coordinate MAEs of the model and of Dummy (the unrelaxed positions) over ``graphs``."""
    dummy = mean_metrics([coordinate_mae(np.zeros((len(g.z), 3)), g) for g in graphs])
    return evaluate(model, graphs, passes=passes)[0], dummy


def main() -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("material")
    p.add_argument("name", help="run name (checkpoint WORK/variants/<name>.pt)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "2dmd-high-density-pairs.tar.gz"))
    p.add_argument("--work", default=str(ROOT / "runs" / "definet"))
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--init-from", default=None)
    p.add_argument(
        "--local-weight", type=float, default=0.0, help="extra loss weight of atoms <=3 A of a defect"
    )
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--ema", type=float, default=0.0, help="weight moving-average decay per step (0: off)")
    p.add_argument(
        "--prior", action="store_true", help="CHGNet atom features and forces on the unrelaxed cell as inputs"
    )
    p.add_argument("--virtual-node", action="store_true", help="global mean features mixed in at every layer")
    p.add_argument(
        "--interpolate",
        type=float,
        default=0.0,
        help="fraction of training inputs moved part of the way to the relaxed structure",
    )
    p.add_argument("--norm", action="store_true", help="LayerNorm on the scalar features the MLPs read")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--batch-size", type=int, default=8, help="structures per gradient step")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training ids only")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(1)
    work = Path(a.work)
    root = unpack(a.data, work / "cache")
    split = material_split(root, a.material, a.cutoff, work / "cache", limit=a.limit)
    if a.prior:
        from defectml.predictor.prior import PRIOR_FEATURES, attach_priors

        t_prior = time.perf_counter()
        attach_priors(
            split.train + split.val + split.test,
            split.train_ids + split.val_ids + split.test_ids,
            cache=work / "cache" / f"prior_chgnet_{a.material}.pt",
        )
        print(f"CHGNet priors ready in {time.perf_counter() - t_prior:.0f} s", flush=True)
    checkpoint = work / "variants" / f"{a.name}.pt"
    settings = TrainSettings.from_options(a, threads=1, compile=not a.no_compile)
    t0 = time.perf_counter()
    train(
        split.train,
        split.val,
        checkpoint,
        ModelConfig(
            features=a.features,
            layers=a.layers,
            cutoff=a.cutoff,
            prior_features=PRIOR_FEATURES if a.prior else 0,
            force_prior=a.prior,
            virtual_node=a.virtual_node,
            norm=a.norm,
        ),
        settings,
        log=lambda m: print(m, flush=True),
    )
    model, ck = load_checkpoint(checkpoint)
    res, dummy = _scores(model, split.test)
    res2 = _scores(model, split.test, passes=2)[0] if a.interpolate > 0 else None  # recycling needs it
    res_train, dummy_train = _scores(model, split.train[:TRAIN_EVAL])
    row = {
        "material": a.material,
        "config": model.config.to_dict(),
        "epochs": len(ck["history"]),
        "train_structures": len(split.train),
        "lr": a.lr,
        "noise_A": a.noise,
        "init_from": a.init_from,
        "local_weight": a.local_weight,
        "weight_decay": a.weight_decay,
        "batch_size": a.batch_size,
        "ema": a.ema,
        "prior": a.prior,
        "interpolate": a.interpolate,
        "seed": a.seed,
        "best_val_loss_A": ck["best_val"],
        "train_s": sum(h["time_s"] for h in ck["history"]),
        "wall_s_this_run": time.perf_counter() - t0,
        "model": res,
        "dummy": dummy,
        "improvement_A3": 1 - res["A3"] / dummy["A3"],
        **({"model_2pass": res2, "improvement_A3_2pass": 1 - res2["A3"] / dummy["A3"]} if res2 else {}),
        "train_improvement_A3": 1 - res_train["A3"] / dummy_train["A3"],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictor_variants.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc[a.name] = row
    path.write_text(json.dumps(doc, indent=2))
    write_tables(doc, out)
    print(
        json.dumps(row["model"]),
        f"A3 gain {row['improvement_A3']:.1%}",
        f"(2 passes {row['improvement_A3_2pass']:.1%})" if res2 else "",
    )


if __name__ == "__main__":
    main()
