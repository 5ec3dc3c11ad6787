"""Training: optimizer, the pure train step, `fit` (the one loop) and `train_and_evaluate`.

`train_and_evaluate(cfg, splits, workdir)` is what the CLI's `train` command and the study
both call (as in flax's examples): it resolves the config's defense once, trains with
`fit`, and writes the run directory (checkpoints, history, curves, test summary). `fit`
is the only training loop; its pieces (restore, one epoch, early stopping) are small
functions, and early stopping with the catastrophic-overfitting guard is a pure update.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxadv import checkpoint, defenses, distributed, evaluation, io, parallel, pretrained
from jaxadv.configs import ModelConfig, OptimConfig, TrainConfig
from jaxadv.data import augment as _augment
from jaxadv.losses import cross_entropy
from jaxadv.models import CNN, make_apply, whiten_and_dirac
from jaxadv.types import Array, BatchTransform, PRNGKey

evaluate = evaluation.evaluate  # the clean-accuracy function, where users found it in 0.1
to_float = evaluation.to_float


class TrainState(struct.PyTreeNode):
    """Params, BatchNorm statistics and optimizer state; `model` and `tx` are static.

    `ema_params` is the moving average of the params (`OptimConfig.ema`), or None."""

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
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


def create_model(cfg: TrainConfig | ModelConfig, num_classes: int = 10) -> CNN:
    m = cfg.model if isinstance(cfg, TrainConfig) else cfg
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(m.dtype)
    if dtype is None:
        raise ValueError(f"unknown dtype {m.dtype!r}; expected 'float32' or 'bfloat16'")
    if m.init not in ("default", "whiten"):
        raise ValueError(f"unknown init {m.init!r}; expected 'default' or 'whiten'")
    return CNN(widths=tuple(m.widths), head=tuple(m.head), num_classes=num_classes, norm=m.norm, dtype=dtype,
               bn_scale=m.bn_scale, bn_momentum=m.bn_momentum)  # fmt: skip


def create_learning_rate_fn(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    total = max(1, total_steps)
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(
            transition_steps=total, peak_value=cfg.lr, pct_start=cfg.warmup_frac, div_factor=25.0, final_div_factor=1e3
        )
    if cfg.schedule == "cosine":
        warmup = int(cfg.warmup_frac * total)
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, warmup), total, end_value=0.0)
    if cfg.schedule == "triangular":
        warmup = max(1, int(cfg.warmup_frac * total))
        return optax.join_schedules([optax.linear_schedule(0.2 * cfg.lr, cfg.lr, warmup),
                                     optax.linear_schedule(cfg.lr, 0.07 * cfg.lr, max(1, total - warmup))], [warmup])
    raise ValueError(f"unknown schedule {cfg.schedule!r}; expected constant, onecycle, cosine or triangular")


def create_optimizer(cfg: OptimConfig, learning_rate_fn: optax.Schedule,
                     frozen: Callable[[tuple], bool] | None = None) -> optax.GradientTransformation:  # fmt: skip
    """The config's optimizer; params for which `frozen(path)` holds get no update at all."""
    tx = _optimizer(cfg, learning_rate_fn)
    if frozen is None:
        return tx

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if frozen(path) else "train", params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def frozen_params(cfg: ModelConfig) -> Callable[[tuple], bool] | None:
    """Which params a model config keeps fixed: the whitening conv of init="whiten"."""
    if cfg.init != "whiten":
        return None
    return lambda path: getattr(path[0], "key", None) == "Conv_0"


def label_smoothing(cfg: TrainConfig) -> float:
    """The training loss's label smoothing: the defense's own for adversarial training, if set."""
    if defenses.get(cfg.defense.name).adversarial and cfg.defense.adv_label_smoothing is not None:
        return cfg.defense.adv_label_smoothing
    return cfg.optim.label_smoothing


