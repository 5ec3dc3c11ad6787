"""Adversarial attacks on `apply_fn(params, x) -> logits` classifiers, and a name registry.

Attacks that follow the house signature `attack(apply_fn, params, x, y, *, key=None, eps,
...) -> x_adv` (FGSM) drop into eval loops directly. DeepFool is a minimal-perturbation
attack: it has no eps and no labels (its reference class is the model's prediction) and
returns a `DeepFoolResult`, so callers that pick attacks by name must dispatch on it.
"""

from jaxadv.attacks.deepfool import DeepFoolResult, deepfool
from jaxadv.attacks.fgsm import fgsm, fgsm_jit
from jaxadv.attacks.pgd import pgd

REGISTRY = {
    "fgsm": fgsm,
    "deepfool": deepfool,
    "pgd": pgd,
}

__all__ = ["REGISTRY", "DeepFoolResult", "deepfool", "fgsm", "fgsm_jit", "pgd"]
