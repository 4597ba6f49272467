"""A trained network, wherever it came from: the one way to load it and run it.

    net = load_trained("runs/resnet20")                  # a training run's --out folder
    net = load_trained("resnet20-12fca82f.th")           # released PyTorch weights
    net = load_trained("runs/photos/finetune/seed0")     # a transfer classifier (model.json)
    probs = jax.jit(net.probabilities)(net.variables, uint8_images)

`Trained` holds what inference needs: the architecture and its options, the
variables, how the network's inputs were made from uint8 images (the saved
normaliser, the device-side resize, the host-side padding), the images' size, the
training configuration when there is one, and the convolution kernels the training
loop would use. `Trained.apply` is the forward pass every inference path calls
(evaluation, ensembles, features, layer statistics): normalise, then the model in
inference mode with those kernels.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cnn_jax.data.dataset import DataSpec, Dataset, open_split
from cnn_jax.data.ops import Normalizer
from cnn_jax.data.sources import SHARED_DATA, imagefolder_path, streams
from cnn_jax.errors import BadInput
from cnn_jax.models import create_model, input_shape
from cnn_jax.models.convert import WEIGHT_SUFFIXES, load_torch_weights
from cnn_jax.train.checkpoint import load_variables
from cnn_jax.train.config import TrainConfig
from cnn_jax.train.conv_kernels import inference_convolutions, resolve
from cnn_jax.train.inputs import (make_input_fn, source_normaliser, training_image_shape,
                                  weights_normaliser)
from cnn_jax.train.metrics import params_digest


@dataclasses.dataclass(frozen=True)
class Trained:
    source: str                      # the run folder, weights file or classifier folder
    model_name: str                  # registry name
    options: dict                    # model options
    variables: dict                  # {'params', 'batch_stats'} as host arrays
    normaliser: Optional[Normalizer]  # uint8 -> float, as in training (None: x as float)
    image_shape: tuple               # (H, W, C) of its training images (padded)
    num_classes: int
    resize: int = 0                  # resized on the device to resize x resize (0: not)
    input_pad: int = 0               # zero-padded on the host first (LeNet's 28 -> 32)
    config: Optional[TrainConfig] = None   # None for released weights
    dtype: str = "float32"
    kernels: str = "xla"             # the convolutions (cnn_jax.train.conv_kernels.resolve)
    classes: Optional[tuple] = None  # the class names, where the source says them
    dataset: Optional[str] = None    # weights files: the dataset they were trained on, if known

    @property
    def data(self) -> Optional[str]:
        """The dataset it was trained on: a run's own; for weights files, where known."""
        return self.config.data.name if self.config is not None else self.dataset

    @property
    def input_size(self) -> int:
        """The side of the square input the model sees."""
        return self.resize or self.image_shape[0]

    def digest(self) -> str:
        return params_digest({"params": self.variables["params"],
                              "batch_stats": self.variables.get("batch_stats", {})})

    @property
    def model(self):
        dtype = jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32
        return create_model(self.model_name, num_classes=self.num_classes, dtype=dtype,
                            **self.options)

    def to_input(self, images):
        """uint8 [B, H, W, C] -> the model's input (on the device)."""
        return make_input_fn(self.normaliser, self.resize)(images)

    def apply(self, variables, images, **kwargs):
        """Logits of uint8 images, in inference mode (kwargs go to `model.apply`, e.g.
        capture_intermediates). Pure: jit it, map it over stacked variables."""
        variables = {k: v for k, v in variables.items() if v}
        with inference_convolutions(self.kernels):
            return self.model.apply(variables, self.to_input(images), train=False, **kwargs)

    def probabilities(self, variables, images):
        logits = self.apply(variables, images)
        return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)

    def split(self, split: str, data: Optional[str] = None,
              data_dir: Optional[str] = None) -> Dataset:
        """`split` as this network sees it: the run's dataset (or `data`) with its
        holdout, classes, image size and padding; for weights files the named data at
        the network's input side (full-size images: the papers' test views)."""
        if self.config is not None:
            spec = self.config.data_spec(data_dir)
            if data:
                spec = dataclasses.replace(spec, name=data, classes="")
            return open_split(spec, split)
        data = data or self.dataset
        if not data:
            raise BadInput(f"{self.source}: a weights file does not say which dataset "
                           f"it was trained on; name it (e.g. --data cifar10)")
        side = self.image_shape[0]
        # full-size photos (a stream, or a folder seen by an ImageNet-size net): the
        # papers' test views at the net's side; small images as they are
        photos = streams(data) or (imagefolder_path(data) is not None and side >= 64)
        spec = DataSpec(data, data_dir, augment="center" if photos else "cifar",
                        image_size=side if photos else 0)
        dataset = open_split(spec, split)
        if min(dataset.image_shape[:2]) < side:
            raise BadInput(f"{self.source}: {data} holds {dataset.image_shape[0]}x"
                           f"{dataset.image_shape[1]} images, smaller than the "
                           f"{side}x{side} this network was trained on")
        return dataset


