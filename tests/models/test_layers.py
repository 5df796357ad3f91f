import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.errors import ConfigError
from pdm_jax.models import layers
from tests.conftest import load_config


def test_quantile_loss_matches_hand_computation():
    pred = jnp.array([[8.0, 10.0, 12.0], [0.0, 5.0, 6.0]])
    y = jnp.array([11.0, 2.0])
    # unit 0: errors y - pred = 3, 1, -1 -> 0.1*3, 0.5*1, (0.9-1)*-1 = 0.3, 0.5, 0.1 -> mean 0.3
    # unit 1: errors 2, -3, -4 -> 0.2, (0.5-1)*-3=1.5, (0.9-1)*-4=0.4 -> mean 0.7
    loss = layers.quantile_loss(pred, y, (0.1, 0.5, 0.9))
    assert float(loss) == pytest.approx(0.5)
    weighted = layers.quantile_loss(pred, y, (0.1, 0.5, 0.9), weight=jnp.array([1.0, 0.0]))
    assert float(weighted) == pytest.approx(0.3)
    assert layers.loss(pred, y, (0.1, 0.5, 0.9)).dtype == jnp.float32


def test_mse_and_point_prediction():
    pred = jnp.array([[3.0], [1.0]], jnp.bfloat16)
    y = jnp.array([1.0, 1.0])
    assert float(layers.loss(pred, y, ())) == pytest.approx(2.0)
    assert layers.point_prediction(pred, ()).tolist() == [3.0, 1.0]
    q = jnp.array([[1.0, 2.0, 3.0]])
    assert layers.point_prediction(q, (0.1, 0.5, 0.9)).tolist() == [2.0]


def test_dropout_is_identity_without_key_and_keeps_the_mean():
    x = jnp.ones((200, 200))
    assert layers.dropout(x, 0.1, None) is x
    y = layers.dropout(x, 0.1, jax.random.key(0))
    assert 0.85 < float((y == 0).mean()) * 10 < 1.15
    assert float(y.mean()) == pytest.approx(1.0, abs=0.02)


def test_spec_from_config_checks_dtype_and_policy():
    cfg = load_config("tft")
    spec = layers.spec_from_config(cfg.model, num_features=14, window=30)
    assert spec.quantiles == (0.1, 0.5, 0.9) and spec.num_outputs == 3
    assert spec.hp("hidden", 0) == 64
    cfg.model.remat_policy = "sometimes"
    with pytest.raises(ConfigError, match=r"config\.model\.remat_policy"):
        layers.spec_from_config(cfg.model, num_features=14, window=30)
    cfg = load_config("cnn_bilstm")
    with pytest.raises(ConfigError, match=r"config\.compute\.dtype"):
        layers.spec_from_config(cfg.model, num_features=14, window=30, dtype="float16")


def test_layer_norm_statistics_in_fp32():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)) * 100, jnp.bfloat16)
    y = layers.layer_norm(x, jnp.ones(64), jnp.zeros(64))
    assert y.dtype == jnp.bfloat16
    assert np.allclose(np.asarray(y, np.float32).mean(-1), 0, atol=0.05)


@pytest.mark.parametrize("shape,param_shape", [((6, 16), (16,)), ((3, 5, 16), (3, 1, 16))])
def test_layer_norm_hand_written_gradient_equals_autodiff(shape, param_shape):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
    s = jnp.asarray(rng.normal(size=param_shape), jnp.float32)
    b = jnp.asarray(rng.normal(size=param_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def reference(x, s, b):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * s + b

    def loss(fn):
        return lambda x, s, b: jnp.sum(fn(x, s, b) * w)

    np.testing.assert_allclose(layers.layer_norm(x, s, b), reference(x, s, b), rtol=1e-5, atol=1e-5)
    got = jax.grad(loss(layers.layer_norm), argnums=(0, 1, 2))(x, s, b)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, s, b)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_huber_is_quadratic_inside_delta_and_linear_beyond():
    import jax.numpy as jnp

    from pdm_jax.models import layers as lyr

    pred = jnp.asarray([[15.0], [40.0]])
    y = jnp.asarray([10.0, 20.0])
    # |5| -> 0.5 * 25 = 12.5; |20| -> 0.5 * 100 + 10 * 10 = 150
    assert float(lyr.loss(pred, y, (), point_loss="huber", huber_delta=10.0)) == 81.25
    assert float(lyr.loss(pred, y, ())) == (25 + 400) / 2
