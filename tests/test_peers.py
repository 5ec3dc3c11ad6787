"""Tests for benchmarks.peers: the Flax -> PyTorch converter and the peer ops agree with jaxadv.

Skipped when the peers (PyTorch, torchattacks, ART, Foolbox, kornia) are not installed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import peers  # noqa: E402
from jaxadv.attacks import deepfool, fgsm  # noqa: E402
from jaxadv.attacks import summed_cross_entropy  # noqa: E402
from jaxadv.models import CNN, make_apply, tiny_cnn  # noqa: E402
from jaxadv.squeeze import median_filter  # noqa: E402


def random_images(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def random_labels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 10, n).astype(np.int32)


def random_variables(model, seed=0):
    """A variables dict for `model` drawn with numpy: He-normal kernels, random the rest.

    Flax initializes biases to 0, BN scales to 1 and the running mean/var to 0/1, which
    would hide a wrongly mapped bias or statistic; random values make every one count.
    Shapes come from `jax.eval_shape`, so nothing is compiled.
    """
    rng = np.random.default_rng(seed)
    draw = {
        "kernel": lambda s: rng.normal(0.0, np.sqrt(2.0 / np.prod(s[:-1])), s),
        "bias": lambda s: rng.normal(0.0, 0.1, s),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "mean": lambda s: rng.normal(0.0, 0.3, s),
        "var": lambda s: rng.uniform(0.3, 3.0, s),
    }
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3), jnp.float32))  # fmt: skip
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(draw[path[-1].key](a.shape), jnp.float32), shapes
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run torch single-threaded in these tests.

    `peers` gives torch every core, whose OpenMP threads spin badly when the cores are
    busy with other work (10-100x slower measured on 2 busy cores); tiny shapes gain
    nothing from threads.
    """
    peers.missing()  # imports the peers, so `peers` has configured torch before we override it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_logits(net, x, channels_last):
    with torch.inference_mode():
        return net(peers.images_to_torch(x, channels_last)).numpy()


def importorskip_impl(impl):
    """Skip unless the package behind a peer_ops impl name is installed."""
    pytest.importorskip({"pytorch": "torch", "foolbox-jax": "foolbox"}.get(impl, impl))


# ---------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("norm", [None, "batch"])
def test_to_torch_same_logits_tiny(norm, channels_last):
    model = tiny_cnn(norm=norm)
    variables = random_variables(model)
    x = random_images((4, 32, 32, 3))
    net = peers.to_torch(model, variables, channels_last=channels_last)
    assert not net.training
    assert all(p.dtype == torch.float32 for p in net.parameters())
    np.testing.assert_allclose(torch_logits(net, x, channels_last), np.asarray(make_apply(model)(variables, x)),
                               rtol=0, atol=1e-4)  # fmt: skip


def test_to_torch_same_logits_default_widths():
    model = CNN()
    variables = random_variables(model)
    x = random_images((2, 32, 32, 3))
    net = peers.to_torch(model, variables)
    np.testing.assert_allclose(torch_logits(net, x, False), np.asarray(make_apply(model)(variables, x)),
                               rtol=0, atol=1e-4)  # fmt: skip


def test_to_torch_same_logits_of_the_shipped_quick_model():
    """The quick preset's BatchNorm has no learned scale (bn_scale=False): torch's weight is 1."""
    from jaxadv import pretrained, train

    apply_fn, variables, cfg, _ = train.load_trained(str(pretrained.SHIPPED / "quick" / "none" / "checkpoints"))
    assert not cfg.model.bn_scale  # premise: the case this converts
    model = train.create_model(cfg, 10)
    x = random_images((4, 32, 32, 3))
    net = peers.to_torch(model, variables)
    np.testing.assert_allclose(torch_logits(net, x, False), np.asarray(apply_fn(variables, x)), rtol=0, atol=1e-4)


def test_layout_helpers_round_trip():
    x = random_images((2, 5, 7, 3))
    assert peers.nhwc_to_nchw(x).shape == (2, 3, 5, 7)
    for channels_last in (False, True):
        t = peers.images_to_torch(x, channels_last)
        assert t.shape == (2, 3, 5, 7)
        assert t.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        np.testing.assert_array_equal(peers.to_nhwc_numpy(t), x)


# ---------------------------------------------------------------------------------------
# Peer ops on the classifier
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """(model, variables, x f32[8,32,32,3], y int32[8]) with BN, so eval mode matters."""
    model = tiny_cnn(norm="batch")
    return model, random_variables(model), random_images((8, 32, 32, 3)), random_labels(8)


def test_peer_ops_rejects_unknown_op_and_deepfool_keys(tiny):
    model, variables, x, y = tiny
    with pytest.raises(ValueError, match="unknown op"):
        peers.peer_ops("pgd", model=model, variables=variables, x=x, y=y)
    with pytest.raises(ValueError, match="deepfool keys"):
        peers.peer_ops("deepfool", model=model, variables=variables, x=x, y=y, deepfool={"steps": 3})
    assert set(peers.missing()) <= set(peers.PEERS)


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward(tiny, channels_last):
    model, variables, x, y = tiny
    ops = peers.peer_ops("forward", model=model, variables=variables, x=x, y=y, channels_last=channels_last)
    np.testing.assert_allclose(ops["pytorch"](), np.asarray(make_apply(model)(variables, x)), rtol=0, atol=1e-4)


