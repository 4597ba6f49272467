"""The run configuration's digest, pinned: every field declares what it does to a run's
numbers (cnn_jax.train.config), and the digests of known configurations, the
experiments' smoke nets among them, never move. A digest that moves makes every
existing run folder refuse to resume and every experiment retrain what it has."""
import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from cnn_jax.errors import BadInput
from cnn_jax.recipe import ADDED, OUTSIDE, RESULT, declaration, flat_name
from cnn_jax.train.config import TrainConfig

HOW_TO_DECLARE = ("a digest moved. If a field was added, declare it with added(default) "
                  "(in the digest only once set) or outside(default) (never): "
                  "cnn_jax/train/config.py says which is which")

# Written by the code before fields declared their digest role (every later field set,
# every recipe field changed, every field outside the digest changed): the same hex.
PINNED = {
    "default": ("386bd99497aee9fb", TrainConfig()),
    "every_later_field": ("c913016c740411e7", TrainConfig(
        input_pad=2, resize=64, eval_subset=100, train_subset=200, init_from="runs/x",
        classes="0,1", image_size=48, init_skip="fc", trainable="fc", warmup_steps=10)),
    "cosine_steps": ("8b749dc94ee5111b", TrainConfig(
        schedule="cosine", steps=1234, model="cifar_resnet", model_options={"depth": 56})),
    "every_recipe_field": ("5e4502af1cabb60f", TrainConfig(
        model="vgg16", model_options={"batch_norm": True}, data="mnist", holdout=500, steps=99,
        batch=64, seed=7, lr=0.05, momentum=0.8, nesterov=True, weight_decay=5e-4,
        decay_norm_and_bias=False, schedule="onecycle", milestones=(10, 20), warmup_lr=0.01,
        warmup_until_error=0.7, label_smoothing=0.1, crop_pad=2, flip=False, colour_shift=20.0,
        pca_colour=True, normalise="standard", dtype="bfloat16", bn_group=16)),
    "outside_fields_set": ("386bd99497aee9fb", TrainConfig(
        data_dir="/d", steps_per_call=10, conv_kernels="xla", eval_batch=7, eval_train_set=True,
        log_every=3, eval_every=4, checkpoint_every=5, keep_checkpoints=1, workers=3, out="x",
        progress=False)),
}


@pytest.mark.parametrize("name", PINNED)
def test_digests_of_known_configurations_do_not_move(name):
    digest, cfg = PINNED[name]
    assert cfg.digest() == digest, HOW_TO_DECLARE


def _args(**kw):
    return argparse.Namespace(data=None, data_dir=None, workers=None, **kw)


def smoke_configs() -> dict:
    """Every experiment's smoke nets, built as the experiments build them (seed 0;
    config_digest of each run folder a smoke run of the code before this wrote)."""
    from cnn_jax.experiment import Net
    from experiments import (augmentation_ablation, identity_blocks, layer_responses,
                             lenet_mnist, plain_vs_resnet, transfer_learning, zoo_cifar)
    out, cfgs = Path("unused"), {}
    pvr = plain_vs_resnet.PRESETS["smoke"]
    for family in ("plain", "resnet"):
        for depth in (8, 14):
            net = Net(family, depth)
            cfgs[f"plain_vs_resnet/{net.name}"] = plain_vs_resnet.run_config(net, pvr, 0, out)
    for v in ("lenet5", "lenet5_classic"):
        cfgs[f"lenet_mnist/{v}"] = lenet_mnist.run_config(
            v, lenet_mnist.PRESETS["smoke"], 0, _args(), out, 60_000)
    for k in zoo_cifar.ZOO:
        cfgs[f"zoo_cifar/{k}"] = zoo_cifar.run_config(k, zoo_cifar.PRESETS["smoke"], 0, _args(),
                                                      out)
    for s in augmentation_ablation.SETTINGS:
        cfgs[f"augmentation_ablation/{s}"] = augmentation_ablation.run_config(
            s, augmentation_ablation.PRESETS["smoke"], 0, _args(), out)
    lr = layer_responses.PRESETS["smoke"]
    for net in (Net("plain", 8), Net("resnet", 8), Net("resnet", 14)):
        cfgs[f"layer_responses/{net.name}"] = layer_responses.here_config(net, lr, 0, _args(),
                                                                          out)
    base = Path("runs/plain_vs_resnet-smoke/nets/resnet8-seed0")
    base_cfg = plain_vs_resnet.run_config(Net("resnet", 8), pvr, 0, base)
    for arm in identity_blocks.ARMS:
        cfgs[f"identity_blocks/{arm}"] = identity_blocks.arm_config(
            arm, base_cfg, identity_blocks.PRESETS["smoke"], 0, base, out, None)
    cfgs["transfer_learning/pretrain"] = transfer_learning.pretrain_config(
        transfer_learning.PRESETS["smoke"], out, data="cifar10")
    return cfgs


