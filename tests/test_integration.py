"""Integration on the real CIFAR-10 archive (JAXADV_DATA): short training, real accuracy bar."""

import jax
import pytest

from jaxadv import data, evaluation, train
from jaxadv.configs import get_config
from jaxadv.models import make_apply


@pytest.mark.slow
def test_one_short_training_on_real_images_beats_chance_by_far(real_archive, tmp_path):
    splits = data.load(real_archive, val_size=500, train_subset=6400, test_subset=1000, seed=0, progress=False)
    cfg = get_config("quick").replace(epochs=1, val_size=500)
    result = train.fit(
        cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
        key=jax.random.key(0), ckpt_dir=str(tmp_path / "ckpt"), progress=False,
    )  # fmt: skip
    test = evaluation.evaluate(make_apply(result.state.model), result.state.variables, splits.test.images, splits.test.labels)
    # The quick preset's recipe (Muon, triangular schedule) for 50 steps of batch 128 on 6,400
    # real images reaches ~57 %; chance is 10 %.
    assert test["n"] == 1000
    assert test["accuracy_pct"] > 45, test
