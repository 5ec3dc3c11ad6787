"""Study cells as data: each protocol against a direct computation, the run plan, prefixes, storage."""

import numpy as np
import pytest

from jaxadv import data, detect, squeeze
from jaxadv.attacks import Spec
from jaxadv.configs import ModelConfig, TrainConfig
from jaxadv.evaluation import attack_eval
from jaxadv.study import Cell, Context, ModelStore, cells, evaluate_cells, run_of

BASE = TrainConfig(name="tiny", model=ModelConfig(widths=(4, 8, 8), head=(16,)), batch_size=32, epochs=1, val_size=32,
                   log_every=4, patience=0, augment=False)  # fmt: skip
FGSM = Spec("fgsm", eps=0.05)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    out = tmp_path_factory.mktemp("cells")
    splits = data.synthetic(192, 24, num_classes=3, val_size=24, seed=4, image_size=16)
    cfgs = {"none": BASE, "median_squeezing": BASE.with_defense("median")}
    models = ModelStore(out, cfgs, splits, progress=False, log=lambda s: None)
    return Context(out, splits.test, splits.val, models, batch_size=16, progress=False, log=lambda s: None,
                   data_source=splits.source, detector={"val": 24, "lam": 1.0, "fpr": 0.05})  # fmt: skip


def _direct(ctx, model, n=None, **kw):
    m = ctx.models(model)
    t = ctx.test
    n = n or len(t)
    s, x = attack_eval(kw.pop("apply", m.deployed), m.variables, t.images[:n], t.labels[:n], index=t.index[:n],
                       batch_size=16, **kw)  # fmt: skip
    return s, x


def _one(ctx, cell):
    return evaluate_cells([cell], ctx)[0]


def test_white_box_is_the_attack_on_the_evaluated_classifier(ctx):
    got = _one(ctx, Cell("median", "fgsm", "median_squeezing", FGSM))
    want, _ = _direct(ctx, "median_squeezing", attack=FGSM)
    assert got["accuracy_pct"] == pytest.approx(want["accuracy_pct"]) and got["loss"] == pytest.approx(want["loss"])
    assert got["protocol"] == "white_box" and got["n"] == 24


def test_transfer_feeds_the_sources_examples_to_the_target(ctx):
    got = _one(ctx, Cell("median_squeezing", "fgsm", "median_squeezing", FGSM, "transfer", source="none"))
    _, x_src = _direct(ctx, "none", attack=FGSM, keep_adv=True)
    want, _ = _direct(ctx, "median_squeezing", inputs=x_src)
    assert got["accuracy_pct"] == pytest.approx(want["accuracy_pct"])
    raw = _one(ctx, Cell("unfiltered", "fgsm", "median_squeezing", FGSM, "transfer", source="none", deploy=False))
    m = ctx.models("median_squeezing")
    want_raw, _ = _direct(ctx, "median_squeezing", inputs=x_src, apply=m.apply_fn)
    assert raw["accuracy_pct"] == pytest.approx(want_raw["accuracy_pct"])


def test_adaptive_attacks_through_the_transform_with_bpda(ctx):
    got = _one(ctx, Cell("median_adaptive", "fgsm", "median_squeezing", FGSM, "adaptive"))
    m = ctx.models("median_squeezing")
    want, _ = _direct(ctx, "median_squeezing", attack=FGSM,
                      attack_apply=squeeze.squeezed(m.apply_fn, squeeze.bpda(m.squeezer)))  # fmt: skip
    assert got["accuracy_pct"] == pytest.approx(want["accuracy_pct"])
    with pytest.raises(ValueError, match="no input transform"):
        _one(ctx, Cell("x", "fgsm", "none", FGSM, "adaptive"))


def test_detector_cells_are_detected_or_correct(ctx):
    got = _one(ctx, Cell("detector", "fgsm", "none", FGSM, "detector"))
    m = ctx.models("none")
    sq = detect.cifar10_squeezers()
    s, x_adv = _direct(ctx, "none", attack=FGSM, keep_adv=True)
    val = detect.scores(m.apply_fn, m.variables, ctx.val.images[:24], sq)
    clean = detect.scores(m.apply_fn, m.variables, ctx.test.images, sq)
    adv = detect.scores(m.apply_fn, m.variables, x_adv, sq)
    rep = detect.evaluate(val, clean, adv, s["per_example"]["correct"])
    assert got["accuracy_pct"] == pytest.approx(100 * rep.detected_or_correct)
    assert got["n_successful"] == rep.n_successful and got["loss"] is None
    clean_cell = _one(ctx, Cell("detector", "none", "none", Spec("none"), "detector"))
    assert clean_cell["fpr_test"] == pytest.approx(np.mean(clean > detect.threshold_at_fpr(val)))


def test_a_cell_on_a_prefix_reads_the_larger_run():
    cell_all = Cell("none", "deepfool", "none", Spec("deepfool", max_iter=3))
    cell_16 = Cell("none", "deepfool", "none", Spec("deepfool", max_iter=3), n=16, table="curve")
    order, size, keep = cells._plan([cell_16, cell_all], 24)
    assert order == [run_of(cell_all)] and size[run_of(cell_all)] == 24 and not keep
    t = Cell("m", "fgsm", "m", FGSM, "transfer", source="none", n=8)
    order, size, keep = cells._plan([t, Cell("none", "fgsm", "none", FGSM, n=20)], 24)
    src = run_of(t).source
    assert order[0] == src and size[src] == 20 and keep == {src}


def test_prefix_cells_equal_direct_evaluations_and_runs_are_stored(ctx, monkeypatch):
    spec = Spec("deepfool", max_iter=3)
    got16, got = evaluate_cells([Cell("none", "df", "none", spec, n=16), Cell("none", "df", "none", spec)], ctx)
    want16, _ = _direct(ctx, "none", n=16, attack=spec)
    assert got16["accuracy_pct"] == pytest.approx(want16["accuracy_pct"]) and got16["n"] == 16
    assert got16["norm_median"] == pytest.approx(want16["norm_median"], rel=1e-5)
    assert got["n"] == 24
    calls = []
    monkeypatch.setattr(cells, "attack_eval", lambda *a, **k: calls.append(1))
    ctx.results.clear()
    again = evaluate_cells([Cell("none", "df", "none", spec)], ctx)[0]
    assert not calls and again == got  # read back from OUT/runs/, not recomputed


def test_cells_reject_malformed_protocols():
    with pytest.raises(ValueError, match="unknown protocol"):
        Cell("a", "b", "c", FGSM, "grey_box")
    with pytest.raises(ValueError, match="transfer protocol only"):
        Cell("a", "b", "c", FGSM, "white_box", source="none")
    with pytest.raises(ValueError, match="unknown attack"):
        Spec("nope")
