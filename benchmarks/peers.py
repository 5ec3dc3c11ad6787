"""Peer-library implementations of the benchmarked ops, on the same weights as jaxadv.

`to_torch` converts a Flax `jaxadv.models.CNN` and its variables into an equivalent
PyTorch module (same logits to float rounding). `peer_ops(op, ...)` returns, for one op,
`{impl_name: fn}` where `fn()` runs the op once on the whole batch with a peer library
(PyTorch, torchattacks, ART, Foolbox, kornia, SciPy) and returns numpy. All setup (model
conversion, tensor layout, attack objects, optimizers) happens in `peer_ops`, so timing
`fn` times the op itself plus the cheap tensor -> numpy conversion of its output.

Peers are optional: they are imported on first use, `missing()` says which ones fail to
import and why, and `peer_ops` leaves their implementations out.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import os
from typing import Any, Callable

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.models import CNN, make_apply

# Import names of the peer packages ("art" is adversarial-robustness-toolbox). torch comes
# first so that `_load` configures its thread pool before any other peer imports it.
PEERS = ("torch", "torchattacks", "art", "foolbox", "kornia", "scipy")

OPS = (
    "forward", "input_grad", "train_step", "fgsm", "deepfool",
    "median3x3_f32", "median3x3_u8", "median2x2_f32", "median2x2_u8",
)  # fmt: skip

DEEPFOOL_DEFAULTS = {"num_candidates": 10, "overshoot": 0.02, "max_iter": 50}


@functools.cache
def _load(name: str) -> Any:
    """The imported peer module, or the exception its import raised."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001  peers also fail with version clashes, not only ImportError
        return e
    if name == "torch":
        # PyTorch's default intra-op pool may be smaller than the machine; XLA uses every core.
        # On cores busy with other work these OpenMP threads spin and run 10-100x slower
        # (measured on 2 busy cores), so time peers on an idle machine.
        module.set_num_threads(os.cpu_count())
    return module


def missing() -> dict[str, str]:
    """Peer packages that cannot be imported: {import name: error text}."""
    failed = {name: _load(name) for name in PEERS}
    return {name: f"{type(e).__name__}: {e}" for name, e in failed.items() if isinstance(e, Exception)}


def _torch():
    torch = _load("torch")
    if isinstance(torch, Exception):
        raise ImportError(f"PyTorch is not available: {torch}") from torch
    return torch


