"""The benchmark harness (benchmarks/run.py): report schema, result checks, CLI errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import run
from jaxadv import bench, cli


def test_harness_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "b.json"
    rc = run.main(["--only", "forward,input_grad,median3x3_u8,deepfool", "--batches", "2,4", "--deepfool-batches", "4",
                   "--no-peers", "--out", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    recs = report["results"]
    assert {(r["op"], r["batch"]) for r in recs} == {
        ("forward", 2), ("forward", 4), ("input_grad", 2), ("input_grad", 4), ("median3x3_u8", 2),
        ("median3x3_u8", 4), ("deepfool", 4)}  # fmt: skip
    for r in recs:
        assert r["impl"] == "jaxadv" and r["img_per_s"] > 0 and len(r["times_s"]) == 5
        assert r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"]
    df = next(r for r in recs if r["op"] == "deepfool")
    # Success and iterations come from the attack's outputs; the ideal time from our own timings.
    assert 0 <= df["success_pct"] <= 100 and df["iterations_sum"] >= df["iterations_max"] >= 1
    assert df["ideal_s"] > 0 and df["time_over_ideal"] == pytest.approx(df["median_s"] / df["ideal_s"])
    assert report["environment"]["backend"] == "cpu"
    assert (tmp_path / "b.md").read_text().startswith("# jaxadv benchmark")
    assert (tmp_path / "b.png").stat().st_size > 0


def test_deepfool_stats_from_images_alone():
    class S:  # a linear "model": class 1 iff the first pixel exceeds 0.5
        variables = None

        @staticmethod
        def apply_f32(v, x):
            s = x.reshape(x.shape[0], -1)[:, :1] - 0.5
            return jnp.concatenate([-s, s], axis=1)

    x = np.full((3, 2, 2, 1), 0.4, np.float32)
    x_adv = x.copy()
    x_adv[0, 0, 0, 0] = 0.7  # fooled, L2 0.3
    x_adv[1, 0, 0, 0] = 0.45  # not fooled
    st = run._deepfool_stats(S, x, x_adv, iterations=np.array([2, 50, 0]))
    assert st["success_pct"] == pytest.approx(100 / 3)
    assert st["median_l2"] == pytest.approx(0.3, abs=1e-6)
    assert (st["iterations_sum"], st["iterations_max"]) == (52, 50)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "forwrd"], "unknown op(s) forwrd"),
        (["--repeats", "3"], "at least 5 timed calls"),
        (["--batches", "0"], "positive integers"),
        (["--out", "x.csv"], "expected a .json path"),
    ],
)
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


@pytest.mark.parametrize("extra, want", [([], None), (["--only", "autoattack,forward"], ["autoattack", "forward"])])
def test_quick_times_the_study_attacks_and_leaves_the_others_to_only(monkeypatch, tmp_path, extra, want):
    ran = []

    class FakeSetting:  # no weights or images: only which ops main() hands on is checked
        weights, inputs = "w", "i"

        def __init__(self, *a, **k):
            pass

    monkeypatch.setattr(run, "Setting", FakeSetting)
    monkeypatch.setattr(run, "run_jax", lambda s, ops, *a, **k: ran.extend(ops) or [])
    monkeypatch.setattr(run, "_evaluate_record", lambda *a, **k: {"img_per_s": 1.0, "accuracy_pct": 0.0})
    monkeypatch.setattr(run, "run_user_model", lambda *a, **k: ran.append("user_model") or [])
    assert run.main(["--quick", "--no-peers", "--no-report", "--out", str(tmp_path / "q.json"), *extra]) == 0
    if want is not None:
        assert ran == want
        return
    assert {"forward", "train_step", "fgsm", "pgd", "deepfool", "median3x3_u8", "user_model"} <= set(ran)
    assert not {"autoattack", "apgd", "square", "fab", "cw"} & set(ran)
    assert set(ran) < set(run.jax_ops())


def test_jaxadv_bench_forwards_to_the_harness(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--only", "nope"])
    assert "unknown op(s) nope" in capsys.readouterr().err


def test_time_call_warms_up_by_time_and_groups_fast_calls(monkeypatch):
    # A fake clock: every call of fn takes exactly 1 ms.
    clock = {"t": 0.0, "calls": 0}

    def fn():
        clock["t"] += 1e-3
        clock["calls"] += 1

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    t = bench.time_call(fn, warmup=2, repeats=5, min_warmup_s=0.25, min_sample_s=0.01)
    assert t["calls_per_sample"] in (10, 11)  # 10 ms samples of 1 ms calls
    assert len(t["times_s"]) == 5
    np.testing.assert_allclose(t["times_s"], 1e-3, rtol=1e-6)  # reported per call
    # first call + a warm-up of >= 0.25 s (250 calls, not just 2) + 5 samples
    warm = clock["calls"] - 1 - 5 * t["calls_per_sample"]
    assert 250 <= warm <= 252


def test_time_call_slow_calls_are_timed_one_by_one(monkeypatch):
    clock = {"t": 0.0, "calls": 0}

    def fn():
        clock["t"] += 0.5
        clock["calls"] += 1

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    t = bench.time_call(fn, warmup=1, repeats=5)
    assert t["calls_per_sample"] == 1 and clock["calls"] == 1 + 1 + 5
    assert t["median_s"] == 0.5


def test_time_interleaved_alternates_samples_and_shares_slow_spells(monkeypatch):
    # A fake clock where every call costs its function's base time, doubled during a
    # "slow spell" (the middle third of all timed samples): both functions must see it alike.
    clock = {"t": 0.0, "log": [], "timed": False}

    def make(name, base):
        def fn():
            slow = clock["timed"] and 4 <= len(clock["log"]) < 7
            clock["t"] += base * (2 if slow else 1)
        return fn

    a, b = make("a", 0.5), make("b", 0.25)

    def sample(fn, inner):
        clock["timed"] = True
        t0 = clock["t"]
        fn()
        clock["log"].append(fn)
        return clock["t"] - t0

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(bench, "_sample", sample)
    t = bench.time_interleaved({"a": a, "b": b}, warmup=1, repeats=5)
    # rounds alternate the order: a b | b a | a b | b a | a b
    assert clock["log"] == [a, b, b, a, a, b, b, a, a, b]
    assert t["a"]["times_s"] == [0.5, 0.5, 1.0, 0.5, 0.5] and t["b"]["times_s"] == [0.25, 0.25, 0.5, 0.5, 0.25]
    assert t["a"]["median_s"] / t["b"]["median_s"] == 2.0


def test_time_interleaved_rewarms_fast_functions_after_a_slow_one(monkeypatch):
    # Fake clock: the fast function's first call after the slow one ran is 10x slower (a
    # cold thread pool); its timed samples must not include that call.
    clock = {"t": 0.0, "last": None}

    def fast():
        clock["t"] += 0.01 if clock["last"] == "slow" else 0.001
        clock["last"] = "fast"

    def slow():
        clock["t"] += 0.5
        clock["last"] = "slow"

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(bench.jax, "block_until_ready", lambda x: x)
    t = bench.time_interleaved({"fast": fast, "slow": slow}, warmup=1, repeats=4)
    assert t["fast"]["calls_per_sample"] == 10 and t["slow"]["calls_per_sample"] == 1
    assert t["fast"]["times_s"] == pytest.approx([0.001] * 4)
    assert t["slow"]["times_s"] == pytest.approx([0.5] * 4)


@pytest.mark.parametrize("norm", [None, "batch"])
def test_the_plain_user_model_is_the_library_cnn_written_with_stock_layers(norm):
    """Same param names, so the same weights load, and the same logits: the harness compares
    speed on one function (nn.max_pool against reshape + max)."""
    import jax

    from benchmarks.user_model import plain_cnn
    from jaxadv.models import CNN, init_params, make_apply

    model = CNN(widths=(4, 8, 8), head=(16,), norm=norm, bn_scale=norm is None)
    v = init_params(model, jax.random.key(0))
    if norm:  # non-trivial running statistics
        v["batch_stats"] = jax.tree.map(lambda a: a + 0.3, v["batch_stats"])
    plain = plain_cnn((4, 8, 8), (16,), 10, norm, norm is None)
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
    assert jax.tree.structure(plain.init(jax.random.key(0), x)) == jax.tree.structure(v)
    np.testing.assert_allclose(plain.apply(v, x), make_apply(model)(v, x), rtol=1e-5, atol=1e-5)


def test_user_model_records_get_their_own_table():
    env = {"cpu": "x", "cpu_count": 2, "versions": {"jax": "0"}, "backend": "cpu", "device_count": 1}
    recs = [{"op": "fgsm", "impl": impl, "order": order, "batch": 128, "img_per_s": ips, "user_model": True,
             "xla_flag_applied": order == "jaxadv-first"}
            for impl, order, ips in (("plain Flax (nn.max_pool)", "jax-first", 400.0), ("jaxadv CNN", "jax-first", 500.0),
                                     ("plain Flax (nn.max_pool)", "jaxadv-first", 600.0),
                                     ("jaxadv CNN", "jaxadv-first", 800.0))]  # fmt: skip
    md = run.markdown({"mode": "quick", "environment": env, "git_commit": "c", "weights": "w", "inputs": "i",
                       "repeats": 5, "warmup": 1, "results": recs})  # fmt: skip
    assert "## A user's own model" in md
    assert "| fgsm | 128 | jax-first | plain Flax (nn.max_pool) | off | 400.0 | 0.50 |" in md
    assert "| fgsm | 128 | jaxadv-first | jaxadv CNN | on | 800.0 | 1.00 |" in md
    assert "jaxadv beside the peers" not in md
