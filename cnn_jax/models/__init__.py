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

from cnn_jax.models.alexnet import AlexNet, AlexNetTorchvision
from cnn_jax.models.inception import GoogLeNet, GoogLeNetTorchvision, InceptionBlock
from cnn_jax.models.layers import BasicBlock, Bottleneck, LocalResponseNorm
from cnn_jax.models.lenet import LeNet5, LeNet5Classic
from cnn_jax.models.nin import NiN
from cnn_jax.models.resnet import (IMAGENET_STAGES, CifarResNet, ImageNetResNet,
                                   cifar_blocks_per_stage)
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

# CIFAR nets of any depth 6n+2 are built on request; these are the ones listed.
CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)


def _cifar_spec(name: str) -> Optional[ModelSpec]:
    m = re.fullmatch(r"(resnet|plain)(\d+)", name)
    if not m:
        return None
    kind, depth = m.group(1), int(m.group(2))
    cifar_blocks_per_stage(depth)  # raises for depths that are not 6n+2
    if kind == "plain":
        return ModelSpec(lambda **kw: CifarResNet(depth=depth, shortcut=None, **kw), CIFAR, 10)
    return ModelSpec(lambda **kw: CifarResNet(depth=depth, **kw), CIFAR, 10)


def available() -> list[str]:
    """Every registered name (CIFAR `resnetN`/`plainN` also accept any other 6n+2)."""
    cifar = [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS] + [f"plain{d}" for d in CIFAR_PLAIN_DEPTHS]
    return sorted(set(_REGISTRY) | set(cifar), key=_natural_key)


def spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    try:
        found = _cifar_spec(name)
    except ValueError as e:
        raise ValueError(f"model {name!r}: {e}") from None
    if found is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return found


def create_model(name: str, num_classes: Optional[int] = None, **options) -> nn.Module:
    """Build a registered architecture. `num_classes` defaults to the paper's dataset."""
    s = spec(name)
    try:
        return s.build(num_classes=num_classes or s.num_classes, **options)
    except TypeError as e:
        raise TypeError(f"model {name!r}: bad option ({e})") from None


def input_shape(name: str) -> tuple:
    """(H, W, C) the architecture was designed for."""
    return spec(name).input_shape


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


__all__ = ["create_model", "available", "input_shape", "spec", "ModelSpec", "AlexNet",
           "AlexNetTorchvision", "GoogLeNet", "GoogLeNetTorchvision", "InceptionBlock", "BasicBlock", "Bottleneck", "LocalResponseNorm",
           "LeNet5", "LeNet5Classic", "NiN", "CifarResNet", "ImageNetResNet", "VGG"]
