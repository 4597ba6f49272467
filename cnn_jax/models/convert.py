"""Weights trained in PyTorch, in our parameters: torchvision's (and timm's) layout of
`resnet18/34/50/101/152`, `vgg11..19` (with or without BN), `alexnet` and `googlenet`;
and the CIFAR ResNets (`resnet20`..`resnet1202`, option A) in the layout of the widely
used PyTorch reproduction (akamaster/pytorch_resnet_cifar10: `conv1`, `layer1..3`,
`linear`), whose released weights `../shared/reference/` holds.

    state = read_state_dict("resnet50.pth")         # or a .safetensors file
    name, options = detect_arch(state)              # ('resnet50', {})
    variables = from_torch(state, create_model(name, **options), name)

The mapping walks *our* model's variables and asks, for each one, which tensor of the
file holds it; so a file of another architecture fails on the first variable it lacks
or holds in another shape, naming the key and both shapes, and a file with tensors
this model has no place for fails too (nothing is silently dropped, except BN's
`num_batches_tracked` counters). Layout changes: convolution kernels OIHW -> HWIO,
dense kernels transposed, and the first fc layer after a flatten re-ordered from
PyTorch's C,H,W flattening to our H,W,C.

torchvision's AlexNet and GoogLeNet differ from the papers' (see alexnet.py and
inception.py): their weights load into `alexnet_torchvision` / `googlenet_torchvision`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from cnn_jax.errors import BadInput
from cnn_jax.models import create_model
from cnn_jax.models.resnet import IMAGENET_STAGES
from cnn_jax.models.vgg import CONFIGS, M

# (torch module prefix, (C, H, W) of a flattened input or None)
KeyFn = Callable[[str], tuple[str, Optional[tuple]]]

WEIGHT_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".safetensors")


class WeightsMismatch(BadInput):
    """A weights file that does not fit the architecture; says where and how."""


# ------------------------------------------------------------------ reading files
def read_state_dict(path) -> dict[str, np.ndarray]:
    """A PyTorch `state_dict` (.pth/.pt/.th/.bin, read with torch) or a .safetensors file
    (read without torch) as numpy arrays. A {'state_dict': ...} or {'model': ...}
    wrapper and DataParallel's 'module.' prefix are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as e:
            raise WeightsMismatch(f"{path}: not a readable .safetensors file ({e})") from None
    else:
        try:
            import torch
        except ImportError:
            raise BadInput(f"{path}: reading a PyTorch {path.suffix} file needs torch "
                              f"(pip install -e '.[torch]'), or save the weights as "
                              f".safetensors") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsMismatch(f"{path}: not a PyTorch state_dict file ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
        for wrapper in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict):
            raise WeightsMismatch(f"{path}: holds a {type(state).__name__}, expected a "
                                  f"state_dict (name -> tensor)")
        state = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                 for k, v in state.items() if hasattr(v, "numpy")}
    return {k.removeprefix("module."): np.asarray(v) for k, v in state.items()}


# ------------------------------------------------------------------ which architecture
def detect_arch(state: dict) -> tuple[str, dict]:
    """(registry name, model options) of a torchvision/timm state_dict, from its keys."""
    keys = set(state)
    if "linear.weight" in keys and "layer1.0.conv1.weight" in keys and "layer4.0.conv1.weight" \
            not in keys:  # the CIFAR ResNet: three stages of n blocks, 6n+2 layers
        blocks = len({k.split(".")[1] for k in keys if k.startswith("layer1.")})
        return f"resnet{6 * blocks + 2}", {}
    if "inception3a.branch1.conv.weight" in keys:
        return "googlenet_torchvision", {"aux_logits": "aux1.fc2.weight" in keys}
    if "layer1.0.conv1.weight" in keys:
        bottleneck = "layer1.0.conv3.weight" in keys
        blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{s}.")})
                       for s in (1, 2, 3, 4))
        for depth, (block, stages) in IMAGENET_STAGES.items():
            if tuple(stages) == blocks and (block.__name__ == "Bottleneck") == bottleneck:
                return f"resnet{depth}", {}
        raise WeightsMismatch(f"a ResNet with {blocks} blocks per stage is not one of "
                              f"resnet{', resnet'.join(map(str, IMAGENET_STAGES))}")
    first = state.get("features.0.weight")
    if first is not None and tuple(first.shape[1:]) == (3, 11, 11):
        return "alexnet_torchvision", {}
    if first is not None and tuple(first.shape[2:]) == (3, 3):
        convs = sum(1 for k, v in state.items()
                    if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4)
        depth = convs + 3
        batch_norm = any(k.startswith("features.") and k.endswith(".running_mean") for k in keys)
        if depth in CONFIGS:
            return f"vgg{depth}", ({"batch_norm": True} if batch_norm else {})
    raise WeightsMismatch(
        "cannot tell the architecture from the keys (expected torchvision/timm resnet18-152, "
        "vgg11-19[_bn], alexnet or googlenet); first keys: " + ", ".join(sorted(keys)[:5]))


