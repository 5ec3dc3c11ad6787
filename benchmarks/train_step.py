"""Train-step throughput (images/s) of the seed CNN at batch 64 and 256; compile time apart.

    python -m benchmarks.train_step [--configs seed,fast] [--batches 64,256] [--steps 10] [--out FILE.json]

Each timed call runs `--steps` jitted train steps on device-resident random uint8 data
(augmentation on, as in training) and blocks on the new state. Run it on an otherwise
idle machine: two cores are shared by everything.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import bench, io, train
from jaxadv.configs import get_config


def bench_train_step(cfg, batch: int, steps: int, repeats: int) -> dict:
    cfg = cfg.replace(batch_size=batch)
    n = batch * steps
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    model = train.create_model(cfg)
    tx = train.create_optimizer(cfg.optim, train.create_learning_rate_fn(cfg.optim, steps))
    state = train.create_train_state(model, tx, jax.random.key(0))
    step = jax.jit(functools.partial(train.train_step, batch_size=batch, label_smoothing=cfg.optim.label_smoothing,
                                     augment_fn=train.make_augment(cfg)), donate_argnums=(0,))  # fmt: skip
    perm = jnp.arange(n, dtype=jnp.int32)
    key = jax.random.key(1)
    compile_s = bench.compile_seconds(step, state, images, labels, perm, jnp.int32(0), key)
    box = [state]

    def run():
        s = box[0]
        for i in range(steps):
            s, _ = step(s, images, labels, perm, jnp.int32(i), key)
        box[0] = s
        return s.params

    t = bench.time_call(run, warmup=1, repeats=repeats)
    return {"op": "train_step", "impl": "jaxadv", "config": cfg.name, "batch": batch, "steps_per_call": steps,
            **bench.throughput(t, n), "compile_s": compile_s, "times_s": t["times_s"]}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="seed,fast")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--steps", type=int, default=10, help="train steps per timed call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    records = []
    for name in args.configs.split(","):
        for batch in map(int, args.batches.split(",")):
            r = bench_train_step(get_config(name), batch, args.steps, args.repeats)
            records.append(r)
            print(f"train_step {name:5s} batch {batch:4d}: {r['img_per_s']:7.0f} img/s "
                  f"(range {r['img_per_s_min']:.0f}-{r['img_per_s_max']:.0f}), compile {r['compile_s']:.1f}s",
                  flush=True)  # fmt: skip
    out = {"environment": io.environment(), "results": records}
    if args.out:
        io.write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
