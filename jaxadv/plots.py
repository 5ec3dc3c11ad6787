"""Figures (matplotlib, Agg backend). Side effects only: every function writes one PNG."""

from __future__ import annotations

import os
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def training_curves(histories: dict[str, list[dict]], path) -> None:
    """Loss and accuracy per epoch (train solid, validation dashed), one colour per run."""
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, history) in enumerate(histories.items()):
        c = f"C{i}"
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], color=c, label=f"{name} train")
        ax_acc.plot(epochs, [h["train_accuracy_pct"] for h in history], color=c, label=f"{name} train")
        if history and "val_loss" in history[0]:
            ax_loss.plot(epochs, [h["val_loss"] for h in history], "--", color=c, label=f"{name} val")
            ax_acc.plot(epochs, [h["val_accuracy_pct"] for h in history], "--", color=c, label=f"{name} val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
