"""Presets, nested sections, and old flat checkpoint configs."""

import pytest

from jaxadv.configs import FAST, SEED, TrainConfig, get_config


def test_get_config_rejects_unknown_names():
    assert get_config("fast") is FAST
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        get_config("nope")


def test_config_roundtrips_through_json_dict():
    assert TrainConfig.from_dict(FAST.to_dict()) == FAST


def test_a_jaxadv_0_1_flat_config_reads_as_the_nested_one():
    flat = {"name": "fast", "widths": [32, 64, 128], "head": [128], "norm": "batch", "dtype": "float32",
            "batch_size": 128, "epochs": 18, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 5e-2,
            "schedule": "onecycle", "warmup_frac": 0.2, "label_smoothing": 0.1, "augment": True, "pad_mode": "reflect",
            "patience": 0, "val_size": 5000, "log_every": 50, "defense": "fgsm_at", "defense_eps": 0.1,
            "adv_weight": 0.5, "median_size": 3, "pgd_steps": 7, "fast_alpha": 1.25, "co_guard": 0.0}  # fmt: skip
    assert TrainConfig.from_dict(flat) == FAST.with_defense("fgsm_at", eps=0.1)


def test_sections_and_with_defense():
    cfg = SEED.with_defense("pgd_at", eps=8 / 255, pgd_steps=3)
    assert (cfg.defense.name, cfg.defense.pgd_steps, cfg.defense.median_size) == ("pgd_at", 3, 3)
    assert cfg.model == SEED.model and cfg.optim == SEED.optim
    assert cfg.with_defense("none").defense.eps == cfg.defense.eps  # other settings are kept



def test_quick8_is_the_measured_86_percent_recipe():
    # `--config quick --epochs 8 --set optim.ema=0.99` is what the 3-seed runs of
    # results/quick/q8_muon_ema* trained with; the preset must be exactly that.
    from jaxadv.configs import override

    flags = override(get_config("quick"), {"epochs": 8, "optim.ema": 0.99})
    assert get_config("quick8") == flags.replace(name="quick8")
    assert get_config("quick").epochs == 6 and get_config("quick").optim.ema == 0.0  # the study's stays as it was
