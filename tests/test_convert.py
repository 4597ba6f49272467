"""PyTorch weights in our models: a torchvision (or timm) network with random weights
and random BN statistics, built here, and ours with its converted weights compute the
same logits; files of another architecture are refused naming the key and shapes."""
import jax
import numpy as np
import pytest

from cnn_jax.errors import BadInput
from cnn_jax.models import create_model
from cnn_jax.models.convert import (WeightsMismatch, detect_arch, from_torch,
                                    load_torch_weights, read_state_dict)
from tests.helpers import abstract_variables, count

torch = pytest.importorskip("torch")


def randomised(net):
    """Fan-in scaled weights and BN statistics far from their defaults, so that every
    tensor's place and layout matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def state_of(net) -> dict:
    return {k: v.numpy() for k, v in net.state_dict().items()}


def same_logits(net, name, options, size, classes=1000):
    """Max |ours - theirs| relative to max |theirs| for two random images."""
    state = state_of(net)
    assert detect_arch(state) == (name, options)
    model = create_model(name, num_classes=classes, **options)
    variables = from_torch(state, model, name, options)
    x = np.random.default_rng(1).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x)).numpy()
    ours = np.asarray(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1)))
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


TV = pytest.importorskip("torchvision").models  # a broken install fails here, loudly
CASES = {  # name -> (torch builder, our name, options, input size)
    "resnet18": (lambda: TV.resnet18(), "resnet18", {}, 64),
    "resnet50": (lambda: TV.resnet50(num_classes=10), "resnet50", {}, 64),
    "vgg11": (lambda: TV.vgg11(), "vgg11", {}, 224),
    "alexnet": (lambda: TV.alexnet(), "alexnet_torchvision", {}, 127),  # adaptive 3x3 -> 6x6
    "googlenet": (lambda: TV.googlenet(aux_logits=False, init_weights=False),
                  "googlenet_torchvision", {"aux_logits": False}, 64),
}
SLOW = {
    "resnet34": (lambda: TV.resnet34(), "resnet34", {}, 64),
    "vgg16": (lambda: TV.vgg16(), "vgg16", {}, 224),
    "vgg16_bn": (lambda: TV.vgg16_bn(), "vgg16", {"batch_norm": True}, 224),
    "alexnet224": (lambda: TV.alexnet(), "alexnet_torchvision", {}, 224),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torchvision_weights_give_the_same_logits(case):
    build, name, options, size = CASES[case]
    net = randomised(build())
    classes = net.state_dict()["fc.weight" if "fc.weight" in net.state_dict()
                               else "classifier.6.weight"].shape[0]
    assert same_logits(net, name, options, size, classes) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW))
def test_more_torchvision_weights_give_the_same_logits(case):
    build, name, options, size = SLOW[case]
    assert same_logits(randomised(build()), name, options, size) < 1e-4


def test_timm_resnet_gives_the_same_logits():
    timm = pytest.importorskip("timm")
    net = randomised(timm.create_model("resnet18", num_classes=7))
    assert same_logits(net, "resnet18", {}, 64, classes=7) < 1e-4


@pytest.mark.slow
def test_timm_vgg_gives_the_same_logits():
    # timm's VGG ends in a 7x7 convolution "pre_logits.fc1": our fc1 as a convolution
    timm = pytest.importorskip("timm")
    net = randomised(timm.create_model("vgg11", num_classes=5))
    assert same_logits(net, "vgg11", {}, 224, classes=5) < 1e-4


def test_torchvision_variants_have_torchvisions_parameter_counts():
    for name, options, theirs in [("alexnet_torchvision", {}, TV.alexnet()),
                                  ("googlenet_torchvision", {}, TV.googlenet(
                                      aux_logits=False, init_weights=False)),
                                  ("googlenet_torchvision", {"aux_logits": True},
                                   TV.googlenet(aux_logits=True, init_weights=False))]:
        ours = abstract_variables(create_model(name, **options), (224, 224, 3))["params"]
        n_theirs = sum(p.numel() for p in theirs.parameters())
        assert count(ours) == n_theirs, name
    assert n_theirs == 13_004_888


def test_googlenet_auxiliary_heads_convert():
    state = state_of(TV.googlenet(aux_logits=True, init_weights=False))
    name, options = detect_arch(state)
    assert options == {"aux_logits": True}
    variables = from_torch(state, create_model(name, **options), name, options)
    # torch flattens the aux head's 128x4x4 maps channel-first: re-ordered to ours
    w = state["aux1.fc1.weight"].reshape(1024, 128, 4, 4)
    np.testing.assert_array_equal(variables["params"]["aux1"]["fc1"]["kernel"],
                                  w.transpose(2, 3, 1, 0).reshape(-1, 1024))


def test_files_round_trip_pth_and_safetensors(tmp_path):
    from safetensors.numpy import save_file
    net = randomised(TV.resnet18(num_classes=3))
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               tmp_path / "wrapped.pth")
    save_file({k: np.ascontiguousarray(v) for k, v in state_of(net).items()},
              str(tmp_path / "w.safetensors"))
    a = read_state_dict(tmp_path / "wrapped.pth")
    b = read_state_dict(tmp_path / "w.safetensors")
    assert a.keys() == b.keys() == net.state_dict().keys()
    name, options, variables = load_torch_weights(tmp_path / "w.safetensors")
    assert name == "resnet18" and variables["params"]["fc"]["kernel"].shape == (512, 3)


def test_wrong_architecture_names_the_key_and_both_shapes():
    state = state_of(TV.resnet18())
    # resnet50's first block starts with a 1x1 convolution where resnet18's has a 3x3
    with pytest.raises(WeightsMismatch, match=r"'layer1\.0\.conv1\.weight' has shape "
                                              r"\(64, 64, 3, 3\).*expects \(1, 1, 64, 64\)"):
        from_torch(state, create_model("resnet50"), "resnet50")
    state34 = state_of(TV.resnet34())
    state34["layer2.0.conv1.weight"] = state34["layer2.0.conv1.weight"][:, :32]
    with pytest.raises(WeightsMismatch,
                       match=r"'layer2\.0\.conv1\.weight' has shape \(128, 32, 3, 3\).*"
                             r"expects \(3, 3, 64, 128\)"):
        from_torch(state34, create_model("resnet34"), "resnet34")
    with pytest.raises(WeightsMismatch, match=r"'layer1\.2\.bn1\.bias'.*no place in resnet18 \(80 such"):
        from_torch(state_of(TV.resnet34()), create_model("resnet18"), "resnet18")


def test_unreadable_and_unknown_files_are_clear_errors(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not weights")
    with pytest.raises(WeightsMismatch, match="notes.pth: not a PyTorch state_dict"):
        read_state_dict(bad)
    with pytest.raises(BadInput, match="no such weights file"):
        read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(WeightsMismatch, match="cannot tell the architecture"):
        detect_arch({"encoder.weight": np.zeros((3, 3))})


def test_the_torch_extra_imports_whole():
    """torchvision's compiled operators load beside the pinned torch (PyPI's CPU torch
    2.13.0 with torchvision 0.28.0 failed here: 'operator torchvision::nms does not
    exist'), and timm builds a model."""
    import torchvision
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.9], [2.0, 2.0, 3.0, 3.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]
    timm = pytest.importorskip("timm")
    assert timm.create_model("resnet18", num_classes=3).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("depth", [20, 32])
def test_cifar_resnet_of_the_pytorch_reproduction_gives_the_same_logits(depth):
    """The layout of akamaster/pytorch_resnet_cifar10 (option A padded on both sides):
    detected from the keys, its channels re-ordered into ours."""
    from scripts.torch_reference import CifarResNet
    net = randomised(CifarResNet(depth, pad="both"))
    assert same_logits(net, f"resnet{depth}", {}, 32, classes=10) < 1e-5
    # the same weights with the shortcut's zeros after the identity are another function
    after = CifarResNet(depth, pad="after")
    after.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(after.eval()(x), net(x), atol=1e-3)
