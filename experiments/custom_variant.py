"""A research variant that touches no library code: the user's own model and squeezer.

The model (a small residual net) and the squeezer (bit-depth reduction written from
scratch, plus a composition with jaxadv's median filter) are defined only here. They plug
into jaxadv's FGSM, DeepFool and evaluation because those take any pure
`apply_fn(params, x) -> logits` and any pure squeezer `x -> x`.

    python experiments/custom_variant.py                  # synthetic data, ~1 min on CPU
    python experiments/custom_variant.py --data ../shared/data/cifar10-jpeg.tar.gz --train-subset 5000

Prints clean / FGSM / DeepFool accuracy of the plain and the squeezed classifier, the
latter attacked both through the squeezer's true gradient and with BPDA.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxadv import data, squeeze
from jaxadv.attacks import Spec
from jaxadv.evaluation import attack_eval
from jaxadv.models import max_pool_2x2


# --- the user's model -----------------------------------------------------------------
class ResBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.width, (3, 3))(x))
        h = nn.Conv(self.width, (3, 3))(h)
        if x.shape[-1] != self.width:
            x = nn.Conv(self.width, (1, 1))(x)
        return nn.relu(x + h)


class TinyResNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x * 2.0 - 1.0  # the model owns its input normalization: attacks see [0, 1]
        for width in (16, 32, 64):
            x = ResBlock(width)(x)
            # jaxadv's 2x2 max pool (reshape + max) instead of `nn.max_pool`: the same
            # values, but its gradient is an elementwise select, where XLA:CPU's
            # select-and-scatter for `nn.max_pool` makes every attack step slower.
            x = max_pool_2x2(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


MODEL = TinyResNet()


def apply_fn(params, x):
    """A module-level function: stable and hashable, so jit treats it as static."""
    return MODEL.apply(params, x)


# --- the user's squeezer ---------------------------------------------------------------
def five_bit(x):
    """Bit-depth reduction to 5 bits (Xu et al.), written as a plain pure function."""
    levels = 2.0**5 - 1
    return jnp.round(x * levels) / levels


def five_bit_then_median(x):
    return squeeze.median_filter(five_bit(x), size=2)


# --- training: the user's own loop -------------------------------------------------------
def train(params, images, labels, *, steps, batch, key):
    tx = optax.adam(2e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss(p):
            logits = apply_fn(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    n = len(labels)
    for i in range(steps):
        idx = jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, n)
        x = jnp.asarray(images)[idx].astype(jnp.float32) / 255.0
        params, opt = step(params, opt, x, jnp.asarray(labels)[idx])
    return params


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="'synthetic' or any jaxadv data source")
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--test-subset", type=int, default=500)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eps", type=float, default=8 / 255)
    args = p.parse_args()

    if args.data == "synthetic":
        splits = data.synthetic(args.train_subset, args.test_subset, val_size=0)
    else:
        splits = data.load(args.data, val_size=0, train_subset=args.train_subset, test_subset=args.test_subset)
    key = jax.random.key(0)
    params = MODEL.init(key, jnp.zeros((1, 32, 32, 3)))
    params = train(params, splits.train.images, splits.train.labels, steps=args.steps, batch=64, key=key)

    squeezed_apply = squeeze.squeezed(apply_fn, five_bit_then_median)  # cached: one object
    # Same classifier, but gradients pass the squeezer as identity (BPDA, Athalye et al.
    # 2018): rounding has zero gradient, so plain white-box attacks on the squeezed model
    # stall, and its robustness there is an artefact (obfuscated gradients).
    bpda_apply = squeeze.squeezed(apply_fn, squeeze.bpda(five_bit_then_median))
    # Attacks as data: registry name + hyperparameters. DeepFool is a minimum-norm attack
    # (no eps); its reference class is the model's prediction.
    attacks = {"none": None, "fgsm": Spec("fgsm", eps=args.eps), "deepfool": Spec("deepfool", max_iter=20)}
    print(f"data: {splits.source}; eps = {args.eps:.4f}")
    print(f"{'classifier':28s} {'clean':>7s} {'FGSM':>7s} {'DeepFool':>9s}")
    for name, f in (("tiny resnet", apply_fn), ("+ 5-bit + median", squeezed_apply), ("+ 5-bit + median, BPDA", bpda_apply)):
        row = []
        for attack in attacks.values():
            res, _ = attack_eval(f, params, splits.test.images, splits.test.labels, attack=attack, batch_size=100)
            row.append(res["accuracy_pct"])
        print(f"{name:28s} {row[0]:6.1f}% {row[1]:6.1f}% {row[2]:8.1f}%")


if __name__ == "__main__":
    main()
