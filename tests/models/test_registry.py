import jax
import ml_collections
import numpy as np
import optax
import pytest

from pdm_jax import configuration, models, prediction
from pdm_jax.data import dataset
from pdm_jax.errors import ConfigError
from pdm_jax.models import layers
from pdm_jax.training import steps
from tests.conftest import load_config


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_registry_builds_each_model_and_a_train_step_runs_on_real_windows(name):
    cfg = load_config(name)
    prepared = dataset.prepare(cfg.data, cfg.seed)
    spec = layers.spec_from_config(cfg.model, prepared.train.features.shape[1], cfg.data.window)
    graphdef, params = models.split(models.build(spec, seed=0))
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    step = steps.make_train_step(graphdef, spec, optimizer)
    batch = steps.train_arrays(prepared.train.gather(np.arange(16)))
    params, opt_state, metrics = step(params, opt_state, batch, 0)
    assert np.isfinite(float(metrics["loss"]))
    out = prediction.make_predict_step(graphdef, spec)(params, batch)
    assert out["pred"].shape == (16, spec.num_outputs) and out["point"].shape == (16,)


def test_unknown_model_name():
    cfg = load_config("tft")
    cfg.model.name = "xgboost"
    with pytest.raises(ConfigError, match="unknown model 'xgboost'"):
        models.build(layers.spec_from_config(cfg.model, 14, 30))


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_outputs_are_the_head_times_target_scale_plus_target_offset(name):
    cfg = load_config(name)
    cfg.model.update(target_scale=1.0, target_offset=0.0)
    plain = layers.spec_from_config(cfg.model, 14, 30)
    cfg.model.update(target_scale=25.0, target_offset=60.0)
    shifted = layers.spec_from_config(cfg.model, 14, 30)
    assert (shifted.target_scale, shifted.target_offset) == (25.0, 60.0)
    x = np.random.default_rng(0).normal(size=(4, 30, 14)).astype(np.float32)
    inputs = {"x": x, "mask": np.ones((4, 30), bool)}
    outs = []
    for spec in (plain, shifted):
        graphdef, params = models.split(models.build(spec, seed=0))
        outs.append(np.asarray(models.apply(graphdef, params, inputs)["pred"]))
    np.testing.assert_allclose(outs[1], outs[0] * 25.0 + 60.0, rtol=1e-5, atol=1e-3)


def test_target_offset_must_be_a_number():
    cfg = load_config("cnn_bilstm")  # a config file may set any type; overrides are typed
    cfg.model = ml_collections.ConfigDict({**cfg.model.to_dict(), "target_offset": "mid"})
    with pytest.raises(ConfigError, match=r"model\.target_offset"):
        configuration.validate(cfg)
