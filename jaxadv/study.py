"""The seed study: three models (clean, FGSM adversarial training, median squeezing) and
the 3x3 table of test accuracy under no attack, FGSM and DeepFool.

Protocol per row, as in the study:
  * "none" and "adversarial_training": white-box, adversarial examples are crafted on the
    evaluated model itself.
  * "median_squeezing": adversarial examples crafted on the *clean* model, median-filtered,
    then fed to the model trained on median-filtered images (transfer / grey-box).
  * Extra row "median_squeezing_unfiltered": the same transferred examples fed to the
    squeezed model without test-time filtering (the study's wording allows this reading).

Every phase writes its result to OUT/phases/<phase>.json (atomically) and is skipped when
that file exists; training phases resume from their last epoch checkpoint. So an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxadv import checkpoint, defenses, plots, squeeze, train
from jaxadv.attacks import deepfool, fgsm_jit
from jaxadv.configs import TrainConfig
from jaxadv.evaluation import attack_eval

# The study's table (test accuracy, %); None where it did not measure.
STUDY = {
    ("none", "none"): 88.5, ("none", "fgsm"): 0.1, ("none", "deepfool"): 7.4,
    ("adversarial_training", "none"): 81.5, ("adversarial_training", "fgsm"): 76.9,
    ("adversarial_training", "deepfool"): None,
    ("median_squeezing", "none"): 80.1, ("median_squeezing", "fgsm"): 45.3, ("median_squeezing", "deepfool"): 77.5,
}  # fmt: skip
DEFENSES = ("none", "adversarial_training", "median_squeezing")
ATTACKS = ("none", "fgsm", "deepfool")
_TRAINING_DEFENSE = {"none": "none", "adversarial_training": "fgsm_at", "median_squeezing": "median"}


def model_configs(base: TrainConfig, eps: float) -> dict[str, TrainConfig]:
    """The three training configs of the study, from one base preset.

    They equal what `jaxadv train --config NAME --defense D --eps EPS` builds, so a model
    trained on its own into OUT/models/<defense>/ is picked up by the study as finished.
    """
    return {
        name: base.replace(defense=_TRAINING_DEFENSE[name], defense_eps=eps if name == "adversarial_training" else base.defense_eps)
        for name in DEFENSES
    }


class Phases:
    """Run named phases once: each result is stored in OUT/phases/<name>.json (atomically)
    with the run's fingerprint, and a rerun reuses it. A phase stored with other settings is
    refused (trainings: hours of work), or recomputed if `recompute_stale` (evaluations)."""

    def __init__(self, out: Path, fingerprint: dict, log: Callable[[str], None], *, recompute_stale: bool = False):
        self.out, self.fingerprint, self.log = out, fingerprint, log
        self.recompute_stale = recompute_stale
        self.done: dict[str, dict] = {}

    def __call__(self, name: str, fn: Callable[[], dict]) -> dict:
        path = self.out / "phases" / f"{name}.json"
        if path.exists():
            done = json.loads(path.read_text())
            if done.get("fingerprint") == self.fingerprint:
                self.done[name] = done
                self.log(f"[{name}] done before ({done['seconds']:.0f}s); skipped")
                return done
            if not self.recompute_stale:
                raise ValueError(
                    f"{self.out} holds a study run with other settings (phase {name}); use a new --out, or the same flags"
                )
            self.log(f"[{name}] stored with other settings; recomputing")
        self.log(f"[{name}] ...")
        t0 = time.perf_counter()
        result = fn()
        result["fingerprint"] = self.fingerprint
        result["seconds"] = time.perf_counter() - t0
        checkpoint.write_json_atomic(path, result)
        self.done[name] = result
        self.log(f"[{name}] finished in {result['seconds']:.0f}s")
        return result


class ModelStore:
    """`store(name) -> (apply_fn, variables, history)`: trains the model `name` with
    `cfgs[name]` into OUT/models/<name>/ (resuming from its checkpoints) the first time it
    is needed, as phase "train_<name>"; "none" may instead be a finished `--clean-run`."""

    def __init__(self, out, cfgs, splits, phase: Phases, *, seed, augment_fn, progress, log, clean_run=None):
        self.out, self.cfgs, self.splits, self.phase = Path(out), cfgs, splits, phase
        self.seed, self.augment_fn, self.progress, self.log, self.clean_run = seed, augment_fn, progress, log, clean_run
        self.models: dict[str, tuple] = {}

    def __call__(self, name: str):
        if name in self.models:
            return self.models[name]
        cfg, splits, seed, log = self.cfgs[name], self.splits, self.seed, self.log
        num_classes = len(splits.class_names)
        ckpt_dir = self.out / "models" / name / "checkpoints"

        def train_phase():
            apply_fn = train.make_apply(train.create_model(cfg, num_classes))
            result = train.fit(
                cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                key=jax.random.key(seed), num_classes=num_classes,
                batch_transform=defenses.batch_transform(cfg, apply_fn), augment_fn=self.augment_fn,
                eval_squeezer=defenses.eval_squeezer(cfg),
                robust_eval=defenses.robust_monitor(cfg, apply_fn, splits.val.images, splits.val.labels),
                ckpt_dir=str(ckpt_dir), resume=True, progress=self.progress,
                extra_meta={"data": splits.source, "seed": seed, "class_names": list(splits.class_names)},
                log=lambda s: log(f"[train {name}] {s}"),
            )  # fmt: skip
            checkpoint.write_json_atomic(self.out / "models" / name / "history.json", result.history)
            return {
                "epochs": len(result.history), "stopped_early": result.stopped_early,
                "train_seconds": sum(h["seconds"] for h in result.history), "config": cfg.to_dict(),
            }  # fmt: skip

        clean_run = self.clean_run
        if name == "none" and clean_run is not None:
            ckpt_dir = Path(clean_run) / "checkpoints"

            def train_phase():
                _, _, cfg_used, meta = train.load_trained(str(ckpt_dir))
                if cfg_used.defense != "none":
                    raise ValueError(f"--clean-run {clean_run} was trained with defense {cfg_used.defense!r}, not none")
                history = meta["history"]
                if len(history) < cfg_used.epochs and not meta.get("stopped_early"):
                    raise ValueError(
                        f"--clean-run {clean_run} has not finished training ({len(history)}/{cfg_used.epochs} epochs); "
                        "rerun the study when it has"
                    )
                return {
                    "epochs": len(history), "reused": str(clean_run), "config": cfg_used.to_dict(),
                    "train_seconds": sum(h["seconds"] for h in history),
                }  # fmt: skip

        done = self.phase(f"train_{name}", train_phase)
        if "reused" not in done and TrainConfig.from_dict(done["config"]) != cfg:
            raise ValueError(f"{self.out}/models/{name} was trained with another config; use a new --out")
        apply_fn, variables, _, meta = train.load_trained(str(ckpt_dir))
        self.models[name] = (apply_fn, variables, meta["history"])
        return self.models[name]


def run(
    splits,
    out: str | Path,
    *,
    base: TrainConfig,
    eps: float = 0.1,
    seed: int = 0,
    deepfool_kwargs: dict | None = None,
    attack_batch: int = 500,
    augment_fn: Callable | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    environment: dict | None = None,
    clean_run: str | Path | None = None,
) -> dict:
    """Train (or reuse) the three models and evaluate every cell; write OUT/results.{json,md} and plots.

    Args:
      splits: `jaxadv.data.Splits`.
      out: output directory (models/, phases/, adv/ caches and the results).
      base: the training preset all three models share (their `defense` differs).
      eps: FGSM eps, for the attack and for adversarial training (pixels in [0, 1]).
      seed: root seed (init, data order, augmentation) of each model.
      deepfool_kwargs: overrides of `jaxadv.attacks.deepfool` defaults.
      attack_batch: batch size for attacks and evaluation.
      augment_fn: training augmentation `(key, x) -> x`.
      progress: show progress bars.
      log: one-line progress messages.
      environment: device/versions record stored in results.json.
      clean_run: reuse this finished `jaxadv train` run (its directory) as the clean model
        instead of training one with `base` (its own config and budget are recorded).

    Returns:
      the results dict written to OUT/results.json.
    """
    out = Path(out)
    df_kwargs = {"num_candidates": 10, "overshoot": 0.02, "max_iter": 50, **(deepfool_kwargs or {})}
    cfgs = model_configs(base, eps)
    test = splits.test

    # Everything a phase's result depends on: a finished phase is reused only if it matches.
    fingerprint = checkpoint.json_safe({
        "base": base.to_dict(), "eps": eps, "seed": seed, "deepfool": df_kwargs,
        "clean_run": str(Path(clean_run).resolve()) if clean_run else None, "data": splits.source,
        "sizes": [len(splits.train.labels), len(splits.val.labels), len(test.labels)],
    })  # fmt: skip

    phase = Phases(out, fingerprint, log)
    phases = phase.done

    # --- training (a model is trained, or loaded, when a phase first needs it) -----------
    model = ModelStore(out, cfgs, splits, phase, seed=seed, augment_fn=augment_fn, progress=progress, log=log,
                       clean_run=clean_run)  # fmt: skip

    # --- attacks ------------------------------------------------------------------------
    def fgsm_attack(apply_fn, variables):
        return lambda x, y: fgsm_jit(apply_fn, variables, x, y, eps=eps)

    def deepfool_attack(apply_fn, variables):
        return lambda x, y: deepfool(apply_fn, variables, x, **df_kwargs)

    adv_dir = out / "adv"  # clean-model adversarial examples, reused by the transfer rows
    cells: list[dict] = []

    def cell(defense, attack, summary, **extra):
        keep = {k: summary[k] for k in ("accuracy_pct", "loss", "n")}
        cells.append({"defense": defense, "attack": attack, **keep, **extra})

    def eval_phase(defense: str) -> dict:
        apply_fn, variables, _ = model(defense)
        kw = dict(batch_size=attack_batch, progress=progress)
        res = {}
        res["none"], _ = attack_eval(apply_fn, variables, test.images, test.labels, desc=f"{defense}/clean", **kw)
        res["fgsm"], x_fgsm = attack_eval(apply_fn, variables, test.images, test.labels,
                                          attack=fgsm_attack(apply_fn, variables), keep_adv=defense == "none",
                                          desc=f"{defense}/fgsm", **kw)  # fmt: skip
        res["deepfool"], x_df = attack_eval(apply_fn, variables, test.images, test.labels,
                                            attack=deepfool_attack(apply_fn, variables), keep_adv=defense == "none",
                                            desc=f"{defense}/deepfool", **kw)  # fmt: skip
        if defense == "none":
            adv_dir.mkdir(parents=True, exist_ok=True)
            for tag, arr in (("fgsm", x_fgsm), ("deepfool", x_df)):
                tmp = adv_dir / f".{tag}.tmp.npy"
                np.save(tmp, arr)
                tmp.replace(adv_dir / f"{tag}.npy")
        return {"attacks": res}

    def transfer_phase() -> dict:
        apply_fn, variables, _ = model("median_squeezing")
        filtered = squeeze.squeezed(apply_fn, squeeze.median_squeezer(cfgs["median_squeezing"].median_size))
        kw = dict(batch_size=attack_batch, progress=progress)
        res = {"filtered": {}, "unfiltered": {}}
        for tag, fn in (("filtered", filtered), ("unfiltered", apply_fn)):
            res[tag]["none"], _ = attack_eval(fn, variables, test.images, test.labels, desc=f"median/{tag}/clean", **kw)
            for attack in ("fgsm", "deepfool"):
                x_adv = np.load(adv_dir / f"{attack}.npy", mmap_mode="r")
                if len(x_adv) != len(test.labels):
                    raise ValueError(f"{adv_dir / attack}.npy holds {len(x_adv)} images, not {len(test.labels)}")
                res[tag][attack], _ = attack_eval(fn, variables, test.images, test.labels, inputs=x_adv,
                                                  desc=f"median/{tag}/{attack}", **kw)  # fmt: skip
        return res

    # The defended models first: the clean model may be a --clean-run still in training.
    # Each model is trained (or loaded) before its evaluation phase starts its clock.
    model("adversarial_training")
    ev_at = phase("eval_adversarial_training", lambda: eval_phase("adversarial_training"))
    model("median_squeezing")
    model("none")
    ev_none = phase("eval_none", lambda: eval_phase("none"))
    if not all((adv_dir / f"{a}.npy").exists() for a in ("fgsm", "deepfool")):  # cache deleted: recompute
        (out / "phases" / "eval_none.json").unlink()
        ev_none = phase("eval_none", lambda: eval_phase("none"))
    ev_sq = phase("eval_median_squeezing", transfer_phase)
    for name in DEFENSES:  # records of all training phases, for results.json and the curves
        model(name)

    stats = {}
    for defense, res in (("none", ev_none["attacks"]), ("adversarial_training", ev_at["attacks"])):
        for attack in ATTACKS:
            extra = {"protocol": "white-box"}
            cell(defense, attack, res[attack], **extra)
        stats[defense] = {k: v for k, v in res["deepfool"].items() if k not in ("accuracy_pct", "loss", "n", "norms")}
    for attack in ATTACKS:
        cell("median_squeezing", attack, ev_sq["filtered"][attack],
             protocol="transfer from the clean model, median-filtered")  # fmt: skip
    extra_cells = [
        {"defense": "median_squeezing_unfiltered", "attack": attack,
         **{k: ev_sq["unfiltered"][attack][k] for k in ("accuracy_pct", "loss", "n")},
         "protocol": "transfer from the clean model, no test-time filter"}
        for attack in ATTACKS
    ]  # fmt: skip

    results = {
        "cells": cells,
        "extra_cells": extra_cells,
        "study": [{"defense": d, "attack": a, "accuracy_pct": v} for (d, a), v in STUDY.items()],
        "attack_stats": {
            "fgsm": {"eps": eps, "norm": "linf"},
            "deepfool": {**df_kwargs, "norm_kind": df_kwargs.get("norm", "l2"), "per_model": stats},
        },
        "config": {name: phases[f"train_{name}"]["config"] for name in DEFENSES},
        "training": {name: {k: v for k, v in phases[f"train_{name}"].items() if k not in ("config", "fingerprint")}
                     for name in DEFENSES},
        "data": {"source": splits.source, "train": len(splits.train.labels), "val": len(splits.val.labels),
                 "test": len(test.labels)},  # fmt: skip
        "seed": seed,
        "environment": environment or {},
        "phase_seconds": {name: p["seconds"] for name, p in phases.items()},
    }
    checkpoint.write_json_atomic(out / "results.json", results)
    _write_markdown(results, out / "results.md")

    plots.training_curves({name: model(name)[2] for name in DEFENSES}, out / "training_curves.png")
    plots.deepfool_norms({d: ev["attacks"]["deepfool"]["norms"] for d, ev in
                          (("none", ev_none), ("adversarial_training", ev_at))}, out / "deepfool_norms.png")  # fmt: skip
    apply_fn, variables, _ = model("none")
    # One image per class (the first of each), so the gallery is not eight airplanes on class-ordered subsets.
    idx = np.array([int(np.flatnonzero(test.labels == c)[0]) for c in np.unique(test.labels)][:8])
    x_clean = test.images[idx].astype(np.float32) / 255.0
    x_f = np.load(adv_dir / "fgsm.npy", mmap_mode="r")[idx]
    x_d = np.load(adv_dir / "deepfool.npy", mmap_mode="r")[idx]
    preds = [np.asarray(apply_fn(variables, v)).argmax(-1) for v in (x_clean, x_f, x_d)]
    plots.adversarial_gallery(x_clean, x_f, x_d, test.labels[idx], preds, splits.class_names, out / "gallery.png")
    return results


def _fmt(v):
    return "–" if v is None else f"{v:.1f}"


def _write_markdown(results: dict, path: Path) -> None:
    ours = {(c["defense"], c["attack"]): c["accuracy_pct"] for c in results["cells"] + results["extra_cells"]}
    lines = [
        "Test accuracy (%) — ours / the study's / difference (ours − study).",
        "",
        "| defense \\ attack | " + " | ".join(ATTACKS) + " |",
        "|---|" + "---|" * len(ATTACKS),
    ]
    for d in DEFENSES:
        row = []
        for a in ATTACKS:
            o, s = ours[(d, a)], STUDY[(d, a)]
            row.append(f"{o:.1f} / {_fmt(s)} / " + ("–" if s is None else f"{o - s:+.1f}"))
        lines.append(f"| {d} | " + " | ".join(row) + " |")
    lines.append(
        "| median_squeezing, no test-time filter | "
        + " | ".join(f"{ours[('median_squeezing_unfiltered', a)]:.1f} / – / –" for a in ATTACKS) + " |"
    )
    n = results["data"]["test"]
    lines += ["", f"n = {n} test images; FGSM eps = {results['attack_stats']['fgsm']['eps']}; "
              f"data: {results['data']['source']}."]  # fmt: skip
    for d, st in results["attack_stats"]["deepfool"]["per_model"].items():
        lines.append(
            f"DeepFool on {d}: fooled {st['success_rate_correct_pct']:.1f}% of the {st['n_correct']} correctly "
            f"classified images; L2 mean {st['norm_mean']:.3f}, median {st['norm_median']:.3f}; "
            f"iterations mean {st['iterations_mean']:.2f}, max {st['iterations_max']}."
        )
    lines += ["", "Phase wall times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in results["phase_seconds"].items())]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
