"""The `jaxadv` command line: train, evaluate (and later study, bench).

This is the edge of the program: it parses flags, sets up logging, builds the root PRNG
key, resolves names to library functions, and turns expected failures into one-line
errors. Everything it calls is a library function that can be used from Python.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
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


def _add_data_flags(p: argparse.ArgumentParser, *, train: bool) -> None:
    p.add_argument("--data", default=os.environ.get("JAXADV_DATA", "tfds"), help=_DATA_HELP)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where decoded arrays are cached (default: $JAXADV_CACHE or ~/.cache/jaxadv)",
    )
    if train:
        p.add_argument(
            "--train-subset", type=_positive_int, default=None,
            help="train on a seeded, class-balanced subset of N training images (after the validation split)",
        )  # fmt: skip
        p.add_argument(
            "--val-size", type=_nonneg_int, default=None,
            help="validation images held out of train for early stopping (default: the config's, 5000)",
        )  # fmt: skip
    p.add_argument(
        "--test-subset", type=_positive_int, default=None,
        help="evaluate on a seeded, class-balanced subset of N test images",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxadv",
        description="Adversarial robustness of image classifiers in JAX: train, evaluate, attack, defend.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train the CNN and write checkpoints, history, curves and a test summary",
        description="Train the seed CNN on CIFAR-10. Writes OUT/checkpoints/, OUT/history.json, "
        "OUT/curves.png and OUT/summary.json (test accuracy of the best-validation params).",
    )
    _add_data_flags(t, train=True)
    t.add_argument("--config", default="seed", help="training preset: 'seed' (faithful to the study) or 'fast'")
    t.add_argument("--epochs", type=_positive_int, default=None, help="maximum epochs (default: the config's)")
    t.add_argument("--seed", type=int, default=0, help="seed for data split, init, data order and augmentation")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    t.add_argument(
        "--defense", choices=["none", "median", "fgsm_at", "pgd_at", "fast_at"], default=None,
        help="training-time defense: median-filtered inputs, FGSM, PGD or fast (random-start FGSM) adversarial "
        "training (default: none)",
    )  # fmt: skip
    t.add_argument("--eps", type=float, default=None, help="attack eps of adversarial training (pixels in [0,1])")
    t.add_argument(
        "--co-guard", type=float, default=None,
        help="adversarial training: watch PGD accuracy on 512 validation images each epoch, keep the most robust "
        "params, and stop when it drops this many points below its best (catastrophic overfitting)",
    )  # fmt: skip

    st = sub.add_parser(
        "study",
        help="the seed study: train clean, FGSM-AT and median-squeezed models; the 3x3 attack table",
        description="Reproduce 'Defense Against Adversarial Examples in NN': train (or reuse) the clean, "
        "FGSM adversarially trained and median-squeezed models, evaluate clean / FGSM / DeepFool accuracy "
        "for each, and write OUT/results.json, OUT/results.md and plots. Resumable: rerun the same command "
        "after an interruption.",
    )
    _add_data_flags(st, train=True)
    st.add_argument("--out", required=True, help="output directory")
    st.add_argument("--config", default="fast", help="training preset shared by the three models: 'seed' or 'fast'")
    st.add_argument("--epochs", type=_positive_int, default=None, help="maximum epochs per model (default: the config's)")
    st.add_argument("--seed", type=int, default=0, help="seed for data split, init, data order and augmentation")
    st.add_argument("--eps", type=float, default=0.1, help="FGSM eps for the attack and adversarial training")
    st.add_argument("--deepfool-max-iter", type=_positive_int, default=50, help="DeepFool iteration limit")
    st.add_argument("--deepfool-overshoot", type=float, default=0.02, help="DeepFool overshoot")
    st.add_argument(
        "--clean-run", default=None,
        help="reuse a finished 'jaxadv train' run directory as the clean model (its own config and budget)",
    )  # fmt: skip
    st.add_argument("--attack-batch", type=_positive_int, default=500, help="batch size for attacks and evaluation")
    st.add_argument(
        "--suite", choices=["seed", "extended"], default="seed",
        help="seed: the study's 3x3 table; extended: also PGD and fast adversarial training, white-box PGD, "
        "adaptive (BPDA) attacks on median squeezing, the feature-squeezing detector and robustness curves",
    )  # fmt: skip
    st.add_argument("--at-eps", type=float, default=8 / 255, help="extended: eps of PGD / fast adversarial training")
    st.add_argument("--pgd-steps", type=_positive_int, default=20, help="extended: steps of the evaluation PGD")
    st.add_argument("--curve-n", type=_positive_int, default=1000, help="extended: test images per curve point")
    st.add_argument(
        "--ext-n", type=_positive_int, default=None,
        help="extended: evaluate the new phases on a seeded class-balanced subset of N test images (default: all; "
        "the seed cells use all)",
    )  # fmt: skip
    st.add_argument("--at-pgd-steps", type=_positive_int, default=None,
                    help="extended: PGD steps of PGD adversarial training (default: the config's, 7)")  # fmt: skip
    st.add_argument("--at-co-guard", type=float, default=0.0,
                    help="extended: catastrophic-overfitting guard of the new trainings (points of PGD-10 val accuracy; "
                    "0 = off)")  # fmt: skip

    b = sub.add_parser(
        "bench", add_help=False,
        help="the benchmark harness (python -m benchmarks.run; run from the source tree): jaxadv beside the peers",
        description="Same as `python -m benchmarks.run ARGS`; `jaxadv bench --help` lists its flags.",
    )  # fmt: skip
    b.add_argument("bench_args", nargs="*", help=argparse.SUPPRESS)

    e = sub.add_parser(
        "evaluate",
        help="clean test accuracy of a trained checkpoint",
        description="Evaluate a checkpoint (its config is read from the checkpoint) on the test split.",
    )
    e.add_argument("--checkpoint", required=True, help="a run directory (OUT of train) or its checkpoints/ folder")
    _add_data_flags(e, train=False)
    e.add_argument("--seed", type=int, default=0, help="seed for --test-subset")
    e.add_argument("--out", default=None, help="write the summary JSON here")
    return parser


def _versions() -> dict:
    import flax
    import jax
    import optax
    import orbax.checkpoint as ocp

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": getattr(ocp, "__version__", "?"),
    }


def environment() -> dict:
    """Device, versions and git commit, recorded next to every result."""
    import jax

    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pass
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": commit,
    }


def _resolve_ckpt_dir(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"checkpoint not found: {path}")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return p


def augment_fn(cfg):
    """The config's per-batch augmentation `(key, x) -> x`, or None."""
    import functools

    from jaxadv import data

    return functools.partial(data.augment, pad=4, pad_mode=cfg.pad_mode, flip=True) if cfg.augment else None


