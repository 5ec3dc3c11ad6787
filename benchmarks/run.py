"""The benchmark harness: jaxadv's ops and the peer libraries' in one run, same weights.

    python -m benchmarks.run [--quick] [--only OPS] [--out FILE.json] [--checkpoint RUN]
                             [--data ARCHIVE] [--bf16] [--no-peers] [--devices 1,2,4]

(`jaxadv bench ...` is the same.) For every op and batch size it reports images/s as
the median of `--repeats` (>= 5) timed calls after a warm-up, with the spread (slowest
and fastest call), and the compile time apart. Peers (PyTorch, torchattacks, ART,
Foolbox, kornia, scipy; `benchmarks/peers.py`) run on the same inputs and, for model
ops, on the same weights converted to PyTorch, at `--peer-batch` (128); the report gives
each ratio jaxadv / peer and whether the results agree (FGSM images, DeepFool success
rate and median L2, median filters bit-exact). Writes FILE.json (environment, git commit
and a list "results" of records {"op", "impl", "batch", "img_per_s", ...}), FILE.md (the
tables) and FILE.png (scaling with batch size; jaxadv against the peers).

Weights: `--checkpoint RUN` (a `jaxadv train` output) uses trained weights, which DeepFool
needs for meaningful iteration counts; without it, a freshly initialized `fast`-preset
model. Inputs: `--data` takes a class-balanced set of test images (real labels, so
adversarial accuracies mean something); without it, uniform random images.

`--devices 1,2,4` reruns forward, FGSM and the train step in subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N and the batch sharded over N devices.
On one CPU that shows the sharded code path works and what it costs, not a speed-up:
the N "devices" share the same cores.

Time on an otherwise idle machine: everything shares the cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadv import attacks, bench, defenses, evaluation, io, models, squeeze, train
from jaxadv.configs import DefenseConfig, get_config

MODEL_OPS = ("forward", "input_grad", "train_step", "train_step_fgsm_at")
OTHER_OPS = ("median3x3_f32", "median3x3_u8", "median2x2_f32", "median2x2_u8", "evaluate")
# FGSM and DeepFool on a user's plain Flax model beside jaxadv's, in subprocesses that
# import JAX before jaxadv and after it (`benchmarks/user_model.py`).
USER_OPS = ("user_model",)
EPS = 0.1
DEEPFOOL = {"num_candidates": 10, "overshoot": 0.02, "max_iter": 50}
PGD = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10}
# The harness's settings per attack; an attack registered without an entry here is timed
# with its documented defaults and eps = EPS (budgeted attacks).
ATTACK_SETTINGS = {"fgsm": {"eps": EPS}, "pgd": PGD, "deepfool": DEEPFOOL}


def jax_ops() -> tuple[str, ...]:
    """Every op the harness times: the model ops, one per registered attack, the medians."""
    return MODEL_OPS + tuple(attacks.REGISTRY) + OTHER_OPS + USER_OPS


# --quick without --only: the seed study's ops, a few minutes. The other attacks (AutoAttack's
# components, CW) run to their full budgets on trained weights: ask for them with --only.
QUICK_ATTACKS = ("fgsm", "pgd", "deepfool")


def quick_ops() -> tuple[str, ...]:
    return tuple(o for o in jax_ops() if o not in attacks.REGISTRY or o in QUICK_ATTACKS)


def attack_settings(name: str) -> dict:
    fn = attacks.REGISTRY[name]
    if name in ATTACK_SETTINGS:
        return dict(ATTACK_SETTINGS[name])
    return {} if fn.meta.minimum_norm else {"eps": EPS}


# --- timing -----------------------------------------------------------------------------
def _time(fn: Callable[[], Any], *, warmup: int, repeats: int) -> dict:
    """Median and spread of `repeats` calls of `fn` after `warmup`; the first call apart."""
    return _timing(bench.time_call(fn, warmup=warmup, repeats=repeats))


def _timing(t: dict) -> dict:
    return {"median_s": t["median_s"], "min_s": t["min_s"], "max_s": t["max_s"], "first_call_s": t["compile_s"],
            "times_s": t["times_s"], "calls_per_sample": t["calls_per_sample"]}  # fmt: skip


def _record(op: str, impl: str, batch: int, timing: dict, **extra) -> dict:
    return {
        "op": op, "impl": impl, "batch": batch,
        "img_per_s": batch / timing["median_s"],
        "img_per_s_min": batch / timing["max_s"],
        "img_per_s_max": batch / timing["min_s"],
        **timing, **extra,
    }  # fmt: skip


def _compile_s(jitted, *args, **kwargs) -> float | None:
    try:
        return bench.compile_seconds(jitted, *args, **kwargs)
    except Exception:  # noqa: BLE001  not every callable has .lower (host-driven loops)
        return None


# --- the setting: model, weights, inputs ----------------------------------------------------
class Setting:
    """The model, its weights and a pool of inputs shared by every op and impl."""

    def __init__(self, checkpoint_dir: str | None, data: str | None, n: int, dtype: str, seed: int = 0):
        if checkpoint_dir:
            ckpt = Path(checkpoint_dir)
            ckpt = ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt
            _, self.variables, cfg, _ = train.load_trained(str(ckpt))
            self.weights = f"trained: {checkpoint_dir} ({cfg.name} preset)"
        else:
            cfg = get_config("fast")
            self.variables = models.init_params(train.create_model(cfg), jax.random.key(seed))
            self.weights = "random init (fast preset)"
        self.cfg = cfg
        self.model = train.create_model(cfg)
        if dtype == "bfloat16":
            self.model = self.model.clone(dtype=jnp.bfloat16)
        self.dtype = dtype
        self.apply = models.make_apply(self.model)
        self.apply_f32 = models.make_apply(train.create_model(cfg))
        if data:
            from jaxadv import data as data_mod

            # Every prefix of the (shuffled) test split is class-balanced, so every batch is too.
            splits = data_mod.load(data, val_size=0, test_subset=n, seed=seed, progress=False)
            self.images_u8, self.labels = splits.test.images, splits.test.labels.astype(np.int32)
            self.inputs = f"{n} test images of {data} (seeded class-balanced subset, classes interleaved)"
        else:
            rng = np.random.default_rng(seed)
            self.images_u8 = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.labels = rng.integers(0, 10, n).astype(np.int32)
            self.inputs = f"{n} uniform random images"

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The first b inputs as f32 in [0, 1], tiled if the pool is smaller."""
        idx = np.arange(b) % len(self.labels)
        return self.images_u8[idx].astype(np.float32) / 255.0, self.labels[idx]


