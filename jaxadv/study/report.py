"""results.json, results.md and the figures, rendered from evaluated cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxadv import io, plots
from jaxadv.attacks import Spec
from jaxadv.study import suites
from jaxadv.study.cells import SCHEMA_VERSION, Cell, Context, min_norm_lists, run_of

ROW_LABELS = {
    "none": "none (white-box)", "adversarial_training": "FGSM adversarial training (white-box)",
    "pgd_adversarial_training": "PGD adversarial training (white-box)",
    "fast_adversarial_training": "fast adversarial training (white-box)",
    "median_squeezing": "median squeezing (transfer from the clean model)",
    "median_squeezing_adaptive": "median squeezing (adaptive: white-box through BPDA)",
    "detector": "feature-squeezing detector (detected or correct)",
    "detector_adaptive": "detector vs adaptive PGD (detected or correct)",
}  # fmt: skip


def _fmt(v):
    return "–" if v is None else f"{v:.1f}"


def _acc(records: list[dict], tables: tuple[str, ...]) -> dict:
    return {(r["defense"], r["attack"]): r["accuracy_pct"] for r in records if r["table"] in tables}


def seed_markdown(results: dict) -> str:
    """The study's table, ours / the study's / difference, and the DeepFool statistics."""
    ours = _acc(results["cells"], ("seed", "seed_extra"))
    cols = suites.SEED_COLUMNS
    lines = ["Test accuracy (%) — ours / the study's / difference (ours − study).", "",
             "| defense \\ attack | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip
    for d in suites.SEED_ROWS:
        row = []
        for a in cols:
            o, s = ours[(d, a)], suites.STUDY[(d, a)]
            row.append(f"{o:.1f} / {_fmt(s)} / " + ("–" if s is None else f"{o - s:+.1f}"))
        lines.append(f"| {d} | " + " | ".join(row) + " |")
    lines.append("| median_squeezing, no test-time filter | "
                 + " | ".join(f"{ours[('median_squeezing_unfiltered', a)]:.1f} / – / –" for a in cols) + " |")
    n = results["data"]["test"]
    lines += ["", f"n = {n} test images; FGSM eps = {results['settings']['eps']}; data: {results['data']['source']}. "
              "Every model is evaluated and attacked single-view, as deployed (no test-time augmentation)."]
    for r in results["cells"]:
        if r["table"] == "seed" and r["attack"] == "deepfool" and r["protocol"] == "white_box":
            lines.append(
                f"DeepFool on {r['defense']}: fooled {r['success_rate_correct_pct']:.1f}% of the {r['n_correct']} "
                f"correctly classified images; L2 mean {r['norm_mean']:.3f}, median {r['norm_median']:.3f}; "
                f"iterations mean {r['iterations_mean']:.2f}, max {r['iterations_max']}.")  # fmt: skip
    secs = results["phase_seconds"]
    lines += ["", "Phase wall times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items())]
    return "\n".join(lines) + "\n"


def extended_markdown(results: dict, cols: list[str]) -> str:
    """The extended table and the detector table."""
    acc = _acc(results["cells"], ("seed", "extended"))
    n_all, n_ext = results["data"]["test"], results["settings"]["ext_n"] or results["data"]["test"]
    scope = (f"n = {n_all}" if n_ext == n_all else
             f"the seed study's cells on all {n_all} test images, every other cell on a class-balanced subset of {n_ext}")
    lines = ["## Extended suite", "", f"Test accuracy (%); {scope}.", "",
             "| defense \\ attack | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip
    for d, label in ROW_LABELS.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(acc.get((d, a))) for a in cols) + " |")
    det = results["detector"]
    lines += ["", f"Detector (Xu et al.: {det['squeezers']}; threshold at {100 * det['fpr']:g} % FPR on "
              f"{det['validation_images']} validation images; clean test FPR {100 * det['fpr_test']:.1f} %):", "",
              "| attack on the clean model | successful examples | detection rate % | ROC-AUC | detected or correct % |",
              "|---|---|---|---|---|"]  # fmt: skip
    for a, r in det["per_attack"].items():
        lines.append(f"| {a} | {r['n_successful']} | {100 * r['detection_rate']:.1f} | {r['roc_auc']:.3f} | "
                     f"{100 * r['detected_or_correct']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _autoattack_section(records: list[dict], ctx: Context, s: suites.Settings) -> list[dict]:
    """Per trained model and budget: PGD-20, AutoAttack, the gap, and AutoAttack's time."""
    acc = _acc(records, ("seed", "extended"))
    rows = []
    for row in suites.TRAINED + ("median_squeezing_adaptive",):
        for norm, eps in s.autoattack:
            name = suites.budget_name(norm, eps)
            pgd, aa = acc.get((row, f"pgd_{name}")), acc.get((row, f"aa_{name}"))
            if aa is None:
                continue
            cell = next(c for c in ctx.cells if c.row == row and c.column == f"aa_{name}")
            seconds = ctx.seconds.get(run_of(cell).id)
            rows.append({"defense": row, "norm": norm, "eps": eps, "pgd20_pct": pgd, "autoattack_pct": aa,
                         "gap": None if pgd is None else pgd - aa, "autoattack_seconds": seconds})  # fmt: skip
    return rows


