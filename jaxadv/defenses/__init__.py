"""Defenses as data: a registry of small records, read by training, the CLI and the study.

A `Defense` says what a defense does at the two times it can act:
  * training: a batch transform `(variables, x, y, key) -> (x', y')` applied inside the
    jitted train step (adversarial examples, filtered images, ...), and optionally a
    monitor `variables -> robust validation accuracy` run after every epoch;
  * deployment: an input transform (squeezer) composed in front of the trained model.
Every field is built from the run's `DefenseConfig`, so a config names its defense and
`resolve` turns it into functions once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from jaxadv import squeeze
from jaxadv.configs import DefenseConfig
from jaxadv.defenses.training import (
    fgsm_adversarial_transform,
    identity_transform,
    median_transform,
    nfgsm_adversarial_transform,
    pgd_adversarial_transform,
    robust_monitor,
)
from jaxadv.types import ApplyFn, BatchTransform, Squeezer


@dataclasses.dataclass(frozen=True)
class Defense:
    """One defense.

    Attributes:
      name: registry name (what `--defense` takes).
      description: one line for `--help` and reports.
      transform: `(DefenseConfig, apply_fn) -> BatchTransform` for training.
      deploy: `DefenseConfig -> Squeezer | None`, the test-time input transform.
      adversarial: True for adversarial training (its runs may watch robust accuracy).
    """

    name: str
    description: str
    transform: Callable[[DefenseConfig, ApplyFn], BatchTransform] = lambda cfg, apply_fn: identity_transform
    deploy: Callable[[DefenseConfig], Squeezer | None] = lambda cfg: None
    adversarial: bool = False


def _fgsm_at(cfg: DefenseConfig, apply_fn: ApplyFn) -> BatchTransform:
    return functools.partial(fgsm_adversarial_transform, apply_fn=apply_fn, eps=cfg.eps, adv_weight=cfg.adv_weight)


def _pgd_at(cfg: DefenseConfig, apply_fn: ApplyFn) -> BatchTransform:
    return functools.partial(pgd_adversarial_transform, apply_fn=apply_fn, eps=cfg.eps, steps=cfg.pgd_steps,
                             step_size=2.5 * cfg.eps / cfg.pgd_steps)  # fmt: skip


def _fast_at(cfg: DefenseConfig, apply_fn: ApplyFn) -> BatchTransform:
    return functools.partial(pgd_adversarial_transform, apply_fn=apply_fn, eps=cfg.eps, steps=1,
                             step_size=cfg.fast_alpha * cfg.eps)  # fmt: skip


def _nfgsm_at(cfg: DefenseConfig, apply_fn: ApplyFn) -> BatchTransform:
    return functools.partial(nfgsm_adversarial_transform, apply_fn=apply_fn, eps=cfg.eps, noise=cfg.nfgsm_noise)


REGISTRY: dict[str, Defense] = {
    d.name: d
    for d in (
        Defense("none", "no defense"),
        Defense("median", "train on median-filtered images and filter at test time (the study's feature squeezing)",
                transform=lambda cfg, apply_fn: functools.partial(median_transform, size=cfg.median_size),
                deploy=lambda cfg: squeeze.median_squeezer(cfg.median_size)),
        Defense("fgsm_at", "FGSM adversarial training, half of each batch (Goodfellow et al. 2015)",
                transform=_fgsm_at, adversarial=True),
        Defense("pgd_at", "PGD adversarial training from a random start (Madry et al. 2018)",
                transform=_pgd_at, adversarial=True),
        Defense("fast_at", "fast adversarial training: FGSM from a random start (Wong et al. 2020)",
                transform=_fast_at, adversarial=True),
        Defense("nfgsm_at", "N-FGSM: FGSM step eps from a U(-2 eps, 2 eps) start, unprojected (de Jorge et al. 2022)",
                transform=_nfgsm_at, adversarial=True),
    )
}  # fmt: skip


def get(name: str) -> Defense:
    """`REGISTRY[name]`, with a one-line error naming the choices."""
    if name not in REGISTRY:
        raise ValueError(f"unknown defense {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A config's defense turned into functions (see `resolve`)."""

    defense: Defense
    batch_transform: BatchTransform
    squeezer: Squeezer | None
    monitor: Callable | None  # variables -> robust validation accuracy (%), or None

    def deployed(self, apply_fn: ApplyFn) -> ApplyFn:
        """The classifier as deployed: `apply_fn` composed with the squeezer, if any."""
        return apply_fn if self.squeezer is None else squeeze.squeezed(apply_fn, self.squeezer)


def resolve(cfg: DefenseConfig, apply_fn: ApplyFn, val_images=None, val_labels=None) -> Resolved:
    """Build the batch transform, deploy squeezer and (if asked for) the robust monitor.

    The monitor exists for adversarial training with `cfg.co_guard > 0` and validation
    data: PGD-10 accuracy at `cfg.eps` on the first 512 validation images.
    """
    d = get(cfg.name)
    monitor = None
    if d.adversarial and cfg.co_guard > 0 and val_labels is not None and len(val_labels):
        monitor = robust_monitor(apply_fn, val_images, val_labels, eps=cfg.eps)
    return Resolved(defense=d, batch_transform=d.transform(cfg, apply_fn), squeezer=d.deploy(cfg), monitor=monitor)


def deployed_apply(cfg: DefenseConfig, apply_fn: ApplyFn) -> ApplyFn:
    """The classifier as the defense deploys it (median-filtered inputs for "median")."""
    sq = get(cfg.name).deploy(cfg)
    return apply_fn if sq is None else squeeze.squeezed(apply_fn, sq)


__all__ = ["REGISTRY", "Defense", "Resolved", "deployed_apply", "fgsm_adversarial_transform", "get",
           "identity_transform", "median_transform", "nfgsm_adversarial_transform", "pgd_adversarial_transform",
           "resolve", "robust_monitor"]