def _optimizer(cfg: OptimConfig, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    if cfg.optimizer == "adam_l2":
        # torch.optim.Adam(weight_decay=wd): wd * param is added to the gradient, then Adam.
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(learning_rate_fn))
    if cfg.optimizer == "adamw":
        return optax.adamw(learning_rate_fn, weight_decay=cfg.weight_decay, mask=_kernels)
    if cfg.optimizer == "sgd_nesterov":
        # PyTorch's SGD(nesterov=True, weight_decay=wd) on kernels; biases and BatchNorm
        # shifts step `bias_lr_scale` times farther (airbench's bias scaler).
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_kernels),
                           optax.sgd(learning_rate_fn, momentum=cfg.momentum, nesterov=True),
                           optax.masked(optax.scale(cfg.bias_lr_scale), _biases))  # fmt: skip
    if cfg.optimizer == "muon":
        from optax.contrib import MuonDimensionNumbers, muon

        def conv_dims(params):  # a conv kernel (kh, kw, in, out) is a (kh*kw*in) x out matrix
            return jax.tree.map(lambda a: MuonDimensionNumbers((0, 1, 2), 3) if a.ndim == 4 else None, params)

        ratio = cfg.adam_lr / cfg.lr
        return muon(learning_rate_fn, beta=cfg.momentum, weight_decay=cfg.weight_decay,
                    adam_learning_rate=lambda t: ratio * learning_rate_fn(t), adam_weight_decay=cfg.weight_decay,
                    muon_weight_dimension_numbers=conv_dims)  # fmt: skip
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adam_l2, adamw, sgd_nesterov or muon")


def _kernels(params):
    # Decay kernels only: decaying biases and BatchNorm shifts/scales just fights the normalization.
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _biases(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "bias", params)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: PRNGKey, image_shape=(32, 32, 3),
                       *, ema: bool = False):  # fmt: skip
    variables = jax.jit(functools.partial(model.init, train=False))(key, jnp.zeros((1, *image_shape), jnp.float32))
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params) if ema else None, model=model, tx=tx,
    )  # fmt: skip


def make_augment(cfg: TrainConfig) -> Callable[[PRNGKey, Array], Array] | None:
    """The config's per-batch augmentation `(key, x) -> x` (crop after padding, random flip), or None.

    With `cfg.flip == "alternate"` the flips are not in here: `train_step` applies them
    from each example's index and the epoch (`alternate_flip_steps`)."""
    if cfg.flip not in ("random", "alternate"):
        raise ValueError(f"unknown flip {cfg.flip!r}; expected 'random' or 'alternate'")
    return functools.partial(_augment, pad=cfg.pad, pad_mode=cfg.pad_mode, flip=cfg.flip == "random") \
        if cfg.augment else None  # fmt: skip


def alternate_flips(key: PRNGKey, index: Array, epoch: Array) -> Array:
    """bool[B]: a random flip per example in epoch 0, the opposite of the last one's after."""
    first = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i)))(index)
    return first ^ (epoch % 2 == 1)


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
    batch_transform: BatchTransform = defenses.identity_transform,
    batch_sharding=None,
    alternate_flip_steps: int = 0,
    ema: float = 0.0,
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
      alternate_flip_steps: steps per epoch when flips alternate per example across
        epochs (`alternate_flips`); 0: none here (`augment_fn` flips, or nothing does).
      ema: decay of `state.ema_params`, ramped up as min(ema, (1 + t) / (10 + t)).

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
    if alternate_flip_steps:
        flip = alternate_flips(jax.random.fold_in(key, 0x5EED), idx, state.step // alternate_flip_steps)
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
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
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 step counts with float schedules
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
        t = state.step.astype(jnp.float32)
        d = jnp.minimum(ema, (1.0 + t) / (10.0 + t))
        ema_params = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)
    n = jnp.asarray(y.shape[0], jnp.float32)
    metrics = {
        "loss": loss * n,
        "correct": jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32),
        "count": n,
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state,
                              ema_params=ema_params)  # fmt: skip
    return new_state, metrics


def recompute_batch_stats(model: nn.Module, params, batch_stats, batches_u8: Array):
    """BatchNorm statistics of `params` itself: the mean over `batches_u8` (u8[K,B,H,W,C])
    of each batch's statistics in training mode. The moving average of the weights is a
    network of its own, and the running statistics of the raw weights do not fit it."""
    if not batch_stats:
        return batch_stats
    exact = model.clone(bn_momentum=0.0)  # the running statistics become the batch's own

    def one(_, xb):
        _, updates = exact.apply({"params": params, "batch_stats": batch_stats}, to_float(xb), train=True,
                                 mutable=["batch_stats"])  # fmt: skip
        return None, updates["batch_stats"]

    _, stats = jax.lax.scan(one, None, batches_u8)
    return jax.tree.map(lambda a: a.mean(0), stats)


# ---------------------------------------------------------------------------------------
# Early stopping and the catastrophic-overfitting guard: a pure update per epoch
# ---------------------------------------------------------------------------------------


