"""oneDNN's convolutions (cnn_jax.onednn, `conv_kernels="onednn"`) compute the same
function as XLA's: forward pass, input and kernel gradients, under vmap, inside a whole
train step; they repeat bit for bit; where they cannot run, the reason is named and
"auto" keeps XLA's convolutions."""
import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_jax import onednn
from cnn_jax.errors import BadInput
from cnn_jax.models import create_model
from cnn_jax.train import conv_kernels
from cnn_jax.train.conv_kernels import kernel_grads, resolve
from cnn_jax.train.state import TrainState
from cnn_jax.train.steps import make_eval_step, make_optimizer, make_train_step
from cnn_jax.train.config import OptimiserConfig

# The oneDNN wheel is a dependency on x86-64 Linux (pyproject.toml): there these tests
# must run, so a broken build fails them instead of skipping them.
pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"),
    reason="the oneDNN wheel (onednn-cpu-gomp) is installed on x86-64 Linux only")

NHWC = ("NHWC", "HWIO", "NHWC")


def _needs(dtype):
    reason = onednn.why_unavailable(dtype)
    if reason and jnp.dtype(dtype) == jnp.bfloat16 and "no bfloat16" in reason:
        pytest.skip(reason)  # CPUs without AVX-512 (oneDNN 3.2 has no kernels there)
    assert reason is None, reason


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch, size, cin, kernel, strides, padding", [
    (5, 9, 6, 3, (1, 1), ((1, 1), (1, 1))),     # odd batch, ResNet's 3x3 "SAME"
    (3, 8, 6, 3, (2, 2), ((0, 1), (0, 1))),     # ResNet's strided "SAME" convolution
    (9, 7, 6, 1, (2, 2), ((0, 0), (0, 0))),     # 1x1 projection shortcut
    (2, 10, 3, 5, (1, 1), ((2, 2), (2, 2))),    # an RGB stem, 5x5
    (4, 11, 6, 3, (3, 2), ((0, 0), (1, 0))),    # VALID rows, uneven strides and padding
    (2, 23, 3, 11, (4, 4), ((2, 2), (2, 2))),   # AlexNet's conv1 geometry
])
def test_convolution_and_both_gradients_equal_xla(batch, size, cin, kernel, strides, padding,
                                                   dtype):
    _needs(dtype)
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.normal(size=(batch, size, size + 1, cin)), dtype)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, 5)), dtype)
    xla = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
    ours = jax.jit(lambda x, w, dy: jax.vjp(
        lambda x, w: onednn.conv2d(x, w, strides, padding), x, w)[1](dy))
    y, vjp = jax.vjp(xla, x, w)
    dy = jnp.asarray(rng.normal(size=y.shape), dtype)
    y2 = jax.jit(lambda x, w: onednn.conv2d(x, w, strides, padding))(x, w)
    assert y2.shape == y.shape and y2.dtype == y.dtype
    # float32: summation order only; bfloat16: both sum in float32 and round once
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for ref, got in zip((y, *vjp(dy)), (y2, *ours(x, w, dy))):
        assert got.dtype == ref.dtype
        ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


def test_under_vmap_each_member_is_its_own_convolution():
    """Seeds vmapped (each its own images and kernel): the calls run member by member."""
    _needs(jnp.float32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4, 8, 8, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 6, 5)), jnp.float32)
    pads = ((1, 1), (1, 1))
    grads = lambda conv: jax.jit(jax.vmap(jax.grad(
        lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))))
    xla = grads(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pads,
                                                      dimension_numbers=NHWC))
    ours = grads(lambda x, w: onednn.conv2d(x, w, (1, 1), pads))
    for a, b in zip(ours(x, w), xla(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_an_empty_batch_gives_zeros():
    _needs(jnp.float32)
    x, w = jnp.ones((0, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
    f = lambda x, w: onednn.conv2d(x, w, (1, 1), ((1, 1), (1, 1))).sum()
    value, (dx, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
    assert value == 0 and dx.shape == x.shape and (dw == 0).all()


def _resnet8_step(conv):
    model = create_model("resnet8", num_classes=4)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (6, 32, 32, 3)), jnp.uint8),
             "label": jnp.array([0, 1, 2, 3, 0, 1])}
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=1e-4))
    state = TrainState.create(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))), tx,
                              jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, tx, lambda s, w: 0.1, lambda im: im / 255.0,
                                   conv_kernels=conv))
    return step, state, batch