SMOKE = {
    "plain_vs_resnet/plain8": "f37bbfd5aace1d20", "plain_vs_resnet/plain14": "bf86548ee8d260b3",
    "plain_vs_resnet/resnet8": "20e937f5e7d532ca", "plain_vs_resnet/resnet14": "59f8dddac3dccf02",
    "lenet_mnist/lenet5": "92249749a839d245", "lenet_mnist/lenet5_classic": "e7d9a7f79d35fec5",
    "zoo_cifar/lenet5": "63a71a933296f373", "zoo_cifar/alexnet": "92fcc675d65012bb",
    "zoo_cifar/vgg16_bn": "09bf0aa7aec8b783", "zoo_cifar/nin": "c3656b3901d8a437",
    "zoo_cifar/googlenet": "3ba037dbf7ae79f6", "zoo_cifar/resnet20": "b02519d4b62178bc",
    "zoo_cifar/resnet56": "edcc712942321fb3",
    "augmentation_ablation/none": "f1f506fa37d3c60c",
    "augmentation_ablation/crop": "af48f813f8a7ddab",
    "augmentation_ablation/crop+mirror": "2b6ede13f2e6cbd9",
    "augmentation_ablation/+colour shift": "56b8b626168479b5",
    "augmentation_ablation/+PCA colour": "7e66f554b75bc176",
    "layer_responses/plain8": "57fb98b30b53a86f", "layer_responses/resnet8": "612ed2156d0834e5",
    "layer_responses/resnet14": "eeeff037805535a8",
    "identity_blocks/control": "9b6208c7ce0baf22", "identity_blocks/residual": "3901f425bc8aac0f",
    "identity_blocks/plain": "0be2a92d8f2617d8",
    "transfer_learning/pretrain": "489cdcdc7f7afe8c",
}


def test_the_experiments_smoke_nets_keep_their_digests():
    digests = {k: c.digest() for k, c in smoke_configs().items()}
    assert set(digests) == set(SMOKE)
    moved = {k: (SMOKE[k], d) for k, d in digests.items() if d != SMOKE[k]}
    assert not moved, f"{HOW_TO_DECLARE}: {moved}"


def test_the_training_command_line_keeps_its_digest():
    from cnn_jax.train.__main__ import build_parser, config_of
    args = build_parser().parse_args(
        ["--model", "resnet8", "--steps", "6", "--batch", "16", "--train-subset", "256",
         "--eval-subset", "200", "--seed", "3", "--workers", "0"])
    assert config_of(args).digest() == "da5c477e89d2ed61", HOW_TO_DECLARE
    # the same fields by section.field, through --set
    dotted = build_parser().parse_args(
        ["--set", "model.name=resnet8", "schedule.steps=6", "optimiser.batch=16",
         "data.train_subset=256", "eval_subset=200", "run.seed=3", "run.workers=0"])
    assert config_of(dotted).digest() == "da5c477e89d2ed61"


def test_every_field_declares_its_role_and_an_undeclared_one_is_named():
    roles = {flat_name(f): decl.role for _, f, decl, _ in TrainConfig().declared()}
    assert set(roles.values()) == {RESULT, ADDED, OUTSIDE}
    assert roles["conv_kernels"] == OUTSIDE and roles["label_smoothing"] == RESULT
    assert roles["eval_subset"] == ADDED and roles["optimizer"] == ADDED

    @dataclasses.dataclass(frozen=True)
    class Newer:
        augment: str = "none"   # a field without a declaration

    with pytest.raises(TypeError, match="field augment does not declare .* added"):
        declaration(dataclasses.fields(Newer)[0])


def test_an_added_field_is_in_the_digest_only_once_set():
    base = TrainConfig()
    assert "resize" not in base.result_fields()
    assert TrainConfig(resize=64).digest() != base.digest()
    assert "steps" not in base.result_fields()          # the paper's schedule ignores it
    assert TrainConfig(steps=10).digest() == base.digest()
    assert TrainConfig(schedule="cosine", steps=10).digest() != \
        TrainConfig(schedule="cosine", steps=20).digest()
    assert TrainConfig(optimizer="adamw").digest() != base.digest()


def test_the_recipe_is_in_sections_and_reads_like_one():
    cfg = TrainConfig(model="resnet56", lr=0.05, **{"evaluation.every": 500}, augment="resnet")
    assert cfg.model.name == "resnet56" and cfg.schedule.lr == 0.05
    assert cfg.evaluation.every == 500 and cfg.data.augment == "resnet"
    assert cfg.get("eval_every") == cfg.get("evaluation.every") == 500
    assert list(cfg.to_json()) == ["data", "model", "optimiser", "schedule", "evaluation",
                                   "run"]
    assert cfg.replace(**{"schedule.lr": 0.1}).schedule.lr == 0.1 and cfg.schedule.lr == 0.05
    with pytest.raises(BadInput, match="unknown configuration field 'schedule.rate'"):
        cfg.replace(**{"schedule.rate": 0.1})
    with pytest.raises(AttributeError, match="immutable"):
        cfg.model = None


@pytest.mark.parametrize("name", PINNED)
def test_config_files_flat_or_in_sections_read_back_to_the_same_digest(name, tmp_path):
    digest, cfg = PINNED[name]
    nested = TrainConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    flat = TrainConfig.from_json(json.loads(json.dumps(cfg.flat())))   # as written before
    assert nested == cfg == flat and nested.digest() == flat.digest() == digest


def test_old_config_files_stay_readable_and_newer_ones_are_refused_by_name(tmp_path):
    old = {**TrainConfig().flat(), "conv_grad": "xla"}   # conv_kernels' older name
    old.pop("conv_kernels")
    assert TrainConfig.from_json(old).run.conv_kernels == "xla"
    (tmp_path / "config.json").write_text(json.dumps(
        {"config": {**TrainConfig().flat(), "mixup": 0.2, "crop_side": 224}}))
    with pytest.raises(BadInput, match=r"config.json: unknown configuration field\(s\) "
                                       r"crop_side, mixup \(written by a newer version"):
        TrainConfig.of_run(tmp_path)
    nested = TrainConfig().to_json()
    nested["schedule"]["rate"] = 1
    (tmp_path / "config.json").write_text(json.dumps({"config": nested}))
    with pytest.raises(BadInput, match=r"unknown configuration field\(s\) schedule.rate"):
        TrainConfig.of_run(tmp_path)
    with pytest.raises(BadInput, match="expected the --out folder of a training run"):
        TrainConfig.of_run(tmp_path / "nowhere")