class Stopping(NamedTuple):
    """Early-stopping state. `score`: lower is better (validation loss, or minus robust accuracy)."""

    best_score: float = math.inf
    bad_epochs: int = 0


def update_stopping(s: Stopping, score: float, *, patience: int, co_guard: float = 0.0,
                    robust: bool = False) -> tuple[Stopping, bool, str | None]:  # fmt: skip
    """One epoch's verdict.

    Returns:
      (new state, improved, reason to stop or None). `improved`: this epoch's params are
      the best so far. Stops after `patience` epochs without improvement (0: never), or,
      when the score is minus robust accuracy and `co_guard > 0`, as soon as robust accuracy
      falls `co_guard` points below its best: catastrophic overfitting (Wong et al. 2020).
    """
    collapsed = robust and co_guard > 0 and score > s.best_score + co_guard
    improved = score < s.best_score
    s = Stopping(score, 0) if improved else Stopping(s.best_score, s.bad_epochs + 1)
    if collapsed:
        return s, improved, f"robust validation accuracy fell by more than {co_guard:g} points: catastrophic overfitting"
    if patience and s.bad_epochs >= patience:
        return s, improved, f"early stop: the validation score has not improved for {patience} epochs"
    return s, improved, None


# ---------------------------------------------------------------------------------------
# fit: the one training loop
# ---------------------------------------------------------------------------------------


def _lr(lr_fn, step: int) -> float:
    with jax.numpy_dtype_promotion("standard"):  # optax schedules mix int counts and floats
        return float(lr_fn(step))


class FitResult(NamedTuple):
    state: TrainState  # final state, with the best-validation params restored
    history: list  # one dict per epoch
    stopped_early: bool


@dataclasses.dataclass
class _Run:
    """The loop's mutable bookkeeping, kept in one place (and in every checkpoint)."""

    state: TrainState
    best: dict  # {"params", "batch_stats"}: a copy of the best params so far
    stopping: Stopping
    history: list
    start_epoch: int = 0
    stopped_early: bool = False


def _copy_best(variables: dict) -> dict:
    # The step donates the state's buffers, so the best params must be a copy, not an alias.
    return {"params": jax.tree.map(jnp.copy, variables["params"]),
            "batch_stats": jax.tree.map(jnp.copy, variables.get("batch_stats", {}))}  # fmt: skip


def _checkpoint_tree(state: TrainState, best: dict, key) -> dict:
    tree = {
        "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
        "step": state.step, "best_params": best["params"], "best_batch_stats": best["batch_stats"],
        "key": jax.random.key_data(key),
    }  # fmt: skip
    if state.ema_params is not None:
        tree["ema_params"] = state.ema_params
    return tree


def _restore(run: _Run, cfg: TrainConfig, ckpt_dir: str, key, expected: dict, log) -> _Run:
    """The run as its latest checkpoint left it; refuses a checkpoint of another config or data."""
    template = _checkpoint_tree(run.state, run.best, key)
    _, tree, meta = checkpoint.restore(ckpt_dir, template)
    if TrainConfig.from_dict(meta.get("config", {})) != cfg:
        raise checkpoint.CheckpointError(
            f"checkpoint in {ckpt_dir} was written with a different config; use a new --out or the same config")
    # Same data and seed too, or the continuation is not the run that was interrupted.
    for k, v in expected.items():
        if k in meta and meta[k] != io.json_safe(v):
            raise checkpoint.CheckpointError(
                f"checkpoint in {ckpt_dir} was written with {k}={meta[k]!r}, not {v!r}; use a new --out")
    state = run.state.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                              opt_state=tree["opt_state"], ema_params=tree.get("ema_params"))  # fmt: skip
    best_score = meta.get("best_score", meta.get("best_val_loss"))
    stopped = bool(meta.get("stopped_early"))
    log(f"resumed from {ckpt_dir} after epoch {meta['epoch'] + 1}")
    return _Run(state=state, best={"params": tree["best_params"], "batch_stats": tree["best_batch_stats"]},
                stopping=Stopping(math.inf if best_score in (None, "inf") else float(best_score), meta["bad_epochs"]),
                history=meta["history"], start_epoch=cfg.epochs if stopped else meta["epoch"] + 1,
                stopped_early=stopped)  # fmt: skip


