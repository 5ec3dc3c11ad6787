"""The `jaxadv` command line: a thin argument layer over the library.

It parses flags, sets up logging, builds configs, resolves names from the registries
(attacks, defenses, presets, suites), calls one library function per command, and turns
expected failures into one-line errors with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

_DATA_HELP = (
    "data source: 'tfds' (CIFAR-10 through TensorFlow Datasets; needs network the first time), "
    "a folder ROOT/{train,test}/<class>/*.png|jpg, or a .tar.gz/.tgz/.tar/.zip of one. "
    "Default: $JAXADV_DATA if set, else 'tfds'."
)


class UsageError(Exception):
    """A bad flag value; printed as one line."""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    return v


def number(s: str) -> float:
    """A float, or a fraction such as 8/255."""
    try:
        v = float(Fraction(s.strip())) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _hparam(s: str) -> tuple[str, object]:
    import ast

    key, sep, value = s.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {s!r}")
    try:
        return key, (number(value) if "/" in value else ast.literal_eval(value))
    except (ValueError, SyntaxError, argparse.ArgumentTypeError):
        return key, value  # a string, e.g. norm=l2


def _field_value(s: str) -> tuple[str, object]:
    """FIELD=VALUE or SECTION.FIELD=VALUE for --set."""
    key, sep, value = s.partition("=")
    if not sep or not all(part.isidentifier() for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE or SECTION.FIELD=VALUE, got {s!r}")
    return key, _hparam(f"value={value}")[1]


def _add_data_flags(p: argparse.ArgumentParser, *, train: bool) -> None:
    p.add_argument("--data", default=os.environ.get("JAXADV_DATA", "tfds"), help=_DATA_HELP)
    p.add_argument("--cache-dir", default=None,
                   help="where decoded arrays are cached (default: $JAXADV_CACHE or ~/.cache/jaxadv)")
    if train:
        p.add_argument("--train-subset", type=_positive_int, default=None,
                       help="train on a seeded, class-balanced subset of N training images (after the validation split)")
        p.add_argument("--val-size", type=_nonneg_int, default=None,
                       help="validation images held out of train for early stopping (default: the config's, 5000)")
    p.add_argument("--test-subset", type=_positive_int, default=None,
                   help="evaluate on a seeded, class-balanced subset of N test images")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")  # fmt: skip


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many processes (JAX's distributed runtime; `python -m jaxadv.launch` sets these)")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0, or 'auto' for the cluster detection of jax.distributed "
                   "(SLURM, TPU pods); default $JAXADV_COORDINATOR, else one process")
    g.add_argument("--num-processes", type=_positive_int, default=None,
                   help="processes in the job ($JAXADV_NUM_PROCESSES)")
    g.add_argument("--process-id", type=_nonneg_int, default=None, help="this process's id ($JAXADV_PROCESS_ID)")
    g.add_argument("--join-timeout", type=_positive_int, default=None,
                   help="seconds to wait for every process to join (default $JAXADV_JOIN_TIMEOUT or 300)")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _train_flags(t: argparse.ArgumentParser) -> None:
    from jaxadv import configs, defenses

    _add_data_flags(t, train=True)
    t.add_argument("--config", default="seed", choices=sorted(configs.PRESETS),
                   help="training preset: 'seed' (faithful to the study), 'fast' (18 epochs), 'quick' (6 epochs) or "
                   "'quick8' (quick for 8 epochs with an average of the weights)")
    t.add_argument("--epochs", type=_positive_int, default=None, help="maximum epochs (default: the config's)")
    t.add_argument("--set", type=_field_value, action="append", default=[], metavar="FIELD=VALUE",
                   help="override one field of the preset, e.g. --set optim.label_smoothing=0.1 --set batch_size=512 "
                   "(repeatable; the fields are those of jaxadv.configs.TrainConfig)")
    t.add_argument("--seed", type=int, default=0, help="seed for data split, init, data order and augmentation")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    t.add_argument("--defense", choices=sorted(defenses.REGISTRY), default=None,
                   help="training-time defense: " + "; ".join(f"{d.name}: {d.description}"
                                                             for d in defenses.REGISTRY.values()))
    t.add_argument("--eps", type=number, default=None, help="attack eps of adversarial training (pixels in [0,1])")
    t.add_argument("--co-guard", type=float, default=None,
                   help="adversarial training: watch PGD accuracy on 512 validation images each epoch, keep the most "
                   "robust params, and stop when it drops this many points below its best (catastrophic overfitting)")


def _study_flags(st: argparse.ArgumentParser) -> None:
    from jaxadv import configs, study

    _add_data_flags(st, train=True)
    st.add_argument("--out", required=True, help="output directory")
    st.add_argument("--config", default=None, choices=sorted(configs.PRESETS),
                    help="training preset shared by the models (default: fast; with --pretrained, theirs)")
    st.add_argument("--epochs", type=_positive_int, default=None, help="maximum epochs per model (default: the config's)")
    st.add_argument("--set", type=_field_value, action="append", default=[], metavar="FIELD=VALUE",
                    help="override one field of the preset shared by the models (see jaxadv train --help)")
    st.add_argument("--seed", type=int, default=0, help="seed for data split, init, data order, augmentation, attacks")
    st.add_argument("--eps", type=number, default=0.1, help="FGSM eps for the attack and adversarial training")
    st.add_argument("--deepfool-max-iter", type=_positive_int, default=50, help="DeepFool iteration limit")
    st.add_argument("--deepfool-overshoot", type=float, default=0.02, help="DeepFool overshoot")
    st.add_argument("--clean-run", default=None,
                    help="reuse a finished 'jaxadv train' run directory as the clean model (its own config and budget)")
    st.add_argument("--pretrained", nargs="?", const="quick", default=None, metavar="DIR",
                    help="evaluate pretrained models instead of training: DIR/none, DIR/adversarial_training and "
                    "DIR/median_squeezing (default: the repository's pretrained/quick, trained with --config quick)")
    st.add_argument("--attack-batch", type=_positive_int, default=500, help="batch size for attacks and evaluation")
    st.add_argument("--suite", choices=study.SUITES, default="seed",
                    help="seed: the study's 3x3 table; extended: also PGD and fast adversarial training, white-box PGD, "
                    "adaptive (BPDA) attacks on median squeezing, the feature-squeezing detector and robustness curves")
    st.add_argument("--at-eps", type=number, default=8 / 255, help="extended: eps of PGD / fast adversarial training")
    st.add_argument("--pgd-steps", type=_positive_int, default=20, help="extended: steps of the evaluation PGD")
    st.add_argument("--curve-n", type=_positive_int, default=1000, help="extended: test images per curve point")
    st.add_argument("--ext-n", type=_positive_int, default=None,
                    help="extended: evaluate the new cells on the first N test images, a seeded class-balanced "
                    "subset (default: all; the seed cells use all)")
    st.add_argument("--at-pgd-steps", type=_positive_int, default=None,
                    help="extended: PGD steps of PGD adversarial training (default: the config's, 7)")
    st.add_argument("--at-co-guard", type=float, default=0.0,
                    help="extended: catastrophic-overfitting guard of the new trainings (points of PGD-10 val "
                    "accuracy; 0 = off)")  # fmt: skip


def _attack_flags(a: argparse.ArgumentParser) -> None:
    from jaxadv import attacks

    a.add_argument("--checkpoint", required=True, help="a run directory (OUT of train) or its checkpoints/ folder")
    a.add_argument("--attack", required=True, choices=sorted(attacks.REGISTRY),
                   help="registered attack: " + ", ".join(f"{n} ({f.meta.paper or 'jaxadv'})"
                                                          for n, f in sorted(attacks.REGISTRY.items())))
    a.add_argument("--eps", type=number, default=None,
                   help="budget in pixels of [0, 1] (fractions like 8/255 accepted); required except for "
                   "minimum-norm attacks")
    a.add_argument("--hp", type=_hparam, action="append", default=[], metavar="NAME=VALUE",
                   help="another hyperparameter of the attack, e.g. --hp steps=20 --hp norm=l2 (repeatable)")
    a.add_argument("--n", type=_positive_int, default=None,
                   help="attack the first N test images (a seeded class-balanced subset; default: all)")
    a.add_argument("--data", default=os.environ.get("JAXADV_DATA", "tfds"), help=_DATA_HELP)
    a.add_argument("--cache-dir", default=None, help="decoded-array cache (default: $JAXADV_CACHE or ~/.cache/jaxadv)")
    a.add_argument("--seed", type=int, default=0, help="seed of the test order and of randomized attacks")
    a.add_argument("--batch-size", type=_positive_int, default=500, help="examples per batch")
    a.add_argument("--out", required=True, help="the result JSON (an interrupted run resumes from FILE.parts/)")
    a.add_argument("--no-progress", action="store_true", help="hide progress bars")  # fmt: skip


def _autoattack_flags(a: argparse.ArgumentParser) -> None:
    from jaxadv.attacks.autoattack import VERSIONS

    a.add_argument("--checkpoint", required=True, help="a run directory (OUT of train) or its checkpoints/ folder")
    a.add_argument("--norm", required=True, choices=["linf", "l2"], help="threat model")
    a.add_argument("--eps", required=True, type=number, help="budget in pixels of [0, 1], e.g. 8/255 (linf) or 0.5 (l2)")
    a.add_argument("--data", default=os.environ.get("JAXADV_DATA", "tfds"), help=_DATA_HELP)
    a.add_argument("--cache-dir", default=None, help="decoded-array cache (default: $JAXADV_CACHE or ~/.cache/jaxadv)")
    a.add_argument("--n", type=_positive_int, default=1000,
                   help="the first N test images, a seeded class-balanced subset (default 1000, as RobustBench)")
    a.add_argument("--version", choices=VERSIONS, default="standard", help="the reference's attack ensemble")
    a.add_argument("--early-exit", action="store_true",
                   help="stop attacking a point once fooled: the same verdicts, other adversarial examples, faster")
    a.add_argument("--square-window", choices=["image", "batch"], default="image",
                   help="Square's windows: one per image (default, batch-independent) or one per batch (the reference)")
    a.add_argument("--batch-size", type=_positive_int, default=250, help="points per attack batch (the reference's 250)")
    a.add_argument("--n-iter", type=_positive_int, default=100,
                   help="APGD/FAB iterations (default 100, the reference's; fewer is not AutoAttack, only a smoke run)")
    a.add_argument("--n-queries", type=_positive_int, default=5000, help="Square's queries (default 5000, the reference's)")
    a.add_argument("--seed", type=int, default=0, help="seed of the test order and of the attacks' randomness")
    a.add_argument("--out", required=True, help="result JSON (a markdown table beside it); an interrupted run resumes")
    a.add_argument("--no-progress", action="store_true", help="hide progress bars")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxadv",
                     description="Adversarial robustness of image classifiers in JAX: train, evaluate, attack, defend.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_flags(sub.add_parser(
        "train", help="train the CNN and write checkpoints, history, curves and a test summary",
        description="Train the study's CNN on CIFAR-10. Writes OUT/checkpoints/, OUT/history.json, OUT/curves.png and "
        "OUT/summary.json (test accuracy of the best-validation params, as the defense deploys them)."))
    _study_flags(sub.add_parser(
        "study", help="the seed study (3x3 table) or the extended suite",
        description="Reproduce 'Defense Against Adversarial Examples in NN': train (or reuse) the models, evaluate "
        "every cell, and write OUT/results.json, OUT/results.md and plots. Resumable: rerun the same command."))
    _attack_flags(sub.add_parser(
        "attack", help="clean and robust accuracy of a checkpoint under any registered attack",
        description="Evaluate a checkpoint (as its defense deploys it) under one registered attack. Writes clean and "
        "robust accuracy, the attack's settings and per-example results (norms for minimum-norm attacks) to --out. "
        "Resumable: rerun the same command after an interruption."))
    _autoattack_flags(sub.add_parser(
        "autoattack", help="RobustBench-style AutoAttack robust accuracy of a checkpoint",
        description="AutoAttack (APGD-CE, APGD-T, FAB-T, Square for 'standard') on the first N test images of a "
        "checkpoint, as its defense deploys it. Writes OUT (clean and robust accuracy, a record per attack, the "
        "sanity flags, a record per point) and OUT with .md (the contribution table). Resumable between attacks "
        "and batches: rerun the same command."))
    e = sub.add_parser("evaluate", help="clean test accuracy of a trained checkpoint",
                       description="Evaluate a checkpoint (its config is read from the checkpoint) on the test split.")
    e.add_argument("--checkpoint", required=True, help="a run directory (OUT of train) or its checkpoints/ folder")
    _add_data_flags(e, train=False)
    e.add_argument("--seed", type=int, default=0, help="seed of the test order (--test-subset)")
    e.add_argument("--out", default=None, help="write the summary JSON here")
    e.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="test-time augmentation: 'flip' averages the logits of each image and its mirror image")
    for name in ("train", "study", "attack", "autoattack", "evaluate"):
        _add_distributed_flags(sub.choices[name])
    b = sub.add_parser("bench", add_help=False,
                       help="the benchmark harness (python -m benchmarks.run; run from the source tree)",
                       description="Same as `python -m benchmarks.run ARGS`; `jaxadv bench --help` lists its flags.")
    b.add_argument("bench_args", nargs="*", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def _resolve_ckpt_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"checkpoint not found: {path}")
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def _check_eps(eps: float, flag: str = "--eps") -> None:
    if not 0 <= eps <= 1:  # also rejects NaN
        raise UsageError(f"{flag} must be in [0, 1] (pixel units), got {eps}")


def _check_writable(out: Path) -> None:
    """Fail now, not after the first epoch, if OUT cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None


