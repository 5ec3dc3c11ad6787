"""jaxadv's AutoAttack against the reference (pyautoattack = fra31/auto-attack) on the same weights and points.

Needs the peers extra (`pip install -e '.[bench-peers]'`): torch and pyautoattack. Without
them the test is skipped and says so. The reference's random numbers come from torch, ours
from JAX, so agreement is statistical: per attack, robust accuracy within 1 point on 200
points of a small CNN trained on 10 synthetic classes. Both run the standard order with
the same smaller budget (10 APGD/FAB iterations, 100 Square queries; the reference's APGD
schedule recomputed for it), so that the test takes under a minute instead of ten.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the AutoAttack reference needs torch: pip install -e '.[bench-peers]'")
pytest.importorskip("pyautoattack", reason="the AutoAttack reference is not installed: pip install -e '.[bench-peers]'")

import jax  # noqa: E402

from jaxadv import data, train  # noqa: E402
from jaxadv.configs import ModelConfig, OptimConfig, TrainConfig  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    splits = data.synthetic(2000, 200, num_classes=10, val_size=0, seed=11, noise=0.3)
    cfg = TrainConfig(name="tiny10", model=ModelConfig(widths=(8, 16, 16), head=(32,)), batch_size=64, epochs=2,
                      optim=OptimConfig(lr=3e-3, weight_decay=0.0), val_size=0, patience=0, augment=False)
    result = train.fit(cfg, splits.train.images, splits.train.labels, None, None, key=jax.random.key(0),
                       num_classes=10, progress=False)  # fmt: skip
    x = splits.test.images.astype(np.float32) / np.float32(255)
    return train.create_model(cfg, 10), result.state.variables, x, splits.test.labels


@pytest.mark.slow
def test_per_attack_robust_accuracy_agrees_with_the_reference(trained):
    from benchmarks import autoattack_reference as ref
    from benchmarks.peers import to_torch
    from jaxadv.models import make_apply

    model, variables, x, y = trained
    eps, budget = 8 / 255, dict(n_iter=10, n_queries=100)
    robust_ref, per_ref, _, _ = ref.reference(to_torch(model, variables), x, y, eps=eps, norm="linf", batch_size=200,
                                              **budget)  # fmt: skip
    robust, per, _, flags = ref.ours(make_apply(model), variables, x, y, eps=eps, norm="linf", early_exit=False,
                                     square_window="batch", **budget)  # fmt: skip
    clean = float(np.mean(np.asarray(make_apply(model)(variables, x)).argmax(-1) == y))
    assert 0.3 < clean and 0.02 < robust_ref.mean() < clean - 0.2, "premise: an evaluation with something to find"
    for name in ref.ORDER:
        if name in per_ref:
            assert abs(per[name][0] - per_ref[name][0]) <= 1.0, (name, per[name][0], per_ref[name][0])
    assert np.mean(robust == robust_ref) >= 0.97
    assert not flags["randomized"] and not flags["probabilities"] and flags["within_eps"]
