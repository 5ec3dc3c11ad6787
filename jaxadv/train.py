"""Training: optimizer, pure train/eval steps, and `fit`, the one loop that owns side effects."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxadv import checkpoint, parallel
from jaxadv.configs import TrainConfig
from jaxadv.models import CNN, make_apply
from jaxadv.types import Array, BatchTransform, PRNGKey


class TrainState(struct.PyTreeNode):
    """Params, BatchNorm statistics and optimizer state; `model` and `tx` are static."""

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    model: nn.Module = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        """The variables dict that `make_apply(model)` takes as `params`."""
        return variables_of(self.params, self.batch_stats)


def variables_of(params, batch_stats) -> dict:
    if batch_stats:
        return {"params": params, "batch_stats": batch_stats}
    return {"params": params}


def create_model(cfg: TrainConfig, num_classes: int = 10) -> CNN:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; expected 'float32' or 'bfloat16'")
    return CNN(widths=tuple(cfg.widths), head=tuple(cfg.head), num_classes=num_classes, norm=cfg.norm, dtype=dtype)


def create_learning_rate_fn(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(
            transition_steps=total, peak_value=cfg.lr, pct_start=cfg.warmup_frac, div_factor=25.0, final_div_factor=1e3
        )
    if cfg.schedule == "cosine":
        warmup = int(cfg.warmup_frac * total)
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, warmup), total, end_value=0.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; expected constant, onecycle or cosine")


def create_optimizer(cfg: TrainConfig, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    if cfg.optimizer == "adam_l2":
        # torch.optim.Adam(weight_decay=wd): wd * param is added to the gradient, then Adam.
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(learning_rate_fn))
    if cfg.optimizer == "adamw":
        # Decay kernels only: decaying biases and BatchNorm scales just fights the normalization.
        mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params
        )
        return optax.adamw(learning_rate_fn, weight_decay=cfg.weight_decay, mask=mask)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adam_l2 or adamw")


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: PRNGKey, image_shape=(32, 32, 3)):
    variables = jax.jit(functools.partial(model.init, train=False))(key, jnp.zeros((1, *image_shape), jnp.float32))
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params), model=model, tx=tx,
    )  # fmt: skip


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Per-example softmax cross-entropy; f32[B]."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def identity_transform(params, x, y, key):
    del params, key
    return x, y


def to_float(x: Array) -> Array:
    """uint8 [0, 255] -> float32 [0, 1]; float input passes through."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


def train_step(
    state: TrainState,
    images: Array,
    labels: Array,
    perm: Array,
    index: Array,
    key: PRNGKey,
    *,
    batch_size: int,
    label_smoothing: float = 0.0,
    augment_fn: Callable[[PRNGKey, Array], Array] | None = None,
    batch_transform: BatchTransform = identity_transform,
    batch_sharding=None,
) -> tuple[TrainState, dict]:
    """One optimizer step on batch `index` of the permutation `perm` of the device-resident data.

    Args:
      state: the train state (donated by `fit`).
      images: u8[N,H,W,C], the whole training set on device.
      labels: i32[N].
      perm: i32[N], this epoch's permutation.
      index: scalar int, which batch of `perm` to use.
      key: the run's training key; folded with `state.step` so every step draws fresh,
        reproducible randomness without host-side splits.
      batch_size: static batch size.
      label_smoothing: cross-entropy label smoothing.
      augment_fn: `(key, x) -> x` on u8/f32 batches, or None.
      batch_transform: `(variables, x, y, key) -> (x', y')` applied to the float batch in
        [0, 1] before the loss (defenses plug in here; identity by default).
      batch_sharding: optional sharding of the batch axis over devices (data parallelism).

    Returns:
      (new state, metrics) with metrics {"loss", "correct", "count"} as device scalars (sums).
    """
    idx = jax.lax.dynamic_slice_in_dim(perm, index * batch_size, batch_size)
    x, y = images[idx], labels[idx]
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
        y = jax.lax.with_sharding_constraint(y, batch_sharding)
    step_key = jax.random.fold_in(key, state.step)
    aug_key, transform_key = jax.random.split(step_key)
    if augment_fn is not None:
        x = augment_fn(aug_key, x)
    x = to_float(x)
    x, y = batch_transform(state.variables, x, y, transform_key)

    def loss_fn(params):
        variables = variables_of(params, state.batch_stats)
        if state.batch_stats:
            logits, updates = state.model.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = state.model.apply(variables, x, train=True), state.batch_stats
        loss = cross_entropy(logits, y, label_smoothing).mean()
        return loss, (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    n = jnp.asarray(y.shape[0], jnp.float32)
    metrics = {
        "loss": loss * n,
        "correct": jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32),
        "count": n,
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
    return new_state, metrics


def eval_step(apply_fn, params, x: Array, y: Array, mask: Array) -> dict:
    """Sums of loss and correct predictions over the unmasked examples of one padded batch."""
    logits = apply_fn(params, to_float(x))
    loss = cross_entropy(logits, y)
    m = mask.astype(jnp.float32)
    return {
        "loss": jnp.sum(loss * m),
        "correct": jnp.sum((jnp.argmax(logits, -1) == y) * m),
        "count": jnp.sum(m),
    }


_eval_step_jit = jax.jit(eval_step, static_argnums=0)


def pad_batches(n: int, batch_size: int):
    """Yield (start, stop, pad) for fixed-size batches over n examples; the last is padded."""
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        yield start, stop, batch_size - (stop - start)


def pad_to(x: np.ndarray, pad: int) -> np.ndarray:
    if pad == 0:
        return x
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)


