"""Pretrained models: export from a run, load like a run, checksum verified on load."""

import json

import jax
import numpy as np
import pytest

from jaxadv import checkpoint, cli, data, evaluation, pretrained, train
from jaxadv.configs import ModelConfig, OptimConfig, TrainConfig

CFG = TrainConfig(name="tiny", model=ModelConfig(widths=(4, 8, 8), head=(16,), norm="batch"), batch_size=32, epochs=1,
                  optim=OptimConfig(lr=3e-3, weight_decay=0.0), val_size=32, log_every=4, patience=0)  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    s = data.synthetic(128, 48, num_classes=4, val_size=32, seed=2)
    train.fit(CFG, s.train.images, s.train.labels, s.val.images, s.val.labels, key=jax.random.key(0), num_classes=4,
              progress=False, ckpt_dir=str(root / "run" / "checkpoints"), extra_meta={"data": "synthetic", "seed": 0})
    apply_fn, v, _, _ = train.load_trained(str(root / "run" / "checkpoints"))
    acc = evaluation.evaluate(apply_fn, v, s.test.images, s.test.labels)["accuracy_pct"]
    card = pretrained.export(root / "run" / "checkpoints", root / "tiny-clean", name="tiny-clean",
                             description="a test model", test_accuracy_pct=acc, extra={"command": "pytest"})
    return root, s, v, card


def test_export_loads_like_the_run_and_is_small(exported):
    root, s, v, card = exported
    apply_fn, v2, cfg, meta = train.load_trained(str(root / "tiny-clean" / "checkpoints"))
    assert cfg == CFG and meta["format"] == pretrained.FORMAT and len(meta["history"]) == 1
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    acc = evaluation.evaluate(apply_fn, v2, s.test.images, s.test.labels)["accuracy_pct"]
    assert acc == card["test_accuracy_pct"]
    saved = json.loads((root / "tiny-clean" / "card.json").read_text())
    assert saved["sha256"] == pretrained.checksum(root / "tiny-clean" / "checkpoints") and saved["epochs"] == 1
    assert "a test model" in (root / "tiny-clean" / "MODEL_CARD.md").read_text()
    size = sum(p.stat().st_size for p in (root / "tiny-clean").rglob("*") if p.is_file())
    full = sum(p.stat().st_size for p in (root / "run").rglob("*") if p.is_file())
    assert size < full  # no optimizer state, one step


def test_a_modified_checkpoint_is_refused_in_one_line(exported, tmp_path, capsys):
    import shutil

    root, *_ = exported
    bad = tmp_path / "bad"
    shutil.copytree(root / "tiny-clean", bad)
    victim = max((p for p in (bad / "checkpoints").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or modified: sha256"):
        train.load_trained(str(bad / "checkpoints"))
    assert cli.main(["evaluate", "--checkpoint", str(bad), "--data", "tfds-missing-dir-xyz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt or modified" in err[0]


def test_export_refuses_an_existing_directory(exported):
    root, *_ = exported
    with pytest.raises(FileExistsError):
        pretrained.export(root / "run" / "checkpoints", root / "tiny-clean", name="x", description="x",
                          test_accuracy_pct=0.0)


# --- the models shipped in pretrained/quick ----------------------------------------------

ROWS = {"none": "none", "adversarial_training": "fgsm_at", "median_squeezing": "median"}
SHIPPED = pretrained.SHIPPED / "quick"
shipped = pytest.mark.skipif(not all((SHIPPED / r / "card.json").is_file() for r in ROWS),
                             reason=f"the pretrained models are not in {SHIPPED}")  # fmt: skip


@shipped
@pytest.mark.parametrize("row", ROWS)
def test_shipped_models_load_and_match_their_cards(row):
    card = pretrained.verify(SHIPPED / row / "checkpoints")  # the checksum, recomputed
    apply_fn, v, cfg, meta = train.load_trained(str(SHIPPED / row / "checkpoints"))
    assert TrainConfig.from_dict(card["config"]) == cfg and cfg.name == "quick" and cfg.defense.name == ROWS[row]
    assert meta["format"] == pretrained.FORMAT and card["study_row"] == row
    size = sum(p.stat().st_size for p in (SHIPPED / row).rglob("*") if p.is_file())
    assert size < 4e6  # params and BatchNorm statistics, no optimizer state
    out = apply_fn(v, np.zeros((2, 32, 32, 3), np.float32))
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


@shipped
def test_a_corrupted_shipped_model_is_refused_in_one_line(tmp_path, capsys):
    import shutil

    bad = tmp_path / "none"
    shutil.copytree(SHIPPED / "none", bad)
    victim = max((p for p in (bad / "checkpoints").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0x01
    victim.write_bytes(bytes(raw))
    assert cli.main(["evaluate", "--checkpoint", str(bad), "--data", "tfds-missing-dir-xyz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt or modified" in err[0]


@shipped
@pytest.mark.parametrize("row", ROWS)
def test_jaxadv_evaluate_reproduces_the_card_on_1000_test_images(row, real_archive, tmp_path):
    card = json.loads((SHIPPED / row / "card.json").read_text())
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--checkpoint", str(SHIPPED / row), "--data", real_archive, "--test-subset", "1000",
                     "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    got = json.loads(out.read_text())
    assert got["n"] == 1000
    # Up to two images may flip on another CPU's float rounding; the card's model is the one loaded.
    assert got["accuracy_pct"] == pytest.approx(card["test_accuracy_1000_pct"], abs=0.2)
