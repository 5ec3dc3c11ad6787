"""Adversarial attacks on `apply_fn(params, x) -> logits` classifiers, and their registry.

Every attack follows one contract (see `jaxadv.attacks._core`):

    x_adv = REGISTRY[name](apply_fn, params, x, y, key=key, eps=eps, **hyperparameters)

Minimum-norm attacks (DeepFool) take no `eps` and give per-example statistics with
`return_info=True`. `REGISTRY` is the one list of attacks: the CLI's `--attack` choices,
the study, the benchmark harness and the contract test all read it. Adding an attack is
one file (a function decorated with `@_core.attack(...)`) and one `register` line below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxadv.attacks._core import AttackMeta, MinNormInfo, example_keys, meta, summed_cross_entropy
from jaxadv.attacks.apgd import apgd, apgd_t
from jaxadv.attacks.autoattack import autoattack
from jaxadv.attacks.cw import cw
from jaxadv.attacks.deepfool import deepfool
from jaxadv.attacks.fab import fab, fab_t
from jaxadv.attacks.fgsm import fgsm
from jaxadv.attacks.pgd import pgd
from jaxadv.attacks.square import square

REGISTRY: dict[str, Callable] = {}


def register(fn: Callable, name: str | None = None) -> Callable:
    """Add an attack (a function with `.meta`, see `_core.attack`) to `REGISTRY`."""
    if not hasattr(fn, "meta"):
        raise ValueError(f"{fn!r} has no attack metadata: decorate it with jaxadv.attacks._core.attack(...)")
    REGISTRY[name or fn.meta.name] = fn
    return fn


register(fgsm)
register(pgd)
register(deepfool)
register(cw)
register(apgd)
register(apgd_t)
register(fab_t)
register(fab)
register(square)
register(autoattack)


def get(name: str) -> Callable:
    """`REGISTRY[name]`, with a one-line error naming the choices."""
    if name not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registered attack with its hyperparameters, as data: `Spec("pgd", eps=8/255, steps=20)`.

    Hashable and JSON-able, so study cells can name attacks and be stored. "none" is the
    identity (clean evaluation).
    """

    name: str
    hparams: tuple[tuple[str, Any], ...] = ()

    def __init__(self, name: str, **hparams: Any):
        if name != "none":
            get(name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "hparams", tuple(sorted(hparams.items())))

    @property
    def fn(self) -> Callable | None:
        return None if self.name == "none" else get(self.name)

    @property
    def kwargs(self) -> dict:
        return dict(self.hparams)

    @property
    def minimum_norm(self) -> bool:
        return self.name != "none" and self.fn.meta.minimum_norm

    def to_dict(self) -> dict:
        return {"name": self.name, **self.kwargs}

    def __call__(self, apply_fn, params, x, y, *, key=None, return_info: bool = False):
        """Run the attack; `(x_adv, info)` with `return_info` (info is None unless minimum-norm)."""
        if self.name == "none":
            return (x, None) if return_info else x
        if self.minimum_norm:
            out = self.fn(apply_fn, params, x, y, key=key, return_info=return_info, **self.kwargs)
            return out
        x_adv = self.fn(apply_fn, params, x, y, key=key, **self.kwargs)
        return (x_adv, None) if return_info else x_adv


__all__ = ["REGISTRY", "AttackMeta", "MinNormInfo", "Spec", "apgd", "apgd_t", "autoattack", "cw", "deepfool", "example_keys", "fab", "fab_t", "fgsm",
           "get", "meta", "pgd", "register", "square", "summed_cross_entropy"]  # fmt: skip