def test_input_grad_equals_jax(tiny):
    model, variables, x, y = tiny
    expected = np.asarray(jax.grad(lambda z: summed_cross_entropy(make_apply(model)(variables, z), y))(x))
    grad = peers.peer_ops("input_grad", model=model, variables=variables, x=x, y=y)["pytorch"]()
    assert grad.shape == x.shape and grad.dtype == np.float32
    # Relative to the gradient's scale: elementwise relative error is ill-posed near 0.
    np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_train_step_updates_a_copy():
    model = tiny_cnn()  # no BN: train-mode logits equal eval-mode ones, so the first loss is checkable
    variables = random_variables(model)
    x, y = random_images((4, 32, 32, 3)), random_labels(4)
    step = peers.peer_ops("train_step", model=model, variables=variables, x=x, y=y)["pytorch"]
    expected = float(summed_cross_entropy(make_apply(model)(variables, x), y)) / len(x)
    first, second = step(), step()
    assert first.shape == () and first.dtype == np.float32
    np.testing.assert_allclose(first, expected, rtol=1e-5)
    assert second != first  # the optimizer updated the training copy
    forward = peers.peer_ops("forward", model=model, variables=variables, x=x, y=y)["pytorch"]
    np.testing.assert_allclose(forward(), np.asarray(make_apply(model)(variables, x)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", ["torchattacks", "art", "foolbox", "foolbox-jax"])
def test_fgsm_equals_jaxadv(tiny, impl):
    importorskip_impl(impl)
    model, variables, x, y = tiny
    eps = 0.03
    apply_fn = make_apply(model)
    expected = np.asarray(fgsm(apply_fn, variables, x, y, eps=eps))
    out = peers.peer_ops("fgsm", model=model, variables=variables, x=x, y=y, eps=eps)[impl]()
    assert out.shape == x.shape and out.dtype == np.float32
    # Peers take the sign of a gradient computed in another framework (and of a mean
    # loss), so a pixel may flip only where the gradient is ~0 relative to its scale.
    differ = np.abs(out - expected) > 1e-6
    assert differ.mean() <= 1e-3
    grad = np.abs(np.asarray(jax.grad(lambda z: summed_cross_entropy(apply_fn(variables, z), y))(x)))
    assert np.all(grad[differ] <= 1e-3 * grad.max())


@pytest.fixture(scope="module")
def deepfool_case():
    """A few images, the peers' DeepFool ops, and jaxadv's result (short max_iter)."""
    model = tiny_cnn()
    variables = random_variables(model, seed=1)
    x = random_images((4, 32, 32, 3), seed=1)
    params = {"num_candidates": 10, "overshoot": 0.02, "max_iter": 20}
    ops = peers.peer_ops("deepfool", model=model, variables=variables, x=x, y=random_labels(4), deepfool=params)
    _, ours = deepfool(make_apply(model), variables, x, return_info=True, **params)
    return model, variables, x, ops, ours


@pytest.mark.parametrize("impl", ["foolbox", "torchattacks", "art"])
def test_deepfool_agrees_with_jaxadv(deepfool_case, impl):
    importorskip_impl(impl)
    model, variables, x, ops, ours = deepfool_case
    x_adv = ops[impl]()
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    logits = make_apply(model)
    success = np.asarray(logits(variables, x_adv)).argmax(-1) != np.asarray(logits(variables, x)).argmax(-1)
    np.testing.assert_array_equal(success, np.asarray(ours.success))
    assert success.all()
    l2 = np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)
    # The peers differ in where the overshoot enters (ART: at the end; torchattacks: per
    # step) and torchattacks uses every class as a candidate, hence a tolerance.
    np.testing.assert_allclose(np.median(l2), np.median(np.asarray(ours.norm)), rtol=0.1)


# ---------------------------------------------------------------------------------------
# Median filters
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op", ["median3x3_f32", "median3x3_u8", "median2x2_f32", "median2x2_u8"])
def test_median_equals_jaxadv(op, channels_last):
    pytest.importorskip("scipy")
    x = random_images((2, 9, 7, 3), seed=3)
    size, u8 = int(op[len("median")]), op.endswith("_u8")
    xs = (x * 255).round().astype(np.uint8) if u8 else x
    expected = np.asarray(median_filter(jnp.asarray(xs), size=size))
    ops = peers.peer_ops(op, model=None, variables=None, x=x, y=None, channels_last=channels_last)
    names = {"scipy"} | ({"art"} - set(peers.missing())) | ({"kornia"} - set(peers.missing()) if size == 3 else set())
    assert set(ops) == names
    for name, fn in ops.items():
        out = fn()
        assert out.dtype == xs.dtype, name
        np.testing.assert_array_equal(out, expected, err_msg=name)