REFERENCE_DIR = SHARED_DATA.parent / "reference"


def released_weights(name: str) -> Optional[Path]:
    """The released weights of `name` (e.g. "resnet56": akamaster's CIFAR ResNets, trained
    on the lossless CIFAR-10) in $CNN_JAX_REFERENCE_DIR or ../shared/reference, if any."""
    for folder in filter(None, (os.environ.get("CNN_JAX_REFERENCE_DIR"), REFERENCE_DIR)):
        found = sorted(Path(folder).glob(f"{name}-*.th"))
        if found:
            return found[0]
    return None


def classes_of(name: str, options: dict, variables: dict, image_shape: tuple) -> int:
    """How many classes `variables` of `name` score: the shapes that change with
    num_classes (traced, not computed) read off the variables themselves."""
    def shapes(k):
        model = create_model(name, num_classes=k, **options)
        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        return jax.eval_shape(lambda v: model.init(jax.random.key(0), v), x)["params"]
    for (path, a), b, ours in zip(jax.tree_util.tree_leaves_with_path(shapes(7)),
                                  jax.tree.leaves(shapes(11)),
                                  jax.tree.leaves(variables["params"])):
        for axis, (m, n) in enumerate(zip(a.shape, b.shape)):
            if (m, n) == (7, 11):
                return int(np.shape(ours)[axis])
    raise ValueError(f"{name}: found no classifier whose size follows num_classes")


def load_trained(source, arch: Optional[str] = None) -> Trained:
    """A training run's --out folder (its latest checkpoint, its saved normaliser), a
    PyTorch weights file (torchvision/timm, or a CIFAR ResNet of the reproduction in
    cnn_jax.models.convert; the architecture detected from its keys unless `arch`
    names it), or a classifier folder of cnn_jax.transfer (MODEL_FILE). Errors name the
    source and what was expected."""
    path = Path(source)
    if (path / MODEL_FILE).is_file():
        return _load_classifier(path)
    if path.suffix in WEIGHT_SUFFIXES:
        name, options, variables = load_torch_weights(path, arch)
        shape = input_shape(name)
        classes = classes_of(name, options, variables, shape)
        # a 10-way net of the CIFAR layout (the reproduction's ResNets) is a CIFAR-10 net
        cifar10 = shape[:2] == (32, 32) and classes == 10
        return Trained(str(path), name, options, jax.device_get(variables),
                       weights_normaliser(name), shape, classes, kernels=resolve("auto"),
                       dataset="cifar10" if cifar10 else None)
    if not (path / "config.json").is_file():
        raise BadInput(f"{path}: expected the --out folder of a training run, holding "
                       f"config.json and checkpoints/, or a weights file "
                       f"({', '.join(WEIGHT_SUFFIXES)})")
    cfg = TrainConfig.of_run(path)
    if arch and arch != cfg.model.name:
        raise BadInput(f"{path}: trained a {cfg.model.name}, not a {arch}")
    variables = jax.device_get(load_variables(path))
    shape = training_image_shape(path)
    seen = (cfg.data.resize, cfg.data.resize, shape[2]) if cfg.data.resize else shape
    return Trained(str(path), cfg.model.name, dict(cfg.model.options), variables,
                   source_normaliser(path), shape,
                   classes_of(cfg.model.name, dict(cfg.model.options), variables, seen),
                   cfg.data.resize, cfg.data.input_pad, cfg, cfg.model.dtype, resolve("auto", dtype=cfg.model.dtype))


MODEL_FILE = "model.json"  # a classifier folder of cnn_jax.transfer (save_classifier)


def _load_classifier(folder: Path) -> Trained:
    """A classifier folder: model.json (architecture, classes, input recipe) with its
    variables in an engine run named there, or in classifier/ beside it."""
    meta = json.loads((folder / MODEL_FILE).read_text())
    if meta.get("run"):
        run = folder / meta["run"]
        variables, config = jax.device_get(load_variables(run)), TrainConfig.of_run(run)
    else:
        with ocp.StandardCheckpointer() as ckpt:
            variables, config = ckpt.restore((folder / "classifier").absolute()), None
    norm = meta["normaliser"]
    normaliser = Normalizer(np.asarray(norm["mean"], np.float32),
                            np.asarray(norm["std"], np.float32)) if norm else None
    size = meta["image_size"]
    return Trained(str(folder), meta["model"], meta["options"], variables, normaliser,
                   (size, size, 3), len(meta["classes"]), meta.get("resize", 0),
                   config=config, dtype=config.model.dtype if config else "float32",
                   kernels=resolve("auto", dtype=config.model.dtype if config else "float32"),
                   classes=tuple(meta["classes"]))


__all__ = ["Trained", "load_trained", "released_weights", "MODEL_FILE"]