def _config(args, **defense):
    """The named preset with the flags that override it (--epochs, --val-size, --defense, --set ...)."""
    from jaxadv.configs import get_config, override

    cfg = get_config(args.config)
    top = {k: v for k, v in (("epochs", args.epochs), ("val_size", args.val_size)) if v is not None}
    cfg = cfg.replace(**top)
    if getattr(args, "set", None):
        cfg = override(cfg, dict(args.set))
    defense = {k: v for k, v in defense.items() if v is not None}
    return cfg.with_defense(defense.pop("name", cfg.defense.name), **defense) if defense else cfg


def _load_splits(args, val_size: int, log):
    from jaxadv import data

    splits = data.load(args.data, cache_dir=args.cache_dir, val_size=val_size,
                       train_subset=getattr(args, "train_subset", None), test_subset=getattr(args, "test_subset", None),
                       seed=args.seed, progress=not args.no_progress)  # fmt: skip
    log.info("data: %s: train %d, val %d, test %d", splits.source, len(splits.train), len(splits.val), len(splits.test))
    return splits


def cmd_train(args, log) -> int:
    from jaxadv import checkpoint, train

    if args.eps is not None:
        _check_eps(args.eps)
    cfg = _config(args, name=args.defense, eps=args.eps, co_guard=args.co_guard)
    out = Path(args.out)
    if checkpoint.latest_step(out / "checkpoints") is not None and not args.resume:
        raise UsageError(f"{out / 'checkpoints'} already has checkpoints: pass --resume to continue, or choose a new --out")
    _check_writable(out)
    splits = _load_splits(args, cfg.val_size, log)
    r = train.train_and_evaluate(cfg, splits, out, seed=args.seed, resume=args.resume, progress=not args.no_progress,
                                 log=log.info)  # fmt: skip
    s = r.summary
    print(f"test accuracy {s['accuracy_pct']:.2f}% (loss {s['loss']:.4f}, n={s['n']}; flip TTA "
          f"{s['flip_tta_accuracy_pct']:.2f}%) after {s['epochs']} epochs, {s['seconds'] / 60:.1f} min training "
          f"-> {out}")
    return 0


