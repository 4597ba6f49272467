"""Cost accounting traced from the modules, the summary CLI and the 1x1 bottleneck
experiment."""
import json
import subprocess
import sys
from collections import defaultdict

import flax.linen as nn
import pytest

from cnn_jax import cost
from cnn_jax.models import create_model


def run_module(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name,shape,macs", [
    ("vgg16", (224, 224, 3), 15_470_264_320),   # the figure quoted for VGG-16
    ("resnet50", (224, 224, 3), 4_089_184_256),  # ~4.09 G, stride on the 3x3 (v1.5)
    ("resnet56", (32, 32, 3), 125_485_696),      # ~125.5 M
    # conv1 55*55*96*363 + conv2 27*27*256*2400 + conv3 13*13*384*2304
    # + conv4 13*13*384*3456 + conv5 13*13*256*3456 + fc 9216*4096 + 4096^2 + 4096*1000
    ("alexnet", (227, 227, 3), 1_135_256_096),
])
def test_multiply_accumulates(name, shape, macs):
    c = cost.profile(create_model(name), shape)
    assert c.macs == macs
    assert c.params == c.inference_params  # every parameter appears in some row


def test_grouped_convolutions_halve_their_macs():
    one = {r.path: r.macs for r in cost.profile(create_model("alexnet"), (227, 227, 3)).layers}
    two = {r.path: r.macs for r in
           cost.profile(create_model("alexnet", groups=2), (227, 227, 3)).layers}
    for layer in ("conv2", "conv4", "conv5"):
        assert 2 * two[layer] == one[layer]
    assert two["conv3"] == one["conv3"]


def test_resnet50_original_stride_placement():
    # The Caffe models stride the first 1x1 (the paper's "3.8 x 10^9"): conv3_1, conv4_1
    # and conv5_1 each run that 1x1 (102,760,448 MACs unstrided) on a quarter of the
    # positions.
    c = cost.profile(create_model("resnet50", stride_in_1x1=True), (224, 224, 3))
    assert c.macs == 4_089_184_256 - 3 * (102_760_448 * 3 // 4) == 3_857_973_248


def test_lenet5_classic_counts_only_the_connections_of_c3():
    rows = {r.path: r for r in cost.profile(create_model("lenet5_classic"), (32, 32, 1)).layers}
    assert rows["c3"].params == 1_516
    assert rows["c3"].macs == 10 * 10 * 1_500  # not the 2,400 of a full 6->16 conv
    assert rows["c1"].macs == 28 * 28 * 6 * 25


def test_googlenet_module_costs_against_table_one():
    """Table 1's 'ops' column (millions of multiply-accumulates) module by module.
    Two rows of the table disagree with its own layer sizes (docs/deviations.md)."""
    table_ops = {"conv2": 360, "inception_3a": 128, "inception_3b": 304,
                 "inception_4a": 73, "inception_4b": 88, "inception_4c": 100,
                 "inception_4d": 119, "inception_4e": 170, "inception_5b": 71,
                 "classifier": 1}
    c = cost.profile(create_model("googlenet"), (224, 224, 3))
    ops = defaultdict(int)
    for r in c.layers:
        ops[r.path.split("/")[0].replace("conv2_reduce", "conv2")] += r.macs
    for module, millions in table_ops.items():
        assert round(ops[module] / 1e6) == pytest.approx(millions, abs=1), module
    # the two rows that do not match Table 1: conv1 (34 M) and inception 5a (54 M)
    assert round(ops["conv1"] / 1e6) == 118 and round(ops["inception_5a"] / 1e6) == 51


def test_summary_json_contract():
    out = run_module("cnn_jax.summary", "resnet20", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["model"] == "resnet20"
    assert data["params"] == 269_722
    assert data["macs"] == sum(layer["macs"] for layer in data["layers"]) > 40_000_000
    assert data["layers"][0]["output_shape"] == [32, 32, 16]


def test_summary_table_and_options():
    out = run_module("cnn_jax.summary", "alexnet", "--option", "groups=2", "--input",
                     "227x227x3")
    assert out.returncode == 0, out.stderr
    assert "60,965,224" in out.stdout and "conv2" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["resnet_x"], "unknown model 'resnet_x'"),
    (["alexnet", "--input", "32x32x3"], "at least 67x67"),
    (["resnet21"], "6n\\+2"),
])
def test_summary_bad_input(args, message):
    out = run_module("cnn_jax.summary", *args)
    assert out.returncode == 2
    assert __import__("re").search(message, out.stderr)


def test_summary_rejects_a_malformed_input_size():
    out = run_module("cnn_jax.summary", "resnet20", "--input", "32x32")
    assert out.returncode == 2 and "HxWxC" in out.stderr


def test_a_module_can_state_its_own_macs():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * 2

        def multiply_accumulates(self, in_shape, out_shape):
            return 7

    assert cost.profile(Custom(), (3, 3, 1)).macs == 7


def test_bottleneck_cost_experiment():
    out = run_module("experiments.bottleneck_cost", "--batch", "2", "--repeats", "2",
                     "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["direct_macs"] == 120_422_400
    assert data["bottleneck_macs"] == 12_443_648 == 2_408_448 + 10_035_200
    assert data["bottleneck_layer_macs"] == [2_408_448, 10_035_200]
    assert data["measured_speedup"] > 0 and data["direct_ms"] > 0
