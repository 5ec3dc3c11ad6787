"""The seed study and the extended suite (`jaxadv study`), built from cells.

    results = study.run(splits, "runs/study", base=configs.FAST, suite="seed")

Modules: `cells` (the `Cell` record, the protocols, `evaluate_cells`), `models` (trained
models by name), `suites` (the seed and extended cell lists, the study's table),
`report` (results.json / results.md / figures). Everything is resumable: trained models
continue from their checkpoints, attack runs from their last finished batch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from jaxadv import io
from jaxadv.configs import TrainConfig
from jaxadv.study import report, suites
from jaxadv.study.cells import PROTOCOLS, SCHEMA_VERSION, Cell, Context, Run, evaluate_cells, run_of
from jaxadv.study.models import Model, ModelStore
from jaxadv.study.suites import STUDY, Settings, extended_cells, model_configs, seed_cells

SUITES = ("seed", "extended")


def run(
    splits,
    out: str | Path,
    *,
    base: TrainConfig,
    suite: str = "seed",
    settings: Settings = Settings(),
    seed: int = 0,
    attack_batch: int = 500,
    progress: bool = True,
    log: Callable[[str], None] = print,
    environment: dict | None = None,
    clean_run: str | Path | None = None,
    pretrained: str | Path | None = None,
) -> dict:
    """Train (or reuse) the suite's models, evaluate its cells, write OUT/results.{json,md} and figures.

    Args:
      splits: `jaxadv.data.Splits` (each split in a seeded, class-balanced order).
      out: output directory (models/, runs/ and the results).
      base: the training preset every model shares (their defense differs).
      suite: "seed" (the study's table) or "extended" (it and everything beyond it).
      settings: attack budgets and subset sizes (`suites.Settings`).
      seed: root seed of every model (init, data order, augmentation) and of the attacks.
      attack_batch: batch size of attacks and evaluation.
      progress: show progress bars.
      log: one-line progress messages.
      environment: provenance block stored in results.json (default: `io.environment()`).
      clean_run: use this finished `jaxadv train` run directory as the clean model.
      pretrained: a directory of pretrained models, one per row (PRETRAINED/none/,
        PRETRAINED/adversarial_training/, ...; see `jaxadv.pretrained`): evaluate them, train nothing.

    Returns:
      the results dict written to OUT/results.json.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {SUITES}")
    t0 = time.perf_counter()
    out = Path(out)
    if (out / "phases").is_dir() and not (out / "runs").is_dir():
        log(f"{out} holds a study from jaxadv 0.1 (class-ordered splits): its evaluations are recomputed, "
            "its trained models reused where their configs match")  # fmt: skip
    environment = environment or io.environment()
    cfgs = model_configs(base, settings, extended=suite == "extended")
    models = ModelStore(out, cfgs, splits, seed=seed, progress=progress, log=log, clean_run=clean_run,
                        environment=environment, pretrained=pretrained)  # fmt: skip
    for name in sorted(cfgs, key=lambda k: k == "none"):  # the clean model last: it may be a --clean-run in training
        models(name)
    cells = extended_cells(settings) if suite == "extended" else seed_cells(settings)
    ctx = Context(out, splits.test, splits.val, models, seed=seed, batch_size=attack_batch, progress=progress,
                  log=log, data_source=splits.source)  # fmt: skip
    records = evaluate_cells(cells, ctx)
    extra = {
        "settings": io.json_safe(dataclasses.asdict(settings)),
        "config": {name: models(name).cfg.to_dict() for name in cfgs},
        "training": {name: {"epochs": len(m.history), "train_seconds": m.train_seconds, "reused": m.reused,
                            "stopped_early": bool(m.history and m.history[-1].get("stopped_early"))}
                     for name, m in ((n, models(n)) for n in cfgs)},
        "data": {"source": splits.source, "train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "seed": seed,
        "environment": environment,
        "phase_seconds": {**{f"train_{n}": models(n).train_seconds for n in cfgs}, **ctx.seconds},
        "wall_seconds_this_invocation": time.perf_counter() - t0,
    }  # fmt: skip
    return report.write(out, records, ctx, settings, suite=suite, extra=extra)


__all__ = ["PROTOCOLS", "SCHEMA_VERSION", "STUDY", "SUITES", "Cell", "Context", "Model", "ModelStore", "Run",
           "Settings", "evaluate_cells", "extended_cells", "model_configs", "run", "run_of", "seed_cells"]
