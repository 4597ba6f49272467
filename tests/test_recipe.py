"""The recipe by name: the update rule (`--optimizer`, its options) and the evaluations
a run declares (`--evaluations`) are fields of the recipe, recorded in config.json,
honoured by the loop, refused when misspelt."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.errors import BadInput
from cnn_jax.train import TrainConfig
from cnn_jax.train.config import OPTIMIZERS, OptimiserConfig
from cnn_jax.train.loop import train
from cnn_jax.train.steps import make_optimizer
from test_train import SMALL, run_cli


def test_every_update_rule_by_name_moves_the_weights_its_own_way():
    params = {"conv": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4)},
              "bn": {"scale": jnp.ones(4)}}
    grads = jax.tree.map(lambda p: 0.1 * jnp.sin(3 * p) + 0.05, params)
    directions = {}
    for name in OPTIMIZERS:
        tx = make_optimizer(OptimiserConfig(name=name))
        state = tx.init(params)
        for _ in range(2):
            update, state = tx.update(grads, state, params)
        directions[name] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(update)])
        assert np.isfinite(directions[name]).all()
    for a in OPTIMIZERS:
        for b in OPTIMIZERS:
            if a < b:
                assert not np.allclose(directions[a], directions[b]), (a, b)
    # adamw decouples the decay: its direction is adam's plus wd * p exactly
    adam = make_optimizer(OptimiserConfig(name="adam", weight_decay=0.0))
    adamw = make_optimizer(OptimiserConfig(name="adamw", weight_decay=0.1))
    ua, _ = adam.update(grads, adam.init(params), params)
    uw, _ = adamw.update(grads, adamw.init(params), params)
    jax.tree.map(lambda a, w, p: np.testing.assert_allclose(w, a + 0.1 * p, rtol=1e-6),
                 ua, uw, params)


def test_a_run_records_its_update_rule_and_trains_with_it(tmp_path):
    sgd = train(TrainConfig(**SMALL, steps=4, out=str(tmp_path / "sgd")))
    adamw = train(TrainConfig(**{**SMALL, "lr": 1e-3}, steps=4, optimizer="adamw",
                              optimizer_options={"b2": 0.99}, out=str(tmp_path / "adamw")))
    assert sgd["final_params_digest"] != adamw["final_params_digest"]
    saved = json.loads((tmp_path / "adamw" / "config.json").read_text())["config"]["optimiser"]
    assert saved["name"] == "adamw" and saved["options"] == {"b2": 0.99}
    assert sgd["config"]["optimiser"]["name"] == "sgd"


def test_a_misspelt_update_rule_or_option_is_refused_by_name(tmp_path):
    r = run_cli(tmp_path / "run", "--optimizer", "adamx")
    assert r.returncode == 2
    assert "--optimizer: must be one of sgd, nesterov, adam, adamw, rmsprop, lamb, lars; " \
           "got 'adamx'" in r.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(BadInput, match=r"--optimizer-options: beta: not an option of adamw "
                                       r"\(its options: b1, b2, eps\)"):
        TrainConfig(optimizer="adamw", optimizer_options={"beta": 0.9}).validate()
    with pytest.raises(BadInput, match="--momentum: --optimizer adamw has no momentum"):
        TrainConfig(optimizer="adamw", momentum=0.5).validate()


def test_declared_evaluations_run_when_declared_and_land_in_the_results(tmp_path):
    cfg = TrainConfig(**{**SMALL, "eval_every": 4}, steps=4, out=str(tmp_path / "run"),
                      evaluations=("test:10@end", "train_set:2@2"))
    r = train(cfg)
    assert 0 <= r["final_test_10views_error"] <= 1 and "test/" in r["final_test_10views_data"]
    assert 0 <= r["final_train_set_2views_error"] <= 1
    assert r["eval_split"] == "test" and "final_test_error" in r      # the main one
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines()]
    assert [x["step"] for x in lines if "train_set_2views_error" in x] == [2, 4]
    assert [x["step"] for x in lines if "eval_error" in x] == [4]
    assert not any("test_10views_error" in x for x in lines)            # at the end only
    with pytest.raises(BadInput, match=r"--evaluations 'tset:10': expected SPLIT"):
        TrainConfig(evaluations=("tset:10",)).validate()
