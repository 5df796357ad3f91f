import jax
import numpy as np
import optax
import pytest

from pdm_jax import models, steps
from pdm_jax.data import dataset
from pdm_jax.errors import ConfigError
from pdm_jax.models import layers
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
    batch = steps.as_arrays(prepared.train.gather(np.arange(16)))
    params, opt_state, metrics = step(params, opt_state, batch, 0)
    assert np.isfinite(float(metrics["loss"]))
    out = steps.make_predict_step(graphdef, spec)(params, batch)
    assert out["pred"].shape == (16, spec.num_outputs) and out["point"].shape == (16,)


def test_unknown_model_name():
    cfg = load_config("tft")
    cfg.model.name = "xgboost"
    with pytest.raises(ConfigError, match="unknown model 'xgboost'"):
        models.build(layers.spec_from_config(cfg.model, 14, 30))
