"""Figures (matplotlib, Agg backend). Side effects only: every function writes one PNG."""

from __future__ import annotations


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    from jaxadv.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


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


def deepfool_norms(norms: dict[str, list[float]], path) -> None:
    """Histogram of DeepFool perturbation norms, one series per model."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    all_norms = np.concatenate([np.asarray(v) for v in norms.values()])
    bins = np.linspace(0, np.quantile(all_norms, 0.99) if len(all_norms) else 1, 50)
    for name, v in norms.items():
        v = np.asarray(v)
        ax.hist(v, bins=bins, alpha=0.6, label=f"{name} (median {np.median(v):.3f})")
    ax.set(xlabel="DeepFool ‖x_adv − x‖₂", ylabel="test images", title="DeepFool perturbation size")
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def adversarial_gallery(x_clean, x_fgsm, x_deepfool, labels, preds, class_names, path) -> None:
    """Rows: clean, FGSM, DeepFool, and the amplified perturbations; titles are predictions."""
    import numpy as np

    plt = _plt()
    n = len(labels)
    rows = [("clean", x_clean, preds[0]), ("FGSM", x_fgsm, preds[1]), ("DeepFool", x_deepfool, preds[2])]
    fig, axes = plt.subplots(5, n, figsize=(1.6 * n, 9))
    for j in range(n):
        for i, (name, x, p) in enumerate(rows):
            ax = axes[i, j]
            ax.imshow(np.clip(x[j], 0, 1))
            ok = p[j] == labels[j]
            ax.set_title(f"{class_names[p[j]]}", fontsize=7, color="green" if ok else "red")
        for i, (name, x) in enumerate((("FGSM", x_fgsm), ("DeepFool", x_deepfool))):
            d = x[j] - x_clean[j]
            scale = np.abs(d).max() or 1.0
            axes[3 + i, j].imshow(0.5 + 0.5 * d / scale)
            axes[3 + i, j].set_title(f"×{0.5 / scale:.0f}", fontsize=7)
        for i in range(5):
            axes[i, j].axis("off")
    for i, name in enumerate(["clean", "FGSM", "DeepFool", "FGSM δ (amplified)", "DeepFool δ (amplified)"]):
        axes[i, 0].text(-4, 16, name, fontsize=8, ha="right", va="center")
    fig.suptitle("Predictions (green: correct, red: wrong); true labels: "
                 + ", ".join(class_names[k] for k in labels), fontsize=8)  # fmt: skip
    _save(fig, path)
    plt.close(fig)


def robustness_curves(curves: dict, l2: dict, n_test: int, path) -> None:
    """Accuracy against the attack budget: FGSM and PGD (L-inf), DeepFool (L2), one line per defense.

    Args:
      curves: {"eps": [...], "n": images per point, "curves": {defense: {"fgsm": [...], "pgd": [...]}}}.
      l2: {defense: DeepFool summary with "norms_correct" and "n_correct_unfooled"}.
      n_test: the number of test images a DeepFool summary covers if it has no "n".
    """
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    eps = np.asarray(curves["eps"])
    for i, kind in enumerate(("fgsm", "pgd")):
        ax = axes[i]
        for name, c in curves["curves"].items():
            ax.plot(eps, c[kind], marker="o", ms=3, label=name)
        ax.axvline(8 / 255, color="grey", lw=0.6, ls="--")
        ax.set(xlabel="L-inf eps (pixels in [0, 1]); dashed: 8/255", ylabel="test accuracy (%)", ylim=(0, 100),
               title=f"{kind.upper()}, white-box (n = {curves['n']})")  # fmt: skip
    ax = axes[2]
    top = max([np.quantile(d["norms_correct"], 0.98) for d in l2.values() if d["norms_correct"]] or [1.0])
    radii = np.linspace(0, top, 100)
    for name, d in l2.items():
        v = np.asarray(d["norms_correct"])
        acc = [100.0 * ((v > r).sum() + d["n_correct_unfooled"]) / d.get("n", n_test) for r in radii]
        ax.plot(radii, acc, label=name)
    ax.set(xlabel="L2 radius", ylabel="accuracy (%): correct and DeepFool norm > radius", ylim=(0, 100),
           title=f"DeepFool (L2), white-box (n = {n_test})")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