def _run_epoch(step_fn, state, data, perm, train_key, *, steps: int, log_every: int, desc: str, progress: bool):
    """One epoch of steps; metrics are fetched every `log_every` steps, never per step."""
    from tqdm.auto import tqdm  # side effects stay in the loop

    images, labels = data
    t0 = time.perf_counter()
    window: list[dict] = []
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for i in range(steps):
        state, metrics = step_fn(state, images, labels, perm, jnp.int32(i), train_key)
        window.append(metrics)
        if len(window) == log_every or i == steps - 1:
            for m in jax.device_get(window):  # the only host sync in the step loop
                for k in totals:
                    totals[k] += float(m[k])
            if not math.isfinite(totals["loss"]):
                raise FloatingPointError(f"non-finite training loss in {desc} before step {i + 1}")
            bar.set_postfix(loss=f"{totals['loss'] / totals['count']:.3f}",
                            acc=f"{100 * totals['correct'] / totals['count']:.1f}%",
                            img_s=f"{totals['count'] / (time.perf_counter() - t0):.0f}")  # fmt: skip
            bar.update(len(window))
            window = []
    bar.close()
    return state, totals, time.perf_counter() - t0


def _epoch_log(record: dict, epochs: int) -> str:
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy_pct']:.2f}%"
            + (f", val loss {record['val_loss']:.4f} acc {record['val_accuracy_pct']:.2f}%" if "val_loss" in record
               else "")
            + (f", val PGD acc {record['val_robust_accuracy_pct']:.2f}%" if "val_robust_accuracy_pct" in record
               else "")
            + f", {record['seconds']:.1f}s, {record['img_per_s']:.0f} img/s")  # fmt: skip


def _validate(run: _Run, cfg: TrainConfig, record: dict, variables: dict, val, deployed, monitor,
              log) -> str | None:  # fmt: skip
    """Score the epoch's `variables` on validation data, update the best params; the reason
    to stop, or None."""
    if val is None:
        run.best = _copy_best(variables)
        return None
    v = evaluation.evaluate(deployed, variables, *val)
    record.update(val_loss=v["loss"], val_accuracy_pct=v["accuracy_pct"])
    score = v["loss"]
    if monitor is not None:
        record["val_robust_accuracy_pct"] = monitor(distributed.local(variables))
        score = -record["val_robust_accuracy_pct"]
    run.stopping, improved, reason = update_stopping(run.stopping, score, patience=cfg.patience,
                                                     co_guard=cfg.defense.co_guard, robust=monitor is not None)
    if improved:
        run.best = _copy_best(variables)
    return reason