def cmd_study(args, log) -> int:
    from jaxadv import checkpoint, study

    _check_eps(args.eps)
    _check_eps(args.at_eps, "--at-eps")
    if not (math.isfinite(args.deepfool_overshoot) and args.deepfool_overshoot >= 0):
        raise UsageError(f"--deepfool-overshoot must be a finite number >= 0, got {args.deepfool_overshoot}")
    if not args.at_co_guard >= 0:
        raise UsageError(f"--at-co-guard must be >= 0 (points), got {args.at_co_guard}")
    if args.clean_run is not None:
        checkpoint.read_meta(_resolve_ckpt_dir(args.clean_run))  # a typo fails now, not after hours of training
    pretrained = None
    if args.pretrained is not None:
        from jaxadv import pretrained as pretrained_mod

        if args.clean_run is not None or args.set or args.epochs is not None:
            raise UsageError("--pretrained evaluates the shipped models as they are: drop --clean-run, --set and --epochs")
        try:
            pretrained = pretrained_mod.resolve_dir(args.pretrained)
            args.config = args.config or pretrained_mod.config_name(pretrained)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    args.config = args.config or "fast"
    _check_writable(Path(args.out))
    cfg = _config(args)
    settings = study.Settings(
        eps=args.eps, deepfool=(("max_iter", args.deepfool_max_iter), ("num_candidates", 10),
                                ("overshoot", args.deepfool_overshoot)),
        at_eps=args.at_eps, pgd_steps=args.pgd_steps, at_pgd_steps=args.at_pgd_steps, at_co_guard=args.at_co_guard,
        ext_n=args.ext_n, curve_n=args.curve_n)  # fmt: skip
    splits = _load_splits(args, cfg.val_size, log)
    study.run(splits, args.out, base=cfg, suite=args.suite, settings=settings, seed=args.seed,
              attack_batch=args.attack_batch, progress=not args.no_progress, log=log.info,
              clean_run=args.clean_run, pretrained=pretrained)  # fmt: skip
    from jaxadv import distributed

    if distributed.is_primary():  # process 0 wrote it; the others may get here first
        print(Path(args.out, "results.md").read_text())
    return 0