# --- jaxadv ops ----------------------------------------------------------------------------
def _train_step_fn(s: Setting, b: int, transform: str, sharding=None):
    """A jitted train step (Adam 1e-3 + L2 5e-4, as the peers' PyTorch step) and its arguments."""
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.adam(1e-3))
    state = train.create_train_state(s.model, tx, jax.random.key(0))
    x, y = s.batch(b)
    images = jnp.asarray((x * 255).round().astype(np.uint8))
    labels = jnp.asarray(y)
    bt = defenses.identity_transform
    if transform == "fgsm_at":
        bt = defenses.get("fgsm_at").transform(DefenseConfig(name="fgsm_at", eps=EPS), s.apply)
    step = jax.jit(functools.partial(train.train_step, batch_size=b, batch_transform=bt, batch_sharding=sharding),
                   donate_argnums=(0,))  # fmt: skip
    perm = jnp.arange(b, dtype=jnp.int32)
    if sharding is not None:
        from jaxadv import parallel

        rep = parallel.replicated(sharding.mesh)
        state, images, labels, perm = jax.device_put((state, images, labels, perm), rep)
    args = (images, labels, perm, jnp.int32(0), jax.random.key(1))
    return step, state, args


def jax_op(s: Setting, op: str, b: int, sharding=None) -> tuple[Callable[[], Any], float | None, dict]:
    """(fn, compile seconds or None, extra record fields) for one jaxadv op at batch b."""
    x, y = s.batch(b)
    v = s.variables
    if sharding is not None:
        from jaxadv import parallel

        v = jax.device_put(v, parallel.replicated(sharding.mesh))
        x, y = jax.device_put((x, y), sharding)
    else:
        x, y = jnp.asarray(x), jnp.asarray(y)
    if op == "forward":
        f = jax.jit(s.apply)
        return (lambda: f(v, x)), _compile_s(f, v, x), {}
    if op == "input_grad":
        def loss(xx):
            return optax.softmax_cross_entropy_with_integer_labels(s.apply(v, xx), y).sum()

        f = jax.jit(jax.grad(loss))
        return (lambda: f(x)), _compile_s(f, x), {}
    if op in ("train_step", "train_step_fgsm_at"):
        step, state, args = _train_step_fn(s, b, "fgsm_at" if op.endswith("fgsm_at") else "none", sharding)
        compile_s = _compile_s(step, state, *args)
        box = [state]

        def run():
            box[0], _ = step(box[0], *args)
            return box[0].params

        return run, compile_s, {}
    if op in attacks.REGISTRY:
        fn, hp = attacks.REGISTRY[op], attack_settings(op)
        if fn.meta.minimum_norm:
            hp["return_info"] = True
        f = functools.partial(fn, s.apply, key=jax.random.key(0), **hp)
        return (lambda: f(v, x, y)), None, {k: v for k, v in hp.items() if k != "return_info"}
    if op.startswith("median"):
        k = int(op[len("median")])
        xin = jnp.asarray((np.asarray(x) * 255).round().astype(np.uint8)) if op.endswith("u8") else x
        f = functools.partial(squeeze.median_filter, size=k)
        return (lambda: f(xin)), _compile_s(squeeze.median_filter, xin, size=k), {}
    raise ValueError(f"unknown op {op!r}")


