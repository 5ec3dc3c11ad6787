"""Pretrained models shipped in the repository: export, model card, checksum verified on load.

A pretrained model is a directory

    NAME/card.json       what it is: data, recipe (the config), seed, accuracy, date, sha256
    NAME/MODEL_CARD.md   the same for people
    NAME/checkpoints/    an orbax checkpoint with the best params and BatchNorm statistics
                         only (no optimizer state: ~2 MB for the study's CNN)

`train.load_trained(NAME/checkpoints)` (and so `jaxadv evaluate --checkpoint NAME`) loads
it like any training run, after checking that the files still hash to the card's sha256:
a corrupted or edited checkpoint is a one-line `CheckpointError`, never a silent load.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

from jaxadv import checkpoint, io

FORMAT = "jaxadv-pretrained-1"

# The models shipped with the repository: pretrained/<set>/<study row>/ (see pretrained/README.md).
SHIPPED = Path(__file__).resolve().parent.parent / "pretrained"


def resolve_dir(where: str | Path) -> Path:
    """A directory of pretrained models: a path, or the name of a shipped set ("quick").

    Raises:
      FileNotFoundError: neither exists (one line, naming both places looked in).
    """
    p = Path(where)
    if p.is_dir():
        return p
    if (SHIPPED / str(where)).is_dir():
        return SHIPPED / str(where)
    raise FileNotFoundError(f"no pretrained models at {where} (nor {SHIPPED / str(where)})")


def config_name(models_dir: str | Path) -> str:
    """The preset the models in `models_dir` were trained with (from the clean model's card)."""
    card = Path(models_dir) / "none" / "card.json"
    if not card.is_file():
        raise FileNotFoundError(f"{models_dir} has no none/card.json: not a directory of pretrained study models")
    return str(io.read_json(card).get("config", {}).get("name", "fast"))


def checksum(ckpt_dir: str | Path) -> str:
    """sha256 over every file under `ckpt_dir` (relative path and bytes, in sorted order)."""
    root = Path(ckpt_dir)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def card_of(ckpt_dir: str | Path) -> dict | None:
    """The model card beside a checkpoints/ directory, or None (an ordinary training run)."""
    card = Path(ckpt_dir).parent / "card.json"
    return io.read_json(card) if card.is_file() else None


def verify(ckpt_dir: str | Path) -> dict | None:
    """Check a pretrained checkpoint against its card; return the card (None if it has none).

    Raises:
      CheckpointError: the files no longer hash to the card's sha256.
    """
    card = card_of(ckpt_dir)
    if card is None:
        return None
    got = checksum(ckpt_dir)
    if got != card.get("sha256"):
        raise checkpoint.CheckpointError(
            f"pretrained checkpoint {ckpt_dir} is corrupt or modified: sha256 {got[:12]} does not match its "
            f"card's {str(card.get('sha256'))[:12]}")  # fmt: skip
    return card


def export(run_ckpt_dir: str | Path, out: str | Path, *, name: str, description: str,
           test_accuracy_pct: float, extra: dict[str, Any] | None = None) -> dict:  # fmt: skip
    """Write the best params of a finished training run as a pretrained model directory.

    Args:
      run_ckpt_dir: a `checkpoints/` directory written by `train.fit`.
      out: the new model directory (NAME/ above); must not exist yet.
      name, description: for the card.
      test_accuracy_pct: the accuracy the card promises (tests re-measure it).
      extra: more card fields (e.g. the command that trained it, its wall time).

    Returns:
      The card.
    """
    import jax

    from jaxadv import train

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory")
    _, variables, cfg, meta = train.load_trained(str(run_ckpt_dir))
    tree = {"best_params": variables["params"], "best_batch_stats": variables.get("batch_stats", {})}
    keep = ("config", "num_classes", "image_shape", "class_names", "data", "seed", "n_train", "history")
    saved_meta = {**{k: meta[k] for k in keep if k in meta}, "format": FORMAT}
    checkpoint.save(out / "checkpoints", 0, jax.device_get(tree), io.json_safe(saved_meta), max_to_keep=1)
    card = {
        "name": name, "description": description, "format": FORMAT,
        "data": meta.get("data"), "seed": meta.get("seed"), "n_train": meta.get("n_train"),
        "config": meta.get("config"), "epochs": len(meta.get("history", [])),
        "train_seconds": sum(h.get("seconds", 0.0) for h in meta.get("history", [])),
        "test_accuracy_pct": test_accuracy_pct, "date": datetime.date.today().isoformat(),
        "sha256": checksum(out / "checkpoints"), **(extra or {}),
    }  # fmt: skip
    io.write_json(out / "card.json", card)
    io.write_text(out / "MODEL_CARD.md", model_card_markdown(card))
    return card


def model_card_markdown(card: dict) -> str:
    data = card.get("data") or "?"
    cfg = json.dumps(card.get("config"), indent=1) if card.get("config") else "?"
    deployed = ", as deployed" if card.get("study_row") == "median_squeezing" else ""
    rows = [f"# {card['name']}", "", card["description"], "",
            "| field | value |", "|---|---|",
            f"| test accuracy (single view, all 10,000 test images{deployed}) | {card['test_accuracy_pct']:.2f} % |",
            f"| data | {data} |", f"| training images | {card.get('n_train')} |", f"| seed | {card.get('seed')} |",
            f"| epochs | {card.get('epochs')} |", f"| training time | {card.get('train_seconds', 0) / 60:.1f} min |",
            f"| date | {card['date']} |", f"| sha256 of checkpoints/ | `{card['sha256']}` |"]  # fmt: skip
    if "test_accuracy_1000_pct" in card:
        rows.append(f"| test accuracy on the 1,000-image subset of `jaxadv evaluate --test-subset 1000` | "
                    f"{card['test_accuracy_1000_pct']:.2f} % |")
    if "flip_tta_accuracy_pct" in card:
        rows.append(f"| test accuracy with flip TTA (reported apart) | {card['flip_tta_accuracy_pct']:.2f} % |")
    for k in ("command", "machine"):
        if k in card:
            rows.append(f"| {k} | {card[k]} |")
    rows += ["", "Load: `train.load_trained(\"<this dir>/checkpoints\")` or `jaxadv evaluate --checkpoint <this dir>`; "
             "the checksum is verified on load.", "", "Recipe (the stored `TrainConfig`):", "", "```json", cfg, "```", ""]
    return "\n".join(rows)