def cmd_evaluate(args, log) -> int:
    from jaxadv import defenses, evaluation, io, train

    ckpt_dir = _resolve_ckpt_dir(args.checkpoint)
    apply_fn, variables, cfg, meta = train.load_trained(str(ckpt_dir))
    splits = _load_splits(args, 0, log)
    deployed = defenses.deployed_apply(cfg.defense, apply_fn)
    if args.tta == "flip":
        deployed = evaluation.flip_tta(deployed)
    summary = evaluation.evaluate(deployed, variables, splits.test.images, splits.test.labels)
    history = meta.get("history", [])
    summary.update(tta=args.tta, epochs=len(history), seconds=sum(h["seconds"] for h in history),
                   checkpoint=str(ckpt_dir), data=splits.source, split="test", environment=io.environment())
    if args.out:
        io.write_json(args.out, summary)
    view = " with flip TTA" if args.tta == "flip" else ""
    print(f"test accuracy{view} {summary['accuracy_pct']:.2f}% (loss {summary['loss']:.4f}, n={summary['n']}) "
          f"of {ckpt_dir}")
    return 0


def cmd_attack(args, log) -> int:
    from jaxadv import robustness

    spec = _attack_spec(args)
    out = Path(args.out)
    if out.suffix != ".json":
        raise UsageError(f"--out {args.out}: expected a .json path")
    _check_writable(out.parent)
    result = robustness.evaluate_checkpoint(
        str(_resolve_ckpt_dir(args.checkpoint)), spec, data=args.data, cache_dir=args.cache_dir, n=args.n,
        seed=args.seed, batch_size=args.batch_size, out=out, progress=not args.no_progress, log=log.info)  # fmt: skip
    print(robustness.one_line(result))
    return 0


