"""Data parallelism: 4 simulated CPU devices give the same training as 1 device."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, jax, numpy as np
    from jaxadv import data, train
    from jaxadv.configs import TrainConfig
    from jaxadv.models import make_apply
    cfg = TrainConfig(name="tiny", widths=(4, 8, 8), head=(16,), norm="batch", batch_size=32, epochs=1,
                      lr=3e-3, weight_decay=0.0, val_size=32, log_every=4, patience=0, augment=True)
    s = data.synthetic(256, 64, num_classes=4, val_size=32, seed=7)
    import functools
    aug = functools.partial(data.augment, pad=4)
    r = train.fit(cfg, s.train.images, s.train.labels, s.val.images, s.val.labels, key=jax.random.key(0),
                  num_classes=4, augment_fn=aug, progress=False)
    ev = train.evaluate(make_apply(r.state.model), r.state.variables, s.test.images, s.test.labels, batch_size=24)
    leaves = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(r.state.variables)]
    print(json.dumps({"devices": jax.device_count(), "leaves": leaves, "eval": ev,
                      "train_loss": r.history[-1]["train_loss"]}))
    """
)


def run(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_train_and_evaluate_like_one():
    import numpy as np

    one, four = run(1), run(4)
    assert one["devices"] == 1 and four["devices"] == 4
    assert four["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    for a, b in zip(one["leaves"], four["leaves"]):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    assert four["eval"]["n"] == one["eval"]["n"] == 64
    assert four["eval"]["accuracy_pct"] == pytest.approx(one["eval"]["accuracy_pct"])
    assert four["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-4)
