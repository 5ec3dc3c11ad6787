"""jaxadv's AutoAttack beside the reference (pyautoattack = fra31/auto-attack), same weights, points and threads.

    python -m benchmarks.autoattack_reference --checkpoint RUN --data ARCHIVE --n 1000 --eps 8/255 \
        --out benchmarks/results/autoattack_RUN.json

For one checkpoint it runs, in turn on the same first N test points (class-balanced):
  1. pyautoattack 0.2.0 'standard' on the model converted to PyTorch (`benchmarks/peers.py`,
     identical logits), torch limited to the same number of threads as JAX's cores;
  2. jaxadv's `autoattack` in faithful mode (every point runs every iteration of every
     attack it reaches, Square's windows shared per batch, as the reference);
  3. jaxadv in early-exit mode (fooled points leave the batch; the same verdicts).
Each jaxadv mode starts cold: JAX's in-memory caches and the on-disk compilation cache are
cleared before it, so its time includes compiling everything it runs (the time of a first
`jaxadv autoattack` on a fresh machine) and no mode reuses another's programs. With
`--warm`, each mode is timed once more with the on-disk cache its cold run filled.
It reports per attack the robust accuracy after it and its time for each implementation,
the per-point agreement of the final verdicts, and the speed ratios. Writes FILE.json and
FILE.md. Timing one after the other on an otherwise idle machine; the ratio of two
implementations run minutes apart is subject to the VM's drift (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import logging
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import defenses, io, train
from jaxadv.attacks import autoattack

ORDER = ("apgd-ce", "apgd-t", "fab-t", "square")


def _set_iterations(attack, n_iter: int) -> None:
    """A reference APGD/FAB with another iteration count (APGD fixes its schedule in __init__)."""
    attack.n_iter = attack.n_iter_orig = n_iter
    if hasattr(attack, "n_iter_2"):
        attack.n_iter_2 = max(int(0.22 * n_iter), 1)
        attack.n_iter_min = max(int(0.06 * n_iter), 1)
        attack.size_decr = max(int(0.03 * n_iter), 1)


def reference(model_t, x: np.ndarray, y: np.ndarray, *, eps: float, norm: str, batch_size: int, seed: int = 0,
              n_iter: int = 100, n_queries: int = 5000):  # fmt: skip
    """pyautoattack 'standard' (or its order with a smaller budget): (robust flags,
    {attack: (robust accuracy %, seconds)}, seconds, log lines)."""
    import torch
    from pyautoattack import AutoAttack

    from benchmarks.peers import nhwc_to_nchw

    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("auto-attack")
    log.setLevel(logging.DEBUG)
    handler = Grab()
    log.addHandler(handler)
    try:
        adversary = AutoAttack(model_t, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard",
                               seed=seed, device="cpu")  # fmt: skip
        if (n_iter, n_queries) != (100, 5000):
            for attack in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
                _set_iterations(attack, n_iter)
            adversary.square.n_queries = n_queries
        xt, yt = torch.from_numpy(nhwc_to_nchw(x)), torch.from_numpy(y.astype(np.int64))
        t0 = time.perf_counter()
        x_adv, _ = adversary.run_standard_evaluation(xt, yt, batch_size=batch_size)
        seconds = time.perf_counter() - t0
    finally:
        log.removeHandler(handler)
    with torch.no_grad():
        robust = (model_t(x_adv).argmax(1) == yt).numpy()
    per = {}
    for msg in records:
        m = re.search(r"robust accuracy after ([A-Z-]+): ([\d.]+)% \(total time ([\d.]+) s\)", msg)
        if m:
            per[m.group(1).lower()] = (float(m.group(2)), float(m.group(3)))
    # The log gives cumulative times; per attack is the difference to the previous one.
    last = 0.0
    for name in ORDER:
        if name in per:
            acc, total = per[name]
            per[name] = (acc, total - last)
            last = total
    return robust, per, seconds, records


def ours(apply_fn, params, x, y, *, eps, norm, early_exit, square_window, n_iter=100, n_queries=5000):
    t0 = time.perf_counter()
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(len(y), dtype=jnp.uint32))
    _, info = autoattack(apply_fn, params, jnp.asarray(x), jnp.asarray(y), key=keys, eps=eps, norm=norm,
                         early_exit=early_exit, square_window=square_window, n_iter=n_iter, n_queries=n_queries,
                         return_info=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    n = len(y)
    per = {t["name"]: (100.0 * t["robust"] / n, t["seconds"], t["passes"], t.get("attacked", 0))
           for t in info["attacks"]}  # fmt: skip
    return info["record"]["robust"], per, seconds, info["flags"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--batch-size", type=int, default=250, help="the reference's batch size (its default)")
    p.add_argument("--skip", default="", help="comma-separated of reference,faithful,early")
    p.add_argument("--warm", action="store_true",
                   help="also time jaxadv a second time, its compiled programs then read from the on-disk cache (as a "
                   "second `jaxadv autoattack` run, or a run on another checkpoint of the same architecture, does)")
    p.add_argument("--xla-cache", default=str(Path("~/.cache/jaxadv/xla-bench").expanduser()),
                   help="the compilation cache of the timed runs (cleared before every cold run)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the runs already in --out (same checkpoint, points and budget) instead of rerunning them")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    eps = float(Fraction(args.eps))
    skip = set(filter(None, args.skip.split(",")))
    import shutil

    jax.config.update("jax_compilation_cache_dir", args.xla_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    import torch

    from benchmarks.peers import to_torch
    from jaxadv import data

    torch.set_num_threads(os.cpu_count() or 1)  # the cores XLA:CPU uses too
    ckpt = Path(args.checkpoint)
    ckpt = ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt
    apply_fn, variables, cfg, _ = train.load_trained(str(ckpt))
    if cfg.defense.name != "none" and defenses.get(cfg.defense.name).deploy(cfg.defense) is not None:
        p.error("models with a deploy transform have no PyTorch twin here")
    test = data.load(args.data, val_size=0, progress=False).test
    x = np.asarray(test.images[: args.n], np.float32) / np.float32(255)
    y = np.asarray(test.labels[: args.n])
    model_t = to_torch(train.create_model(cfg), variables)
    report = {"checkpoint": str(ckpt), "n": len(y), "eps": eps, "norm": args.norm, "environment": io.environment(),
              "torch_threads": torch.get_num_threads(), "command": "python -m benchmarks.autoattack_reference "
              + " ".join(argv if argv is not None else sys.argv[1:])}  # fmt: skip
    runs = {}
    if args.reuse and Path(args.out).exists():
        old = io.read_json(args.out)
        if (old["checkpoint"], old["n"], old["eps"], old["norm"]) == (str(ckpt), len(y), eps, args.norm):
            runs = {k: {**v, "robust": np.asarray(v["robust"], bool)} for k, v in old["runs"].items()}
            skip |= set(runs)

    def save():
        report["runs"] = {k: {**v, "robust": np.asarray(v["robust"]).tolist()} for k, v in runs.items()}
        report["summary"] = summary(runs)
        io.write_json(args.out, report)

    if "reference" not in skip:
        robust, per, seconds, log_lines = reference(model_t, x, y, eps=eps, norm=args.norm, batch_size=args.batch_size)
        runs["reference"] = {"robust": robust, "per": per, "seconds": seconds, "log": log_lines}
        save()
        print(f"reference: robust {100 * robust.mean():.1f}% in {seconds:.0f}s {per}", flush=True)
    modes = [("faithful", False, "batch"), ("early", True, "image")]
    if args.warm:
        modes = [("faithful", False, "batch"), ("faithful_warm", False, "batch"), ("early", True, "image"),
                 ("early_warm", True, "image")]  # fmt: skip
    for name, early, window in modes:
        if name in skip or name.split("_")[0] in skip:
            continue
        jax.clear_caches()  # nothing compiled in memory: warm runs read the on-disk cache, cold ones compile
        if not name.endswith("_warm"):
            shutil.rmtree(args.xla_cache, ignore_errors=True)
            os.makedirs(args.xla_cache, exist_ok=True)  # JAX's cache object keeps the path and does not recreate it
        robust, per, seconds, flags = ours(apply_fn, variables, x, y, eps=eps, norm=args.norm, early_exit=early,
                                           square_window=window)  # fmt: skip
        runs[name] = {"robust": robust, "per": per, "seconds": seconds, "flags": flags}
        save()
        print(f"jaxadv {name}: robust {100 * robust.mean():.1f}% in {seconds:.0f}s", flush=True)
    save()
    io.write_text(Path(args.out).with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


def summary(runs: dict) -> dict:
    out = {}
    ref = runs.get("reference")
    for name, r in runs.items():
        s = {"robust_accuracy_pct": 100.0 * float(np.mean(r["robust"])), "seconds": r["seconds"]}
        if ref is not None and name != "reference":
            s["agreement_pct"] = 100.0 * float(np.mean(np.asarray(r["robust"]) == np.asarray(ref["robust"])))
            s["speedup_vs_reference"] = ref["seconds"] / r["seconds"]
        out[name] = s
    return out


def markdown(report: dict) -> str:
    runs, s = report["runs"], report["summary"]
    names = list(runs)
    lines = [f"AutoAttack standard, {report['norm']} eps {report['eps']:.6g}, {report['n']} points of "
             f"`{report['checkpoint']}`; torch threads {report['torch_threads']}.", "",
             "| attack | " + " | ".join(f"{k}: robust % after / seconds" for k in names) + " |",
             "|---|" + "---|" * len(names)]  # fmt: skip
    for a in ORDER:
        cells = []
        for k in names:
            v = runs[k]["per"].get(a)
            cells.append("–" if v is None else f"{v[0]:.1f} / {v[1]:.1f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines.append("| total | " + " | ".join(f"{s[k]['robust_accuracy_pct']:.1f} / {s[k]['seconds']:.1f}" for k in names)
                 + " |")  # fmt: skip
    for k in names:
        if "agreement_pct" in s[k]:
            lines.append(f"\n{k}: per-point agreement with the reference {s[k]['agreement_pct']:.1f} %, "
                         f"{s[k]['speedup_vs_reference']:.2f}x the reference's speed.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
