"""Robust accuracy of a trained checkpoint under one registered attack (`jaxadv attack`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxadv import attacks, checkpoint, defenses, distributed, evaluation, io, train


def evaluate_checkpoint(ckpt_dir: str, spec: attacks.Spec, *, data: str, cache_dir: str | None = None,
                        n: int | None = None, seed: int = 0, batch_size: int = 500, out: str | Path,
                        progress: bool = True, log: Callable[[str], None] = lambda s: None) -> dict:  # fmt: skip
    """Clean and robust accuracy of the checkpoint, as its defense deploys it, on the first
    `n` test images (a seeded class-balanced subset); written to `out` (JSON).

    Finished batches are kept in OUT.parts/ until the result is written, so an interrupted
    run resumes where it stopped. Example i of a randomized attack uses
    `fold_in(key(seed), test_index[i])`, so the result does not depend on `batch_size`.

    Returns:
      the result dict (also written to `out`).
    """
    from jaxadv import data as data_mod

    t0 = time.perf_counter()
    out = Path(out)
    apply_fn, variables, cfg, _ = train.load_trained(ckpt_dir)
    deployed = defenses.deployed_apply(cfg.defense, apply_fn)
    splits = data_mod.load(data, cache_dir=cache_dir, val_size=0, seed=seed, progress=progress)
    test = splits.test
    n = len(test) if n is None else min(n, len(test))
    images, labels, index = test.images[:n], test.labels[:n], test.index[:n]
    fingerprint = {"checkpoint": str(Path(ckpt_dir).resolve()), "step": checkpoint.latest_step(ckpt_dir),
                   "attack": spec.to_dict(), "n": n, "seed": seed}  # fmt: skip
    parts = out.with_name(out.name + ".parts")
    kw = dict(index=index, batch_size=batch_size, progress=progress)
    log(f"{ckpt_dir}: {cfg.name} preset, defense {cfg.defense.name}; {spec.name} on {n} test images")
    clean, _ = evaluation.attack_eval(deployed, variables, images, labels, desc="clean",
                                      store=evaluation.BatchStore(parts / "clean", fingerprint), **kw)  # fmt: skip
    robust, _ = evaluation.attack_eval(deployed, variables, images, labels, attack=spec, key=jax.random.key(seed),
                                       desc=spec.name, store=evaluation.BatchStore(parts / "attack", fingerprint),
                                       **kw)  # fmt: skip
    per = {"index": index, "clean_correct": clean["per_example"]["correct"],
           "robust_correct": robust["per_example"]["correct"]}  # fmt: skip
    for k in ("norm", "success", "iterations"):
        if k in robust["per_example"]:
            per[k] = robust["per_example"][k]
    stats = {k: v for k, v in robust.items() if k not in ("accuracy_pct", "loss", "n", "per_example", "norms",
                                                           "norms_correct")}  # fmt: skip
    result = {"checkpoint": str(ckpt_dir), "defense": cfg.defense.name, "attack": spec.to_dict(), "n": n,
              "clean_accuracy_pct": clean["accuracy_pct"], "robust_accuracy_pct": robust["accuracy_pct"],
              "clean_loss": clean["loss"], "robust_loss": robust["loss"], "attack_stats": stats,
              "per_example": {k: np.asarray(v).tolist() for k, v in per.items()}, "data": splits.source,
              "seed": seed, "seconds": time.perf_counter() - t0, "environment": io.environment()}  # fmt: skip
    io.write_json(out, result)
    if distributed.is_primary():
        shutil.rmtree(parts, ignore_errors=True)
    return result


def one_line(result: dict) -> str:
    """`clean 86.0% -> robust 7.7% under fgsm(eps=0.1), n=1000`."""
    a = result["attack"]
    hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in a.items() if k != "name")
    return (f"clean {result['clean_accuracy_pct']:.2f}% -> robust {result['robust_accuracy_pct']:.2f}% under "
            f"{a['name']}({hp}), n={result['n']}")