# ------------------------------------------------------------------ name mappings
def _resnet_key(path: str):
    if path == "fc":
        return "fc", None
    if path.startswith("conv1/"):
        return {"conv1/conv": "conv1", "conv1/bn": "bn1"}[path], None
    m = re.fullmatch(r"conv(\d)_(\d+)/(?:ConvBN_(\d)/(conv|bn)|shortcut/proj/(conv|bn))", path)
    if not m:
        raise KeyError(path)
    stage, block = f"layer{int(m[1]) - 1}", int(m[2]) - 1
    if m[3] is not None:
        return f"{stage}.{block}.{m[4]}{int(m[3]) + 1}", None
    return f"{stage}.{block}.downsample.{0 if m[5] == 'conv' else 1}", None


def _cifar_resnet_key(path: str):
    if path == "fc":
        return "linear", None
    if path in ("stem/conv", "stem/bn"):
        return {"stem/conv": "conv1", "stem/bn": "bn1"}[path], None
    m = re.fullmatch(r"stage(\d)_block(\d+)/ConvBN_(\d)/(conv|bn)", path)
    if not m:
        raise KeyError(path)
    return f"layer{m[1]}.{int(m[2]) - 1}.{m[4]}{int(m[3]) + 1}", None


def _option_a_both_sides(widths=(16, 32, 64)) -> list[np.ndarray]:
    """Per stage, which of the file's channels each of ours is. The reproduction's
    option A pads the subsampled identity with width/4 zero channels on *both* sides
    (`F.pad(x, (0, 0, 0, 0, w // 4, w // 4))`), ours only after it; a net is the same
    function under any consistent re-ordering of each stage's channels, so stage s's
    channel j < width[s-1] is the file's channel w/4 + (stage s-1's order)[j], and the
    new channels take the file's zero-padded ones in order."""
    orders = [np.arange(widths[0])]
    for previous, width in zip(widths, widths[1:]):
        side = width // 4
        carried = side + orders[-1]
        padded = np.setdiff1d(np.arange(width), carried)
        orders.append(np.concatenate([carried, padded]))
    return orders


def _reorder_cifar_channels(variables: dict) -> dict:
    """Variables converted in the file's channel order, re-ordered to ours
    (_option_a_both_sides): convolutions by input and output stage, BatchNorms by
    their stage, the classifier by the last stage."""
    orders = _option_a_both_sides()
    flat = traverse_util.flatten_dict(variables)
    out = {}
    for path, value in flat.items():
        collection, module, *rest = path
        if module == "fc":
            out[path] = value[orders[-1]] if rest[-1] == "kernel" else value
            continue
        if module == "stem":
            stage_in, stage_out = None, 0
        else:
            stage, block = (int(v) for v in re.fullmatch(r"stage(\d)_block(\d+)", module).groups())
            first_conv = rest[0] == "ConvBN_0"
            stage_out = stage - 1
            stage_in = (stage - 2 if block == 1 and stage > 1 else stage - 1) \
                if first_conv else stage - 1
        if rest[-1] == "kernel":  # HWIO
            value = value[:, :, orders[stage_in]] if stage_in is not None else value
            out[path] = value[..., orders[stage_out]]
        else:
            out[path] = value[orders[stage_out]]
    return traverse_util.unflatten_dict(out)


def _vgg_key(depth: int, batch_norm: bool, timm: bool) -> KeyFn:
    index, i, n = {}, 0, 0
    for layer in CONFIGS[depth]:
        if layer == M:
            i += 1
            continue
        n += 1
        index[f"conv{n}"], index[f"bn{n}"] = i, i + 1
        i += 3 if batch_norm else 2  # conv (BN) ReLU
    heads = ({"fc1": ("pre_logits.fc1", (512, 7, 7)), "fc2": ("pre_logits.fc2", (4096, 1, 1)),
              "fc3": ("head.fc", None)} if timm else
             {"fc1": ("classifier.0", (512, 7, 7)), "fc2": ("classifier.3", None),
              "fc3": ("classifier.6", None)})

    def key(path):
        return heads[path] if path in heads else (f"features.{index[path]}", None)
    return key


def _alexnet_key(path: str):
    return {"conv1": ("features.0", None), "conv2": ("features.3", None),
            "conv3": ("features.6", None), "conv4": ("features.8", None),
            "conv5": ("features.10", None), "fc6": ("classifier.1", (256, 6, 6)),
            "fc7": ("classifier.4", None), "fc8": ("classifier.6", None)}[path]