def fit(
    cfg: TrainConfig,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray | None,
    val_labels: np.ndarray | None,
    *,
    key: PRNGKey,
    num_classes: int = 10,
    defense: defenses.Resolved | None = None,
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
      defense: the config's defense, resolved (default: `defenses.resolve(cfg.defense, ...)`):
        its batch transform runs in every step, validation sees inputs as the defense
        deploys them, and its monitor (robust validation accuracy) replaces the validation
        loss as the score when present (Rice et al. 2020).
      ckpt_dir: where to write checkpoints (None: don't).
      resume: continue from the latest checkpoint in `ckpt_dir`.
      extra_meta: JSON-serializable extras stored with each checkpoint (e.g. data source).
      progress: show a tqdm progress bar per epoch.
      log: called with a one-line summary per epoch.
    """
    n = len(train_labels)
    steps = n // cfg.batch_size
    if steps == 0:
        raise ValueError(f"training set ({n}) is smaller than one batch ({cfg.batch_size})")
    init_key, data_key, train_key = jax.random.split(key, 3)
    model = create_model(cfg, num_classes)
    lr_fn = create_learning_rate_fn(cfg.optim, cfg.epochs * steps)
    state = create_train_state(model, create_optimizer(cfg.optim, lr_fn, frozen_params(cfg.model)), init_key,
                               train_images.shape[1:], ema=cfg.optim.ema > 0)  # fmt: skip
    if cfg.model.init == "whiten":
        v = whiten_and_dirac(state.variables, model, train_images)
        ema = jax.tree.map(jnp.copy, v["params"]) if state.ema_params is not None else None  # not an alias: donated
        state = state.replace(params=v["params"], ema_params=ema)
    if defense is None:
        defense = defenses.resolve(cfg.defense, make_apply(model), val_images, val_labels)
    run = _Run(state=state, best=_copy_best(state.variables), stopping=Stopping(), history=[])
    expected = {"n_train": n, **(extra_meta or {})}
    if resume and ckpt_dir and checkpoint.latest_step(ckpt_dir) is not None:
        run = _restore(run, cfg, ckpt_dir, train_key, expected, log)

    mesh = parallel.batch_mesh()
    parallel.check_divisible(cfg.batch_size, mesh)
    repl = parallel.replicated(mesh)
    step_fn = jax.jit(functools.partial(
        train_step, batch_size=cfg.batch_size, label_smoothing=label_smoothing(cfg),
        augment_fn=make_augment(cfg), batch_transform=defense.batch_transform,
        batch_sharding=parallel.batch_sharded(mesh) if mesh.devices.size > 1 else None,
        alternate_flip_steps=steps if cfg.augment and cfg.flip == "alternate" else 0, ema=cfg.optim.ema,
    ), donate_argnums=(0,))  # fmt: skip
    bn_batches = min(cfg.optim.ema_bn_batches, steps)
    ema_stats = jax.jit(lambda params, stats, images, perm: recompute_batch_stats(
        model, params, stats, images[perm[:bn_batches * cfg.batch_size]].reshape(
            bn_batches, cfg.batch_size, *images.shape[1:])))  # fmt: skip
    deployed = defense.deployed(make_apply(model))
    val = (val_images, val_labels) if val_labels is not None and len(val_labels) else None
    # Every process holds the same host data and puts it only on its own devices; with
    # one process this is a plain replicated device_put.
    run.state = distributed.replicate(run.state, repl)
    data = distributed.replicate((train_images, train_labels), repl)
    progress = progress and distributed.is_primary()

    for epoch in range(run.start_epoch, cfg.epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n), np.int32)
        run.state, totals, seconds = _run_epoch(step_fn, run.state, data, distributed.replicate(perm, repl),
                                                train_key, steps=steps, log_every=cfg.log_every,
                                                desc=f"epoch {epoch + 1}/{cfg.epochs}", progress=progress)  # fmt: skip
        record = {"epoch": epoch + 1, "train_loss": totals["loss"] / totals["count"],
                  "train_accuracy_pct": 100 * totals["correct"] / totals["count"],
                  "lr": _lr(lr_fn, int(run.state.step) - 1), "seconds": seconds,
                  "img_per_s": totals["count"] / seconds}  # fmt: skip
        variables = run.state.variables
        if run.state.ema_params is not None:  # the average, with BatchNorm statistics of its own
            variables = variables_of(run.state.ema_params, ema_stats(run.state.ema_params, run.state.batch_stats,
                                                                     data[0], distributed.replicate(perm, repl)))
        reason = _validate(run, cfg, record, variables, val, deployed, defense.monitor, log)
        run.stopped_early = reason is not None
        record["stopped_early"] = run.stopped_early
        run.history.append(record)
        log(_epoch_log(record, cfg.epochs))
        if ckpt_dir:
            meta = {"config": cfg.to_dict(), "epoch": epoch, "history": run.history, "num_classes": num_classes,
                    "image_shape": list(train_images.shape[1:]), "best_score": run.stopping.best_score,
                    "bad_epochs": run.stopping.bad_epochs, "stopped_early": run.stopped_early, **expected}
            checkpoint.save(ckpt_dir, epoch, _checkpoint_tree(run.state, run.best, train_key), io.json_safe(meta))
        if reason:
            log(reason)
            break

    # The best params as this process's own copies: evaluation, attacks and plots run
    # per process (global arrays of a multi-process run would not mix with local inputs).
    state = run.state.replace(params=distributed.local(run.best["params"]),
                              batch_stats=distributed.local(run.best["batch_stats"]))
    return FitResult(state=state, history=run.history, stopped_early=run.stopped_early)


# ---------------------------------------------------------------------------------------
# Entry points: train a run directory, load one back
# ---------------------------------------------------------------------------------------


class TrainResult(NamedTuple):
    apply_fn: Callable  # the model's eval-mode apply (undefended)
    variables: dict  # best-validation variables
    history: list
    summary: dict  # test accuracy of the deployed model, epochs, seconds, config


def train_and_evaluate(cfg: TrainConfig, splits, workdir: str | Path, *, seed: int = 0, resume: bool = False,
                       progress: bool = True, log: Callable[[str], None] = lambda s: None,
                       environment: dict | None = None) -> TrainResult:  # fmt: skip
    """Train `cfg` on `splits` into `workdir` and evaluate the deployed model on the test split.

    Writes WORKDIR/checkpoints/ (every epoch), history.json, curves.png and summary.json.
    With `resume`, an interrupted run continues; a finished one is loaded, not retrained.

    Args:
      cfg: the training config (its defense is resolved here, once).
      splits: `jaxadv.data.Splits`.
      workdir: the run directory.
      seed: root seed of init, data order, augmentation and training-time attacks.
      resume: continue from WORKDIR/checkpoints if it holds a run of this config.
      progress, log: progress bars and one-line messages.
      environment: provenance block stored in summary.json (default: `io.environment()`).

    Returns:
      `TrainResult(apply_fn, variables, history, summary)`.
    """
    from jaxadv import plots

    workdir = Path(workdir)
    num_classes = len(splits.class_names)
    apply_fn = make_apply(create_model(cfg, num_classes))
    defense = defenses.resolve(cfg.defense, apply_fn, splits.val.images, splits.val.labels)
    t0 = time.perf_counter()
    result = fit(cfg, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                 key=jax.random.key(seed), num_classes=num_classes, defense=defense,
                 ckpt_dir=str(workdir / "checkpoints"), resume=resume,
                 extra_meta={"data": splits.source, "seed": seed, "class_names": list(splits.class_names)},
                 progress=progress, log=log)  # fmt: skip
    wall = time.perf_counter() - t0
    io.write_json(workdir / "history.json", result.history)
    plots.training_curves({cfg.name: result.history}, workdir / "curves.png")
    deployed = defense.deployed(apply_fn)
    summary = evaluation.evaluate(deployed, result.state.variables, splits.test.images, splits.test.labels)
    tta = evaluation.evaluate(evaluation.flip_tta(deployed), result.state.variables, splits.test.images,
                              splits.test.labels)  # fmt: skip
    summary["flip_tta_accuracy_pct"] = tta["accuracy_pct"]  # reported beside, never instead of, single-view
    history = result.history
    summary.update(epochs=len(history), seconds=sum(h["seconds"] for h in history), wall_seconds_this_invocation=wall,
                   train_img_per_s=float(np.median([h["img_per_s"] for h in history])) if history else None,
                   stopped_early=result.stopped_early, config=cfg.to_dict(), data=splits.source, split="test",
                   seed=seed, environment=environment or io.environment())  # fmt: skip
    io.write_json(workdir / "summary.json", summary)
    return TrainResult(apply_fn, result.state.variables, history, summary)


def load_trained(ckpt_dir: str, *, which: str = "best"):
    """Rebuild a trained model from its checkpoint directory alone (the config is stored in it).

    Args:
      ckpt_dir: a `checkpoints/` directory written by `fit` (jaxadv 0.1 ones too), or of a
        pretrained model (`jaxadv.pretrained`; its checksum is verified first).
      which: "best" (best-validation params, what `fit` returns) or "last" (a pretrained
        model has only its best).

    Returns:
      (apply_fn, variables, cfg, meta): `apply_fn(variables, x) -> logits` of the model
      without its deploy transform (see `defenses.deployed_apply(cfg.defense, apply_fn)`).
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', not {which!r}")
    _, meta = checkpoint.read_meta(ckpt_dir)
    if "config" not in meta:
        raise checkpoint.CheckpointError(f"{ckpt_dir} is not a jaxadv training checkpoint (no config stored)")
    cfg = TrainConfig.from_dict(meta["config"])
    model = create_model(cfg, meta.get("num_classes", 10))
    tx = create_optimizer(cfg.optim, create_learning_rate_fn(cfg.optim, 1), frozen_params(cfg.model))
    image_shape = tuple(meta.get("image_shape", (32, 32, 3)))
    shapes = jax.eval_shape(lambda: create_train_state(model, tx, jax.random.key(0), image_shape,
                                                       ema=cfg.optim.ema > 0))  # fmt: skip
    if meta.get("format") == pretrained.FORMAT:  # best params only, checked against its model card
        pretrained.verify(ckpt_dir)
        template = {"best_params": shapes.params, "best_batch_stats": shapes.batch_stats}
        which = "best"
    else:
        template = _checkpoint_tree(shapes, {"params": shapes.params, "batch_stats": shapes.batch_stats},
                                    jax.random.key(0))  # fmt: skip
    _, tree, meta = checkpoint.restore(ckpt_dir, template)
    prefix = "best_" if which == "best" else ""
    return make_apply(model), variables_of(tree[f"{prefix}params"], tree[f"{prefix}batch_stats"]), cfg, meta
