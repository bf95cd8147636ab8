"""`defectml predictor train | predict | evaluate`: the direct relaxed-structure predictor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from defectml.errors import DefectMLError


def add_parsers(sub) -> None:
    """Add this area's commands to the ``defectml`` subparsers."""
    pr = sub.add_parser("predictor", help="direct relaxed-structure predictor: train, predict, evaluate",
                        description="A defect-aware equivariant graph network mapping unrelaxed defect "
                                    "structures to relaxed coordinates in one pass.")
    psub = pr.add_subparsers(dest="predictor_command", required=True)
    pt = psub.add_parser("train", help="train on the 2DMD pairs (checkpoints resume)")
    pt.add_argument("--data", default="../shared/data/2dmd-high-density-pairs.tar.gz",
                    help="the 2DMD tarball or its unpacked folder")
    pt.add_argument("--out", default="runs/predictor",
                    help="folder for model.pt, its log and the graph cache")
    pt.add_argument("--materials", default="all", help="comma list of MoS2,WSe2,hBN,GaSe,InSe,BP or all")
    pt.add_argument("--per-material", action="store_true",
                    help="one model per material (OUT/<material>/model.pt) instead of one joint model")
    pt.add_argument("--epochs", type=int, default=20)
    pt.add_argument("--batch-size", type=int, default=8)
    pt.add_argument("--lr", type=float, default=2e-3)
    pt.add_argument("--features", type=int, default=32)
    pt.add_argument("--layers", type=int, default=3)
    pt.add_argument("--cutoff", type=float, default=5.0, help="graph cutoff (Å)")
    pt.add_argument("--limit", type=int, default=None, help="first N training pairs per material")
    pt.add_argument("--device", default="cpu", help="cpu or cuda")
    pt.add_argument("--threads", type=int, default=None)
    pt.add_argument("--noise", type=float, default=0.0,
                    help="input-noise regulariser: Gaussian width (Å) of a random shift of the input atoms")
    pt.add_argument("--compile", action="store_true",
                    help="torch.compile the training step (about 2x faster on CPU after ~1 min of compiling)")
    pt.add_argument("--init-from", default=None,
                    help="start from this checkpoint's weights with a fresh schedule (fine-tuning)")
    pt.add_argument("--seed", type=int, default=0,
                    help="random seed (initial weights, batch order); seeds make an ensemble")
    pt.add_argument("--seeds", type=int, default=1,
                    help="train N models (seeds --seed..--seed+N-1: model.pt, model_s1.pt, ...), an ensemble")
    pt.add_argument("--local-weight", type=float, default=0.0,
                    help="extra loss weight of atoms within 3 Å of a defect site (the A3 metric's atoms)")
    pt.add_argument("--ema", type=float, default=0.0,
                    help="keep a moving average of the weights (decay per step, e.g. 0.999) as the model")
    pt.add_argument("--virtual-node", action="store_true",
                    help="a global node: every layer mixes each structure's mean features into its atoms")
    pt.add_argument("--norm", action="store_true",
                    help="LayerNorm on the scalar features each layer's MLPs read (stabler off-distribution)")
    pt.add_argument("--interpolate", type=float, default=0.0,
                    help="fraction of training inputs moved a random part of the way to the relaxed "
                         "structure (lets `--passes 2` refine a prediction)")
    pp = psub.add_parser("predict", help="predict the relaxed structure of an unrelaxed defect cell")
    pp.add_argument("model", help="model.pt from `defectml predictor train`; a,b,c.pt averages an ensemble")
    pp.add_argument("structure", help="unrelaxed defect supercell (CIF, POSCAR, extxyz, ...)")
    pp.add_argument("--pristine", required=True, help="the pristine supercell (or unit cell) of the host")
    pp.add_argument("-o", "--output", default=None, help="output file (default: <structure>_predicted.cif)")
    pp.add_argument("--passes", type=int, default=1,
                    help="apply the model N times, each on its last prediction (for --interpolate models)")
    pe = psub.add_parser("evaluate", help="coordinate MAE on the 2DMD test split vs the Dummy baseline")
    pe.add_argument("model", help="model.pt, or the folder of a --per-material run (all of "
                    "<material>/model*.pt, the seeds, averaged); a comma-separated list averages an ensemble")
    pe.add_argument("--data", default="../shared/data/2dmd-high-density-pairs.tar.gz")
    pe.add_argument("--out", default="runs/predictor")
    pe.add_argument("--materials", default="all")
    pe.add_argument("--passes", type=int, default=1,
                    help="apply the model N times, each on its last prediction (for --interpolate models)")


