"""The speed a user's own model gets: a plain Flax copy of the study's CNN beside jaxadv's.

    python -m benchmarks.user_model --order jax-first|jaxadv-first [--checkpoint RUN] [--data ARCHIVE]
                                    [--batch 128] [--deepfool-batch 32] --out FILE.json

A researcher's script usually starts with `import jax` and builds its model from stock
Flax layers. Two things then cost speed on XLA:CPU, and this measures both in one process:

  * the model: `PlainCNN` below is the study's CNN written the ordinary way (`nn.max_pool`,
    whose backward pass is XLA's select-and-scatter), against `jaxadv.models.CNN` (reshape +
    max pooling), on the same weights and images (the param trees have the same names);
  * the import order: with `--order jax-first` JAX's CPU backend starts before `import
    jaxadv`, so jaxadv's XLA:CPU flag cannot apply (jaxadv warns once); with
    `--order jaxadv-first` it does.

`benchmarks.run` runs this twice, once per order, so its report has all four numbers. The
two models are timed in turn (`jaxadv.bench.time_interleaved`), so their ratio is from one
stretch of time. This module imports nothing from JAX at its top: the order is the point.
"""

from __future__ import annotations

import argparse
import sys


def _start(order: str):
    if order == "jax-first":
        import jax

        jax.devices()  # the user's script has touched JAX: the backend starts now, without jaxadv's flag
    import jaxadv  # noqa: F401  (with "jaxadv-first" this sets the flag before the backend starts)


def plain_cnn(widths=(32, 64, 128), head=(128,), num_classes=10, norm=None, bn_scale=True):
    """The study's CNN from stock Flax layers, as a user would write it (input in [0, 1])."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxadv.models import CIFAR10_MEAN, CIFAR10_STD

    class PlainCNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = (x - jnp.asarray(CIFAR10_MEAN).reshape(1, 1, 1, 3)) / jnp.asarray(CIFAR10_STD).reshape(1, 1, 1, 3)
            for w in widths:
                for _ in range(2):
                    x = nn.Conv(w, (3, 3), padding=1, use_bias=norm is None)(x)
                    if norm == "batch":
                        x = nn.BatchNorm(use_running_average=not train, use_scale=bn_scale)(x)
                    x = nn.relu(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape(x.shape[0], -1)
            for w in head:
                x = nn.relu(nn.Dense(w)(x))
            return nn.Dense(num_classes)(x)

    return PlainCNN()


def measure(order: str, checkpoint: str | None, data: str | None, batch: int, deepfool_batch: int,
            repeats: int = 5) -> dict:  # fmt: skip
    """FGSM and DeepFool img/s of the plain model and of jaxadv's, same weights and inputs."""
    _start(order)
    import functools
    import os

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.run import Setting  # imports JAX: only now, after the order is set
    from jaxadv import _xla_flags, bench
    from jaxadv.attacks import deepfool, fgsm

    s = Setting(checkpoint, data, max(batch, deepfool_batch), "float32")
    m = s.cfg.model
    plain = plain_cnn(m.widths, m.head, 10, m.norm, m.bn_scale)
    variables = s.variables
    applies = {"plain Flax (nn.max_pool)": lambda v, xx: plain.apply(v, xx), "jaxadv CNN": s.apply}
    x8 = jnp.asarray(s.batch(8)[0])  # same weights, same function
    plain_logits = jax.jit(applies["plain Flax (nn.max_pool)"])(variables, x8)
    np.testing.assert_allclose(plain_logits, jax.jit(s.apply)(variables, x8), rtol=1e-4, atol=1e-4)
    recs = []
    for op, b in (("fgsm", batch), ("deepfool", deepfool_batch)):
        xb, yb = (jnp.asarray(a) for a in s.batch(b))
        fns = {}
        for name, f in applies.items():
            if op == "fgsm":
                fns[name] = functools.partial(fgsm, f, variables, xb, yb, eps=0.1)
            else:
                fns[name] = functools.partial(deepfool, f, variables, xb, yb, num_candidates=10, overshoot=0.02,
                                              max_iter=50)  # fmt: skip
        timings = bench.time_interleaved(fns, repeats=repeats)
        for name, t in timings.items():
            recs.append({"op": op, "impl": name, "order": order, "batch": b, "img_per_s": b / t["median_s"],
                         "img_per_s_min": b / t["max_s"], "img_per_s_max": b / t["min_s"],
                         "first_call_s": t["compile_s"]})  # fmt: skip
    return {"order": order, "xla_flag_applied": _xla_flags.FLAG in os.environ.get("XLA_FLAGS", ""),
            "weights": s.weights, "inputs": s.inputs, "results": recs}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.user_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--order", choices=("jax-first", "jaxadv-first"), required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--deepfool-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rep = measure(args.order, args.checkpoint, args.data, args.batch, args.deepfool_batch, args.repeats)
    from jaxadv import io

    io.write_json(args.out, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
