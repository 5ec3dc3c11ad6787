"""Export a finished study's three models as the repository's pretrained models.

    python experiments/export_pretrained.py --study runs/study_quick --data ../shared/data/cifar10-jpeg.tar.gz \
        --out pretrained/quick [--clean-run runs/quick/q8]

For each row of the study's table (none, adversarial_training, median_squeezing) it
evaluates the model as deployed (median-filtered inputs for the median model) on all
10,000 test images and on the seeded class-balanced 1,000-image subset that
`jaxadv evaluate --test-subset 1000` takes, then writes OUT/<row>/ with `jaxadv.pretrained`:
the best params only, a card (data, recipe, seed, both accuracies, training time, date,
sha256) and MODEL_CARD.md. tests/test_pretrained.py re-measures the 1,000-image figure.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROWS = {
    "none": "The study's CNN, clean training",
    "adversarial_training": "The study's CNN, FGSM adversarial training (eps 0.1, half of each batch; label smoothing off)",
    "median_squeezing": "The study's CNN trained on 3x3-median-filtered images; deployed behind the same filter",
}


def main(argv=None) -> int:
    import jaxadv  # noqa: F401  (before JAX starts: its XLA:CPU defaults)
    from jaxadv import data, defenses, evaluation, io, pretrained, train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="a `jaxadv study` output directory (its models/<row>/)")
    p.add_argument("--clean-run", default=None, help="the clean model's run directory, if the study reused one")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    full = data.load(args.data, val_size=0, progress=False).test
    subset = data.load(args.data, val_size=0, test_subset=1000, progress=False).test
    env = io.environment()
    machine = f"{env.get('cpu') or platform.machine()}, {env.get('cpu_count')} CPU cores"
    cards = []
    for row, description in ROWS.items():
        run = Path(args.clean_run) if row == "none" and args.clean_run else Path(args.study) / "models" / row
        ckpt = run / "checkpoints"
        apply_fn, variables, cfg, meta = train.load_trained(str(ckpt))
        deployed = defenses.deployed_apply(cfg.defense, apply_fn)
        acc = evaluation.evaluate(deployed, variables, full.images, full.labels)["accuracy_pct"]
        acc_1k = evaluation.evaluate(deployed, variables, subset.images, subset.labels)["accuracy_pct"]
        tta = evaluation.evaluate(evaluation.flip_tta(deployed), variables, full.images, full.labels)["accuracy_pct"]
        card = pretrained.export(
            ckpt, Path(args.out) / row, name=f"{cfg.name}/{row}", description=description, test_accuracy_pct=acc,
            extra={"test_accuracy_1000_pct": acc_1k, "flip_tta_accuracy_pct": tta, "study_row": row,
                   "command": f"jaxadv study --config {cfg.name} (row {row}); then " + " ".join(
                       ["python", "experiments/export_pretrained.py", *(argv or sys.argv[1:])]),
                   "machine": machine})  # fmt: skip
        cards.append(card)
        print(f"{row}: {acc:.2f}% on 10,000 test images ({acc_1k:.2f}% on the 1,000-image subset), "
              f"sha256 {card['sha256'][:12]} -> {Path(args.out) / row}")
    io.write_text(Path(args.out) / "README.md", index(cards))
    return 0


def index(cards: list[dict]) -> str:
    """OUT/README.md: the models in one table."""
    rows = ["# Pretrained study models", "",
            "The study's three models, trained on the JPEG copy of CIFAR-10 (all 50,000 training images) with "
            "the recipe in each card; accuracy on its 10,000 test images (official CIFAR-10 is typically a "
            "little higher). Load with `jaxadv.train.load_trained(\"<dir>/checkpoints\")`, `jaxadv evaluate "
            "--checkpoint <dir>`, or all three at once with `jaxadv study --pretrained`. The sha256 of each "
            "checkpoints/ directory is verified on every load.", "",
            "| dir | model | test % (single view) | 1,000-image subset % | flip TTA % | epochs | training min | sha256 |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in cards:
        rows.append(f"| [{c['study_row']}]({c['study_row']}/MODEL_CARD.md) | {c['description']} | "
                    f"{c['test_accuracy_pct']:.2f} | {c['test_accuracy_1000_pct']:.2f} | {c['flip_tta_accuracy_pct']:.2f} "
                    f"| {c['epochs']} | {c['train_seconds'] / 60:.1f} | `{c['sha256'][:12]}` |")  # fmt: skip
    return "\n".join(rows + ["", f"Exported {cards[0]['date']} by `experiments/export_pretrained.py` on {cards[0]['machine']}.", ""])


if __name__ == "__main__":
    sys.exit(main())