def _evaluate_record(s: Setting, n: int, warmup: int, repeats: int) -> dict:
    """Clean evaluation of n test images (u8 on the host -> accuracy), `train.evaluate`."""
    idx = np.arange(n) % len(s.labels)
    images, labels = s.images_u8[idx], s.labels[idx]

    def run():
        return evaluation.evaluate(s.apply, s.variables, images, labels, batch_size=1000)["accuracy_pct"]

    timing = _time(run, warmup=warmup, repeats=repeats)
    return _record("evaluate", "jaxadv", n, timing, accuracy_pct=run())


# --- result checks ---------------------------------------------------------------------------
def _adv_accuracy(s: Setting, x_adv, y) -> float:
    return float(np.mean(np.asarray(jax.jit(s.apply_f32)(s.variables, jnp.asarray(x_adv))).argmax(-1) == np.asarray(y)) * 100)


def _deepfool_stats(s: Setting, x, x_adv, iterations=None) -> dict:
    """Success (prediction changed) and L2 norms from the images alone, same for every impl."""
    f = jax.jit(s.apply_f32)
    pred0 = np.asarray(f(s.variables, jnp.asarray(x))).argmax(-1)
    pred1 = np.asarray(f(s.variables, jnp.asarray(x_adv))).argmax(-1)
    ok = pred1 != pred0
    l2 = np.sqrt(((np.asarray(x_adv, np.float32) - np.asarray(x, np.float32)) ** 2).reshape(len(x), -1).sum(-1))
    out = {"success_pct": float(ok.mean() * 100), "median_l2": float(np.median(l2[ok])) if ok.any() else None}
    if iterations is not None:
        it = np.asarray(iterations)
        out.update(iterations_mean=float(it.mean()), iterations_max=int(it.max()), iterations_sum=int(it.sum()))
    return out


def _agreement(ref: np.ndarray, out: np.ndarray) -> dict:
    d = np.abs(np.asarray(ref, np.float64) - np.asarray(out, np.float64))
    return {"max_abs_diff": float(d.max()), "frac_differing": float((d > 1e-6).mean())}


