"""Many processes on JAX's distributed runtime, with real processes on localhost (CPU, gloo).

Each multi-process run goes through the launcher (`python -m jaxadv.launch`), and is
compared with one process holding as many devices: the same global mesh, so the same
programs per device, and the results must agree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxadv import distributed, launch

WORKER = str(Path(__file__).with_name("dist_worker.py"))
ROOT = str(Path(__file__).resolve().parents[1])


def _no_cpu_collectives() -> str | None:
    import jax

    if "jax_cpu_collectives_implementation" not in jax.config.values:
        return f"jaxlib {jax.__version__} has no CPU collectives (jax_cpu_collectives_implementation)"
    return None


pytestmark = pytest.mark.skipif(_no_cpu_collectives() is not None, reason=str(_no_cpu_collectives()))


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXADV_") or k == "JAXADV_XLA_DEFAULTS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAXADV_XLA_CACHE"] = "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launched(args: list[str], n: int, *, timeout: int = 300, env_extra: dict | None = None,
             join_timeout: int = 120) -> subprocess.CompletedProcess:  # fmt: skip
    env = {**_env(1), **(env_extra or {})}
    cmd = [sys.executable, "-m", "jaxadv.launch", "-n", str(n), "--devices-per-process", "1",
           "--join-timeout", str(join_timeout), "--", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def single(args: list[str], devices: int, *, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=_env(devices), timeout=timeout, cwd=ROOT)


def results_by_process(out: str) -> dict[int, dict]:
    """The JSON line each process printed, keyed by the launcher's [i] prefix."""
    found = {}
    for line in out.splitlines():
        if line.startswith("[") and "] {" in line:
            pid, _, rest = line.partition("] ")
            found[int(pid.strip("[ "))] = json.loads(rest)
    return found


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same tiny training as 2 processes x 1 device and as 1 process x 2 devices."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    r2 = launched([sys.executable, WORKER, "train", str(two)], 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = single([sys.executable, WORKER, "train", str(one)], 2)
    assert r1.returncode == 0, r1.stderr[-3000:]
    return {"two": two, "one": one, "by_process": results_by_process(r2.stdout), "single": last_json(r1.stdout)}


