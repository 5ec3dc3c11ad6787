"""The extended suite (`jaxadv study --suite extended`): honest robustness numbers beyond the study.

It first runs (or reuses) the seed study in the same OUT, then adds:
  * two stronger training defenses, PGD adversarial training (Madry et al.) and fast
    adversarial training (FGSM with random start, Wong et al. 2020), at `at_eps`;
  * white-box PGD (L-inf, `pgd_steps` steps of 2.5 eps / steps, random start) at 8/255 and
    at 0.1 against every trained model;
  * median squeezing attacked two ways: the study's transfer protocol (examples crafted on
    the clean model, then filtered) and adaptively, white-box through the filter with BPDA;
  * Xu et al.'s feature-squeezing detector on the clean model (5-bit depth, 2x2 median,
    non-local means 13-3-2; threshold at 5 % FPR on validation images): detection rate and
    ROC-AUC per attack, "detected or correctly classified", and an adaptive PGD that also
    lowers the detector score (`detect.adaptive_objective`, through BPDA);
  * robustness curves: accuracy against L-inf eps (FGSM and PGD) for every defense, and
    against the L2 radius from DeepFool's minimal perturbations, in one figure.
Every phase is stored in OUT/phases/ext_*.json and skipped on a rerun, like the study's.
Writes OUT/results.json (the seed study's cells plus the new ones, and a "detector"
section), OUT/results.md (both tables) and OUT/robustness_curves.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxadv import checkpoint, data, detect, plots, squeeze, study
from jaxadv.attacks import deepfool, fgsm_jit, pgd
from jaxadv.configs import TrainConfig
from jaxadv.evaluation import attack_eval

# Row names of the extended table; the first three are the seed study's models.
TRAINED = ("none", "adversarial_training", "pgd_adversarial_training", "fast_adversarial_training")
_DEFENSE = {"pgd_adversarial_training": "pgd_at", "fast_adversarial_training": "fast_at"}
ROWS = TRAINED + ("median_squeezing", "median_squeezing_adaptive", "detector")


def pgd_name(eps: float) -> str:
    return "pgd_8/255" if abs(eps - 8 / 255) < 1e-9 else f"pgd_{eps:g}"


def run(
    splits,
    out: str | Path,
    *,
    base: TrainConfig,
    eps: float = 0.1,
    at_eps: float = 8 / 255,
    pgd_eps: tuple[float, ...] = (8 / 255, 0.1),
    pgd_steps: int = 20,
    curve_eps: tuple[float, ...] = tuple(np.linspace(0.0, 0.1, 8).round(4)),
    curve_n: int = 1000,
    ext_n: int | None = None,
    at_pgd_steps: int | None = None,
    at_co_guard: float = 0.0,
    detector_val: int = 2000,
    detector_lam: float = 1.0,
    seed: int = 0,
    deepfool_kwargs: dict | None = None,
    attack_batch: int = 500,
    augment_fn: Callable | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    environment: dict | None = None,
    clean_run: str | Path | None = None,
) -> dict:
    """Run the seed study, then the extended phases; returns the combined results dict.

    Args (beyond `study.run`'s):
      at_eps: L-inf eps of PGD and fast adversarial training (8/255 as in Madry et al.).
      pgd_eps: the white-box PGD budgets of the table's PGD columns.
      pgd_steps: PGD steps (step size 2.5 eps / steps, one random start).
      curve_eps: L-inf budgets of the robustness curves.
      curve_n: test images per point of the curves (the first curve_n of the ext_n subset,
        whose order interleaves the classes, so they are balanced too).
      ext_n: the extended phases (PGD, adaptive attacks, detector) use a seeded,
        class-balanced subset of ext_n test images (all if None); the seed study's cells
        always use the whole test split.
      at_pgd_steps: PGD steps of PGD adversarial training (the base config's if None).
      at_co_guard: catastrophic-overfitting guard of the two new trainings, in points of
        PGD-10 validation accuracy (`TrainConfig.co_guard`; 0 = off). With it the params
        with the best robust validation accuracy are kept (Rice et al. 2020).
      detector_val: validation images that set the detector threshold.
      detector_lam: weight of the detector score in the adaptive attack.
    """
    out = Path(out)
    seed_kw = dict(base=base, eps=eps, seed=seed, deepfool_kwargs=deepfool_kwargs, attack_batch=attack_batch,
                   augment_fn=augment_fn, progress=progress, log=log, environment=environment, clean_run=clean_run)
    seed_results = study.run(splits, out, **seed_kw)
    df_kwargs = seed_results["attack_stats"]["deepfool"]
    df_kwargs = {k: df_kwargs[k] for k in ("num_candidates", "overshoot", "max_iter", "norm") if k in df_kwargs}
    test, val = splits.test, splits.val
    n_ext = len(test) if ext_n is None else min(ext_n, len(test))
    # The splits are stored class by class: subsets are seeded, class-balanced and in
    # class-interleaved order, so that the curves' prefix (curve_n) is balanced too.
    ext_idx = data.balanced_indices(test.labels, n_ext, np.random.default_rng(seed), what="ext_n", sort=False)
    test = test.take(ext_idx)
    n_val = min(detector_val, len(val))
    val = val.take(data.balanced_indices(val.labels, n_val, np.random.default_rng(seed + 1), sort=False))

    cfgs = dict(study.model_configs(base, eps))
    for name, defense in _DEFENSE.items():
        cfgs[name] = base.replace(defense=defense, defense_eps=at_eps, co_guard=at_co_guard)
    if at_pgd_steps is not None:
        cfgs["pgd_adversarial_training"] = cfgs["pgd_adversarial_training"].replace(pgd_steps=at_pgd_steps)
    seed_fp = json_fingerprint(out)  # the new models' train phases carry the study's fingerprint
    train_phases = study.Phases(out, seed_fp, log)
    model = study.ModelStore(out, cfgs, splits, train_phases, seed=seed, augment_fn=augment_fn, progress=progress,
                             log=log, clean_run=clean_run)  # fmt: skip
    settings = checkpoint.json_safe({"at_eps": at_eps, "pgd_eps": list(pgd_eps), "pgd_steps": pgd_steps,
                                     "curve_eps": list(curve_eps), "curve_n": curve_n, "detector_val": detector_val,
                                     "detector_lam": detector_lam, "ext_n": n_ext,
                                     "subsets": "class-balanced, interleaved"})  # fmt: skip
    # Evaluation phases: changed settings (--ext-n, --pgd-steps, ...) recompute them and reuse the models.
    phase = study.Phases(out, {**seed_fp, "extended": settings}, log, recompute_stale=True)
    kw = dict(batch_size=attack_batch, progress=progress)
    adv_dir = out / "adv"
    median_size = cfgs["median_squeezing"].median_size
    filtered_sq = squeeze.median_squeezer(median_size)

    def pgd_attack(apply_fn, variables, e):
        step = 2.5 * e / pgd_steps
        return lambda x, y: pgd(apply_fn, variables, x, y, eps=e, step_size=step, steps=pgd_steps,
                                key=jax.random.key(seed))  # fmt: skip

    def fgsm_attack(apply_fn, variables, e=eps):
        return lambda x, y: fgsm_jit(apply_fn, variables, x, y, eps=e)

    def deepfool_attack(apply_fn, variables):
        return lambda x, y: deepfool(apply_fn, variables, x, **df_kwargs)

    def summary(s):
        keep = {k: s[k] for k in ("accuracy_pct", "loss", "n")}
        keep.update({k: s[k] for k in ("norms_correct", "n_correct_unfooled", "success_rate_correct_pct",
                                       "norm_median", "iterations_mean") if k in s})  # DeepFool
        return keep

    # --- white-box rows: the study's attacks on the new models, PGD on all trained models ---
    def eval_trained(name):
        apply_fn, variables, _ = model(name)
        res = {}
        if name in _DEFENSE:
            res["none"], _ = attack_eval(apply_fn, variables, test.images, test.labels, desc=f"{name}/clean", **kw)
            res["fgsm"], _ = attack_eval(apply_fn, variables, test.images, test.labels,
                                         attack=fgsm_attack(apply_fn, variables), desc=f"{name}/fgsm", **kw)
            res["deepfool"], _ = attack_eval(apply_fn, variables, test.images, test.labels,
                                             attack=deepfool_attack(apply_fn, variables), desc=f"{name}/deepfool", **kw)
        else:  # the study's models: DeepFool again on this subset, for the L2 curve only
            res["deepfool_l2"], _ = attack_eval(apply_fn, variables, test.images, test.labels,
                                                attack=deepfool_attack(apply_fn, variables), desc=f"{name}/deepfool",
                                                **kw)  # fmt: skip
        for e in pgd_eps:
            keep = name == "none"
            res[pgd_name(e)], x_adv = attack_eval(apply_fn, variables, test.images, test.labels,
                                                  attack=pgd_attack(apply_fn, variables, e), keep_adv=keep,
                                                  desc=f"{name}/{pgd_name(e)}", **kw)  # fmt: skip
            if keep:  # the clean model's PGD examples: for the transfer row and the detector
                _save(adv_dir / f"{pgd_name(e).replace('/', '_')}.npy", x_adv)
        return {k: summary(v) for k, v in res.items()}

    white = {name: phase(f"ext_eval_{name}", lambda name=name: eval_trained(name)) for name in TRAINED}

    # --- median squeezing: transfer (PGD columns) and adaptive white-box through BPDA --------
    def eval_median():
        apply_fn, variables, _ = model("median_squeezing")
        deployed = squeeze.squeezed(apply_fn, filtered_sq)
        through = squeeze.squeezed(apply_fn, squeeze.bpda(filtered_sq))
        res = {"transfer": {}, "adaptive": {}}
        for e in pgd_eps:
            x_adv = np.load(adv_dir / f"{pgd_name(e).replace('/', '_')}.npy")  # made on this subset
            res["transfer"][pgd_name(e)], _ = attack_eval(deployed, variables, test.images, test.labels, inputs=x_adv,
                                                          desc=f"median/transfer/{pgd_name(e)}", **kw)  # fmt: skip
        # White-box through the filter: gradients of the deployed classifier with BPDA, and
        # the deployed (filtered) classifier is the one evaluated.
        res["adaptive"]["none"], _ = attack_eval(deployed, variables, test.images, test.labels, desc="median/clean", **kw)
        res["adaptive"]["fgsm"], _ = attack_eval(deployed, variables, test.images, test.labels,
                                                 attack=fgsm_attack(through, variables), desc="median/bpda/fgsm", **kw)
        res["adaptive"]["deepfool"], _ = attack_eval(deployed, variables, test.images, test.labels,
                                                     attack=deepfool_attack(through, variables),
                                                     desc="median/bpda/deepfool", **kw)  # fmt: skip
        for e in pgd_eps:
            res["adaptive"][pgd_name(e)], _ = attack_eval(deployed, variables, test.images, test.labels,
                                                          attack=pgd_attack(through, variables, e),
                                                          desc=f"median/bpda/{pgd_name(e)}", **kw)  # fmt: skip
        return {g: {k: summary(v) for k, v in r.items()} for g, r in res.items()}

    median = phase("ext_median_squeezing", eval_median)

    # --- the feature-squeezing detector on the clean model ---------------------------------
    def eval_detector():
        apply_fn, variables, _ = model("none")
        sq = detect.cifar10_squeezers()
        val_scores = detect.scores(apply_fn, variables, val.images, sq, batch_size=attack_batch)
        clean_scores = detect.scores(apply_fn, variables, test.images, sq, batch_size=attack_batch)
        pred_clean = _predict(apply_fn, variables, test.images, attack_batch)
        flagged_clean = clean_scores > detect.threshold_at_fpr(val_scores)
        res = {"clean": {"accepted_and_correct_pct": 100 * float(np.mean(~flagged_clean & (pred_clean == test.labels))),
                         "fpr_test": float(flagged_clean.mean()), "n": int(len(test.labels))}}  # fmt: skip
        sources = {"fgsm": "fgsm", "deepfool": "deepfool", **{pgd_name(e): pgd_name(e).replace("/", "_") for e in pgd_eps}}
        for attack, fname in sources.items():
            x_adv = np.load(adv_dir / f"{fname}.npy", mmap_mode="r")
            # The study's FGSM and DeepFool examples cover its whole test split; PGD's, this subset.
            x_adv = x_adv[ext_idx] if attack in ("fgsm", "deepfool") else np.asarray(x_adv)
            res[attack] = _detector_report(apply_fn, variables, x_adv, test.labels, val_scores, clean_scores, sq,
                                           attack_batch)  # fmt: skip
        objective = detect.adaptive_objective(apply_fn, sq, lam=detector_lam)
        for e in pgd_eps:
            x_adv = _attack_all(lambda x, y, e=e: pgd(apply_fn, variables, x, y, eps=e, step_size=2.5 * e / pgd_steps,
                                                      steps=pgd_steps, key=jax.random.key(seed), objective=objective),
                                test.images, test.labels, attack_batch)  # fmt: skip
            res[f"adaptive_{pgd_name(e)}"] = _detector_report(apply_fn, variables, x_adv, test.labels, val_scores,
                                                              clean_scores, sq, attack_batch)  # fmt: skip
        return res

    det = _strip(phase("ext_detector", eval_detector))

    # --- robustness curves ---------------------------------------------------------------
    def eval_curves():
        n = min(curve_n, len(test.labels))
        images, labels = test.images[:n], test.labels[:n]
        curves = {}
        apply_m, var_m, _ = model("median_squeezing")
        targets = {name: (model(name)[0], model(name)[1], model(name)[0]) for name in TRAINED}
        targets["median_squeezing_adaptive"] = (squeeze.squeezed(apply_m, filtered_sq), var_m,
                                                squeeze.squeezed(apply_m, squeeze.bpda(filtered_sq)))  # fmt: skip
        for name, (evaluated, variables, attacked) in targets.items():
            for kind in ("fgsm", "pgd"):
                pts = []
                for e in curve_eps:
                    if e == 0:
                        s, _ = attack_eval(evaluated, variables, images, labels, batch_size=attack_batch)
                    else:
                        a = fgsm_attack(attacked, variables, e) if kind == "fgsm" else pgd_attack(attacked, variables, e)
                        s, _ = attack_eval(evaluated, variables, images, labels, attack=a, batch_size=attack_batch)
                    pts.append(s["accuracy_pct"])
                curves.setdefault(name, {})[kind] = pts
        return {"eps": list(curve_eps), "n": n, "curves": curves}

    curves = _strip(phase("ext_curves", eval_curves))

    # --- results ---------------------------------------------------------------------------
    for name in _DEFENSE:  # their training records, also when every phase was skipped
        model(name)
    cells = list(seed_results["cells"])
    cols = ["none", "fgsm", "deepfool"] + [pgd_name(e) for e in pgd_eps]
    for name in TRAINED:
        for a in cols:
            src = white[name].get(a)
            if src is None:  # the study's attacks on the study's own models: from its cells
                continue
            cells.append({"defense": name, "attack": a, **_cell(src), "protocol": "white-box"})
    for a, s in median["transfer"].items():
        cells.append({"defense": "median_squeezing", "attack": a, **_cell(s),
                      "protocol": "transfer from the clean model, median-filtered"})  # fmt: skip
    for a, s in median["adaptive"].items():
        cells.append({"defense": "median_squeezing_adaptive", "attack": a, **_cell(s),
                      "protocol": "white-box through the median filter (BPDA), filtered model evaluated"})  # fmt: skip
    n_test = len(test.labels)
    cells.append({"defense": "detector", "attack": "none", "accuracy_pct": det["clean"]["accepted_and_correct_pct"],
                  "loss": None, "n": n_test, "protocol": "clean images neither flagged nor misclassified"})  # fmt: skip
    for a in cols[1:]:
        cells.append({"defense": "detector", "attack": a, "accuracy_pct": 100 * det[a]["detected_or_correct"],
                      "loss": None, "n": n_test,
                      "protocol": "clean-model attack; detected or correctly classified"})  # fmt: skip
    for e in pgd_eps:
        a = pgd_name(e)
        cells.append({"defense": "detector_adaptive", "attack": a,
                      "accuracy_pct": 100 * det[f"adaptive_{a}"]["detected_or_correct"], "loss": None, "n": n_test,
                      "protocol": f"PGD on margin + {detector_lam:g} x detector score (BPDA); detected or correct"})

    # DeepFool L2 curves: accuracy at radius r = correct inputs whose DeepFool perturbation exceeds r.
    l2 = {name: white[name]["deepfool" if name in _DEFENSE else "deepfool_l2"] for name in TRAINED}
    l2["median_squeezing_adaptive"] = median["adaptive"]["deepfool"]
    plots.robustness_curves(curves, l2, n_test, out / "robustness_curves.png")

    results = {
        **seed_results,
        "suite": "extended",
        "cells": cells,
        "detector": {"squeezers": "bit depth 5, median 2x2, non-local means 13-3-2", "fpr": 0.05,
                     "validation_images": detector_val, "adaptive_lambda": detector_lam, "per_attack": det},
        "curves": curves,
        "extended_settings": settings,
        "config": {**seed_results["config"], **{n: cfgs[n].to_dict() for n in _DEFENSE}},
        "training": {**seed_results["training"],
                     **{n: {k: v for k, v in train_phases.done[f"train_{n}"].items() if k not in ("config", "fingerprint")}
                        for n in _DEFENSE}},  # fmt: skip
        "phase_seconds": {**seed_results["phase_seconds"], **{k: v["seconds"] for k, v in phase.done.items()},
                          **{f"train_{n}": train_phases.done[f"train_{n}"]["seconds"] for n in _DEFENSE}},
    }  # fmt: skip
    checkpoint.write_json_atomic(out / "results.json", results)
    md = (out / "results.md").read_text() if (out / "results.md").exists() else ""
    md = md.split("\n## Extended suite")[0].rstrip() + "\n\n" + _markdown(results, cols)
    tmp = out / ".results.md.tmp"
    tmp.write_text(md)
    tmp.replace(out / "results.md")
    return results


def json_fingerprint(out: Path) -> dict:
    """The seed study's fingerprint, read back from its finished train phase."""
    return json.loads((out / "phases" / "train_none.json").read_text())["fingerprint"]


def _strip(result: dict) -> dict:
    """A phase's result without its bookkeeping (fingerprint, seconds)."""
    return {k: v for k, v in result.items() if k not in ("fingerprint", "seconds")}


def _cell(s: dict) -> dict:
    return {k: s[k] for k in ("accuracy_pct", "loss", "n")}


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)


def _predict(apply_fn, variables, images, batch_size):
    from jaxadv.evaluation import predict

    return predict(apply_fn, variables, images, batch_size=batch_size)


def _attack_all(attack, images, labels, batch_size) -> np.ndarray:
    """Adversarial examples f32[N,...] for the whole set, in fixed-size padded batches."""
    from jaxadv.train import pad_batches, pad_to

    out = []
    for start, stop, pad in pad_batches(len(labels), min(batch_size, len(labels))):
        x = pad_to(np.asarray(images[start:stop]), pad).astype(np.float32) / 255.0
        y = pad_to(np.asarray(labels[start:stop]), pad)
        out.append(np.asarray(attack(x, y))[: stop - start])
    return np.concatenate(out)


def _detector_report(apply_fn, variables, x_adv, labels, val_scores, clean_scores, sq, batch_size) -> dict:
    adv_scores = detect.scores(apply_fn, variables, x_adv, sq, batch_size=batch_size)
    correct = _predict(apply_fn, variables, x_adv, batch_size) == labels
    return detect.evaluate(val_scores, clean_scores, adv_scores, correct)._asdict()


def _markdown(results: dict, cols: list[str]) -> str:
    acc = {(c["defense"], c["attack"]): c["accuracy_pct"] for c in results["cells"]}
    names = {
        "none": "none (white-box)", "adversarial_training": "FGSM adversarial training (white-box)",
        "pgd_adversarial_training": "PGD adversarial training (white-box)",
        "fast_adversarial_training": "fast adversarial training (white-box)",
        "median_squeezing": "median squeezing (transfer from the clean model)",
        "median_squeezing_adaptive": "median squeezing (adaptive: white-box through BPDA)",
        "detector": "feature-squeezing detector (detected or correct)",
        "detector_adaptive": "detector vs adaptive PGD (detected or correct)",
    }  # fmt: skip
    n_all, n_ext = results["data"]["test"], results["extended_settings"]["ext_n"]
    scope = (f"n = {n_all}" if n_ext == n_all else
             f"the seed study's cells on all {n_all} test images, every other cell on a class-balanced subset of {n_ext}")
    lines = ["## Extended suite", "", f"Test accuracy (%); {scope}.", "",
             "| defense \\ attack | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip
    for d, label in names.items():
        row = [acc.get((d, a)) for a in cols]
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in row) + " |")
    det = results["detector"]["per_attack"]
    lines += ["", "Detector (Xu et al.: " + results["detector"]["squeezers"] + f"; threshold at 5 % FPR on "
              f"{results['detector']['validation_images']} validation images; clean test FPR "
              f"{100 * det['clean']['fpr_test']:.1f} %):", "",
              "| attack on the clean model | successful examples | detection rate % | ROC-AUC | detected or correct % |",
              "|---|---|---|---|---|"]  # fmt: skip
    for a, r in det.items():
        if a == "clean":
            continue
        lines.append(f"| {a} | {r['n_successful']} | {100 * r['detection_rate']:.1f} | {r['roc_auc']:.3f} | "
                     f"{100 * r['detected_or_correct']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
