"""config.model.ensemble: N members stacked in one model, trained as N independent networks on
the same batches, their outputs averaged."""

import jax
import ml_collections
import numpy as np
import pytest

from pdm_jax import configuration, models, optim, prediction, training
from pdm_jax.errors import ConfigError
from pdm_jax.models import layers
from pdm_jax.training import steps
from tests.conftest import load_config

TINY = {
    "cnn_bilstm": {"channels": (8,), "dilations": (1,), "lstm_hidden": 8, "dense": 8},
}


def _spec(name: str, ensemble: int, dropout: float = 0.0) -> layers.ModelSpec:
    cfg = load_config(name)
    cfg.model[name].update(TINY[name])
    cfg.model.update(ensemble=ensemble, dropout=dropout)
    return layers.spec_from_config(cfg.model, 6, 12)


def _inputs(rows: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(rows, 12, 6)).astype(np.float32),
        "mask": np.ones((rows, 12), bool),
    }


def _member(params, m):
    return jax.tree.map(lambda x: x[m], params)


# The ensemble code is model-agnostic; the CNN-BiLSTM keeps these tests cheap, and the TFT runs
# as a two-member ensemble end to end in tests/test_inference.py.
@pytest.mark.parametrize("name", ["cnn_bilstm"])
def test_members_are_stacked_and_member_0_is_the_single_model_of_the_seed(name):
    graphdef, params = models.init(_spec(name, 3), seed=5)
    assert isinstance(graphdef, models.Ensemble) and graphdef.size == 3
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(params))
    _, single = models.init(_spec(name, 1), seed=5)
    for stacked, alone in zip(jax.tree.leaves(params), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(stacked[0], alone)
    kernels = [leaf for leaf in jax.tree.leaves(params) if leaf.ndim >= 3 and np.ptp(leaf[0]) > 0]
    assert kernels and all(
        not np.array_equal(k[0], k[1]) and not np.array_equal(k[1], k[2]) for k in kernels
    )
    # Seeds never hand one member to two ensembles.
    seeds = {models.member_seed(s, m) for s in range(4) for m in range(3)}
    assert len(seeds) == 12


@pytest.mark.parametrize("name", ["cnn_bilstm"])
def test_an_ensemble_predicts_the_mean_of_its_members(name):
    spec = _spec(name, 3)
    graphdef, params = models.init(spec, seed=0)
    inputs = _inputs()
    out = models.apply(graphdef, params, inputs)["pred"]
    each = [models.apply(graphdef.member, _member(params, m), inputs)["pred"] for m in range(3)]
    np.testing.assert_allclose(out, np.mean(each, axis=0), rtol=1e-5, atol=1e-4)
    assert not np.allclose(each[0], each[1])
    predicted = prediction.make_predict_step(graphdef, spec)(params, inputs)
    np.testing.assert_allclose(predicted["pred"], out, rtol=1e-5, atol=1e-5)


def test_each_member_trains_exactly_as_it_would_alone():
    """Per-member clipping, Adam moments and parameter average: a clip threshold this low clips
    every step, so one global norm over the stacked members would change every update."""
    cfg = load_config("cnn_bilstm")
    cfg.train.update(clip_norm=0.05, ema_decay=0.9, learning_rate=0.01, warmup_steps=0)
    spec = _spec("cnn_bilstm", 2)
    graphdef, params = models.init(spec, seed=3)
    rng = np.random.default_rng(1)
    batches = [
        {**_inputs(8), "y": rng.uniform(0, 125, size=8).astype(np.float32)} for _ in range(4)
    ]

    def fit(graphdef, params, members):
        optimizer, _ = optim.make_optimizer(cfg.train, members)
        opt_state = optimizer.init(params)
        step = steps.make_train_step(graphdef, spec, optimizer)
        losses = []
        for i, batch in enumerate(batches):
            params, opt_state, out = step(params, opt_state, steps.train_arrays(batch), np.int32(i))
            losses.append(float(out["loss"]))
        return optim.eval_params(params, opt_state), losses

    together, losses = fit(graphdef, params, 2)
    alone = [fit(graphdef.member, _member(params, m), 1) for m in range(2)]
    for m, (member_params, _) in enumerate(alone):
        for a, b in zip(
            jax.tree.leaves(_member(together, m)), jax.tree.leaves(member_params), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    # The logged loss is the members' mean, on the scale of a single model's.
    np.testing.assert_allclose(losses, np.mean([alone[0][1], alone[1][1]], axis=0), rtol=1e-4)


@pytest.mark.parametrize("value", [0, -2, 1.5, "3"])
def test_ensemble_must_be_a_positive_integer(value):
    cfg = load_config("cnn_bilstm")
    cfg.model = ml_collections.ConfigDict({**cfg.model.to_dict(), "ensemble": value})
    with pytest.raises(ConfigError, match=r"config\.model\.ensemble"):
        configuration.validate(cfg)


def test_an_ensemble_run_stopped_and_resumed_ends_like_one_run_straight_through(tmp_path):
    """Stacked members, their per-member optimizer state and the ensemble's calibration go
    through the checkpoint and back: a run raised from 4 to 6 steps ends bit-identical."""
    from tests.conftest import tiny_cnn_config

    def config(num_steps: int):
        cfg = tiny_cnn_config()
        cfg.model.ensemble = 2
        cfg.data.window = 10
        cfg.train.update(num_steps=num_steps, batch_size=32, eval_every=2, warmup_steps=1)
        cfg.train.update(tensorboard=False, plots=False)
        cfg.checkpoint.every_steps = 2
        return cfg

    straight = training.train_and_evaluate(config(6), str(tmp_path / "straight"))
    training.train_and_evaluate(config(4), str(tmp_path / "resumed"))
    resumed = training.train_and_evaluate(config(6), str(tmp_path / "resumed"))
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == straight["steps"] == 6
    assert resumed["params_sha256"] == straight["params_sha256"]
    assert resumed["test"] == straight["test"] and resumed["calibration"] == straight["calibration"]
