"""The training loop's pieces that end-to-end runs cannot pin down deterministically."""

import jax
import numpy as np
import optax

from pdm_jax import models, optim, prediction, training
from pdm_jax.data import dataset
from pdm_jax.models import layers
from pdm_jax.training import evaluation, state, steps
from tests.conftest import load_config, tiny_cnn_config


def test_best_params_snapshot_survives_the_donating_train_step():
    cfg = tiny_cnn_config()
    prepared = dataset.prepare(cfg.data, cfg.seed)
    spec = layers.spec_from_config(cfg.model, len(prepared.scaler.features), cfg.data.window)
    graphdef, params = models.split(models.build(spec))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    step = steps.make_train_step(graphdef, spec, optimizer)
    batch = steps.train_arrays(prepared.train.gather(np.arange(32)))
    best = state.snapshot(params)
    kept = jax.tree.map(np.array, best)
    for i in range(2):
        params, opt_state, _ = step(params, opt_state, batch, i)
    # The donated originals are gone; the snapshot is intact and usable for evaluation.
    for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(a, b)
    result = evaluation.evaluate(prediction.make_predict_step(graphdef, spec), best, prepared.test)
    assert result["count"] == 100 and np.isfinite(result["rmse"])
    moved = evaluation.evaluate(prediction.make_predict_step(graphdef, spec), params, prepared.test)
    assert moved["rmse"] != result["rmse"]


def test_schedule_has_its_own_length():
    cfg = load_config("tft").train
    cfg.learning_rate, cfg.warmup_steps, cfg.schedule_steps = 1e-3, 10, 100
    schedule = optim.learning_rate_schedule(cfg)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - 1e-3) < 1e-9
    assert abs(float(schedule(100)) - 1e-5) < 1e-9 and abs(float(schedule(10_000)) - 1e-5) < 1e-9


def test_parameter_average_rides_in_the_optimizer_state():
    import jax.numpy as jnp

    from pdm_jax import averaging

    optimizer = optax.chain(optax.sgd(1.0), averaging.track_average(0.5))
    params = {"w": jnp.zeros(2)}
    state = optimizer.init(params)
    expected = np.zeros(2)
    for t, grad in enumerate([1.0, 2.0, 3.0]):
        updates, state = optimizer.update({"w": jnp.full(2, grad)}, state, params)
        params = optax.apply_updates(params, updates)
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * np.asarray(params["w"])
    np.testing.assert_allclose(averaging.averaged(state)["w"], expected, rtol=1e-6)
    assert optim.eval_params(params, state) is averaging.averaged(state)
    assert optim.eval_params(params, optax.sgd(1.0).init(params)) is params


def test_input_noise_jitters_observed_readings_only():
    import jax.numpy as jnp

    x = jnp.ones((64, 50, 4))
    mask = jnp.concatenate([jnp.zeros((64, 20)), jnp.ones((64, 30))], axis=1)
    batch = {"x": x * mask[..., None], "mask": mask, "y": jnp.zeros(64)}
    noisy = steps.noisy_inputs(batch, jax.random.key(0), 0.2)
    delta = np.asarray(noisy["x"] - batch["x"])
    assert np.all(delta[:, :20] == 0)  # left-padding stays exactly zero
    assert abs(delta[:, 20:].std() - 0.2) < 0.01 and abs(delta[:, 20:].mean()) < 0.01
    assert noisy["y"] is batch["y"]


def test_input_noise_reaches_the_training_step_from_the_config(tmp_path):
    """train.input_noise changes what a run learns: the config reaches the step."""

    def run(noise: float, name: str) -> str:
        cfg = tiny_cnn_config()
        cfg.data.window = 10
        cfg.train.update(num_steps=2, batch_size=32, eval_every=2, warmup_steps=1)
        cfg.train.update(tensorboard=False, plots=False, input_noise=noise)
        cfg.checkpoint.every_steps = 0
        return training.train_and_evaluate(cfg, str(tmp_path / name))["params_sha256"]

    assert run(0.5, "noisy") != run(0.0, "quiet")


def test_input_noise_must_not_be_negative():
    import pytest

    from pdm_jax import configuration
    from pdm_jax.errors import ConfigError

    cfg = load_config("cnn_bilstm")
    cfg.train.input_noise = -0.1
    with pytest.raises(ConfigError, match=r"config\.train\.input_noise"):
        configuration.validate(cfg)
