"""Every architecture in the zoo trains: with the engine's own train step (SGD with
momentum, its paper initialisation, dropout and auxiliary heads on), a few steps on
one small batch at the model's native input size drive its loss down - it memorises
the batch. The ImageNet-sized nets are marked slow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import models
from cnn_jax.train.state import TrainState
from cnn_jax.train.steps import make_optimizer, make_train_step
from cnn_jax.train.config import OptimiserConfig

# name -> (model options, learning rate, steps, batch). Nets without BatchNorm and with
# the papers' small initial weights (AlexNet, VGG, NiN, GoogLeNet) take a smaller step;
# the 224x224 nets memorise two images (a VGG-19 step costs ~10 s on a 2-core CPU)
# with a smaller step: one step on two images already moves 1000-way logits far.
CHEAP = {
    "lenet5": ({}, 0.1, 15, 4),
    "lenet5_classic": ({}, 0.01, 15, 4),
    "resnet20": ({}, 0.1, 10, 4),
    "plain20": ({}, 0.1, 10, 4),
    "cifar_resnet": ({"depth": 14}, 0.1, 10, 4),   # the families behind resnet20, plain20
    "cifar_plain": ({"depth": 14}, 0.1, 10, 4),
    "preact_resnet20": ({}, 0.1, 10, 4),           # He et al. 2016's unit
    "cifar_preact": ({"depth": 14}, 0.1, 10, 4),
    "nin": ({}, 0.01, 120, 4),  # no BN, ReLU on the class maps: slow to start
}
HEAVY = {
    "alexnet": ({}, 0.0005, 8, 2),
    **{f"vgg{d}": ({}, 0.002, 10, 2) for d in (11, 13, 16, 19)},
    **{f"vgg{d}_bn": ({"batch_norm": True}, 0.001, 6, 2) for d in (11, 13, 16, 19)},
    "googlenet": ({}, 0.01, 20, 2),
    **{f"resnet{d}": ({}, 0.01, 6, 2) for d in (18, 34, 50, 101, 152)},
    **{f"plain{d}": ({}, 0.01, 6, 2) for d in (18, 34)},
    **{f"resnet{d}": ({}, 0.1, 15, 4) for d in (32, 44, 56, 110)},
    # XLA's compile of the unrolled 1202-layer step runs for over 40 minutes on 2 cores,
    # so this one runs op by op (~65 s a step); at lr 0.1 or 0.01 the loss on 4 images
    # (15.7 at the start: the residual stream grows through 200 blocks a stage) diverges
    "resnet1202": ({}, 0.002, 8, 4),
    "preact_resnet1202": ({}, 0.002, 8, 4),
    **{f"plain{d}": ({}, 0.1, 15, 4) for d in (32, 44, 56, 110)},
    **{f"preact_resnet{d}": ({}, 0.1, 15, 4) for d in (32, 44, 56, 110)},
    "alexnet_torchvision": ({}, 0.001, 8, 2),
    "googlenet_torchvision": ({}, 0.01, 10, 2),
}
EAGER = {"resnet1202", "preact_resnet1202"}


def blocky_images(n: int, shape: tuple, blocks: int = 4) -> np.ndarray:
    """Random images made of blocks x blocks flat patches: unlike i.i.d. pixel noise,
    whose statistics a global average pool sees as identical for every image, these
    differ in what each net's pooled features can see."""
    h, w, c = shape
    coarse = np.random.default_rng(0).integers(0, 256, (n, blocks, blocks, c), dtype=np.uint8)
    rows = np.arange(h) * blocks // h
    cols = np.arange(w) * blocks // w
    return coarse[:, rows][:, :, cols]


def losses_on_one_batch(name: str, options: dict, lr: float, steps: int, batch: int = 4):
    registry_name = name.removesuffix("_bn")
    spec = models.spec(registry_name)
    model = models.create_model(registry_name, num_classes=spec.num_classes, **options)
    data = {"image": blocky_images(batch, spec.input_shape),
            "label": np.arange(batch, dtype=np.int32) % spec.num_classes}
    tx = make_optimizer(OptimiserConfig(momentum=0.9, weight_decay=0.0))
    normalise = lambda x: (x.astype(jnp.float32) - 127.5) / 64.0
    compiled = jax.jit if name not in EAGER else (lambda f, **_: f)
    step = compiled(make_train_step(model, tx, lambda s, w: lr, normalise), donate_argnums=0)

    @compiled
    def init():
        key = jax.random.key(1)
        variables = model.init({"params": key, "dropout": key},
                               jnp.zeros((1, *spec.input_shape), jnp.float32))
        return TrainState.create(variables, tx, jax.random.PRNGKey(2))

    state, losses = init(), []
    for _ in range(steps):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss"]))
    return np.array(losses)


def check_trains(name):
    options, lr, steps, batch = {**CHEAP, **HEAVY}[name]
    losses = losses_on_one_batch(name, options, lr, steps, batch)
    assert np.all(np.isfinite(losses)), losses
    # the first loss is about chance level (ln of the classes); memorising the batch
    # takes it far below that (most nets reach < 1/4 within the steps given; plain-110,
    # the degradation problem in miniature, creeps down to ~1/3). With a constant step
    # and momentum on two images the loss can overshoot again afterwards, so the
    # lowest loss is checked.
    assert losses[1:].min() < 0.4 * losses[0], f"{name}: loss went {losses.round(3)}"


def test_every_registered_model_is_covered():
    covered = {n.removesuffix("_bn") for n in {**CHEAP, **HEAVY}}
    assert set(models.available()) <= covered, set(models.available()) - covered


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "nin"
                                  else n for n in CHEAP])  # nin: 50 s, kept out of CI
def test_small_models_memorise_a_batch(name):
    check_trains(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HEAVY))
def test_large_models_memorise_a_batch(name):
    check_trains(name)
