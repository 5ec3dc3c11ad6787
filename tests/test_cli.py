"""The `jaxadv` command line: smoke runs on a tiny image tree and one-line errors."""

import json
import subprocess
import sys

import pytest

from jaxadv import cli, data


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
    """A 4-class image tree with 32x32 PNGs, laid out like the real archive."""
    root = tmp_path_factory.mktemp("tree")
    s = data.synthetic(256, 64, num_classes=4, val_size=0, seed=2)
    data.write_image_tree(root / "train", s.train.images, s.train.labels, s.class_names)
    data.write_image_tree(root / "test", s.test.images, s.test.labels, s.class_names)
    return root


def run_cli(*args, env_data=None):
    """Run `python -m jaxadv.cli` in a subprocess, as a user would."""
    import os

    env = {**os.environ, "JAXADV_CACHE": os.environ.get("PYTEST_JAXADV_CACHE", "/tmp/jaxadv-test-cache")}
    env.pop("JAXADV_DATA", None)
    if env_data:
        env["JAXADV_DATA"] = env_data
    return subprocess.run([sys.executable, "-m", "jaxadv.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip


def test_train_then_evaluate_a_tiny_run(tiny_tree, tmp_path):
    out = tmp_path / "run"
    common = ["--data", tiny_tree, "--cache-dir", tmp_path / "cache", "--no-progress"]
    r = cli.main(["train", "--config", "seed", "--epochs", "2", "--val-size", "32", "--out", str(out),
                  *map(str, common)])  # fmt: skip
    assert r == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"accuracy_pct", "loss", "n", "epochs", "seconds"} <= set(summary)
    assert summary["n"] == 64 and summary["epochs"] == 2
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (out / "curves.png").stat().st_size > 1000

    # Evaluating needs only the directory: the config is stored with the checkpoint.
    r = cli.main(["evaluate", "--checkpoint", str(out), "--out", str(tmp_path / "eval.json"), *map(str, common)])
    assert r == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["n"] == 64 and ev["accuracy_pct"] == pytest.approx(summary["accuracy_pct"])

    # Training again into the same directory without --resume is refused, with --resume it is a no-op.
    r = cli.main(["train", "--epochs", "2", "--val-size", "32", "--out", str(out), *map(str, common)])
    assert r == 2
    r = cli.main(["train", "--epochs", "2", "--val-size", "32", "--out", str(out), "--resume", *map(str, common)])
    assert r == 0
    assert json.loads((out / "history.json").read_text()) == history

    # Any registered attack on the checkpoint: clean and robust accuracy, resumable, per example.
    res = tmp_path / "attack.json"
    r = cli.main(["attack", "--checkpoint", str(out), "--attack", "pgd", "--eps", "8/255", "--hp", "steps=3",
                  "--n", "40", "--out", str(res), *map(str, common)])  # fmt: skip
    assert r == 0
    a = json.loads(res.read_text())
    assert a["n"] == 40 and a["attack"] == {"name": "pgd", "eps": pytest.approx(8 / 255), "steps": 3}
    assert a["robust_accuracy_pct"] <= a["clean_accuracy_pct"]
    assert len(a["per_example"]["index"]) == 40 and not (tmp_path / "attack.json.parts").exists()
    r = cli.main(["attack", "--checkpoint", str(out), "--attack", "deepfool", "--hp", "max_iter=5", "--n", "40",
                  "--out", str(res), *map(str, common)])  # fmt: skip
    a = json.loads(res.read_text())
    assert r == 0 and len(a["per_example"]["norm"]) == 40 and "success_rate_pct" in a["attack_stats"]

    # AutoAttack, RobustBench style: the contribution table, the flags, a record per point; a rerun reads the state.
    res = tmp_path / "aa.json"
    argv = ["autoattack", "--checkpoint", str(out), "--norm", "linf", "--eps", "8/255", "--n", "24", "--early-exit",
            "--n-iter", "10", "--n-queries", "50",
            "--out", str(res), *map(str, common)]  # fmt: skip
    assert cli.main(argv) == 0
    aa = json.loads(res.read_text())
    assert aa["n"] == 24 and [t["name"] for t in aa["attacks"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["robust_accuracy_pct"] <= aa["clean_accuracy_pct"] and aa["flags"]["within_eps"]
    assert len(aa["points"]["broken_by"]) == 24 and (tmp_path / "aa.md").read_text().startswith("# AutoAttack")
    assert (tmp_path / "aa.state.npz").exists()
    assert cli.main(argv) == 0
    assert json.loads(res.read_text())["points"] == aa["points"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--out", "X", "--config", "nope"], "invalid choice: 'nope'"),
        (["train", "--out", "X", "--data", "/does/not/exist"], "/does/not/exist"),
        (["train", "--out", "X", "--epochs", "0"], "positive integer"),
        (["train", "--out", "X", "--eps", "3"], "--eps must be in"),
        (["evaluate", "--checkpoint", "/no/such/ckpt"], "checkpoint not found"),
        (["study", "--out", "X", "--deepfool-overshoot", "nan"], "--deepfool-overshoot must be"),
        (["study", "--out", "X", "--clean-run", "/no/such/run"], "checkpoint not found"),
        (["study", "--out", "X", "--pretrained", "/no/such/models"], "no pretrained models at /no/such/models"),
        (["study", "--out", "X", "--pretrained", "--epochs", "2"], "--pretrained evaluates the shipped models"),
        (["train", "--out", "/proc/nope", "--epochs", "1"], "cannot write to --out"),
        (["train", "--out", "X", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--out", "X", "--defense", "magic"], "invalid choice: 'magic'"),
        (["attack", "--checkpoint", "C", "--attack", "fgsm", "--out", "X.json"], "--eps is required for fgsm"),
        (["attack", "--checkpoint", "C", "--attack", "deepfool", "--eps", "0.1", "--out", "X.json"],
         "minimum-norm attack and takes no budget"),
        (["attack", "--checkpoint", "C", "--attack", "pgd", "--eps", "8/0", "--out", "X.json"], "fraction like 8/255"),
        (["attack", "--checkpoint", "C", "--attack", "pgd", "--eps", "2", "--out", "X.json"], "--eps must be in"),
        (["attack", "--checkpoint", "C", "--attack", "pgd", "--eps", "0.1", "--hp", "stepz=3", "--out", "X.json"],
         "pgd has no hyperparameter stepz"),
        (["attack", "--checkpoint", "C", "--attack", "nope", "--out", "X.json"], "invalid choice: 'nope'"),
        (["attack", "--checkpoint", "/no/such", "--attack", "fgsm", "--eps", "0.1", "--out", "X.json"],
         "checkpoint not found"),
        (["autoattack", "--checkpoint", "C", "--norm", "linf", "--out", "X.json"], "--eps"),
        (["autoattack", "--checkpoint", "C", "--norm", "l1", "--eps", "0.1", "--out", "X.json"], "invalid choice: 'l1'"),
        (["autoattack", "--checkpoint", "C", "--norm", "linf", "--eps", "2", "--out", "X.json"], "--eps must be in (0, 1]"),
        (["autoattack", "--checkpoint", "C", "--norm", "linf", "--eps", "0", "--out", "X.json"], "--eps must be in (0, 1]"),
        (["autoattack", "--checkpoint", "/no/such", "--norm", "l2", "--eps", "0.5", "--out", "X.json"],
         "checkpoint not found"),
    ],
)
def test_bad_flags_and_inputs_give_one_line_errors(args, message, tmp_path):
    args = [str(tmp_path) if a == "C" else a.replace("X", str(tmp_path / "o")) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_evaluate_an_empty_checkpoint_dir_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    r = run_cli("evaluate", "--checkpoint", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no complete checkpoint" in r.stderr


def test_help_explains_every_flag():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for flag in ["--data", "--config", "--epochs", "--seed", "--out", "--train-subset", "--test-subset", "--resume"]:
        assert flag in r.stdout



def test_adversarial_training_from_the_cli_on_a_four_class_tree(tiny_tree, tmp_path):
    out = tmp_path / "at"
    r = cli.main(["train", "--data", str(tiny_tree), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
                  "--val-size", "32", "--defense", "fgsm_at", "--eps", "0.03", "--out", str(out), "--no-progress"])
    assert r == 0
    assert json.loads((out / "summary.json").read_text())["config"]["defense"]["name"] == "fgsm_at"
