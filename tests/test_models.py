"""The zoo: exact parameter counts against the papers, shapes, train/eval behaviour,
and clear errors on bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.errors import BadInput
from cnn_jax.models import available, create_model, input_shape
from tests.helpers import abstract_variables, count, quick_variables

# Published (or, where marked, derived and stated in docs/deviations.md) counts of
# trainable parameters at the paper's input size.
PARAMS = {
    "lenet5": 61_706,
    "lenet5_classic": 60_000,
    "alexnet": 62_378_344,
    "vgg11": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "plain18": 11_515_688,   # resnet18 less its three projection shortcuts
    "plain34": 21_623_848,
    "nin": 966_986,
    # He et al. 2016 (pre-activation), Table 2: ResNet-110 1.7M; the unit's BatchNorms sit
    # on its input (16/32 channels where a stage widens) and a final BN-ReLU replaces the
    # stem's: the same count as the original's
    "preact_resnet20": 269_722,
    "preact_resnet110": 1_727_962,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_matches_paper(name):
    variables = abstract_variables(create_model(name), input_shape(name))
    assert count(variables["params"]) == PARAMS[name]


@pytest.mark.slow
def test_resnet1202_parameter_count():
    variables = abstract_variables(create_model("resnet1202"), (32, 32, 3))
    assert count(variables["params"]) == 19_421_274


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_net_has_exactly_the_resnets_parameters(depth):
    plain = abstract_variables(create_model(f"plain{depth}"), (32, 32, 3))
    res = abstract_variables(create_model(f"resnet{depth}"), (32, 32, 3))
    assert count(plain["params"]) == count(res["params"]) == PARAMS.get(f"resnet{depth}")


def test_alexnet_two_gpu_split():
    model = create_model("alexnet", groups=2)
    params = abstract_variables(model, (227, 227, 3))["params"]
    assert count(params) == 60_965_224
    # conv2, conv4, conv5 see half of their input maps; conv3 sees all of them.
    assert params["conv2"]["kernel"].shape == (5, 5, 48, 256)
    assert params["conv3"]["kernel"].shape == (3, 3, 256, 384)
    assert params["conv4"]["kernel"].shape == (3, 3, 192, 384)
    assert params["conv5"]["kernel"].shape == (3, 3, 192, 256)


@pytest.mark.parametrize("depth,expected", [
    (11, 132_868_840), (13, 133_053_736), (16, 138_365_992), (19, 143_678_248)])
def test_vgg_batch_norm_counts_match_torchvision(depth, expected):
    variables = abstract_variables(create_model(f"vgg{depth}", batch_norm=True), (224, 224, 3))
    assert count(variables["params"]) == expected
    assert count(variables["batch_stats"]) == 2 * (expected - PARAMS[f"vgg{depth}"]) // 2


def test_googlenet_counts_with_and_without_auxiliary_heads():
    without = abstract_variables(create_model("googlenet", aux_logits=False), (224, 224, 3))
    with_aux = abstract_variables(create_model("googlenet"), (224, 224, 3))
    assert count(without["params"]) == 6_998_552
    aux = {k: v for k, v in with_aux["params"].items() if k.startswith("aux")}
    assert sorted(aux) == ["aux1", "aux2"]
    assert count(with_aux["params"]) - count(aux) == 6_998_552


def test_resnet_option_b_adds_only_the_two_projections():
    a = abstract_variables(create_model("resnet20", shortcut="A"), (32, 32, 3))["params"]
    b = abstract_variables(create_model("resnet20", shortcut="B"), (32, 32, 3))["params"]
    c = abstract_variables(create_model("resnet20", shortcut="C"), (32, 32, 3))["params"]
    # 16->32 and 32->64 1x1 convolutions, each with BN scale and bias.
    assert count(b) - count(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    projected = [k for k, v in b.items() if "shortcut" in v]
    assert projected == ["stage2_block1", "stage3_block1"]
    # Option C projects every block's shortcut: 9 blocks.
    assert sum("shortcut" in v for v in c.values() if isinstance(v, dict)) == 9


def test_available_lists_the_contract_names():
    names = set(available())
    for n in ["lenet5", "lenet5_classic", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19",
              "plain20", "plain32", "plain44", "plain56", "plain110", "resnet20",
              "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202", "resnet18",
              "resnet34", "resnet50", "resnet101", "resnet152", "plain18", "plain34",
              "nin", "googlenet", "preact_resnet20", "preact_resnet110", "preact_resnet1202"]:
        assert n in names


# ------------------------------------------------------------------ forward passes
SMALL_INPUTS = {  # name -> a small NHWC input the net accepts, and the classes
    "lenet5": ((32, 32, 1), 10),
    "lenet5_classic": ((32, 32, 1), 10),
    "resnet20": ((32, 32, 3), 10),
    "plain20": ((32, 32, 3), 10),
    "nin": ((32, 32, 3), 10),
    "resnet18": ((32, 32, 3), 7),
    "resnet50": ((32, 32, 3), 7),
    "plain18": ((32, 32, 3), 7),
    "alexnet": ((67, 67, 3), 7),
    "vgg11": ((32, 32, 3), 7),
    "googlenet": ((65, 65, 3), 7),
}


@pytest.mark.parametrize("name", sorted(SMALL_INPUTS))
def test_forward_shapes_and_finite_logits(name):
    shape, classes = SMALL_INPUTS[name]
    model = create_model(name, num_classes=classes)
    x = jax.random.normal(jax.random.key(1), (2, *shape))
    logits = jax.jit(model.apply)(quick_variables(model, x), x)
    assert logits.shape == (2, classes) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = create_model("resnet20", dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    shapes = abstract_variables(model, (32, 32, 3))
    assert {l.dtype for l in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}
    hidden = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True))(
        quick_variables(model, x), x)
    logits, inter = hidden[0], hidden[1]["intermediates"]
    assert logits.dtype == jnp.float32
    assert inter["stage1_block1"]["__call__"][0].dtype == jnp.bfloat16


# ------------------------------------------------------------------ train vs eval
def test_batchnorm_uses_batch_statistics_in_training_and_running_averages_in_eval():
    model = create_model("resnet20")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3 + 1
    variables = quick_variables(model, x)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    eval_a = apply(variables, x)
    eval_b = apply(variables, x[:1])
    np.testing.assert_allclose(eval_a[:1], eval_b, rtol=1e-5, atol=1e-5)  # per-example
    train_out, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    assert not np.allclose(train_out, eval_a)
    old = variables["batch_stats"]["stem"]["bn"]["mean"]
    new = updates["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(old, new)
    with pytest.raises(Exception):  # eval never writes statistics
        apply(variables, x, train=True)


@pytest.mark.parametrize("name,shape", [("alexnet", (67, 67, 3)), ("nin", (32, 32, 3))])
def test_dropout_only_in_training(name, shape):
    model = create_model(name, num_classes=5)
    x = jax.random.normal(jax.random.key(1), (2, *shape))
    variables = quick_variables(model, x)
    apply = jax.jit(model.apply, static_argnames="train")
    np.testing.assert_array_equal(apply(variables, x), apply(variables, x))
    t1 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    t2 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(t1, t2)


def test_googlenet_auxiliary_heads_only_in_training():
    model = create_model("googlenet", num_classes=5)
    x = jax.random.normal(jax.random.key(1), (2, 65, 65, 3))
    variables = quick_variables(model, x)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    _, state = apply(variables, x, mutable=("intermediates",))
    assert "intermediates" not in state or not state["intermediates"]
    logits, state = apply(variables, x, train=True, mutable=("intermediates",),
                          rngs={"dropout": jax.random.key(3)})
    aux = state["intermediates"]["aux_logits"]
    assert len(aux) == 2 and all(a.shape == (2, 5) for a in aux)
    assert logits.shape == (2, 5)


# ------------------------------------------------------------------ bad input
def test_unknown_model_lists_available_names():
    with pytest.raises(BadInput, match="unknown model 'resnet_9000'.*resnet56.*vgg16"):
        create_model("resnet_9000")


@pytest.mark.parametrize("name", ["resnet21", "plain30", "resnet7"])
def test_cifar_depth_must_be_6n_plus_2(name):
    with pytest.raises(BadInput, match="6n\\+2"):
        create_model(name)


def test_other_6n_plus_2_depths_build():
    params = abstract_variables(create_model("resnet8"), (32, 32, 3))["params"]
    # stem 3*9*16 + 32 BN; stage 1: 2 * (16*9*16 + 32); stage 2: 16*9*32 + 32*9*32 + 128;
    # stage 3: 32*9*64 + 64*9*64 + 256; fc 64*10 + 10.
    assert count(params) == 464 + 4_672 + 13_952 + 55_552 + 650 == 75_290


def test_bad_option_names_the_model():
    with pytest.raises(BadInput, match="alexnet"):
        create_model("alexnet", not_an_option=3)


MIN_SIZES = {"alexnet": 67, "vgg16": 32, "googlenet": 65, "lenet5": 16, "lenet5_classic": 32}


@pytest.mark.parametrize("name", sorted(MIN_SIZES))
def test_too_small_input_names_the_minimum(name):
    m, model = MIN_SIZES[name], create_model(name)
    c = input_shape(name)[-1]
    abstract_variables(model, (m, m, c))  # the stated minimum works ...
    with pytest.raises(BadInput, match=f"at least {m}x{m}"):  # ... one less does not
        abstract_variables(model, (m - 1, m - 1, c))


def test_alexnet_at_cifar_size_is_a_clear_error():
    with pytest.raises(BadInput, match="alexnet: input 32x32 is too small.*67x67"):
        abstract_variables(create_model("alexnet"), (32, 32, 3))


def test_a_pre_activation_unit_is_bn_relu_conv_with_nothing_after_the_addition():
    """He et al. 2016 Fig. 4(e): x + conv(relu(bn(conv(relu(bn(x)))))). With the
    convolutions' kernels zero the unit is the identity (no ReLU after the addition:
    negative inputs pass), where the original unit, relu(x + F(x)), clips them."""
    import jax
    import jax.numpy as jnp
    from cnn_jax.models.layers import BasicBlock, ZeroPadShortcut
    from cnn_jax.models.preact import PreActBlock
    x = jnp.linspace(-2, 2, 2 * 4 * 4 * 8).reshape(2, 4, 4, 8)
    for block, expected in ((PreActBlock(8, shortcut=ZeroPadShortcut), x),
                            (BasicBlock(8, shortcut=ZeroPadShortcut), jax.nn.relu(x))):
        v = block.init(jax.random.key(0), x)
        zero = jax.tree_util.tree_map_with_path(
            lambda path, a: jnp.zeros_like(a) if path[-1].key == "kernel" else a, v)
        np.testing.assert_allclose(block.apply(zero, x), expected, atol=1e-6)
    names = list(PreActBlock(8).init(jax.random.key(0), x)["params"])
    assert names == ["bn1", "conv1", "bn2", "conv2"]   # the order of the figure
