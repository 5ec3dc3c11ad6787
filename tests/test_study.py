"""The seed study and the extended suite end to end on tiny synthetic data: schema, files, reuse, resume."""

import dataclasses
import json

import pytest

from jaxadv import data, study
from jaxadv.configs import DefenseConfig, ModelConfig, TrainConfig
from jaxadv.study import suites

BASE = TrainConfig(name="tiny", model=ModelConfig(widths=(4, 8, 8), head=(16,)), batch_size=32, epochs=1, val_size=32,
                   log_every=4, patience=0, augment=False, defense=DefenseConfig(pgd_steps=2))  # fmt: skip
SETTINGS = suites.Settings(eps=0.1, deepfool=(("max_iter", 5), ("num_candidates", 10), ("overshoot", 0.02)),
                           pgd_steps=3, curve_eps=(0.0, 0.05, 0.1), curve_n=20,
                           autoattack_settings=(("n_iter", 4), ("n_queries", 10)))  # fmt: skip


def _run(splits, out, **kw):
    lines = []
    kw = {"base": BASE, "settings": SETTINGS, "attack_batch": 16, "progress": False, **kw}
    return study.run(splits, out, log=lines.append, **kw), lines


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    splits = data.synthetic(256, 40, num_classes=4, val_size=32, seed=3, image_size=16)
    seed, _ = _run(splits, out)
    ext, _ = _run(splits, out, suite="extended")
    return out, splits, seed, ext


def _acc(results):
    return {(c["defense"], c["attack"]): c for c in results["cells"]}


def test_seed_results_have_the_nine_cells_and_the_extra_row_with_the_schema(runs):
    out, _, seed, _ = runs
    assert seed["schema_version"] == 2 and seed["suite"] == "seed"
    cells = _acc(seed)
    assert set(cells) == {(d, a) for d in suites.SEED_ROWS + ("median_squeezing_unfiltered",)
                          for a in suites.SEED_COLUMNS}  # fmt: skip
    for c in seed["cells"]:
        assert {"defense", "attack", "accuracy_pct", "loss", "n", "protocol"} <= set(c)
        assert 0 <= c["accuracy_pct"] <= 100 and c["n"] == 40 and c["loss"] >= 0
    assert cells[("median_squeezing", "fgsm")]["protocol"] == "transfer"
    assert cells[("median_squeezing_unfiltered", "fgsm")]["deployed"] is False
    assert {"success_rate_correct_pct", "norm_median", "iterations_mean"} <= set(cells[("none", "deepfool")])
    assert cells[("none", "fgsm")]["accuracy_pct"] < cells[("none", "none")]["accuracy_pct"]
    for name in ("results.md", "training_curves.png", "gallery.png", "deepfool_norms.png"):
        assert (out / name).stat().st_size > 100, name
    assert "88.5" in (out / "results.md").read_text()
    assert set(seed["phase_seconds"]) >= {"train_none", "train_adversarial_training", "train_median_squeezing"}


def test_the_extended_suite_extends_the_seed_cells(runs):
    out, _, seed, ext = runs
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["suite"] == "extended" and on_disk["cells"] == json.loads(json.dumps(ext["cells"]))
    cells = _acc(ext)
    for key, c in _acc(seed).items():  # the seed cells, unchanged: their runs were reused
        assert cells[key]["accuracy_pct"] == c["accuracy_pct"], key
    cols = ["none", "fgsm", "deepfool", "pgd_8/255", "pgd_0.1"]
    for row in suites.TRAINED + ("median_squeezing_adaptive", "detector"):
        assert {(row, a) for a in cols} <= set(cells), row
    assert {("median_squeezing", a) for a in cols} <= set(cells)
    assert {("detector_adaptive", "pgd_8/255"), ("detector_adaptive", "pgd_0.1")} <= set(cells)
    det = ext["detector"]
    assert {"fgsm", "deepfool", "pgd_8/255", "pgd_0.1", "adaptive_pgd_8/255"} <= set(det["per_attack"])
    assert set(ext["curves"]["curves"]) == set(suites.TRAINED) | {"median_squeezing_adaptive"}
    assert all(len(v["pgd"]) == 3 for v in ext["curves"]["curves"].values())
    assert (out / "robustness_curves.png").stat().st_size > 1000
    assert "## Extended suite" in (out / "results.md").read_text()
    aa = {(r["defense"], r["norm"]): r for r in ext["autoattack"]}
    assert set(aa) == {(d, n) for d in suites.TRAINED + ("median_squeezing_adaptive",) for n in ("linf", "l2")}
    for r in aa.values():  # AutoAttack includes APGD-CE, which is at least as strong as PGD-20 here
        assert r["autoattack_pct"] <= cells[(r["defense"], "none")]["accuracy_pct"] and r["gap"] is not None
    assert "## AutoAttack beside PGD-20" in (out / "results.md").read_text()


