"""The extended suite end to end on tiny synthetic data: schema, detector section, curves, resume."""

import json

import pytest

from jaxadv import data, extended, study
from jaxadv.configs import TrainConfig


@pytest.fixture(scope="module")
def ext_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("extended")
    splits = data.synthetic(256, 40, num_classes=4, val_size=32, seed=3, image_size=16)
    base = TrainConfig(name="tiny", widths=(4, 8, 8), head=(16,), batch_size=32, epochs=1, val_size=32,
                       log_every=4, patience=0, augment=False, pgd_steps=2)  # fmt: skip
    kw = dict(base=base, eps=0.1, deepfool_kwargs={"max_iter": 5}, attack_batch=20, progress=False, pgd_steps=3,
              curve_eps=(0.0, 0.05, 0.1), curve_n=20, detector_val=32)  # fmt: skip
    lines = []
    results = extended.run(splits, out, log=lines.append, **kw)
    return out, splits, kw, results


def test_extended_cells_cover_the_table(ext_run):
    out, _, _, results = ext_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["cells"] == results["cells"] and on_disk["suite"] == "extended"
    have = {(c["defense"], c["attack"]) for c in results["cells"]}
    cols = ["none", "fgsm", "deepfool", "pgd_8/255", "pgd_0.1"]
    for row in extended.TRAINED + ("median_squeezing_adaptive", "detector"):
        assert {(row, a) for a in cols} <= have, row
    assert {("median_squeezing", a) for a in cols} <= have  # the study's 3 + PGD by transfer
    assert {("detector_adaptive", "pgd_8/255"), ("detector_adaptive", "pgd_0.1")} <= have
    for c in results["cells"]:
        assert 0 <= c["accuracy_pct"] <= 100 and c["n"] == 40
    # The seed study's 9 cells are still there, unchanged.
    seed_pairs = {(d, a) for d in study.DEFENSES for a in study.ATTACKS}
    assert seed_pairs <= have


def test_pgd_is_at_least_as_strong_as_fgsm_at_the_same_eps_on_the_clean_model(ext_run):
    _, _, _, results = ext_run
    acc = {(c["defense"], c["attack"]): c["accuracy_pct"] for c in results["cells"]}
    assert acc[("none", "pgd_0.1")] <= acc[("none", "fgsm")]


def test_detector_section_and_curves(ext_run):
    out, _, kw, results = ext_run
    det = results["detector"]["per_attack"]
    assert {"clean", "fgsm", "deepfool", "pgd_8/255", "pgd_0.1", "adaptive_pgd_8/255", "adaptive_pgd_0.1"} == set(det)
    for name, r in det.items():
        if name != "clean":
            assert {"detection_rate", "roc_auc", "detected_or_correct", "n_successful", "threshold"} <= set(r)
    curves = results["curves"]
    assert curves["eps"] == list(kw["curve_eps"]) and curves["n"] == 20
    for name in extended.TRAINED + ("median_squeezing_adaptive",):
        for kind in ("fgsm", "pgd"):
            pts = curves["curves"][name][kind]
            assert len(pts) == 3 and pts[0] >= pts[-1] - 10  # accuracy falls (or stays) as eps grows
    assert (out / "robustness_curves.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "## Extended suite" in md and "| defense \\ attack | none | fgsm | deepfool |" in md


def test_extended_rerun_skips_every_phase(ext_run):
    out, splits, kw, results = ext_run
    lines = []
    again = extended.run(splits, out, log=lines.append, **kw)
    assert not any(line.endswith("...") for line in lines), [line for line in lines if line.endswith("...")]
    assert again["cells"] == results["cells"]


def test_ext_n_limits_the_new_phases_not_the_seed_cells_or_the_trainings(ext_run):
    out, splits, kw, _ = ext_run
    lines = []
    results = extended.run(splits, out, log=lines.append, **{**kw, "ext_n": 16})
    assert not any(line.startswith("[train_") and line.endswith("...") for line in lines)  # models reused
    seed_pairs = {(d, a) for d in study.DEFENSES for a in study.ATTACKS}
    for c in results["cells"]:
        assert c["n"] == (40 if (c["defense"], c["attack"]) in seed_pairs else 16), c
    assert results["detector"]["per_attack"]["clean"]["n"] == 16
    assert "every other cell on a class-balanced subset of 16" in (out / "results.md").read_text()


def test_ext_subset_is_balanced_and_the_study_examples_are_aligned_with_it(ext_run):
    import jax
    import numpy as np

    from jaxadv import train
    from jaxadv.attacks import fgsm_jit

    out, splits, kw, _ = ext_run
    results = extended.run(splits, out, log=lambda s: None, **{**kw, "ext_n": 20})
    idx = data.balanced_indices(splits.test.labels, 20, np.random.default_rng(0), sort=False)
    assert np.bincount(splits.test.labels[idx], minlength=4).tolist() == [5, 5, 5, 5]
    assert np.bincount(splits.test.labels[idx[:8]], minlength=4).tolist() == [2, 2, 2, 2]  # prefixes too
    # The detector's FGSM report reads the study's FGSM examples of these very images.
    apply_fn, params, _, _ = train.load_trained(out / "models" / "none" / "checkpoints")
    x = splits.test.images[idx] / np.float32(255)
    fooled = np.asarray(jax.numpy.argmax(apply_fn(params, fgsm_jit(apply_fn, params, x, splits.test.labels[idx],
                                                                     eps=kw["eps"])), -1)) != splits.test.labels[idx]
    assert results["detector"]["per_attack"]["fgsm"]["n_successful"] == int(fooled.sum())