def test_a_train_step_on_onednn_is_xlas_step_and_repeats_bit_for_bit():
    """The same step up to summation order (loss within 1e-6, parameters within 1e-5
    after a step), and run twice from one state it is the same to the bit (resumes and
    the quick run's digits rely on that); the compiled step calls oneDNN for ResNet-8's
    7 convolutions and their gradients, and XLA's convolutions for none."""
    _needs(jnp.float32)
    out = {}
    for conv in ("xla", "onednn"):
        step, state, batch = _resnet8_step(conv)
        out[conv] = step(state, batch)
        if conv == "onednn":
            again = step(state, batch)
            assert all((a == b).all() for a, b in zip(jax.tree.leaves(out[conv]),
                                                      jax.tree.leaves(again)))
            hlo = step.lower(state, batch).compile().as_text()
            calls = [hlo.count(f'custom_call_target="{t}"') for t in onednn.TARGETS.values()]
            assert calls == [7, 6, 7]  # XLA drops the stem's unused input gradient
            assert "convolution(" not in hlo
    np.testing.assert_allclose(out["onednn"][1]["loss"], out["xla"][1]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out["onednn"][0].params),
                    jax.tree.leaves(out["xla"][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_eval_step_takes_the_train_steps_convolutions():
    """With the train step's kernels "onednn", evaluation runs its convolutions on
    oneDNN too: the same logits as XLA's within 1e-4, and no XLA convolution left."""
    _needs(jnp.float32)
    _, state, batch = _resnet8_step("xla")
    model = create_model("resnet8", num_classes=4)
    logits = {}
    for conv in ("xla", "onednn"):
        step = jax.jit(make_eval_step(model, lambda im: im / 255.0, conv))
        logits[conv] = np.asarray(step(state, batch["image"]))
    hlo = step.lower(state, batch["image"]).compile().as_text()
    assert hlo.count(f'custom_call_target="{onednn.TARGETS["forward"]}"') == 7
    assert "convolution(" not in hlo
    np.testing.assert_array_equal(logits["onednn"].argmax(-1), logits["xla"].argmax(-1))
    np.testing.assert_allclose(logits["onednn"], logits["xla"], rtol=1e-4, atol=1e-5)


def test_only_plain_float_convolutions_go_to_onednn():
    """Grouped and dilated convolutions, and float16 ones, stay on XLA's path."""
    _needs(jnp.float32)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), feature_group_count=2, name="grouped")(x)
            x = nn.Conv(8, (3, 3), kernel_dilation=2, name="dilated")(jnp.tanh(x))
            x = nn.Conv(8, (3, 3), dtype=jnp.float16, name="half")(jnp.tanh(x))
            return nn.Conv(4, (3, 3), strides=2, name="plain")(jnp.tanh(x))

    x = jnp.ones((2, 9, 9, 4))
    params = Net().init(jax.random.key(0), x)

    def forward(p):
        with kernel_grads("onednn"):
            return Net().apply(p, x)

    text = str(jax.make_jaxpr(forward)(params))
    assert text.count(onednn.TARGETS["forward"]) == 1
    assert text.count("conv_general_dilated") == 3


def test_auto_takes_onednn_on_cpus_and_falls_back_where_it_cannot_run(monkeypatch):
    for variable in ("CNN_JAX_CONV_KERNELS", "CNN_JAX_CONV_GRAD"):
        monkeypatch.delenv(variable, raising=False)
    _needs(jnp.float32)
    assert resolve("auto") == "onednn" == resolve("auto", seeds=3)
    bf16 = "onednn" if onednn.available(jnp.bfloat16) else "xla"
    assert resolve("auto", dtype="bfloat16") == bf16
    monkeypatch.setenv("CNN_JAX_CONV_KERNELS", "matmul")  # a record of other kernels, repeated
    assert resolve("auto") == "matmul"
    monkeypatch.delenv("CNN_JAX_CONV_KERNELS")
    # where oneDNN cannot run: the products for float32, XLA's own for bfloat16, and
    # asking for it names the reason
    monkeypatch.setattr(onednn, "why_unavailable", lambda dtype=None: "no oneDNN here")
    assert resolve("auto") == "matmul" and resolve("auto", dtype="bfloat16") == "xla"
    with pytest.raises(BadInput, match="--conv-kernels onednn .*: no oneDNN here"):
        resolve("onednn")  # BadInput: the CLIs print it as a bad-input error


def test_what_is_missing_is_named(monkeypatch, tmp_path):
    """No library, no compiler, a failing compiler, an unwritable cache: OnednnUnavailable
    says which, and a failed build leaves nothing in the cache."""
    monkeypatch.setenv("CNN_JAX_ONEDNN_LIB", str(tmp_path / "libdnnl.so.3"))
    with pytest.raises(onednn.OnednnUnavailable, match="CNN_JAX_ONEDNN_LIB=.*no such file"):
        onednn.build(tmp_path)
    monkeypatch.delenv("CNN_JAX_ONEDNN_LIB")
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(onednn.OnednnUnavailable, match="no C\\+\\+ compiler.*no-such-compiler"):
        onednn.build(tmp_path)
    monkeypatch.setenv("CXX", "false")  # runs and fails
    with pytest.raises(onednn.OnednnUnavailable, match="building .*conv.cc failed"):
        onednn.build(tmp_path)
    assert not list((tmp_path / "onednn").iterdir())
    monkeypatch.delenv("CXX")
    (tmp_path / "file").write_text("")  # the cache folder cannot be made
    with pytest.raises(onednn.OnednnUnavailable, match="cannot build into .*CNN_JAX_CACHE_DIR"):
        onednn.build(tmp_path / "file")
    with pytest.raises(onednn.OnednnUnavailable, match="float32 or bfloat16, not float16"):
        onednn.require(jnp.float16)


def test_the_build_is_cached_by_its_inputs(tmp_path):
    _needs(jnp.float32)
    first = onednn.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert onednn.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "onednn").iterdir()] == [first.name]


def test_onednn_kernels_are_a_config_choice_outside_the_digest():
    from cnn_jax.train import TrainConfig
    assert TrainConfig(conv_kernels="onednn").digest() == TrainConfig().digest()
    TrainConfig(conv_kernels="onednn").validate()
    assert "onednn" in conv_kernels.CONV_KERNELS