# --- the run ----------------------------------------------------------------------------------
def run_jax(s: Setting, ops, batches, *, warmup, repeats, log, deepfool_batches, train_batches, sharding_for=None):
    """Records of the jaxadv ops at every batch size (and the DeepFool ideal-time check)."""
    recs = []
    for op in ops:
        if op in ("evaluate",) + USER_OPS:
            continue
        bs = deepfool_batches if op == "deepfool" else train_batches if op.startswith("train_step") else batches
        for b in bs:
            sharding = sharding_for(b) if sharding_for else None
            fn, compile_s, extra = jax_op(s, op, b, sharding)
            timing = _time(fn, warmup=warmup, repeats=repeats)
            rec = _record(op, "jaxadv", b, timing, compile_s=compile_s, dtype=s.dtype, **extra)
            out = fn()
            x, y = s.batch(b)
            if op in attacks.REGISTRY and attacks.REGISTRY[op].meta.minimum_norm:
                x_adv, info = out
                rec.update(_deepfool_stats(s, x, x_adv, info.iterations))
            elif op in attacks.REGISTRY:
                rec["adv_accuracy_pct"] = _adv_accuracy(s, out, y)
                rec["clean_accuracy_pct"] = _adv_accuracy(s, x, y)
            recs.append(rec)
            log(f"{op:20s} jaxadv  b{b:<5d} {rec['img_per_s']:9.1f} img/s  "
                f"({rec['img_per_s_min']:.1f}-{rec['img_per_s_max']:.1f})"
                + (f"  compile {compile_s:.2f}s" if compile_s else ""))  # fmt: skip
    _deepfool_ideal(recs)
    return recs


def _deepfool_ideal(recs: list[dict]) -> None:
    """Attach to each DeepFool record the ideal time: sum of per-example iterations x (1
    forward + (k-1) input-gradient backward passes), from our own forward and input-gradient
    timings at the same batch size (backward = input_grad - forward). k-1, not k: each
    step needs the gradients of the k-1 logit differences only."""
    by = {(r["op"], r["batch"]): r for r in recs}
    for r in recs:
        if r["op"] != "deepfool" or "iterations_sum" not in r:
            continue
        fwd, grad = by.get(("forward", r["batch"])), by.get(("input_grad", r["batch"]))
        if not (fwd and grad):
            continue
        t_fwd = 1 / fwd["img_per_s"]
        t_bwd = max(1 / grad["img_per_s"] - t_fwd, 0.0)
        ideal_s = r["iterations_sum"] * (t_fwd + (r["num_candidates"] - 1) * t_bwd)
        r["ideal_s"] = ideal_s
        r["time_over_ideal"] = r["median_s"] / ideal_s


def run_peers(s: Setting, ops, batch, deepfool_batch, *, warmup, repeats, log, slow_peers) -> list[dict]:
    from benchmarks import peers

    recs = []
    for op in ops:
        if op not in peers.OPS:
            continue
        bs = [deepfool_batch] if op == "deepfool" else [64, 256] if op == "train_step" else [batch]
        for b in bs:
            x, y = s.batch(b)
            fns = peers.peer_ops(op, model=s.model.clone(dtype=jnp.float32), variables=s.variables, x=x, y=y,
                                 eps=EPS, deepfool=DEEPFOOL)  # fmt: skip
            if op == "deepfool" and not slow_peers:
                fns.pop("art", None)  # ART always runs max_iter steps on the whole batch: minutes per call
            ref_fn, _, _ = jax_op(s, op, b)
            ref_out = np.asarray(ref_fn()) if op == "fgsm" or op.startswith("median") else None
            if op == "deepfool":  # time what the peers return: the images alone
                ref_fn = functools.partial(lambda f: f()[0], ref_fn)
            # Ours and every peer timed in turn, sample by sample: the ratio is from one stretch of time.
            timings = bench.time_interleaved({"jaxadv": ref_fn, **fns}, warmup=warmup, repeats=repeats)
            ours_paired = _record(op, "jaxadv", b, _timing(timings.pop("jaxadv")))
            for impl, fn in fns.items():
                rec = _record(op, impl, b, _timing(timings[impl]))
                out = fn()
                if ref_out is not None:
                    rec.update(_agreement(ref_out, out))
                if op == "fgsm":
                    rec["adv_accuracy_pct"] = _adv_accuracy(s, out, y)
                if op == "deepfool":
                    rec.update(_deepfool_stats(s, x, out))
                rec["jaxadv_img_per_s"] = ours_paired["img_per_s"]
                rec["jaxadv_img_per_s_min"] = ours_paired["img_per_s_min"]
                rec["jaxadv_img_per_s_max"] = ours_paired["img_per_s_max"]
                rec["jaxadv_ratio"] = ours_paired["img_per_s"] / rec["img_per_s"]
                recs.append(rec)
                log(f"{op:20s} {impl:12s} b{b:<5d} {rec['img_per_s']:9.1f} img/s"
                    + (f"  (jaxadv {rec['jaxadv_ratio']:.2f}x)" if "jaxadv_ratio" in rec else ""))  # fmt: skip
    return recs