def evaluate(apply_fn, params, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 1000) -> dict:
    """Clean accuracy (%) and mean cross-entropy over a dataset, with one compiled shape.

    Batches are split over all local devices (params replicated).

    Returns:
      {"accuracy_pct": float, "loss": float, "n": int}
    """
    mesh = parallel.batch_mesh()
    ndev = mesh.devices.size
    n = len(labels)
    batch_size = -(-min(batch_size, max(n, 1)) // ndev) * ndev
    params = jax.device_put(params, parallel.replicated(mesh))
    sharding = parallel.batch_sharded(mesh)
    sums = []
    for start, stop, pad in pad_batches(n, batch_size):
        x = pad_to(images[start:stop], pad)
        y = pad_to(labels[start:stop], pad)
        mask = np.arange(batch_size) < (stop - start)
        x, y, mask = jax.device_put((x, y, mask), sharding)
        sums.append(_eval_step_jit(apply_fn, params, x, y, mask))
    return summarize(sums)


def summarize(sums: list[dict]) -> dict:
    total = jax.device_get(jax.tree.map(lambda *a: sum(a), *sums))
    count = float(total["count"])
    return {
        "accuracy_pct": 100.0 * float(total["correct"]) / max(count, 1.0),
        "loss": float(total["loss"]) / max(count, 1.0),
        "n": int(count),
    }


class FitResult(NamedTuple):
    state: TrainState  # final state, with the best-validation params restored
    history: list  # one dict per epoch
    stopped_early: bool


def _checkpoint_tree(state: TrainState, best_params, best_stats, key) -> dict:
    return {
        "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
        "step": state.step, "best_params": best_params, "best_batch_stats": best_stats,
        "key": jax.random.key_data(key),
    }  # fmt: skip


def fit(
    cfg: TrainConfig,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray | None,
    val_labels: np.ndarray | None,
    *,
    key: PRNGKey,
    num_classes: int = 10,
    batch_transform: BatchTransform = identity_transform,
    augment_fn: Callable | None = None,
    eval_squeezer: Callable | None = None,
    robust_eval: Callable[[Any], float] | None = None,
    ckpt_dir: str | None = None,
    resume: bool = False,
    extra_meta: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> FitResult:
    """Train a model per `cfg`; the only training loop in jaxadv.

    Checkpoints (params, optimizer state, step, best-so-far params, RNG key data; history
    and config in the metadata) are written after every epoch when `ckpt_dir` is given.
    With `resume=True` the run continues from the latest checkpoint and ends with the same
    params as an uninterrupted run with the same seed: all randomness derives from `key`
    folded with the epoch (data order) or the global step (augmentation, attacks).

    Args:
      cfg: the training config.
      train_images, train_labels: u8[N,H,W,C], i32[N] host arrays.
      val_images, val_labels: validation split for early stopping (None: no validation;
        the last params are kept).
      key: root PRNG key of the run.
      batch_transform: `(variables, x, y, key) -> (x', y')`, e.g. a defense.
      augment_fn: `(key, x_u8) -> x_u8` batch augmentation (None: none).
      eval_squeezer: test-time input transform of the defended classifier (e.g. the
        median filter for a model trained on filtered images); validation, and so early
        stopping and best-params selection, sees the inputs as the defense will.
      robust_eval: `variables -> robust validation accuracy (%)`, run after every epoch
        (e.g. PGD on a validation batch). When given, the best params are those with the
        highest robust accuracy (Rice et al. 2020), and with `cfg.co_guard > 0` training
        stops once robust accuracy falls `co_guard` points below its best: the signature
        of catastrophic overfitting in fast adversarial training (Wong et al. 2020).
      ckpt_dir: where to write checkpoints (None: don't).
      resume: continue from the latest checkpoint in `ckpt_dir`.
      extra_meta: JSON-serializable extras stored with each checkpoint (e.g. data source).
      progress: show a tqdm progress bar per epoch.
      log: called with a one-line summary per epoch.
    """
    from tqdm.auto import tqdm  # side effects stay in the loop

    n = len(train_labels)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"training set ({n}) is smaller than one batch ({cfg.batch_size})")
    init_key, data_key, train_key = jax.random.split(key, 3)
    model = create_model(cfg, num_classes)
    lr_fn = create_learning_rate_fn(cfg, steps_per_epoch)
    tx = create_optimizer(cfg, lr_fn)
    state = create_train_state(model, tx, init_key, train_images.shape[1:])
    # `score`: lower is better; validation loss, or minus robust accuracy with robust_eval.
    best = {**_copy_best(state), "score": math.inf, "bad_epochs": 0}
    history: list[dict] = []
    start_epoch = 0

    if resume and ckpt_dir and checkpoint.latest_step(ckpt_dir) is not None:
        template = _checkpoint_tree(state, state.params, state.batch_stats, train_key)
        _, tree, meta = checkpoint.restore(ckpt_dir, template)
        if TrainConfig.from_dict(meta.get("config", {})) != cfg:
            raise checkpoint.CheckpointError(
                f"checkpoint in {ckpt_dir} was written with a different config; use a new --out or the same config"
            )
        # Same data and seed too, or the continuation is not the run that was interrupted.
        for k, v in {"n_train": n, **(extra_meta or {})}.items():
            if k in meta and meta[k] != checkpoint.json_safe(v):
                raise checkpoint.CheckpointError(
                    f"checkpoint in {ckpt_dir} was written with {k}={meta[k]!r}, not {v!r}; use a new --out"
                )
        state = state.replace(
            step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"], opt_state=tree["opt_state"]
        )
        best = {
            "params": tree["best_params"], "batch_stats": tree["best_batch_stats"],
            "score": float(meta.get("best_score", meta.get("best_val_loss"))), "bad_epochs": meta["bad_epochs"],
        }  # fmt: skip
        history = meta["history"]
        start_epoch = meta["epoch"] + 1
        if meta.get("stopped_early"):
            start_epoch = cfg.epochs
        log(f"resumed from {ckpt_dir} after epoch {meta['epoch'] + 1}")

    mesh = parallel.batch_mesh()
    parallel.check_divisible(cfg.batch_size, mesh)
    repl = parallel.replicated(mesh)
    step_fn = jax.jit(
        functools.partial(
            train_step, batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing,
            augment_fn=augment_fn, batch_transform=batch_transform,
            batch_sharding=parallel.batch_sharded(mesh) if mesh.devices.size > 1 else None,
        ),
        donate_argnums=(0,),
    )  # fmt: skip
    apply_fn = make_apply(model)
    if eval_squeezer is not None:
        from jaxadv.squeeze import squeezed

        apply_fn = squeezed(apply_fn, eval_squeezer)
    state = jax.device_put(state, repl)
    images = jax.device_put(train_images, repl)
    labels = jax.device_put(train_labels, repl)
    stopped_early = bool(history and history[-1].get("stopped_early"))

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        perm = jax.device_put(jax.random.permutation(jax.random.fold_in(data_key, epoch), n).astype(jnp.int32), repl)
        window: list[dict] = []
        totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for i in range(steps_per_epoch):
            state, metrics = step_fn(state, images, labels, perm, jnp.int32(i), train_key)
            window.append(metrics)
            if len(window) == cfg.log_every or i == steps_per_epoch - 1:
                fetched = jax.device_get(window)  # the only host sync in the step loop
                for m in fetched:
                    for k in totals:
                        totals[k] += float(m[k])
                if not math.isfinite(totals["loss"]):
                    raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1} before step {i + 1}")
                elapsed = time.perf_counter() - t0
                bar.set_postfix(
                    loss=f"{totals['loss'] / totals['count']:.3f}",
                    acc=f"{100 * totals['correct'] / totals['count']:.1f}%",
                    img_s=f"{totals['count'] / elapsed:.0f}",
                )
                bar.update(len(window))
                window = []
        bar.close()
        train_seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "train_loss": totals["loss"] / totals["count"],
            "train_accuracy_pct": 100 * totals["correct"] / totals["count"],
            "lr": float(lr_fn(int(state.step) - 1)),
            "seconds": train_seconds,
            "img_per_s": totals["count"] / train_seconds,
        }
        if val_labels is not None and len(val_labels):
            val = evaluate(apply_fn, state.variables, val_images, val_labels)
            record.update(val_loss=val["loss"], val_accuracy_pct=val["accuracy_pct"])
            score = val["loss"]
            if robust_eval is not None:
                record["val_robust_accuracy_pct"] = robust_eval(state.variables)
                score = -record["val_robust_accuracy_pct"]
            collapsed = bool(robust_eval is not None and cfg.co_guard and score > best["score"] + cfg.co_guard)
            if score < best["score"]:
                best = {**_copy_best(state), "score": score, "bad_epochs": 0}
            else:
                best["bad_epochs"] += 1
        else:
            best = {**_copy_best(state), "score": math.inf, "bad_epochs": 0}
            collapsed = False
        if collapsed:
            log(f"robust validation accuracy fell by more than {cfg.co_guard} points: catastrophic overfitting")
        stopped_early = bool(cfg.patience and best["bad_epochs"] >= cfg.patience) or collapsed
        record["stopped_early"] = stopped_early
        history.append(record)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc {record['train_accuracy_pct']:.2f}%"
            + (f", val loss {record['val_loss']:.4f} acc {record['val_accuracy_pct']:.2f}%" if "val_loss" in record else "")
            + (f", val PGD acc {record['val_robust_accuracy_pct']:.2f}%" if "val_robust_accuracy_pct" in record else "")
            + f", {train_seconds:.1f}s, {record['img_per_s']:.0f} img/s"
        )
        if ckpt_dir:
            meta = {
                "config": cfg.to_dict(), "epoch": epoch, "history": history, "num_classes": num_classes,
                "image_shape": list(train_images.shape[1:]), "n_train": n,
                "best_score": best["score"], "bad_epochs": best["bad_epochs"], "stopped_early": stopped_early, **(extra_meta or {}),
            }  # fmt: skip
            tree = _checkpoint_tree(state, best["params"], best["batch_stats"], train_key)
            checkpoint.save(ckpt_dir, epoch, tree, checkpoint.json_safe(meta))
        if stopped_early:
            if not collapsed:
                log(f"early stop: the validation score has not improved for {cfg.patience} epochs")
            break

    state = state.replace(params=best["params"], batch_stats=best["batch_stats"])
    return FitResult(state=state, history=history, stopped_early=stopped_early)


