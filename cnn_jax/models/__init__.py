"""The model zoo: `create_model(name, num_classes=..., **options)` and `available()`.

Every model is a flax linen Module taking an NHWC batch and `train: bool`, returning
float32 logits. Options are the module's own fields (`dtype`, `shortcut`, `groups`,
`batch_norm`, `aux_logits`, ...).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import flax.linen as nn

from cnn_jax.errors import BadInput
from cnn_jax.models.alexnet import AlexNet, AlexNetTorchvision
from cnn_jax.models.inception import GoogLeNet, GoogLeNetTorchvision, InceptionBlock
from cnn_jax.models.layers import BasicBlock, Bottleneck, LocalResponseNorm
from cnn_jax.models.lenet import LeNet5, LeNet5Classic
from cnn_jax.models.nin import NiN
from cnn_jax.models.preact import PREACT_CIFAR_ERROR, CifarPreActResNet
from cnn_jax.models.resnet import (IMAGENET_STAGES, PAPER_CIFAR_ERROR, CifarResNet,
                                   ImageNetResNet, cifar_blocks_per_stage)
from cnn_jax.models.vgg import VGG


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    input_shape: tuple  # (H, W, C) of the paper's input
    num_classes: int    # the paper's dataset


CIFAR, IMAGENET = (32, 32, 3), (224, 224, 3)

_REGISTRY: dict[str, ModelSpec] = {
    "lenet5": ModelSpec(LeNet5, (32, 32, 1), 10),
    "lenet5_classic": ModelSpec(LeNet5Classic, (32, 32, 1), 10),
    "alexnet": ModelSpec(AlexNet, (227, 227, 3), 1000),
    "nin": ModelSpec(NiN, CIFAR, 10),
    "googlenet": ModelSpec(GoogLeNet, IMAGENET, 1000),
    # torchvision's variants, for its trained weights (cnn_jax.models.convert)
    "alexnet_torchvision": ModelSpec(AlexNetTorchvision, IMAGENET, 1000),
    "googlenet_torchvision": ModelSpec(GoogLeNetTorchvision, IMAGENET, 1000),
}
for _d in (11, 13, 16, 19):
    _REGISTRY[f"vgg{_d}"] = ModelSpec(lambda d=_d, **kw: VGG(depth=d, **kw), IMAGENET, 1000)
for _d in IMAGENET_STAGES:
    _REGISTRY[f"resnet{_d}"] = ModelSpec(
        lambda d=_d, **kw: ImageNetResNet(depth=d, **kw), IMAGENET, 1000)
for _d in (18, 34):
    _REGISTRY[f"plain{_d}"] = ModelSpec(
        lambda d=_d, **kw: ImageNetResNet(depth=d, shortcut=None, **kw), IMAGENET, 1000)

# The CIFAR families of depth 6n+2, one table: adding a family is its module and one
# entry here. Each has names `<prefix><depth>` (resnet56, preact_resnet110) wherever a
# name does not already mean an ImageNet net (CIFAR ResNet-50 is cifar_resnet with
# depth 50), and `cifar_<key>` with the depth as an option: the architecture as data,
# as experiments name their nets (create_model("cifar_resnet", depth=56)).
@dataclasses.dataclass(frozen=True)
class Family:
    prefix: str                       # the names: <prefix><depth>
    build: Callable[..., nn.Module]   # given depth=..., num_classes=..., options
    label: str                        # how tables and plots name a net: f"{label}-{depth}"
    depths: tuple                     # what available() lists (any 6n+2 builds)
    paper_error: Optional[dict] = None   # CIFAR-10 test error (%) its paper reports, by depth


CIFAR_FAMILIES = {
    "plain": Family("plain", lambda **kw: CifarResNet(shortcut=None, **kw), "plain",
                    (20, 32, 44, 56, 110)),
    "resnet": Family("resnet", CifarResNet, "ResNet", (20, 32, 44, 56, 110, 1202),
                     PAPER_CIFAR_ERROR),
    "preact": Family("preact_resnet", CifarPreActResNet, "pre-act ResNet",
                     (20, 32, 44, 56, 110, 1202), PREACT_CIFAR_ERROR),
}
for _key, _family in CIFAR_FAMILIES.items():
    _REGISTRY[f"cifar_{_key}"] = ModelSpec(_family.build, CIFAR, 10)
_NAMED = re.compile(r"(" + "|".join(sorted((f.prefix for f in CIFAR_FAMILIES.values()),
                                           key=len, reverse=True)) + r")(\d+)")


def family_of(prefix: str) -> str:
    return next(k for k, f in CIFAR_FAMILIES.items() if f.prefix == prefix)


def _cifar_spec(name: str) -> Optional[ModelSpec]:
    """<prefix><depth> (depth 6n+2) for the CIFAR families (the ImageNet names are in
    the registry and never reach here)."""
    m = _NAMED.fullmatch(name)
    if not m:
        return None
    family, depth = CIFAR_FAMILIES[family_of(m.group(1))], int(m.group(2))
    cifar_blocks_per_stage(depth)  # raises for depths that are not 6n+2
    return ModelSpec(lambda **kw: family.build(depth=depth, **kw), CIFAR, 10)


def canonical(name: str, options: dict) -> tuple[str, dict]:
    """The shortest spelling of an architecture: cifar_resnet with depth 56 is resnet56
    (not where the name is an ImageNet net's), so runs named either way are one recipe."""
    key = name[len("cifar_"):] if name.startswith("cifar_") else None
    if key in CIFAR_FAMILIES and "depth" in options:
        named = f"{CIFAR_FAMILIES[key].prefix}{options['depth']}"
        if named not in _REGISTRY:
            return named, {k: v for k, v in options.items() if k != "depth"}
    return name, options


def available() -> list[str]:
    """Every registered name (the CIFAR families' names also accept any other 6n+2)."""
    cifar = [f"{f.prefix}{d}" for f in CIFAR_FAMILIES.values() for d in f.depths]
    return sorted(set(_REGISTRY) | set(cifar), key=_natural_key)


def spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    try:
        found = _cifar_spec(name)
    except BadInput as e:
        raise BadInput(f"model {name!r}: {e}") from None
    if found is None:
        raise BadInput(f"unknown model {name!r}; available: {', '.join(available())}")
    return found


def create_model(name: str, num_classes: Optional[int] = None, **options) -> nn.Module:
    """Build a registered architecture. `num_classes` defaults to the paper's dataset."""
    s = spec(name)
    try:
        return s.build(num_classes=num_classes or s.num_classes, **options)
    except TypeError as e:
        raise BadInput(f"model {name!r}: bad option ({e})") from None


def input_shape(name: str) -> tuple:
    """(H, W, C) the architecture was designed for."""
    return spec(name).input_shape


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


__all__ = ["create_model", "available", "canonical", "input_shape", "spec", "ModelSpec", "AlexNet",
           "AlexNetTorchvision", "GoogLeNet", "GoogLeNetTorchvision", "InceptionBlock", "BasicBlock", "Bottleneck", "LocalResponseNorm",
           "LeNet5", "LeNet5Classic", "NiN", "CifarResNet", "CifarPreActResNet",
           "ImageNetResNet", "VGG", "CIFAR_FAMILIES", "Family"]