def _googlenet_key(path: str):
    chw = (128, 4, 4) if re.fullmatch(r"aux\d/fc1", path) else None
    return re.sub(r"branch(\d)_(\d)", r"branch\1.\2", path).replace("/", "."), chw


def key_function(name: str, options: dict, state: dict) -> KeyFn:
    if "linear.weight" in state and re.fullmatch(r"resnet\d+", name):
        return _cifar_resnet_key
    if re.fullmatch(r"resnet(18|34|50|101|152)", name):
        return _resnet_key
    if m := re.fullmatch(r"vgg(\d+)", name):
        return _vgg_key(int(m[1]), bool(options.get("batch_norm")), "pre_logits.fc1.weight" in state)
    if name == "alexnet_torchvision":
        return _alexnet_key
    if name == "googlenet_torchvision":
        return _googlenet_key
    raise WeightsMismatch(f"no PyTorch weight layout known for {name!r}; convertible: "
                          f"resnet18/34/50/101/152, CIFAR resnet20..1202, vgg11..19 (batch_norm or not), "
                          f"alexnet_torchvision, googlenet_torchvision")


# ------------------------------------------------------------------ conversion
LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias",
        ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
        ("batch_stats", "var"): "running_var"}


def _to_ours(value: np.ndarray, leaf: str, chw: Optional[tuple]) -> np.ndarray:
    if leaf != "kernel":
        return value
    if value.ndim == 4 and chw is None:            # conv: OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if chw is not None:                            # fc after a C,H,W flatten (or a conv
        out = value.shape[0]                       # used as one, timm's pre_logits)
        if value.size != out * int(np.prod(chw)):
            return value                           # wrong size: reported by the caller
        return value.reshape(out, *chw).transpose(2, 3, 1, 0).reshape(-1, out)
    return value.T                                 # dense: [out, in] -> [in, out]


def from_torch(state: dict, model, name: str, options: Optional[dict] = None,
               input_shape: tuple = (224, 224, 3), source: str = "weights") -> dict:
    """Our {'params', 'batch_stats'} for `model` (registry `name`) from a torchvision/
    timm state_dict of numpy arrays."""
    options = options or {}
    key_of = key_function(name, options, state)
    expected = jax.eval_shape(lambda: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(0)},
        jnp.zeros((1, *input_shape), jnp.float32)))
    flat = traverse_util.flatten_dict({k: expected[k] for k in ("params", "batch_stats")
                                       if k in expected})  # weights first: clearer errors
    used, out = set(), {}
    for path, want in flat.items():
        collection, *modules, leaf = path
        module = "/".join(modules)
        try:
            prefix, chw = key_of(module)
        except KeyError:
            raise WeightsMismatch(f"{source}: no tensor for {collection}/{module}/{leaf} "
                                  f"of {name}") from None
        key = f"{prefix}.{LEAF[collection, leaf]}"
        if key not in state:
            raise WeightsMismatch(f"{source}: key {key!r} missing (holds {collection}/"
                                  f"{module}/{leaf} of {name}, shape {tuple(want.shape)})")
        value = _to_ours(np.asarray(state[key], np.float32), leaf, chw)
        if tuple(value.shape) != tuple(want.shape):
            raise WeightsMismatch(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)} (as ours: "
                f"{tuple(value.shape)}) but {name} expects {tuple(want.shape)} for "
                f"{collection}/{module}/{leaf}")
        out[path] = value
        used.add(key)
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise WeightsMismatch(f"{source}: key {unused[0]!r} (shape {tuple(state[unused[0]].shape)})"
                              f" has no place in {name}{' ' + str(options) if options else ''}"
                              f" ({len(unused)} such keys); another architecture?")
    variables = traverse_util.unflatten_dict(out)
    return _reorder_cifar_channels(variables) if key_of is _cifar_resnet_key else variables


def load_torch_weights(path, name: Optional[str] = None, options: Optional[dict] = None):
    """(name, options, variables) from a weights file; the architecture is detected
    from the keys unless `name` is given."""
    state = read_state_dict(path)
    detected, detected_options = detect_arch(state)
    if name is None:
        name, options = detected, {**detected_options, **(options or {})}
    options = options or {}
    model = create_model(name, num_classes=head_classes(state), **options)
    return name, options, from_torch(state, model, name, options, source=str(path))


def head_classes(state: dict) -> Optional[int]:
    """The number of classes of the file's final layer (None if not recognised)."""
    for key in ("fc.weight", "classifier.6.weight", "head.fc.weight", "linear.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None
