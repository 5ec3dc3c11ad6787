"""The orbax wrapper: one-line errors, partial saves, retention."""

import jax.numpy as jnp
import pytest

from jaxadv import checkpoint


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.restore(tmp_path / "missing", {"a": jnp.zeros(2)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.read_meta(tmp_path / "empty")
    checkpoint.save(tmp_path / "ck", 0, {"a": jnp.zeros(2)}, {"x": 1})
    with pytest.raises(checkpoint.CheckpointError, match="incompatible") as e:
        checkpoint.restore(tmp_path / "ck", {"a": jnp.zeros(3)})
    assert "\n" not in str(e.value)
    # A save interrupted before orbax's final rename is not a checkpoint.
    (tmp_path / "partial" / "0.orbax-checkpoint-tmp-123").mkdir(parents=True)
    assert checkpoint.latest_step(tmp_path / "partial") is None


def test_checkpoint_keeps_the_last_few(tmp_path):
    for step in range(5):
        checkpoint.save(tmp_path, step, {"a": jnp.full(2, step)}, {"step": step}, max_to_keep=3)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3, 4]
    _, state, meta = checkpoint.restore(tmp_path, {"a": jnp.zeros(2)})
    assert meta == {"step": 4} and float(state["a"][0]) == 4
