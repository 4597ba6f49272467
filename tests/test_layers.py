"""The shared pieces against their formulas: LRN, shortcuts, LeNet-5's C3 table and
RBF codes, the Inception module, He initialisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.errors import BadInput
from cnn_jax.models import create_model
from cnn_jax.models.inception import TABLE1, InceptionBlock
from cnn_jax.models.layers import (ConvBN, LocalResponseNorm, ProjectionShortcut,
                                   ZeroPadShortcut, make_shortcut)
from cnn_jax.models.lenet import C3_TABLE, PartialConv, digit_codes


def lrn_reference(a, n, k, alpha, beta):
    """Krizhevsky et al. 2012, Sec. 3.3, written as the paper's sum."""
    out = np.empty_like(a)
    channels = a.shape[-1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        s = np.sum(a[..., lo:hi + 1] ** 2, axis=-1)
        out[..., i] = a[..., i] / (k + alpha * s) ** beta
    return out


@pytest.mark.parametrize("n,k,alpha,beta", [(5, 2.0, 1e-4, 0.75), (3, 1.0, 0.5, 0.5)])
def test_lrn_matches_the_paper_formula(n, k, alpha, beta):
    a = np.random.default_rng(0).normal(0, 10, (2, 3, 4, 11)).astype(np.float32)
    got = LocalResponseNorm(size=n, k=k, alpha=alpha, beta=beta).apply({}, jnp.asarray(a))
    np.testing.assert_allclose(got, lrn_reference(a, n, k, alpha, beta), rtol=1e-5)


def test_option_a_shortcut_is_the_strided_identity_padded_with_zeros():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = ZeroPadShortcut(features=8, strides=2).apply({}, x)
    assert y.shape == (2, 2, 2, 8)
    np.testing.assert_array_equal(y[..., :3], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(y[..., 3:], 0)
    np.testing.assert_array_equal(ZeroPadShortcut(3).apply({}, x), x)


def test_option_b_projects_only_when_the_shape_changes():
    x = jnp.ones((1, 8, 8, 16))
    same = ProjectionShortcut(16, 1)
    assert same.init(jax.random.key(0), x) == {}
    grow = ProjectionShortcut(32, 2)
    v = grow.init(jax.random.key(0), x)
    assert v["params"]["proj"]["conv"]["kernel"].shape == (1, 1, 16, 32)
    assert grow.apply(v, x).shape == (1, 4, 4, 32)


def test_unknown_shortcut_option():
    with pytest.raises(BadInput, match="'A', 'B', 'C' or None"):
        make_shortcut("D")


def test_he_fan_out_initialisation():
    v = ConvBN(256, 3).init(jax.random.key(0), jnp.ones((1, 8, 8, 128)))
    w = np.asarray(v["params"]["conv"]["kernel"])
    # He et al.: std = sqrt(2 / (k*k*C_out)), here sqrt(2 / 2304) ~ 0.0295.
    assert abs(w.std() - np.sqrt(2 / (9 * 256))) < 0.02 * np.sqrt(2 / (9 * 256))


def test_c3_follows_table_one():
    assert sum(len(t) for t in C3_TABLE) == 60  # 60 connections, 1,500 weights
    conv = PartialConv()
    x = jnp.zeros((1, 14, 14, 6))
    v = conv.init(jax.random.key(0), x)
    assert v["params"]["kernel"].shape == (5, 5, 60)
    for i in range(6):  # poke one input map: only the maps Table I connects respond
        bump = x.at[..., i].set(1.0)
        moved = np.abs(np.asarray(conv.apply(v, bump) - conv.apply(v, x))).sum(axis=(0, 1, 2))
        connected = {j for j, inputs in enumerate(C3_TABLE) if i in inputs}
        assert {j for j in range(16) if moved[j] > 0} == connected


def test_lenet5_classic_rbf_codes_are_fixed_and_distinct():
    codes = digit_codes()
    assert codes.shape == (10, 84) and set(np.unique(codes)) == {-1.0, 1.0}
    assert len({c.tobytes() for c in codes}) == 10
    model = create_model("lenet5_classic")
    v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    assert "output" not in v["params"]  # the codes are constants, not parameters
    # logits are minus the squared distances of F6's output to the codes
    f6 = jnp.asarray(codes[3])[None] * 0.9
    from cnn_jax.models.lenet import RBFOutput
    logits = RBFOutput().apply({}, f6)
    assert int(jnp.argmax(logits)) == 3
    np.testing.assert_allclose(logits[0, 3], -84 * 0.01, rtol=1e-5)


def test_inception_block_concatenates_its_four_branches():
    block = InceptionBlock(*TABLE1["3a"])
    x = jnp.ones((1, 28, 28, 192))
    v = jax.eval_shape(block.init, jax.random.key(0), x)
    out = jax.eval_shape(block.apply, v, x)
    assert out.shape == (1, 28, 28, 64 + 128 + 32 + 32)  # 256, as in Table 1
    assert v["params"]["5x5"]["conv"]["kernel"].shape == (5, 5, 16, 32)
    assert v["params"]["pool_proj"]["conv"]["kernel"].shape == (1, 1, 192, 32)


def test_googlenet_output_depths_follow_table_one():
    model = create_model("googlenet", aux_logits=False)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        v, x)
    inter = state["intermediates"]
    table1 = {"3a": (28, 256), "3b": (28, 480), "4a": (14, 512), "4b": (14, 512),
              "4c": (14, 512), "4d": (14, 528), "4e": (14, 832), "5a": (7, 832),
              "5b": (7, 1024)}
    for name, (size, depth) in table1.items():
        assert inter[f"inception_{name}"]["__call__"][0].shape == (1, size, size, depth)
