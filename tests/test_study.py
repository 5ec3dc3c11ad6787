"""The seed study end to end on tiny synthetic data: schema, files, resumability."""

import json

import pytest

from jaxadv import data, study
from jaxadv.configs import TrainConfig


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    splits = data.synthetic(256, 40, num_classes=4, val_size=32, seed=3, image_size=16)
    base = TrainConfig(name="tiny", widths=(4, 8, 8), head=(16,), batch_size=32, epochs=1, val_size=32,
                       log_every=4, patience=0, augment=False)  # fmt: skip
    kw = dict(base=base, eps=0.1, deepfool_kwargs={"max_iter": 5}, attack_batch=16, progress=False)
    lines = []
    results = study.run(splits, out, log=lines.append, **kw)
    return out, splits, kw, results, lines


def test_results_have_all_nine_cells_with_the_schema(study_run):
    out, _, _, results, _ = study_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["cells"] == results["cells"]
    pairs = {(c["defense"], c["attack"]) for c in results["cells"]}
    assert pairs == {(d, a) for d in study.DEFENSES for a in study.ATTACKS}
    for c in results["cells"]:
        assert 0 <= c["accuracy_pct"] <= 100 and c["n"] == 40 and c["loss"] >= 0
    assert {(c["defense"], c["attack"]) for c in results["extra_cells"]} == {
        ("median_squeezing_unfiltered", a) for a in study.ATTACKS
    }
    st = results["attack_stats"]
    assert st["fgsm"]["eps"] == 0.1
    for d in ("none", "adversarial_training"):
        assert {"success_rate_pct", "norm_mean", "norm_median", "iterations_mean"} <= set(st["deepfool"]["per_model"][d])
    assert set(results["phase_seconds"]) >= {"train_none", "train_adversarial_training", "train_median_squeezing",
                                             "eval_none", "eval_adversarial_training", "eval_median_squeezing"}
    for name in ("results.md", "training_curves.png", "gallery.png", "deepfool_norms.png"):
        assert (out / name).stat().st_size > 100, name
    md = (out / "results.md").read_text()
    assert "88.5" in md and "| median_squeezing |" in md


def test_white_box_fgsm_hurts_the_clean_model(study_run):
    _, _, _, results, _ = study_run
    acc = {(c["defense"], c["attack"]): c["accuracy_pct"] for c in results["cells"]}
    assert acc[("none", "fgsm")] < acc[("none", "none")]


def test_rerun_skips_finished_phases(study_run):
    out, splits, kw, results, _ = study_run
    lines = []
    again = study.run(splits, out, log=lines.append, **kw)
    assert sum("skipped" in line for line in lines) == 6
    assert again["cells"] == results["cells"]


def test_median_row_is_the_transfer_protocol(study_run):
    """median_squeezing x fgsm = the squeezed model on median-filtered clean-model FGSM examples."""
    import numpy as np

    from jaxadv import squeeze, train
    from jaxadv.evaluation import attack_eval

    out, splits, _, results, _ = study_run
    apply_fn, variables, _, _ = train.load_trained(str(out / "models" / "median_squeezing" / "checkpoints"))
    x_adv = np.load(out / "adv" / "fgsm.npy")
    ref, _ = attack_eval(squeeze.squeezed(apply_fn, squeeze.median_squeezer(3)), variables, splits.test.images,
                         splits.test.labels, inputs=x_adv)  # fmt: skip
    cell = next(c for c in results["cells"] if c["defense"] == "median_squeezing" and c["attack"] == "fgsm")
    assert cell["accuracy_pct"] == ref["accuracy_pct"] and cell["loss"] == pytest.approx(ref["loss"])


def test_rerun_with_other_settings_is_refused(study_run):
    out, splits, kw, _, _ = study_run
    with pytest.raises(ValueError, match="other settings"):
        study.run(splits, out, log=lambda s: None, **{**kw, "eps": 0.2})