def _copy_best(state: TrainState) -> dict:
    # The step donates `state`'s buffers, so the best params must be a copy, not an alias.
    return {"params": jax.tree.map(jnp.copy, state.params), "batch_stats": jax.tree.map(jnp.copy, state.batch_stats)}


def load_trained(ckpt_dir: str, *, which: str = "best"):
    """Rebuild a trained model from its checkpoint directory alone (the config is stored in it).

    Args:
      ckpt_dir: a `checkpoints/` directory written by `fit`.
      which: "best" (best-validation params, what `fit` returns) or "last".

    Returns:
      (apply_fn, variables, cfg, meta): `apply_fn(variables, x) -> logits`.
    """
    _, meta = checkpoint.read_meta(ckpt_dir)
    if "config" not in meta:
        raise checkpoint.CheckpointError(f"{ckpt_dir} is not a jaxadv training checkpoint (no config stored)")
    cfg = TrainConfig.from_dict(meta["config"])
    model = create_model(cfg, meta.get("num_classes", 10))
    tx = create_optimizer(cfg, create_learning_rate_fn(cfg, 1))
    shapes = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0), tuple(meta.get("image_shape", (32, 32, 3)))))
    template = _checkpoint_tree(shapes, shapes.params, shapes.batch_stats, jax.random.key(0))
    _, tree, meta = checkpoint.restore(ckpt_dir, template)
    if which == "best":
        variables = variables_of(tree["best_params"], tree["best_batch_stats"])
    elif which == "last":
        variables = variables_of(tree["params"], tree["batch_stats"])
    else:
        raise ValueError(f"which must be 'best' or 'last', not {which!r}")
    return make_apply(model), variables, cfg, meta