def test_two_processes_train_like_one_process_with_two_devices(trained):
    procs, one = trained["by_process"], trained["single"]
    assert sorted(procs) == [0, 1]
    assert one["processes"] == 1 and one["devices"] == 2
    for p in procs.values():
        assert (p["processes"], p["devices"]) == (2, 2)
        np.testing.assert_allclose(p["train_loss"], one["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(p["val_loss"], one["val_loss"], rtol=1e-5)
        for a, b in zip(p["leaves"], one["leaves"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert p["eval"] == pytest.approx(one["eval"], rel=1e-5)
    # Both processes computed the same thing, and the loss moved (the comparison is not vacuous).
    assert procs[0]["leaves"] == procs[1]["leaves"]
    assert one["train_loss"][-1] < one["train_loss"][0]
    # Process 0 wrote the result file and the checkpoints (orbax's multi-process save).
    assert json.loads((trained["two"] / "train.json").read_text())["process"] == 0
    assert sorted(p.name for p in (trained["two"] / "checkpoints").iterdir() if p.name.isdigit())[-1] == "2"


def test_two_processes_attack_like_one_process(trained):
    """FGSM and DeepFool (with its host-driven compaction) through `attack_eval`, 2 x 1 vs 1 x 2."""
    r2 = launched([sys.executable, WORKER, "eval", str(trained["two"])], 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = single([sys.executable, WORKER, "eval", str(trained["two"])], 2)  # same model, its own stores
    assert r1.returncode == 0, r1.stderr[-3000:]
    procs, one = results_by_process(r2.stdout), last_json(r1.stdout)
    assert sorted(procs) == [0, 1]
    for p in procs.values():
        for name in ("fgsm", "deepfool"):
            assert p[name]["n"] == one[name]["n"] == 48
            assert p[name]["index"] == one[name]["index"]
            assert p[name]["correct"] == one[name]["correct"]
            assert p[name]["accuracy_pct"] == one[name]["accuracy_pct"]
        assert p["deepfool"]["success"] == one["deepfool"]["success"]
        np.testing.assert_allclose(p["deepfool"]["norm"], one["deepfool"]["norm"], rtol=1e-4, atol=1e-6)
    assert any(one["deepfool"]["success"])  # DeepFool really ran


def test_killed_two_process_training_resumes_to_the_same_params(trained, tmp_path):
    r = launched([sys.executable, WORKER, "train", str(tmp_path)], 2, env_extra={"DIST_WORKER_DIE_AFTER_EPOCH": "0"})
    assert r.returncode == 9, (r.returncode, r.stderr[-2000:])
    assert "process 1 exited with code 9; stopping the other 1" in r.stderr
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["0"]  # only epoch 1 was saved
    r = launched([sys.executable, WORKER, "train", str(tmp_path)], 2)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed, uninterrupted = results_by_process(r.stdout)[0], trained["by_process"][0]
    assert resumed["train_loss"] == uninterrupted["train_loss"]
    for a, b in zip(resumed["leaves"], uninterrupted["leaves"]):
        np.testing.assert_array_equal(a, b)


def test_a_process_that_never_joins_gives_a_one_line_error_in_time(tmp_path):
    env = {**_env(1), "JAXADV_COORDINATOR": f"127.0.0.1:{launch.free_port()}", "JAXADV_NUM_PROCESSES": "2",
           "JAXADV_PROCESS_ID": "0", "JAXADV_JOIN_TIMEOUT": "4"}  # fmt: skip
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, WORKER, "train", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=120, cwd=ROOT)  # fmt: skip
    assert time.monotonic() - t0 < 60
    assert r.returncode == distributed.JOIN_EXIT_CODE, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and "process 0 of 2 waited 4 s" in errors[0] and "process 1 did not join" in errors[0]


def test_cli_runs_as_two_processes_and_writes_once(trained, tmp_path):
    """`jaxadv attack` under the launcher: the same JSON as one process, printed and written by process 0."""
    from jaxadv import data as data_mod

    tree = tmp_path / "data"
    s = data_mod.synthetic(8, 48, num_classes=4, seed=3, val_size=0)
    names = ("a", "b", "c", "d")
    for split, ds in (("train", s.train), ("test", s.test)):
        data_mod.write_image_tree(tree / split, ds.images, ds.labels, names, fmt="png")
    ck = str(trained["two"] / "checkpoints")
    common = ["--checkpoint", ck, "--attack", "fgsm", "--eps", "8/255", "--data", str(tree), "--cache-dir",
              str(tmp_path / "cache"), "--no-progress", "--batch-size", "16"]  # fmt: skip
    r2 = launched(["jaxadv", "attack", *common, "--out", str(tmp_path / "two.json")], 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = single(["jaxadv", "attack", *common, "--out", str(tmp_path / "one.json")], 2)
    assert r1.returncode == 0, r1.stderr[-3000:]
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert two["robust_accuracy_pct"] == one["robust_accuracy_pct"] and two["n"] == one["n"] == 48
    assert two["per_example"] == one["per_example"]
    report = [line[:4] for line in r2.stdout.splitlines() if line.strip() and "[Gloo]" not in line]  # gloo's own
    assert report == ["[0] "]  # one report, from process 0
    assert not list(tmp_path.glob(".two.*"))  # no temporary file left behind


# ---------------------------------------------------------------------------------------
# The launcher alone (no JAX in the children)
# ---------------------------------------------------------------------------------------

CHILD = ("import os, sys, time\n"
         "i = int(os.environ['JAXADV_PROCESS_ID'])\n"
         "print('hello from', i, os.environ['JAXADV_NUM_PROCESSES'], os.environ['JAXADV_COORDINATOR'], flush=True)\n"
         "open(os.path.join(sys.argv[1], f'pid{i}'), 'w').write(str(os.getpid()))\n"
         "if i == 0 and sys.argv[2] == 'fail': time.sleep(0.5); sys.exit(3)\n"
         "time.sleep(float(sys.argv[3]))\n")  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_launcher_prefixes_output_and_succeeds(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jaxadv.launch", "-n", "3", "--", sys.executable, "-c", CHILD,
                        str(tmp_path), "ok", "0"], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert [line[:16] for line in lines] == ["[0] hello from 0", "[1] hello from 1", "[2] hello from 2"]
    assert len({line.split()[-1] for line in lines}) == 1 and all(" 3 127.0.0.1:" in line for line in lines)


def test_launcher_forwards_the_first_failure_and_leaves_no_child(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "jaxadv.launch", "-n", "2", "--", sys.executable, "-c", CHILD,
                        str(tmp_path), "fail", "60"], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert r.returncode == 3
    assert time.monotonic() - t0 < 30
    assert "jaxadv.launch: process 0 exited with code 3; stopping the other 1" in r.stderr
    assert not _alive(int((tmp_path / "pid1").read_text()))


def test_launcher_ctrl_c_stops_every_child(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "jaxadv.launch", "-n", "2", "--", sys.executable, "-c", CHILD,
                          str(tmp_path), "ok", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)  # fmt: skip
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"pid{i}").exists() for i in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int((tmp_path / f"pid{i}").read_text()) for i in (0, 1)]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "SIGINT: stopping all 2 processes" in err
    assert not any(_alive(pid) for pid in pids)


def test_launcher_needs_a_command():
    r = subprocess.run([sys.executable, "-m", "jaxadv.launch", "-n", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "give the command after --" in r.stderr


@pytest.mark.parametrize("kw, message", [
    ({"coordinator": "localhost"}, "HOST:PORT"),
    ({"coordinator": "localhost:1234", "num_processes": 2}, "needs --num-processes and --process-id"),
    ({"coordinator": "localhost:1234", "num_processes": 2, "process_id": 2}, "not in [0, 2)"),
    ({"num_processes": 2}, "need a coordinator"),
])  # fmt: skip
def test_bad_distributed_settings_are_one_line_errors(kw, message):
    with pytest.raises(distributed.DistributedError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):  # fmt: skip
        distributed.settings(env={}, **kw)


def test_single_process_settings_are_a_no_op():
    assert distributed.settings(env={}) == distributed.Settings(None, None, None, 300)
    env = {"JAXADV_COORDINATOR": "h:1", "JAXADV_NUM_PROCESSES": "2", "JAXADV_PROCESS_ID": "1"}
    assert distributed.settings(env=env) == distributed.Settings("h:1", 2, 1, 300)
    with pytest.raises(distributed.DistributedError, match="JAXADV_NUM_PROCESSES"):
        distributed.settings(env={**env, "JAXADV_NUM_PROCESSES": "two"})