def cmd_autoattack(args, log) -> int:
    from jaxadv import autoattack_eval, checkpoint, defenses, io, train
    from jaxadv import data as data_mod

    limit = 1.0 if args.norm == "linf" else 64.0
    if not 0 < args.eps <= limit:
        raise UsageError(f"--eps must be in (0, {limit:g}] for norm {args.norm} (pixels in [0, 1]), got {args.eps}")
    out = Path(args.out)
    if out.suffix != ".json":
        raise UsageError(f"--out {args.out}: expected a .json path")
    ckpt = _resolve_ckpt_dir(args.checkpoint)
    _check_writable(out.parent)
    apply_fn, variables, cfg, _ = train.load_trained(str(ckpt))
    deployed = defenses.deployed_apply(cfg.defense, apply_fn)
    splits = data_mod.load(args.data, cache_dir=args.cache_dir, val_size=0, seed=args.seed, progress=not args.no_progress)
    test = splits.test
    n = min(args.n, len(test))
    fingerprint = {"checkpoint": str(ckpt.resolve()), "step": checkpoint.latest_step(ckpt), "data": splits.source}
    result = autoattack_eval.evaluate(
        deployed, variables, test.images[:n], test.labels[:n], test.index[:n], eps=args.eps, norm=args.norm,
        version=args.version, early_exit=args.early_exit, square_window=args.square_window, seed=args.seed,
        batch_size=args.batch_size, state_path=out.with_name(out.stem + ".state.npz"), fingerprint=fingerprint,
        progress=not args.no_progress, log=log.info, n_iter=args.n_iter, n_queries=args.n_queries)  # fmt: skip
    result.update(checkpoint=str(ckpt), defense=cfg.defense.name, version=args.version, early_exit=args.early_exit,
                  n_iter=args.n_iter, n_queries=args.n_queries,
                  square_window=args.square_window, data=splits.source, environment=io.environment())
    io.write_json(out, result)
    io.write_text(out.with_suffix(".md"), autoattack_eval.markdown(result, f"AutoAttack ({args.version}) of {ckpt}"))
    f = result["flags"]
    raised = [k for k in ("randomized", "probabilities", "square_beats_white_box", "nan") if f.get(k)]
    raised += [k for k in ("within_eps", "within_box") if not f.get(k)]
    raised += ["zero_gradients"] if f.get("zero_gradients") else []
    print(f"clean {result['clean_accuracy_pct']:.2f}% -> robust {result['robust_accuracy_pct']:.2f}% under AutoAttack "
          f"({args.version}, {args.norm} {args.eps:.6g}), n={n}; flags: {', '.join(raised) or 'none'}")
    return 0