def autoattack_markdown(results: dict) -> str:
    lines = ["## AutoAttack beside PGD-20", "",
             "Robust accuracy (%), white-box (median squeezing: through BPDA); AutoAttack standard with early exit "
             "(the same verdicts as the reference's flow).", "",
             "| defense | budget | PGD-20 | AutoAttack | PGD-20 − AutoAttack | AutoAttack time |", "|---|---|---|---|---|---|"]
    for r in results["autoattack"]:
        b = ("L-inf " if r["norm"] == "linf" else "L2 ") + suites.budget_name(r["norm"], r["eps"]).replace("l2_", "")
        t = "–" if r["autoattack_seconds"] is None else f"{r['autoattack_seconds'] / 60:.1f} min"
        lines.append(f"| {ROW_LABELS.get(r['defense'], r['defense'])} | {b} | {_fmt(r['pgd20_pct'])} | "
                     f"{r['autoattack_pct']:.1f} | {_fmt(r['gap'])} | {t} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _detector_section(records: list[dict], ctx: Context) -> dict:
    per = {("adaptive_" if r["defense"] == "detector_adaptive" else "") + r["attack"]: r for r in records
           if r["defense"] in ("detector", "detector_adaptive") and r["attack"] != "none"}  # fmt: skip
    clean = next(r for r in records if r["defense"] == "detector" and r["attack"] == "none")
    keys = ("threshold", "fpr_val", "fpr_test", "detection_rate", "roc_auc", "detected_or_correct", "n_successful")
    return {"squeezers": "bit depth 5, median 2x2, non-local means 13-3-2", "fpr": ctx.detector["fpr"],
            "validation_images": min(ctx.detector["val"], len(ctx.val)), "adaptive_lambda": ctx.detector["lam"],
            "fpr_test": clean["fpr_test"], "per_attack": {a: {k: r[k] for k in keys} for a, r in per.items()}}


def _curves(records: list[dict], s: suites.Settings) -> dict:
    curves: dict = {}
    for r in records:
        if r["table"] != "curve":
            continue
        kind, e = r["attack"].split("@")
        curves.setdefault(r["defense"], {}).setdefault(kind, {})[float(e)] = r["accuracy_pct"]
    return {"eps": list(s.curve_eps), "n": next((r["n"] for r in records if r["table"] == "curve"), 0),
            "curves": {row: {k: [v[e] for e in s.curve_eps] for k, v in kinds.items()} for row, kinds in curves.items()}}


def write(out: Path, records: list[dict], ctx: Context, s: suites.Settings, *, suite: str, extra: dict) -> dict:
    """Write OUT/results.json, OUT/results.md and the figures; return the results dict."""
    results = {"schema_version": SCHEMA_VERSION, "suite": suite,
               "cells": [r for r in records if r["table"] != "curve"],
               "study": [{"defense": d, "attack": a, "accuracy_pct": v} for (d, a), v in suites.STUDY.items()],
               **extra}  # fmt: skip
    md = seed_markdown(results)
    cols = list(suites.SEED_COLUMNS) + [suites.pgd_name(e) for e in s.pgd_eps]
    if suite == "extended":
        results["detector"] = _detector_section(records, ctx)
        results["curves"] = _curves(records, s)
        results["autoattack"] = _autoattack_section(records, ctx, s)
        md += "\n" + extended_markdown(results, cols) + "\n" + autoattack_markdown(results)
    io.write_json(out / "results.json", results)
    io.write_text(out / "results.md", md)
    _figures(out, records, ctx, s, suite, results)
    return results


def _figures(out: Path, records, ctx: Context, s: suites.Settings, suite: str, results: dict) -> None:
    models = ctx.models
    plots.training_curves({name: models(name).history for name in suites.SEED_ROWS}, out / "training_curves.png")
    df = Spec("deepfool", **dict(s.deepfool))
    norms = {row: min_norm_lists(Cell(row, "deepfool", row, df), ctx)["norms"] for row in ("none", "adversarial_training")}
    plots.deepfool_norms(norms, out / "deepfool_norms.png")
    _gallery(out, ctx, s)
    if suite == "extended":
        n_ext = s.ext_n or len(ctx.test)
        l2 = {row: min_norm_lists(Cell(row, "deepfool", row, df, n=n_ext), ctx) for row in suites.TRAINED}
        l2["median_squeezing_adaptive"] = min_norm_lists(
            Cell("median_squeezing_adaptive", "deepfool", "median_squeezing", df, "adaptive", n=n_ext), ctx)
        plots.robustness_curves(results["curves"], l2, n_ext, out / "robustness_curves.png")


def _gallery(out: Path, ctx: Context, s: suites.Settings) -> None:
    """One test image per class (the first of each), clean, FGSM and DeepFool on the clean model."""
    test = ctx.test
    m = ctx.models("none")
    runs = {k: ctx.results[run_of(Cell("none", k, "none", spec))] for k, spec in
            (("fgsm", Spec("fgsm", eps=s.eps)), ("deepfool", Spec("deepfool", **dict(s.deepfool))))}  # fmt: skip
    idx = np.array([int(np.flatnonzero(test.labels == c)[0]) for c in np.unique(test.labels)][:8])
    x_clean = np.asarray(test.images[idx], np.float32) / np.float32(255)
    x_f, x_d = runs["fgsm"]["x_adv"][idx], runs["deepfool"]["x_adv"][idx]
    preds = [np.asarray(m.apply_fn(m.variables, v)).argmax(-1) for v in (x_clean, x_f, x_d)]
    plots.adversarial_gallery(x_clean, x_f, x_d, test.labels[idx], preds, ctx.models.splits.class_names,
                              out / "gallery.png")  # fmt: skip