def _materials(text: str) -> list[str]:
    from defectml.predictor.data import MATERIALS

    chosen = list(MATERIALS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in chosen if m not in MATERIALS]
    if bad or not chosen:
        raise DefectMLError(f"unknown material(s) {', '.join(bad) or text!r}; "
                            f"choose from {', '.join(MATERIALS)}")
    return chosen


def cmd_predictor(a: argparse.Namespace) -> int:
    """`defectml predictor train|predict|evaluate`."""
    from defectml.predictor import data as pdata
    from defectml.predictor import ensemble, prior
    from defectml.predictor import train as ptrain

    if a.predictor_command == "predict":
        from ase.io import write

        from defectml.predictor.predict import predict_relaxed
        from defectml.structure_io import read_structure, to_atoms

        model = ptrain.load_predictor(a.model)
        unrelaxed, pristine = (to_atoms(read_structure(x)) for x in (a.structure, a.pristine))
        out = predict_relaxed(model, unrelaxed, pristine, passes=_passes(a.passes))
        target = Path(a.output or Path(a.structure).with_suffix("").as_posix() + "_predicted.cif")
        write(target, out)
        print(f"wrote {target}")
        return 0
    out = Path(a.out)
    root = pdata.unpack(a.data, out / "cache")
    materials = _materials(a.materials)
    if a.predictor_command == "train":
        from tqdm.auto import tqdm

        from defectml.predictor.model import ModelConfig

        settings = ptrain.TrainSettings.from_options(a)  # bad values fail before any graph is built
        if a.seeds < 1:
            raise DefectMLError(f"--seeds {a.seeds}: train at least one model")
        splits = [pdata.material_split(root, m, a.cutoff, out / "cache", limit=a.limit,
                                       progress=lambda x, m=m: tqdm(x, desc=f"graphs {m}", leave=False))
                  for m in materials]
        config = ModelConfig(features=a.features, layers=a.layers, cutoff=a.cutoff,
                             virtual_node=a.virtual_node, norm=a.norm)
        groups = ([(out / s.material, [s]) for s in splits] if a.per_material else [(out, splits)])
        for target in ensemble.train_ensemble(
            groups, config, settings, a.seeds,
            log=lambda t, m: print(f"{t.parent.name}/{t.stem}: {m}", file=sys.stderr),
        ):
            print(f"model: {target}")
        return 0
    print(f"{'material':>8} {'model all':>9} {'A3':>7} {'dummy all':>9} {'A3':>7} {'A3 gain':>8}")
    specs = ptrain.predictor_paths(a.model)
    per_material = all(p.is_dir() for p in specs)
    shared = None if per_material else ptrain.load_predictor(specs)
    for m in materials:
        model = ptrain.load_predictor(ensemble.material_members(specs, m)) if per_material else shared
        split = pdata.material_split(root, m, model.config.cutoff, out / "cache")
        if prior.needs_prior(model):  # CHGNet features/forces as inputs (benchmark variants)
            prior.attach_priors(split.test, split.test_ids, cache=out / "cache" / f"prior_chgnet_{m}.pt")
        res, dummy, gain = ensemble.gain_over_dummy(model, split.test, passes=_passes(a.passes))
        print(f"{m:>8} {res['all']:9.4f} {res['A3']:7.4f} {dummy['all']:9.4f} {dummy['A3']:7.4f} "
              f"{gain:8.1%}")
    return 0


def _passes(n: int) -> int:
    if n < 1:
        raise DefectMLError(f"--passes {n}: the model is applied at least once")
    return n
