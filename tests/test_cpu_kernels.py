"""CPU kernel choices: Eigen's convolutions (cnn_jax.cpu_kernels) and kernel gradients
by matrix products (cnn_jax.train.conv_kernels) compute the same function as XLA's own."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_jax.cpu_kernels import EIGEN_CONVOLUTIONS, prefer_eigen_convolutions
from cnn_jax.train import TrainConfig
from cnn_jax.train.conv_kernels import conv_with_kernel_grad, resolve


@pytest.mark.parametrize("chunk", [8, "patches", "seedwise"])  # 8: chunks of 8 images
@pytest.mark.parametrize("batch, size, kernel, strides, padding", [
    (5, 9, 3, (1, 1), ((1, 1), (1, 1))),      # odd batch: zero images pad the last chunk
    (3, 8, 3, (2, 2), ((0, 1), (0, 1))),      # ResNet's strided "SAME" convolution
    (9, 7, 1, (2, 2), ((0, 0), (0, 0))),      # 1x1 projection shortcut
    (2, 10, 5, (1, 1), ((2, 2), (2, 2))),
    (4, 11, 3, (3, 2), ((0, 0), (1, 0))),     # VALID rows, uneven strides and padding
])
def test_kernel_gradient_by_products_equals_xla(batch, size, kernel, strides, padding, chunk):
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.normal(size=(batch, size, size, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 6, 5)), jnp.float32)
    xla = lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: conv_with_kernel_grad(x, w, strides, padding, chunk)
    y, vjp = jax.vjp(xla, x, w)
    y2, vjp2 = jax.vjp(ours, x, w)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    (dx, dw), (dx2, dw2) = vjp(dy), vjp2(dy)
    assert (y == y2).all() and (dx == dx2).all()  # XLA's own forward and input gradient
    np.testing.assert_allclose(dw2, dw, rtol=1e-5, atol=1e-5 * float(jnp.abs(dw).max()))


@pytest.mark.parametrize("chunk", [8, "patches", "seedwise"])
def test_kernel_gradient_by_products_under_vmap_over_seeds(chunk):
    """Seeds vmapped (each its own images and kernel): the same gradients as XLA's
    grouped convolution, which is what vmap makes of the plain one."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4, 8, 8, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 6, 5)), jnp.float32)
    pads = ((1, 1), (1, 1))
    loss = lambda conv: jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))),
                                          argnums=(0, 1)))
    xla = loss(lambda x, w: lax.conv_general_dilated(
        x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    ours = loss(lambda x, w: conv_with_kernel_grad(x, w, (1, 1), pads, chunk))
    for a, b in zip(ours(x, w), xla(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    if chunk == "seedwise":  # one plain kernel-gradient convolution per seed (3)
        text = str(jax.make_jaxpr(ours)(x, w))
        assert text.count("f32[3,3,6,5] = conv_general_dilated") == 3


def test_only_plain_convolutions_are_intercepted():
    """kernel_grads() takes plain 2-D nn.Conv calls and leaves grouped (AlexNet's two
    towers) and dilated ones to XLA's path: their gradients are XLA's bit for bit, the
    plain one's within 1e-5, and the gradient holds exactly one loop of products."""
    import flax.linen as nn
    from cnn_jax.train.conv_kernels import kernel_grads

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), feature_group_count=2, name="grouped")(x)
            x = nn.Conv(8, (3, 3), kernel_dilation=2, name="dilated")(jnp.tanh(x))
            return nn.Conv(4, (3, 3), strides=2, name="plain")(jnp.tanh(x))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 9, 9, 4)), jnp.float32)
    params = Net().init(jax.random.key(0), x)
    loss = lambda p: jnp.sum(jnp.sin(Net().apply(p, x)))

    def intercepted(p):
        with kernel_grads():
            return loss(p)
    xla, ours = jax.grad(loss)(params)["params"], jax.grad(intercepted)(params)["params"]
    for name in ("grouped", "dilated"):
        for a, b in zip(jax.tree.leaves(ours[name]), jax.tree.leaves(xla[name])):
            assert (a == b).all(), name
    np.testing.assert_allclose(ours["plain"]["kernel"], xla["plain"]["kernel"], rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(xla["plain"]["kernel"]).max()))
    text = str(jax.make_jaxpr(jax.grad(intercepted))(params))
    assert text.count(" = scan[") == 1  # the plain convolution's chunks of images


def test_auto_without_onednn_means_products_for_float32_on_cpus_and_is_not_in_the_digest(
        monkeypatch):
    from cnn_jax import onednn
    from cnn_jax.errors import BadInput
    for variable in ("CNN_JAX_CONV_KERNELS", "CNN_JAX_CONV_GRAD"):
        monkeypatch.delenv(variable, raising=False)
    # where oneDNN's convolutions can run, "auto" takes them (tests/test_onednn.py)
    monkeypatch.setattr(onednn, "why_unavailable", lambda dtype=None: "not here")
    assert jax.default_backend() == "cpu" and resolve("auto") == "matmul"
    assert resolve("auto", seeds=5) == "matmul" and resolve("xla", seeds=5) == "seedwise"
    # bfloat16 on CPUs: XLA's own (its convolutions compute in float32 there; faster)
    assert resolve("auto", dtype="bfloat16") == "xla" == resolve("auto", dtype=jnp.bfloat16)
    assert resolve("matmul", dtype="bfloat16") == "matmul"
    monkeypatch.setenv("CNN_JAX_CONV_KERNELS", "xla")  # older records, bit for bit
    assert resolve("auto") == "xla" and resolve("matmul") == "matmul"
    monkeypatch.delenv("CNN_JAX_CONV_KERNELS")
    monkeypatch.setenv("CNN_JAX_CONV_GRAD", "xla")  # its older name still works
    assert resolve("auto") == "xla"
    monkeypatch.setenv("CNN_JAX_CONV_GRAD", "fast")
    with pytest.raises(BadInput, match="CNN_JAX_CONV_GRAD must be one of xla, matmul, onednn"):
        resolve("auto")
    assert resolve("xla") == "xla" and TrainConfig().run.conv_kernels == "auto"
    assert TrainConfig(conv_kernels="xla").digest() == TrainConfig().digest()
    with pytest.raises(BadInput, match="--conv-kernels: must be one of auto, xla, matmul, onednn"):
        TrainConfig(conv_kernels="fast").validate()


def test_eigen_convolutions_are_asked_for_unless_the_user_chose():
    env = {}
    prefer_eigen_convolutions(env)
    assert env["XLA_FLAGS"] == EIGEN_CONVOLUTIONS
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    prefer_eigen_convolutions(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                        EIGEN_CONVOLUTIONS]
    mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
    env = {"XLA_FLAGS": mine}
    prefer_eigen_convolutions(env)
    assert env["XLA_FLAGS"] == mine


@pytest.mark.parametrize("user_flags, ynn", [("", False), (
    "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution", True)])
def test_importing_cnn_jax_moves_cpu_convolutions_off_ynnpack(user_flags, ynn):
    """The flag reaches XLA: the compiled convolution (32 channels: YNNPACK takes those
    by default) is (not) a YNNPACK fusion."""
    code = ("import cnn_jax, jax, jax.numpy as jnp\n"
            "f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
            "dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
            "hlo = jax.jit(f).lower(jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32)))"
            ".compile().as_text()\n"
            "print('convolution' in hlo, '__ynn_fusion' in hlo)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if user_flags:
        env["XLA_FLAGS"] = user_flags
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", str(ynn)]