def test_a_rerun_recomputes_nothing(runs, monkeypatch):
    out, splits, _, ext = runs
    from jaxadv.study import cells as cells_mod

    calls = []
    monkeypatch.setattr(cells_mod, "attack_eval", lambda *a, **k: calls.append(1))
    again, lines = _run(splits, out, suite="extended")
    assert not calls and not any(line.startswith("[train") for line in lines)
    assert [c["accuracy_pct"] for c in again["cells"]] == [c["accuracy_pct"] for c in ext["cells"]]


def test_ext_n_limits_the_new_cells_and_reuses_the_models(runs):
    out, splits, _, _ = runs
    results, lines = _run(splits, out, suite="extended",
                          settings=dataclasses.replace(SETTINGS, ext_n=16))
    assert not any(line.startswith("[train") for line in lines)
    for c in results["cells"]:
        assert c["n"] == (40 if c["table"] in ("seed", "seed_extra") else 16), c
    assert "every other cell on a class-balanced subset of 16" in (out / "results.md").read_text()


def test_a_0_1_study_directory_is_named_and_its_models_reused(runs, tmp_path):
    import shutil

    out, splits, seed, _ = runs
    old = tmp_path / "old"
    shutil.copytree(out / "models", old / "models")
    (old / "phases").mkdir()
    results, lines = _run(splits, old)
    assert any("jaxadv 0.1" in line for line in lines) and not any(line.startswith("[train") for line in lines)
    assert [c["accuracy_pct"] for c in results["cells"]] == [c["accuracy_pct"] for c in seed["cells"]]


def test_pretrained_models_are_evaluated_not_trained(runs, tmp_path):
    """`study.run(pretrained=DIR)` (`jaxadv study --pretrained`): the exported models give
    the seed table of the run that trained them, and nothing is trained."""
    from jaxadv import pretrained

    out, splits, seed, _ = runs
    shipped = tmp_path / "shipped"
    for name in ("none", "adversarial_training", "median_squeezing"):
        pretrained.export(out / "models" / name / "checkpoints", shipped / name, name=name, description="test",
                          test_accuracy_pct=0.0)  # fmt: skip
    res, lines = _run(splits, tmp_path / "eval", pretrained=shipped)
    assert not any("[train" in line for line in lines) and not (tmp_path / "eval" / "models").exists()
    got, want = _acc(res), _acc(seed)
    for key in want:
        assert got[key]["accuracy_pct"] == want[key]["accuracy_pct"], key
    assert res["training"]["none"]["reused"] == str(shipped / "none")

    import shutil

    shutil.rmtree(shipped / "median_squeezing")
    with pytest.raises(ValueError, match="no pretrained model 'median_squeezing'"):
        _run(splits, tmp_path / "eval2", pretrained=shipped)
    shutil.copytree(shipped / "none", shipped / "median_squeezing")
    with pytest.raises(ValueError, match="trained with defense 'none'.*needs 'median'"):
        _run(splits, tmp_path / "eval3", pretrained=shipped)
