"""Runs that isolate why three cells of our seed-study table differ from the study's.

    python experiments/study_gaps.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --study runs/study10k --clean-run runs/fast --seed-run runs/seed10 --out results/seed_study/gaps

All on the full test split, FGSM with true labels unless said otherwise:
  1. Label leaking (Kurakin et al. 2016): the FGSM-trained model under FGSM eps 0.1 made
     with the true labels (the study's protocol) and with the model's own predictions.
  2. The eps scale: the study does not say whether eps 0.1 is in [0, 1] pixels or in its
     normalized input space. A PyTorch pipeline with Normalize(0.5, 0.5) makes 0.1
     normalized = 0.05 pixels; with the CIFAR-10 std (~0.25), 0.1 normalized = 0.025 pixels.
     FGSM at each scale against the clean model, the FGSM-trained model, and (transfer) the
     median-squeezed model.
  3. The source model: a clean model trained with the study's recipe (`seed` preset: no
     BatchNorm, no label smoothing, Adam 1e-3 + weight decay) instead of our `fast` one.
     FGSM against it, and its FGSM examples transferred to the median-squeezed model.
  4. The training budget of FGSM adversarial training (with --at-long-run): the same
     recipe trained for as many epochs as the clean model (18 instead of 8); clean
     accuracy and FGSM with true and predicted labels.
  5. The median model's recipe (with --seed-median-run): a median-squeezed model trained
     with the study's recipe (`jaxadv train --config seed --defense median`) instead of the
     `fast` preset, fed the same transferred FGSM examples at each eps scale.
Writes OUT.json and OUT.md. Cheap (FGSM only): a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

from jaxadv import data, io, squeeze, train
from jaxadv.attacks import fgsm
from jaxadv.evaluation import attack_eval

EPS_SCALES = {"0.1 (pixels in [0, 1])": 0.1, "0.1 x 0.5 (Normalize(0.5, 0.5))": 0.05,
              "0.1 x 0.247 (Normalize(CIFAR-10 std))": 0.1 * 0.247}  # fmt: skip


def _load(run: str | Path):
    ckpt = Path(run) / "checkpoints"
    apply_fn, variables, cfg, _ = train.load_trained(str(ckpt if ckpt.is_dir() else run))
    return apply_fn, variables, cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--study", required=True, help="the study's OUT directory (its models/ are used)")
    p.add_argument("--clean-run", required=True, help="the clean model the study used (--clean-run)")
    p.add_argument("--seed-run", required=True, help="a clean model trained with `jaxadv train --config seed`")
    p.add_argument("--at-long-run", default=None, help="an FGSM-AT model trained longer (`jaxadv train --defense "
                   "fgsm_at --epochs 18`)")
    p.add_argument("--seed-median-run", default=None, help="a median-squeezed model trained with the study's recipe "
                   "(`jaxadv train --config seed --defense median`)")
    p.add_argument("--out", required=True, help="output path without suffix")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--experiments", default="leaking,eps,budget,median",
                   help="which of leaking (1), eps (2 and 3), budget (4, needs --at-long-run), median (5, needs "
                   "--seed-median-run) to run")
    args = p.parse_args(argv)
    which = set(args.experiments.split(","))
    known = {"leaking", "eps", "budget", "median"}
    if not which <= known:
        p.error(f"--experiments: unknown {', '.join(sorted(which - known))}")

    t0 = time.perf_counter()
    splits = data.load(args.data, test_subset=args.test_subset, progress=False)
    x, y = splits.test.images, splits.test.labels
    models = {
        "clean (fast)": _load(args.clean_run),
        "clean (seed recipe)": _load(args.seed_run),
        "fgsm_at": _load(Path(args.study) / "models" / "adversarial_training"),
        "median": _load(Path(args.study) / "models" / "median_squeezing"),
    }
    apply_m, var_m, cfg_m = models["median"]
    median_deployed = squeeze.squeezed(apply_m, squeeze.median_squeezer(cfg_m.defense.median_size))
    rows = []

    def add(experiment, model, attack, summary, **extra):
        rows.append({"experiment": experiment, "model": model, "attack": attack,
                     "accuracy_pct": summary["accuracy_pct"], "n": summary["n"], **extra})  # fmt: skip
        print(f"{experiment:14s} {model:22s} {attack:48s} {summary['accuracy_pct']:5.1f}%", flush=True)

    def fgsm_attack(eps, predicted=False):
        """FGSM under the attack contract, with the true labels or the model's own predictions."""

        def attack(apply_fn, params, xb, yb, *, key=None):
            if predicted:
                yb = jax.numpy.argmax(apply_fn(params, xb), axis=-1)
            return fgsm(apply_fn, params, xb, yb, eps=eps)

        return attack

    # 1. Label leaking.
    apply_a, var_a, _ = models["fgsm_at"]
    for predicted in (False, True) if "leaking" in which else ():
        s, _ = attack_eval(apply_a, var_a, x, y, attack=fgsm_attack(0.1, predicted))
        add("label leaking", "fgsm_at", f"FGSM 0.1, {'predicted' if predicted else 'true'} labels", s)

    adv_cache = {}

    def source_fgsm(source, eps):
        """(summary, x_adv) of FGSM at eps on a clean source model; made once, used by 2-3 and 5."""
        if (source, eps) not in adv_cache:
            apply_c, var_c, _ = models[source]
            adv_cache[source, eps] = attack_eval(apply_c, var_c, x, y, attack=fgsm_attack(eps),
                                                 keep_adv=True)  # fmt: skip
        return adv_cache[source, eps]

    # 2 and 3. Clean models at each eps scale, and their examples transferred to the median model.
    for source in ("clean (fast)", "clean (seed recipe)") if "eps" in which else ():
        apply_c, var_c, _ = models[source]
        s, _ = attack_eval(apply_c, var_c, x, y)
        add("source model", source, "none", s)
        for label, eps in EPS_SCALES.items():
            s, x_adv = source_fgsm(source, eps)
            add("eps scale", source, f"FGSM eps {label}", s, eps=eps)
            s, _ = attack_eval(median_deployed, var_m, x, y, inputs=x_adv)
            add("eps scale", "median (filtered)", f"transfer from {source}, FGSM eps {label}", s, eps=eps)
    for label, eps in EPS_SCALES.items() if "eps" in which else ():
        s, _ = attack_eval(apply_a, var_a, x, y, attack=fgsm_attack(eps))
        add("eps scale", "fgsm_at", f"FGSM eps {label}", s, eps=eps)

    # 4. The adversarial training budget.
    if "budget" in which and args.at_long_run:
        apply_l, var_l, cfg_l = models["fgsm_at, long"] = _load(args.at_long_run)
        s, _ = attack_eval(apply_l, var_l, x, y)
        add("AT budget", f"fgsm_at ({cfg_l.epochs} epochs)", "none", s)
        s, _ = attack_eval(apply_a, var_a, x, y)
        add("AT budget", f"fgsm_at ({models['fgsm_at'][2].epochs} epochs)", "none", s)
        for predicted in (False, True):
            s, _ = attack_eval(apply_l, var_l, x, y, attack=fgsm_attack(0.1, predicted))
            add("AT budget", f"fgsm_at ({cfg_l.epochs} epochs)",
                f"FGSM 0.1, {'predicted' if predicted else 'true'} labels", s)  # fmt: skip

    # 5. The median model's training recipe.
    if "median" in which and args.seed_median_run:
        apply_r, var_r, cfg_r = models["median (seed recipe)"] = _load(args.seed_median_run)
        medians = {"median (fast)": (median_deployed, var_m),
                   "median (seed recipe)": (squeeze.squeezed(apply_r, squeeze.median_squeezer(cfg_r.defense.median_size)),
                                            var_r)}  # fmt: skip
        for name, (deployed, variables) in medians.items():
            s, _ = attack_eval(deployed, variables, x, y)
            add("median recipe", f"{name}, filtered", "none", s)
        for source in ("clean (fast)", "clean (seed recipe)"):
            for label, eps in EPS_SCALES.items():
                _, x_adv = source_fgsm(source, eps)
                for name, (deployed, variables) in medians.items():
                    s, _ = attack_eval(deployed, variables, x, y, inputs=x_adv)
                    add("median recipe", f"{name}, filtered", f"transfer from {source}, FGSM eps {label}", s,
                        eps=eps)

    out = Path(args.out)
    configs = {name: cfg.to_dict() for name, (_, _, cfg) in models.items()}
    report = {"rows": rows, "n_test": int(len(y)), "data": splits.source, "configs": configs,
              "seconds": time.perf_counter() - t0, "command": "python experiments/study_gaps.py " + " ".join(
                  argv if argv is not None else sys.argv[1:])}  # fmt: skip
    io.write_json(out.with_suffix(".json"), report)
    md = ["| experiment | model evaluated | attack | accuracy % |", "|---|---|---|---|"]
    md += [f"| {r['experiment']} | {r['model']} | {r['attack']} | {r['accuracy_pct']:.1f} |" for r in rows]
    md += ["", f"n = {len(y)} test images; data: {splits.source}; {report['seconds'] / 60:.1f} min."]
    io.write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