def _check_eps(eps: float) -> None:
    if not 0 <= eps <= 1:  # also rejects NaN
        raise UsageError(f"--eps must be in [0, 1] (pixel units), got {eps}")


def _check_writable(out: Path) -> None:
    """Fail now, not after the first epoch, if OUT cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None


def _config(args, **overrides):
    """The named preset with the flags that override it (--epochs, --val-size, ...)."""
    from jaxadv.configs import get_config

    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.val_size is not None:
        overrides["val_size"] = args.val_size
    return get_config(args.config).replace(**overrides)


def _load_splits(args, cfg, log):
    from jaxadv import data

    splits = data.load(
        args.data, cache_dir=args.cache_dir, val_size=cfg.val_size, train_subset=args.train_subset,
        test_subset=args.test_subset, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    log.info("data: %s: train %d, val %d, test %d", splits.source, len(splits.train.labels), len(splits.val.labels),
             len(splits.test.labels))  # fmt: skip
    return splits


def cmd_train(args, log) -> int:
    import jax
    import numpy as np

    from jaxadv import checkpoint, defenses, plots, train

    overrides = {}
    if args.defense is not None:
        overrides["defense"] = args.defense
    if args.eps is not None:
        _check_eps(args.eps)
        overrides["defense_eps"] = args.eps
    if args.co_guard is not None:
        overrides["co_guard"] = args.co_guard
    cfg = _config(args, **overrides)
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    if checkpoint.latest_step(ckpt_dir) is not None and not args.resume:
        raise UsageError(f"{ckpt_dir} already has checkpoints: pass --resume to continue, or choose a new --out")
    _check_writable(out)
    splits = _load_splits(args, cfg, log)
    apply_fn = train.make_apply(train.create_model(cfg, len(splits.class_names)))
    t0 = time.perf_counter()
    result = train.fit(
        cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
        key=jax.random.key(args.seed), num_classes=len(splits.class_names),
        batch_transform=defenses.batch_transform(cfg, apply_fn), augment_fn=augment_fn(cfg),
        eval_squeezer=defenses.eval_squeezer(cfg), ckpt_dir=str(ckpt_dir), resume=args.resume,
        robust_eval=defenses.robust_monitor(cfg, apply_fn, splits.val.images, splits.val.labels),
        extra_meta={"data": splits.source, "seed": args.seed, "class_names": list(splits.class_names)},
        progress=not args.no_progress, log=log.info,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    history = result.history
    checkpoint.write_json_atomic(out / "history.json", history)
    plots.training_curves({cfg.name: history}, out / "curves.png")
    # As the defense deploys the model (median-filtered inputs for --defense median).
    deployed = defenses.defended_apply(cfg, train.make_apply(result.state.model))
    summary = train.evaluate(deployed, result.state.variables, splits.test.images, splits.test.labels)
    summary.update(
        epochs=len(history),
        seconds=sum(h["seconds"] for h in history),
        wall_seconds_this_invocation=seconds,
        train_img_per_s=float(np.median([h["img_per_s"] for h in history])) if history else None,
        config=cfg.to_dict(), data=splits.source, split="test", environment=environment(),
    )  # fmt: skip
    checkpoint.write_json_atomic(out / "summary.json", summary)
    print(
        f"test accuracy {summary['accuracy_pct']:.2f}% (loss {summary['loss']:.4f}, n={summary['n']}) after "
        f"{summary['epochs']} epochs, {summary['seconds'] / 60:.1f} min training -> {out}"
    )
    return 0


def cmd_study(args, log) -> int:
    from jaxadv import study

    import math

    from jaxadv import checkpoint

    _check_eps(args.eps)
    if not (math.isfinite(args.deepfool_overshoot) and args.deepfool_overshoot >= 0):
        raise UsageError(f"--deepfool-overshoot must be a finite number >= 0, got {args.deepfool_overshoot}")
    if not args.at_co_guard >= 0:
        raise UsageError(f"--at-co-guard must be >= 0 (points), got {args.at_co_guard}")
    if args.clean_run is not None:
        checkpoint.read_meta(_resolve_ckpt_dir(args.clean_run))  # a typo fails now, not after hours of training
    _check_writable(Path(args.out))
    cfg = _config(args)
    splits = _load_splits(args, cfg, log)
    kw = dict(
        base=cfg, eps=args.eps, seed=args.seed,
        deepfool_kwargs={"max_iter": args.deepfool_max_iter, "overshoot": args.deepfool_overshoot},
        attack_batch=args.attack_batch, augment_fn=augment_fn(cfg), progress=not args.no_progress,
        log=log.info, environment=environment(), clean_run=args.clean_run,
    )  # fmt: skip
    if args.suite == "extended":
        from jaxadv import extended

        _check_eps(args.at_eps)
        results = extended.run(splits, args.out, at_eps=args.at_eps, pgd_steps=args.pgd_steps, curve_n=args.curve_n,
                               ext_n=args.ext_n, at_pgd_steps=args.at_pgd_steps, at_co_guard=args.at_co_guard,
                               **kw)  # fmt: skip
    else:
        results = study.run(splits, args.out, **kw)
    print(Path(args.out, "results.md").read_text())
    return 0 if results else 1


def cmd_evaluate(args, log) -> int:
    import jax  # noqa: F401

    from jaxadv import checkpoint, data, defenses, train

    ckpt_dir = _resolve_ckpt_dir(args.checkpoint)
    apply_fn, variables, cfg, meta = train.load_trained(str(ckpt_dir))
    splits = data.load(
        args.data, cache_dir=args.cache_dir, val_size=0, test_subset=args.test_subset, seed=args.seed,
        progress=not args.no_progress,
    )  # fmt: skip
    summary = train.evaluate(defenses.defended_apply(cfg, apply_fn), variables, splits.test.images,
                             splits.test.labels)  # fmt: skip
    summary.update(epochs=len(meta.get("history", [])), seconds=sum(h["seconds"] for h in meta.get("history", [])),
                   checkpoint=str(ckpt_dir), data=splits.source, split="test", environment=environment())  # fmt: skip
    if args.out:
        checkpoint.write_json_atomic(args.out, summary)
    print(f"test accuracy {summary['accuracy_pct']:.2f}% (loss {summary['loss']:.4f}, n={summary['n']}) of {ckpt_dir}")
    return 0


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


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "study": cmd_study, "bench": cmd_bench}


def _host_devices_from_env() -> None:
    """`JAXADV_HOST_DEVICES=N` exposes N host (CPU) devices, so CPU runs are data-parallel.

    Opt-in: it must be set before JAX initializes its backends, so only the CLI does it,
    and an explicit XLA_FLAGS setting wins. On this project's 2-core machine, splitting
    the batch over 2 host devices sped up the seed model's training step, but a
    BatchNorm model adds a cross-device all-reduce per layer, and a starved device thread
    can trip XLA:CPU's 40 s collective timeout, which aborts the process. See the
    benchmarks before turning it on.
    """
    n = os.environ.get("JAXADV_HOST_DEVICES")
    flags = os.environ.get("XLA_FLAGS", "")
    if not n or "xla_force_host_platform_device_count" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()


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
    # Our own INFO lines only; orbax and absl log every save step at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("jaxadv")
    log.setLevel(logging.INFO)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.WARNING)
    except ImportError:
        pass
    from jaxadv.checkpoint import CheckpointError
    from jaxadv.data import DataError

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
        again = {"train": "rerun with --resume", "study": "rerun the same command"}.get(args.command, "rerun")
        print(f"jaxadv {args.command}: interrupted; {again} to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
