"""Named training presets as frozen, nested dataclasses.

A `TrainConfig` has three sections, each a record of its own: `model` (the CNN's shape
and dtype), `optim` (optimizer, schedule, loss) and `defense` (the training-time defense,
by registry name, and its settings), plus the loop's own fields (batch size, epochs,
early stopping, augmentation, validation split). Every preset states what it is for;
measured results (machine, runtime, accuracy) live in the docs beside the command that
produced them.

Checkpoints store the config as a nested dict; `TrainConfig.from_dict` also reads the
flat dicts that jaxadv 0.1 checkpoints hold, so old runs keep loading.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The CNN (see `jaxadv.models.CNN`).

    Attributes:
      widths: output channels of the three conv blocks.
      head: hidden widths of the classifier head.
      norm: None, or "batch" for BatchNorm after every conv.
      dtype: compute dtype, "float32" or "bfloat16" (params stay float32).
      bn_scale: BatchNorm learns a scale (False: shift only, as airbench).
      bn_momentum: weight of the old running statistics in each BatchNorm update (flax's
        convention; PyTorch's momentum m is 1 - this).
      init: "default" (flax's), or "whiten": the first conv frozen to the training
        patches' whitening filters (+-, the top eigenvectors of 3x3 patch covariance) and
        the other convs initialized to the identity ("dirac") on their first channels.
    """

    widths: tuple[int, ...] = (32, 64, 128)
    head: tuple[int, ...] = (128,)
    norm: str | None = None
    dtype: str = "float32"
    bn_scale: bool = True
    bn_momentum: float = 0.9
    init: str = "default"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule and loss.

    Attributes:
      optimizer: "adam_l2" = PyTorch-style Adam(weight_decay=...): L2 added to the gradient
        before Adam; "adamw" = decoupled weight decay on conv/dense kernels only;
        "sgd_nesterov" = SGD with Nesterov momentum and decoupled decay on kernels;
        "muon" = optax.contrib.muon: orthogonalized Nesterov momentum on the conv kernels
        (each a 3*3*in x out matrix) at `lr`, AdamW on the other params at `adam_lr`.
      lr: peak learning rate.
      weight_decay: L2 coefficient (adam_l2) or decoupled decay (adamw, multiplied by lr).
      schedule: "constant", "onecycle" (cosine one-cycle), "cosine" (warmup + cosine) or
        "triangular" (linear from 0.2 lr up to lr, then linearly down to 0.07 lr, as airbench).
      warmup_frac: fraction of all steps spent warming up (onecycle/cosine/triangular).
      label_smoothing: 0 for plain cross-entropy.
      ema: decay per step of an exponential moving average of the weights (0: off). With
        it on, validation, the best params and the returned model are the average's, with
        BatchNorm statistics of its own (recomputed on `ema_bn_batches` training batches
        at the end of every epoch); the decay ramps up as min(ema, (1 + t) / (10 + t)).
      ema_bn_batches: training batches (no augmentation) for the average's BatchNorm statistics.
      momentum: momentum of "sgd_nesterov" (Nesterov) and "muon".
      bias_lr_scale: "sgd_nesterov": learning-rate multiplier of biases (BatchNorm shifts
        included), as airbench's bias scaler.
      adam_lr: "muon": the peak learning rate of the params Muon does not update.
    """

    optimizer: str = "adam_l2"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    schedule: str = "constant"
    warmup_frac: float = 0.15
    label_smoothing: float = 0.0
    ema: float = 0.0
    ema_bn_batches: int = 16
    momentum: float = 0.9
    bias_lr_scale: float = 1.0
    adam_lr: float = 3e-3


@dataclasses.dataclass(frozen=True)
class DefenseConfig:
    """The training-time defense, by name in `jaxadv.defenses.REGISTRY`, and its settings.

    Attributes:
      name: "none", "median", "fgsm_at", "pgd_at", "fast_at" or "nfgsm_at" (see `jaxadv.defenses`).
      eps: L-inf eps (pixels in [0, 1]) of adversarial training.
      adv_weight: fraction of each batch replaced by FGSM examples ("fgsm_at";
        Goodfellow's 0.5); "pgd_at" and "fast_at" train on adversarial examples only.
      median_size: filter size of "median" (training and deployment).
      pgd_steps: PGD steps of "pgd_at" (step size 2.5 * eps / steps).
      fast_alpha: step of "fast_at" in units of eps (Wong et al.: 1.25).
      nfgsm_noise: "nfgsm_at" starts from x + U(-k eps, k eps), k = this (de Jorge et al.: 2).
      co_guard: if > 0 (adversarial training), measure PGD-10 accuracy on 512 validation
        images after every epoch, keep the params with the best one, and stop when it falls
        this many points below its best (catastrophic overfitting).
      adv_label_smoothing: label smoothing of adversarial training (None: the optim
        section's). Smoothing gives spurious FGSM/PGD robustness (masked gradients), so
        presets that smooth clean training turn it off here.
    """

    name: str = "none"
    eps: float = 0.1
    adv_weight: float = 0.5
    median_size: int = 3
    pgd_steps: int = 7
    fast_alpha: float = 1.25
    nfgsm_noise: float = 2.0
    co_guard: float = 0.0
    adv_label_smoothing: float | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (and is stored with its checkpoints).

    Attributes:
      name: preset name.
      model, optim, defense: the three sections above.
      batch_size: examples per step (the last partial batch of an epoch is dropped).
      epochs: maximum number of epochs.
      patience: early stopping on the validation score: stop after this many epochs
        without improvement (0 disables it; the best-validation params are still returned).
      val_size: examples held out of train for validation / early stopping.
      augment: random crop (after padding `pad`) + horizontal flip on every batch.
      pad_mode: "reflect" or "constant" (zero) padding before the random crop.
      pad: pixels of padding per side before the crop (translation by up to `pad`).
      flip: "random" (each example, each step) or "alternate" (a random flip per example in
        the first epoch, then the opposite of the previous epoch's: every image is seen
        both ways in every two epochs, as airbench).
      log_every: steps between host fetches of training metrics.
    """

    name: str = "seed"
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    defense: DefenseConfig = DefenseConfig()
    batch_size: int = 64
    epochs: int = 70
    patience: int = 10
    val_size: int = 5000
    augment: bool = True
    pad_mode: str = "reflect"
    pad: int = 4
    flip: str = "random"
    log_every: int = 50

    def replace(self, **kwargs: Any) -> "TrainConfig":
        """A copy with top-level fields or whole sections replaced."""
        return dataclasses.replace(self, **kwargs)

    def with_defense(self, name: str, **settings: Any) -> "TrainConfig":
        """A copy training with defense `name` (other defense settings kept unless given)."""
        return self.replace(defense=dataclasses.replace(self.defense, name=name, **settings))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from `to_dict()` output, or from a jaxadv 0.1 flat dict (old checkpoints)."""
        if not isinstance(d.get("model"), dict):
            d = _from_flat(d)
        sections = {"model": ModelConfig, "optim": OptimConfig, "defense": DefenseConfig}
        kw = {k: _build(sections[k], v) if k in sections else v for k, v in d.items() if k in _fields(cls)}
        return _build(cls, kw)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _build(cls, d: dict):
    known = _fields(cls)
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})


# jaxadv 0.1 stored one flat record; where each field lives now.
_FLAT = {
    "model": {"widths": "widths", "head": "head", "norm": "norm", "dtype": "dtype"},
    "optim": {"optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay", "schedule": "schedule",
              "warmup_frac": "warmup_frac", "label_smoothing": "label_smoothing"},
    "defense": {"defense": "name", "defense_eps": "eps", "adv_weight": "adv_weight", "median_size": "median_size",
                "pgd_steps": "pgd_steps", "fast_alpha": "fast_alpha", "co_guard": "co_guard"},
}  # fmt: skip


def _from_flat(d: dict) -> dict:
    nested = {k: v for k, v in d.items() if not any(k in m for m in _FLAT.values())}
    for section, mapping in _FLAT.items():
        nested[section] = {new: d[old] for old, new in mapping.items() if old in d}
    return nested


# Faithful to the study: no normalization layers, Adam lr 1e-3 with PyTorch-style weight
# decay (its value is not given in the study; 5e-4 is the common choice), batch 64, up
# to 70 epochs with early stopping on validation loss.
SEED = TrainConfig()

# Same conv topology, built to reach the study's clean accuracy in far fewer CPU epochs:
# BatchNorm, AdamW with a cosine one-cycle LR, label smoothing, batch 128.
FAST = TrainConfig(
    name="fast",
    model=ModelConfig(norm="batch"),
    optim=OptimConfig(optimizer="adamw", lr=3e-3, weight_decay=5e-2, schedule="onecycle", warmup_frac=0.2,
                      label_smoothing=0.1),
    batch_size=128,
    epochs=18,
    patience=0,
)

# The same topology and widths again, for a whole study in an hour on 2 CPU cores: the
# fast-training tricks of airbench and Page's bag of tricks that apply to a 6-conv net.
# What each one did is in docs/training.md ("quick").
QUICK = TrainConfig(
    name="quick",
    model=ModelConfig(norm="batch", bn_scale=False, bn_momentum=0.6, init="whiten"),
    # Muon on the conv kernels (AdamW, lr 3e-3, on the rest): +0.9 points over AdamW (docs/training.md).
    optim=OptimConfig(optimizer="muon", lr=0.05, momentum=0.95, adam_lr=3e-3, weight_decay=5e-2,
                      schedule="triangular", warmup_frac=0.2, label_smoothing=0.2),
    defense=DefenseConfig(adv_label_smoothing=0.0),
    batch_size=128,
    # 6 epochs: the whole study (three models, nine cells) in under an hour; --epochs 8 adds
    # ~0.8 points, and --set optim.ema=0.99 with it another ~0.3 (86.3 %, docs/training.md).
    epochs=6,
    patience=0,
    val_size=0,  # no early stopping to feed: all 50,000 images train (+0.8 points, docs/training.md)
    pad=2,
    flip="alternate",
)

# `quick` for 8 epochs with an average of the weights: 86.31 +- 0.17 % over 3 seeds (flip TTA
# 87.05), 17 min of training on 2 CPU cores (docs/training.md). The 6-epoch `quick` stays the
# study's preset (the whole study in under an hour) and the shipped models'.
QUICK8 = dataclasses.replace(QUICK, name="quick8", epochs=8, optim=dataclasses.replace(QUICK.optim, ema=0.99))

PRESETS = {"seed": SEED, "fast": FAST, "quick": QUICK, "quick8": QUICK8}


def override(cfg: TrainConfig, fields: dict[str, Any]) -> TrainConfig:
    """`cfg` with dotted fields replaced, e.g. {"optim.lr": 1e-3, "batch_size": 256}.

    Values keep the type of the field they replace (ints stay ints, tuples stay tuples);
    an unknown field or a value of the wrong kind is a ValueError naming it.
    """
    sections = {"model", "optim", "defense"}
    for key, value in fields.items():
        section, _, name = key.rpartition(".")
        if section and section not in sections or not section and name in sections:
            raise ValueError(f"unknown config field {key!r}; expected FIELD or SECTION.FIELD with SECTION in "
                             f"{sorted(sections)}")  # fmt: skip
        target = getattr(cfg, section) if section else cfg
        if name not in _fields(type(target)):
            raise ValueError(f"unknown config field {key!r}; {section or 'the config'} has "
                             f"{', '.join(sorted(_fields(type(target))))}")  # fmt: skip
        old = getattr(target, name)
        try:
            if name == "adv_label_smoothing":  # optional: None means "as the optim section"
                value = None if str(value).lower() == "none" else float(value)
            elif isinstance(old, bool):
                if str(value).lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = str(value).lower() in ("true", "1")
            elif isinstance(old, tuple):
                value = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            elif old is not None and not isinstance(old, str):
                value = type(old)(value)
        except (TypeError, ValueError):
            raise ValueError(f"config field {key!r}: {value!r} is not a valid {type(old).__name__}") from None
        target = dataclasses.replace(target, **{name: value})
        cfg = cfg.replace(**{section: target}) if section else target
    return cfg


def get_config(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