def _attack_spec(args):
    from jaxadv import attacks

    fn = attacks.get(args.attack)
    hp = dict(args.hp)
    if fn.meta.minimum_norm:
        if args.eps is not None:
            raise UsageError(f"--eps: {args.attack} is a minimum-norm attack and takes no budget")
    elif args.eps is None:
        raise UsageError(f"--eps is required for {args.attack} (e.g. --eps 8/255)")
    else:
        _check_eps(args.eps)
        hp["eps"] = args.eps
    unknown = sorted(set(hp) - set(fn.meta.defaults(fn)) - {"eps"})
    if unknown:
        raise UsageError(f"--hp: {args.attack} has no hyperparameter {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(fn.meta.defaults(fn)))}")  # fmt: skip
    return attacks.Spec(args.attack, **hp)


def cmd_bench(args, log) -> int:
    # The harness lives in benchmarks/ of the source tree (it is not part of the installed
    # package): import it from the current directory.
    if (Path.cwd() / "benchmarks" / "run.py").is_file() and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        from benchmarks import run
    except ImportError:
        raise UsageError("the benchmark harness is benchmarks/run.py of the jaxadv source tree; "
                         "run `jaxadv bench` from the repository root") from None  # fmt: skip
    return run.main(args.bench_args)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "attack": cmd_attack, "autoattack": cmd_autoattack,
            "study": cmd_study, "bench": cmd_bench}


def _host_devices_from_env() -> None:
    """`JAXADV_HOST_DEVICES=N` exposes N host (CPU) devices, so CPU runs are data-parallel.

    Opt-in: it must be set before JAX initializes its backends, so only the CLI does it,
    and an explicit XLA_FLAGS setting wins. A starved device thread can trip XLA:CPU's
    40 s collective timeout on a busy 2-core machine, which aborts the process.
    """
    n = os.environ.get("JAXADV_HOST_DEVICES")
    flags = os.environ.get("XLA_FLAGS", "")
    if not n or "xla_force_host_platform_device_count" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()


def _compilation_cache() -> None:
    """Keep compiled XLA programs on disk (`$JAXADV_XLA_CACHE`, default ~/.cache/jaxadv/xla; "0": off).

    Attacks compile a program per batch shape; a second run of the same command reuses them.
    Set here, at the edge: the library never touches jax.config.
    """
    where = os.environ.get("JAXADV_XLA_CACHE")
    if where == "0":
        return
    import jax

    base = Path(os.environ.get("JAXADV_CACHE") or "~/.cache/jaxadv").expanduser()
    jax.config.update("jax_compilation_cache_dir", str(Path(where) if where else base / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _logging() -> logging.Logger:
    # Our own INFO lines only; orbax and absl log every save step at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    log = logging.getLogger("jaxadv")
    log.setLevel(logging.INFO)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.WARNING)
    except ImportError:
        pass
    return log


def main(argv: list[str] | None = None) -> int:
    _host_devices_from_env()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # all further flags are the harness's own (argparse REMAINDER drops --flags)
        args = argparse.Namespace(command="bench", bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from jaxadv import distributed
    from jaxadv.checkpoint import CheckpointError
    from jaxadv.data import DataError

    try:  # before anything starts a JAX backend
        if hasattr(args, "coordinator"):
            distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.join_timeout)
    except distributed.DistributedError as e:
        print(f"jaxadv {args.command}: error: {e}", file=sys.stderr)
        return 2
    log = _logging()
    if not distributed.is_primary():
        # Process 0 reports; the others say only what goes wrong (warnings, errors).
        log.setLevel(logging.WARNING)
        args.no_progress = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    _compilation_cache()

    try:
        return COMMANDS[args.command](args, log)
    except (UsageError, DataError, CheckpointError, ValueError, FloatingPointError) as e:
        # ValueError: bad argument values surfacing from the library; FloatingPointError: a
        # diverged training run. Both are the user's to fix, not a bug to debug.
        print(f"jaxadv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output, a directory where a file was expected, ...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"jaxadv {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = {"train": "rerun with --resume"}.get(args.command, "rerun the same command")
        print(f"jaxadv {args.command}: interrupted; {again} to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