def run_user_model(checkpoint: str | None, data: str | None, batch: int, deepfool_batch: int, repeats: int,
                   log) -> list[dict]:  # fmt: skip
    """The plain-Flax user model beside jaxadv's, JAX imported before and after jaxadv."""
    recs = []
    for order in ("jax-first", "jaxadv-first"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "user.json"
            cmd = [sys.executable, "-m", "benchmarks.user_model", "--order", order, "--batch", str(batch),
                   "--deepfool-batch", str(deepfool_batch), "--repeats", str(repeats), "--out", str(out)]
            cmd += ["--checkpoint", checkpoint] if checkpoint else []
            cmd += ["--data", data] if data else []
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user's fresh shell has it
            subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parent.parent)
            rep = json.loads(out.read_text())
        for r in rep["results"]:
            r.update(xla_flag_applied=rep["xla_flag_applied"], user_model=True)
            recs.append(r)
            log(f"{r['op']:20s} {r['impl']} ({order}) b{r['batch']:<4d} {r['img_per_s']:9.1f} img/s")
    return recs


def run_devices(args, counts: list[int], log) -> list[dict]:
    """Forward, FGSM and the train step with the batch sharded over N simulated CPU devices."""
    recs = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "dev.json"
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
            cmd = [sys.executable, "-m", "benchmarks.run", "--_sharded", "--no-peers", "--only",
                   "forward,fgsm,train_step", "--batches", "256", "--train-batches", "256",
                   "--repeats", str(args.repeats), "--out", str(out), "--no-report"]  # fmt: skip
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            for r in json.loads(out.read_text())["results"]:
                r["devices"] = n
                r["impl"] = f"jaxadv x{n} devices"
                recs.append(r)
                log(f"{r['op']:20s} {n} devices b{r['batch']:<5d} {r['img_per_s']:9.1f} img/s")
    return recs


# --- report -------------------------------------------------------------------------------------
def _fmt(v, nd=1):
    return "–" if v is None else f"{v:,.{nd}f}"