# ---------------------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------------------


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    """[B,H,W,C] -> C-contiguous [B,C,H,W] numpy array."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


def to_nhwc_numpy(t) -> np.ndarray:
    """A [B,C,H,W] torch tensor (any memory format) -> C-contiguous [B,H,W,C] numpy array."""
    return np.ascontiguousarray(t.detach().permute(0, 2, 3, 1).cpu().numpy())


def images_to_torch(x: np.ndarray, channels_last: bool = False):
    """[B,H,W,C] numpy -> [B,C,H,W] torch tensor in torch's contiguous or channels_last format.

    The permuted view of an NHWC array already *is* channels_last in memory, so that case
    costs no copy.
    """
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# Flax CNN -> PyTorch
# ---------------------------------------------------------------------------------------


@functools.cache
def _normalize_class():
    """The `Normalize` torch module class (defined lazily: torch is optional)."""
    torch = _torch()

    class Normalize(torch.nn.Module):
        """Per-channel `(x - mean) / std` of NCHW input, as in `CNN.__call__`."""

        def __init__(self, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    return Normalize


def to_torch(model: CNN, variables: Any, channels_last: bool = False):
    """The PyTorch twin of a `jaxadv.models.CNN` with the same weights, in eval mode.

    Layers map one to one: Conv (kernel HWIO -> weight OIHW), BatchNorm (scale/bias ->
    weight/bias, weight 1 without a learned scale; running mean/var from `batch_stats`,
    Flax's eps and momentum), ReLU, 2x2 max pool, Flatten, Dense (kernel [in,out] -> weight
    [out,in]). Flax flattens NHWC activations in (h, w, c) order and torch flattens NCHW in
    (c, h, w) order, so the rows
    of the first Dense kernel are permuted instead of the activations: the result is the
    natural torch model. Computation is float32 whatever `model.dtype` is.

    Args:
      model: the Flax CNN (any widths/head, norm None or "batch").
      variables: its variables dict {'params': ..., maybe 'batch_stats': ...}.
      channels_last: convert the conv weights to torch's channels_last memory format.

    Returns:
      A float32 `torch.nn.Sequential` in eval mode mapping f32[B,3,H,W] in [0,1] to
      f32[B,K] logits (normalization included).
    """
    torch = _torch()
    nn = torch.nn
    if model.norm not in (None, "batch"):
        raise ValueError(f"unknown norm {model.norm!r}; expected None or 'batch'")
    params, stats = variables["params"], variables.get("batch_stats", {})

    def assign(param, value):
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.array(value, np.float32)))  # a writable copy

    # Flax modules of one type are numbered in call order: Conv_0, Conv_1, ..., Dense_0, ...
    layers = [_normalize_class()(model.mean, model.std)]
    conv_index = 0
    for width in model.widths:
        for _ in range(2):
            name = f"Conv_{conv_index}"
            kernel = np.asarray(params[name]["kernel"])  # [3,3,in,out]
            conv = nn.Conv2d(kernel.shape[2], width, 3, padding=1, bias=model.norm is None)
            assign(conv.weight, kernel.transpose(3, 2, 0, 1))
            layers.append(conv)
            if model.norm is None:
                assign(conv.bias, params[name]["bias"])
            else:
                bn_name = f"BatchNorm_{conv_index}"
                # CNN keeps Flax's default epsilon and sets momentum 0.9 (torch counts the other way).
                bn = nn.BatchNorm2d(width, eps=flax.linen.BatchNorm.epsilon, momentum=1.0 - 0.9)
                # Without a learned scale (`bn_scale=False`, the quick preset) the scale is 1.
                assign(bn.weight, params[bn_name].get("scale", np.ones((width,), np.float32)))
                assign(bn.bias, params[bn_name]["bias"])
                assign(bn.running_mean, stats[bn_name]["mean"])
                assign(bn.running_var, stats[bn_name]["var"])
                layers.append(bn)
            layers.append(nn.ReLU())
            conv_index += 1
        layers.append(nn.MaxPool2d(2))
    layers.append(nn.Flatten())

    for i in range(len(model.head) + 1):
        kernel = np.asarray(params[f"Dense_{i}"]["kernel"])  # [in,out]
        fan_in, fan_out = kernel.shape
        weight = kernel.T
        if i == 0:
            channels = model.widths[-1]
            side = math.isqrt(fan_in // channels)
            if side * side * channels != fan_in:
                raise ValueError(f"cannot infer a square feature map from {fan_in} inputs and {channels} channels")
            # rows in (h, w, c) order -> columns in (c, h, w) order
            weight = kernel.reshape(side, side, channels, fan_out).transpose(3, 2, 0, 1).reshape(fan_out, fan_in)
        dense = nn.Linear(fan_in, fan_out)
        assign(dense.weight, weight)
        assign(dense.bias, params[f"Dense_{i}"]["bias"])
        layers.append(dense)
        if i < len(model.head):
            layers.append(nn.ReLU())

    net = nn.Sequential(*layers).float().eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


# ---------------------------------------------------------------------------------------
# Peer ops
# ---------------------------------------------------------------------------------------


def _art_classifier(net, x: np.ndarray, num_classes: int):
    from art.estimators.classification import PyTorchClassifier

    torch = _torch()
    return PyTorchClassifier(
        model=net, loss=torch.nn.CrossEntropyLoss(), input_shape=(x.shape[3], x.shape[1], x.shape[2]),
        nb_classes=num_classes, clip_values=(0.0, 1.0), channels_first=True, device_type="cpu",
    )  # fmt: skip


def _model_ops(op, model, variables, x, y, eps, deepfool, channels_last, have) -> dict[str, Callable[[], Any]]:
    """The ops on the classifier: forward, input_grad, train_step, fgsm, deepfool."""
    ops: dict[str, Callable[[], Any]] = {}
    if op == "fgsm" and "foolbox" in have:
        import foolbox as fb

        # Foolbox's JAX backend (eagerpy 0.30) works with jax 0.10. The model is jitted, as
        # a JAX user would do; Foolbox's loss and value_and_grad around it run eagerly.
        apply_jit = jax.jit(make_apply(model))
        fmodel_jax = fb.JAXModel(lambda z: apply_jit(variables, z), bounds=(0, 1))
        x_jax, y_jax = jnp.asarray(x), jnp.asarray(y, jnp.int32)
        attack = fb.attacks.FGSM()
        ops["foolbox-jax"] = lambda: np.asarray(attack(fmodel_jax, x_jax, y_jax, epsilons=eps)[1])
    if "torch" not in have:
        return ops

    torch = _torch()
    F = torch.nn.functional
    net = to_torch(model, variables, channels_last)
    xt = images_to_torch(x, channels_last)
    yt = None if y is None else torch.from_numpy(np.asarray(y, np.int64))
    x_nchw = nhwc_to_nchw(x) if op in ("fgsm", "deepfool") else None  # ART's input: numpy NCHW

    if op == "forward":

        def forward():
            with torch.inference_mode():
                return net(xt).numpy()

        ops["pytorch"] = forward
    elif op == "input_grad":
        x_leaf = xt.clone().requires_grad_(True)

        def input_grad():
            loss = F.cross_entropy(net(x_leaf), yt, reduction="sum")
            # Only the input gradient: autograd prunes the weight gradients.
            (grad,) = torch.autograd.grad(loss, x_leaf)
            return to_nhwc_numpy(grad)

        ops["pytorch"] = input_grad
    elif op == "train_step":
        train_net = copy.deepcopy(net).train()
        opt = torch.optim.Adam(train_net.parameters(), lr=1e-3, weight_decay=5e-4)

        def train_step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(train_net(xt), yt)
            loss.backward()
            opt.step()
            return loss.detach().numpy()

        ops["pytorch"] = train_step
    elif op == "fgsm":
        if "torchattacks" in have:
            import torchattacks

            ta_fgsm = torchattacks.FGSM(net, eps=eps)
            ops["torchattacks"] = lambda: to_nhwc_numpy(ta_fgsm(xt, yt))
        if "art" in have:
            from art.attacks.evasion import FastGradientMethod

            art_fgsm = FastGradientMethod(
                _art_classifier(net, x, model.num_classes), norm=np.inf, eps=eps, batch_size=len(x)
            )
            y_np = np.asarray(y)
            ops["art"] = lambda: np.ascontiguousarray(art_fgsm.generate(x_nchw, y=y_np).transpose(0, 2, 3, 1))
        if "foolbox" in have:
            import foolbox as fb

            fmodel = fb.PyTorchModel(net, bounds=(0, 1), device="cpu")
            fb_fgsm = fb.attacks.FGSM()
            ops["foolbox"] = lambda: to_nhwc_numpy(fb_fgsm(fmodel, xt, yt, epsilons=eps)[1])
    elif op == "deepfool":
        p = {**DEEPFOOL_DEFAULTS, **(deepfool or {})}
        # DeepFool's reference class is the prediction at x (as in jaxadv.attacks.deepfool
        # and ART). Foolbox and torchattacks take it from their labels argument, so they
        # get the predictions; `y` is not used.
        with torch.inference_mode():
            pred = net(xt).argmax(-1)
        if "foolbox" in have:
            import foolbox as fb

            fmodel = fb.PyTorchModel(net, bounds=(0, 1), device="cpu")
            fb_df = fb.attacks.L2DeepFoolAttack(
                steps=p["max_iter"], candidates=p["num_candidates"], overshoot=p["overshoot"], loss="logits"
            )
            ops["foolbox"] = lambda: to_nhwc_numpy(fb_df(fmodel, xt, pred, epsilons=None)[0])
        if "torchattacks" in have:
            import torchattacks

            # torchattacks considers every class as a candidate (no num_candidates), loops
            # over examples, and applies the overshoot per step.
            ta_df = torchattacks.DeepFool(net, steps=p["max_iter"], overshoot=p["overshoot"])
            ops["torchattacks"] = lambda: to_nhwc_numpy(ta_df(xt, pred))
        if "art" in have:
            from art.attacks.evasion import DeepFool

            art_df = DeepFool(
                _art_classifier(net, x, model.num_classes), max_iter=p["max_iter"], epsilon=p["overshoot"],
                nb_grads=p["num_candidates"], batch_size=len(x), verbose=False,
            )  # fmt: skip
            ops["art"] = lambda: np.ascontiguousarray(art_df.generate(x_nchw).transpose(0, 2, 3, 1))
    return ops


def _median_ops(op: str, x: np.ndarray, channels_last: bool, have) -> dict[str, Callable[[], Any]]:
    """scipy / ART / kornia median filters; "median{k}x{k}_{f32|u8}"."""
    size = int(op[len("median")])
    u8 = op.endswith("_u8")
    xs = (x * 255).round().astype(np.uint8) if u8 else np.asarray(x, np.float32)
    ops: dict[str, Callable[[], Any]] = {}
    if "scipy" in have:
        from scipy import ndimage

        ops["scipy"] = lambda: ndimage.median_filter(xs, size=(1, size, size, 1), mode="reflect")
    if "art" in have:
        from art.defences.preprocessor import SpatialSmoothing

        # ART calls scipy.ndimage.median_filter(mode="reflect") and clips in place; both
        # work on uint8.
        smoother = SpatialSmoothing(window_size=size, channels_first=False, clip_values=(0, 255) if u8 else (0.0, 1.0))
        ops["art"] = lambda: smoother(xs)[0]
    if "kornia" in have and "torch" in have and size == 3:
        import kornia

        torch = _torch()
        t = images_to_torch(xs, channels_last)
        # kornia's default border "reflect" is torch's whole-sample reflection (scipy's
        # "mirror"). For a 3x3 window, scipy's half-sample "reflect" only ever repeats the
        # edge pixel, which is "replicate"; for 5x5 and up they differ, and kornia has no
        # even windows.
        if u8:
            # kornia filters in float; the median selects an input value, so the round
            # trip through float32 is exact.
            ops["kornia"] = lambda: to_nhwc_numpy(
                kornia.filters.median_blur(t.float(), size, border_type="replicate").to(torch.uint8)
            )
        else:
            ops["kornia"] = lambda: to_nhwc_numpy(kornia.filters.median_blur(t, size, border_type="replicate"))
    return ops


def peer_ops(
    op: str,
    *,
    model: CNN | None,
    variables: Any,
    x: np.ndarray,
    y: np.ndarray | None,
    eps: float = 0.1,
    deepfool: dict | None = None,
    channels_last: bool = True,
) -> dict[str, Callable[[], Any]]:
    """Peer implementations of `op`, each a zero-argument call that runs it once on the batch.

    Impls per op (those whose package is missing are left out):
      forward: "pytorch" (under `torch.inference_mode`) -> f32[B,K] logits.
      input_grad: "pytorch", grad of the batch-summed cross-entropy -> f32[B,H,W,C].
      train_step: "pytorch", one Adam(lr=1e-3, weight_decay=5e-4) step on a train-mode
        copy of the converted model (the copy keeps training across calls) -> f32[] loss.
      fgsm: "torchattacks", "art", "foolbox", "foolbox-jax" (Foolbox driving the jitted
        Flax model) -> f32[B,H,W,C] adversarial images.
      deepfool: L2 DeepFool with `deepfool` hyperparameters (num_candidates, overshoot,
        max_iter; defaults `DEEPFOOL_DEFAULTS`): "foolbox", "torchattacks" (all classes are
        candidates), "art" -> f32[B,H,W,C] adversarial images.
      median{3x3,2x2}_{f32,u8}: "scipy" (`median_filter(size=(1,k,k,1), mode="reflect")`),
        "art" (`SpatialSmoothing`), "kornia" (3x3 only, `median_blur` with replicate
        border, which equals scipy's for 3x3) -> [B,H,W,C] in the op's dtype. The u8 ops
        filter `(x * 255).round().astype(uint8)`.

    Args:
      op: one of `OPS`.
      model: the Flax CNN (None for the median ops).
      variables: its variables dict (None for the median ops).
      x: f32[B,H,W,C] images in [0,1].
      y: int[B] labels, or None for the ops that ignore them (forward, deepfool, median).
      eps: L-inf budget of fgsm.
      deepfool: overrides of `DEEPFOOL_DEFAULTS`.
      channels_last: torch inputs and model in channels_last memory format.

    Returns:
      {impl name: fn}; `fn()` returns numpy, NHWC for images.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if set(deepfool or {}) - set(DEEPFOOL_DEFAULTS):
        raise ValueError(f"deepfool keys must be among {sorted(DEEPFOOL_DEFAULTS)}, got {sorted(deepfool)}")
    if y is None and op in ("input_grad", "train_step", "fgsm"):
        raise ValueError(f"{op} needs labels y")
    have = set(PEERS) - set(missing())
    if op.startswith("median"):
        return _median_ops(op, x, channels_last, have)
    return _model_ops(op, model, variables, x, y, eps, deepfool, channels_last, have)