def markdown(report: dict) -> str:
    env, recs = report["environment"], report["results"]
    lines = [f"# jaxadv benchmark ({report['mode']})", "",
             f"Machine: {env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores; JAX "
             f"{env.get('versions', {}).get('jax')} on "
             f"{env.get('backend')} ({env.get('device_count')} device(s)); XLA_FLAGS `{env.get('xla_flags', '')}`; "
             f"commit {report.get('git_commit')}.",
             f"Weights: {report['weights']}. Inputs: {report['inputs']}. Timings: median of {report['repeats']} "
             f"samples after a warm-up of at least {report['warmup']} call(s) and 0.25 s; a sample is one call, "
             f"or for fast ops enough back-to-back calls to last 10 ms (per-call time reported); "
             f"spread = slowest..fastest sample.", ""]  # fmt: skip
    mine = [r for r in recs if r["impl"] == "jaxadv"]
    user = [r for r in recs if r.get("user_model")]
    peer = [r for r in recs if r["impl"] != "jaxadv" and "devices" not in r and not r.get("user_model")]
    if peer:
        lines += ["## jaxadv beside the peers (same weights, same inputs)", "",
                  "jaxadv and the peers of an op are timed in turn, one sample each per round, so each ratio "
                  "comes from one stretch of time; the jaxadv figure here is that paired one.", "",
                  "| op | batch | jaxadv img/s | peer | peer img/s | jaxadv / peer | results |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        ours = {(r["op"], r["batch"]): r for r in mine if r.get("dtype", "float32") == "float32"}
        for r in peer:
            o = ours.get((r["op"], r["batch"]))
            res = ""
            if "frac_differing" in r:
                res = "identical" if r["max_abs_diff"] <= 1e-6 else (
                    f"{r['frac_differing'] * 100:.3f}% of values differ (max {r['max_abs_diff']:.2g})")
                if r["op"] == "fgsm" and 0 < r["frac_differing"] < 0.01:
                    res += ": sign flips where the input gradient is ~0, the two frameworks' rounding differs"
            if "success_pct" in r:
                res = f"success {r['success_pct']:.1f}%, median L2 {_fmt(r['median_l2'], 3)}"
            lines.append(f"| {r['op']} | {r['batch']} | {_fmt(r.get('jaxadv_img_per_s', o and o['img_per_s']))} | {r['impl']} | "
                         f"{_fmt(r['img_per_s'])} | {_fmt(r.get('jaxadv_ratio'), 2)}x | {res} |")  # fmt: skip
        lines.append("")
    lines += ["## jaxadv: images/s by batch size", "", "| op | dtype | batch | img/s | spread | compile s | notes |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in mine:
        notes = []
        if "adv_accuracy_pct" in r:
            notes.append(f"adv acc {r['adv_accuracy_pct']:.1f}% (clean {r['clean_accuracy_pct']:.1f}%)")
        if "success_pct" in r:
            notes.append(f"success {r['success_pct']:.1f}%, median L2 {_fmt(r['median_l2'], 3)}, "
                         f"iterations mean {r['iterations_mean']:.2f} max {r['iterations_max']}")  # fmt: skip
        if "time_over_ideal" in r:
            notes.append(f"{r['time_over_ideal']:.2f}x the ideal time")
        if "accuracy_pct" in r:
            notes.append(f"accuracy {r['accuracy_pct']:.2f}%")
        dtype = {"u8": "uint8", "f32": "float32"}[r["op"][-3:].lstrip("_")] if r["op"].startswith("median") else (
            r.get("dtype", "float32"))
        lines.append(f"| {r['op']} | {dtype} | {r['batch']} | {_fmt(r['img_per_s'])} | "
                     f"{_fmt(r['img_per_s_min'])}–{_fmt(r['img_per_s_max'])} | {_fmt(r.get('compile_s'), 2)} | "
                     f"{'; '.join(notes)} |")  # fmt: skip
    if user:
        base = {(r["op"], r["order"]): r["img_per_s"] for r in user if r["impl"] == "jaxadv CNN"}
        lines += ["", "## A user's own model: plain Flax layers, JAX imported first", "",
                  "The study's CNN written with stock Flax layers (`nn.max_pool`) beside jaxadv's CNN (reshape + "
                  "max pooling), same weights and inputs, each in a fresh process that imports JAX before jaxadv "
                  "(its XLA:CPU flag then cannot apply) or jaxadv first. Each pair is timed in turn within its "
                  "process; the last column divides by jaxadv's CNN with jaxadv imported first.", "",
                  "| op | batch | import order | model | XLA flag | img/s | / jaxadv CNN, jaxadv first |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in user:
            ref = base.get((r["op"], "jaxadv-first"))
            lines.append(f"| {r['op']} | {r['batch']} | {r['order']} | {r['impl']} | "
                         f"{'on' if r['xla_flag_applied'] else 'off'} | {_fmt(r['img_per_s'])} | "
                         f"{_fmt(ref and r['img_per_s'] / ref, 2)} |")  # fmt: skip
    dev = [r for r in recs if "devices" in r]
    if dev:
        lines += ["", "## Simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)", "",
                  "The N devices share the same CPU cores, so this shows that the sharded code path works and "
                  "what it costs, not what N real devices would give. A speed-up here means XLA:CPU keeps the "
                  "cores busier with N smaller programs than with one, not that there is more hardware.", "", "| op | batch | devices | img/s |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['op']} | {r['batch']} | {r['devices']} | {_fmt(r['img_per_s'])} |" for r in dev]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = report["results"]
    dev = [r for r in recs if "devices" in r]
    n_peer = sum("jaxadv_ratio" in r for r in recs)
    fig, axes = plt.subplots(1, 3 if dev else 2, figsize=(18 if dev else 13, max(4.5, 0.22 * n_peer + 1.5)))
    ax = axes[0]
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    mine = [r for r in recs if r["impl"] == "jaxadv" and r.get("dtype", "float32") == "float32" and r["op"] != "evaluate"]
    for op in dict.fromkeys(r["op"] for r in mine):
        rs = sorted((r for r in mine if r["op"] == op), key=lambda r: r["batch"])
        if len(rs) > 1:
            ax.plot([r["batch"] for r in rs], [r["img_per_s"] for r in rs], marker="o", label=op)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images/s", title="jaxadv: scaling with batch size")
    if ax.lines:
        ax.legend(fontsize=7)
    ax = axes[1]
    peer = [r for r in recs if "jaxadv_ratio" in r]
    labels = [f"{r['op']} b{r['batch']} vs {r['impl']}" for r in peer]
    ax.barh(range(len(peer)), [r["jaxadv_ratio"] for r in peer], color=["tab:green" if r["jaxadv_ratio"] >= 1 else
                                                                           "tab:red" for r in peer])  # fmt: skip
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(peer)), labels, fontsize=7)
    ax.set(xscale="log", xlabel="jaxadv speed / peer speed", title="jaxadv against the peers (> 1: jaxadv faster)")
    if dev:
        ax = axes[2]
        for op in dict.fromkeys(r["op"] for r in dev):
            rs = sorted((r for r in dev if r["op"] == op), key=lambda r: r["devices"])
            ax.plot([r["devices"] for r in rs], [r["img_per_s"] for r in rs], marker="o", label=op)
        ax.set(xlabel="simulated CPU devices (same 2 cores)", ylabel="images/s", title="Sharded over N devices")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help=f"batch 128 (DeepFool 32) only and, unless --only, the study's attacks ({', '.join(QUICK_ATTACKS)})"
                   ": a few minutes; the shipped pretrained quick model and $JAXADV_DATA's test images when present")
    p.add_argument("--only", default=None, help=f"comma-separated ops of {','.join(jax_ops())}")
    p.add_argument("--out", default="benchmarks/results/latest.json", help="JSON report; .md and .png beside it")
    p.add_argument("--checkpoint", default=None, help="a `jaxadv train` run directory for trained weights")
    p.add_argument("--data", default=None, help="CIFAR-10 source for real test images (see `jaxadv train --help`)")
    p.add_argument("--batches", type=_ints, default=None, help="batch sizes (default 1,64,128,256,1024)")
    p.add_argument("--train-batches", type=_ints, default=None, help="train-step batch sizes (default 64,128,256)")
    p.add_argument("--deepfool-batches", type=_ints, default=None, help="DeepFool batch sizes (default 1,64,128,256)")
    p.add_argument("--peer-batch", type=int, default=128, help="batch size of the peer comparison")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (>= 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) call")
    p.add_argument("--bf16", action="store_true", help="also time the model ops with bfloat16 compute")
    p.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    p.add_argument("--slow-peers", action="store_true", help="include ART DeepFool (minutes per call)")
    p.add_argument("--devices", type=_ints, default=None, help="simulated device counts to scale over, e.g. 1,2,4")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_sharded", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error(f"--repeats {args.repeats}: at least 5 timed calls are needed for a median with a spread")
    ops = list(quick_ops() if args.quick else jax_ops())
    if args.only:
        ops = [o.strip() for o in args.only.split(",") if o.strip()]
        bad = [o for o in ops if o not in jax_ops()]
        if bad:
            p.error(f"--only: unknown op(s) {', '.join(bad)}; choose from {', '.join(jax_ops())}")
    if args.quick:
        batches, train_batches, df_batches, n_eval = [128], [64], [32], 2000
        peer_batch, df_peer_batch = 128, 32
    else:
        batches = args.batches or [1, 64, 128, 256, 1024]
        train_batches = args.train_batches or [64, 128, 256]
        df_batches = args.deepfool_batches or [1, 64, 128, 256]
        n_eval, peer_batch, df_peer_batch = 10_000, args.peer_batch, args.peer_batch
    out = Path(args.out)
    if out.suffix != ".json":
        p.error(f"--out {args.out}: expected a .json path")
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    t_start = time.perf_counter()
    commit = io.git_commit(Path(__file__).parent)  # at the start: the code that runs, not edits made meanwhile
    pool = max(batches + train_batches + df_batches + [peer_batch])
    checkpoint, data = args.checkpoint, args.data
    if args.quick:  # the speed users get: trained weights and real images when they are at hand
        from jaxadv import pretrained

        shipped = pretrained.SHIPPED / "quick" / "none"
        checkpoint = checkpoint or (str(shipped) if (shipped / "checkpoints").is_dir() else None)
        data = data or os.environ.get("JAXADV_DATA") or None
    try:
        setting = Setting(checkpoint, data, max(pool, n_eval if "evaluate" in ops else 0), "float32")
    except (OSError, ValueError) as e:
        p.error(str(e).splitlines()[0])
    log(f"weights: {setting.weights}; inputs: {setting.inputs}; backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s)")  # fmt: skip
    sharding_for = None
    if args._sharded:
        from jaxadv import parallel

        mesh = parallel.batch_mesh()
        sharding_for = lambda b: parallel.batch_sharded(mesh)  # noqa: E731
    kw = dict(warmup=args.warmup, repeats=args.repeats, log=log)
    recs = run_jax(setting, ops, batches, deepfool_batches=df_batches, train_batches=train_batches,
                   sharding_for=sharding_for, **kw)  # fmt: skip
    if "evaluate" in ops:
        r = _evaluate_record(setting, n_eval, args.warmup, args.repeats)
        recs.append(r)
        log(f"{'evaluate':20s} jaxadv  n{n_eval:<5d} {r['img_per_s']:9.1f} img/s  accuracy {r['accuracy_pct']:.2f}%")
    if args.bf16:
        s16 = Setting.__new__(Setting)
        s16.__dict__.update(setting.__dict__)
        s16.model = setting.model.clone(dtype=jnp.bfloat16)
        s16.apply, s16.dtype = models.make_apply(s16.model), "bfloat16"
        bf_ops = [o for o in ops if o in ("forward", "input_grad", "fgsm", "train_step", "deepfool")]
        recs += run_jax(s16, bf_ops, [peer_batch], deepfool_batches=[df_peer_batch], train_batches=[64, 256], **kw)
    if not args.no_peers:
        from benchmarks import peers

        gone = peers.missing()
        if gone:
            log("peers not installed (pip install -e '.[bench-peers]' && pip install --no-deps torchattacks==3.5.1): "
                + ", ".join(gone))  # fmt: skip
        recs += run_peers(setting, ops, peer_batch, df_peer_batch, slow_peers=args.slow_peers, **kw)
    if "user_model" in ops:
        recs += run_user_model(checkpoint, data, peer_batch, df_peer_batch, args.repeats, log)
    if args.devices:
        recs += run_devices(args, args.devices, log)

    env = io.environment()
    report = {
        "mode": "quick" if args.quick else "full",
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": commit,  # with "-dirty" when tracked files differed from it
        "environment": env,
        "weights": setting.weights,
        "inputs": setting.inputs,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "wall_s": time.perf_counter() - t_start,
        "results": recs,
    }
    io.write_json(out, report)
    if not args.no_report:
        md = out.with_suffix(".md")
        io.write_text(md, markdown(report))
        plot(report, out.with_suffix(".png"))
        log(f"wrote {out}, {md.name}, {out.with_suffix('.png').name} in {report['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
