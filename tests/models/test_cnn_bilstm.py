"""CNN-BiLSTM: shapes and dtypes, masking, remat, dropout, the custom VJP, and that it learns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdm_jax.errors import ConfigError
from pdm_jax.models import apply, build, layers, split
from tests.conftest import load_config

B, T, F = 6, 30, 14
SMALL = {"channels": (8, 8), "lstm_hidden": 8, "dense": 8}


def make_spec(small: bool = True, **overrides) -> layers.ModelSpec:
    """The spec of the real configs/cnn_bilstm.py; `small` shrinks the widths for speed."""
    cfg = load_config("cnn_bilstm")
    kwargs = {
        k: overrides.pop(k)
        for k in ("static_cardinalities", "num_known", "dtype")
        if k in overrides
    }
    for k in ("quantiles", "remat", "remat_policy", "dropout"):
        if k in overrides:
            cfg.model[k] = overrides.pop(k)
    spec = layers.spec_from_config(cfg.model, num_features=F, window=T, **kwargs)
    return with_hparams(spec, **{**(SMALL if small else {}), **overrides})


def with_hparams(spec: layers.ModelSpec, **hparams) -> layers.ModelSpec:
    return dataclasses.replace(
        spec, hparams=tuple(sorted({**dict(spec.hparams), **hparams}.items()))
    )


def make_inputs(spec: layers.ModelSpec, seed: int = 0, batch: int = B) -> dict:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, T, batch)  # left padding; the last step is always valid
    starts[0] = 0
    inputs = {
        "x": jnp.asarray(rng.normal(size=(batch, T, F)), jnp.float32),
        "mask": jnp.asarray(np.arange(T)[None, :] >= starts[:, None]),
    }
    if spec.num_known:
        inputs["known"] = jnp.asarray(rng.normal(size=(batch, T, spec.num_known)), jnp.float32)
    if spec.static_cardinalities:
        inputs["static"] = jnp.asarray(
            np.stack([rng.integers(0, c, batch) for c in spec.static_cardinalities], 1), jnp.int32
        )
    return inputs


def targets(inputs: dict) -> jax.Array:
    return inputs["x"][:, -1, 0] + 0.5 * inputs["x"][:, -3:, 1].mean(1)


def loss_and_grads(spec, params, graphdef, inputs, key=None):
    def f(p):
        pred = apply(graphdef, p, inputs, key=key)["pred"]
        return layers.loss(pred, targets(inputs), spec.quantiles)

    return jax.jit(jax.value_and_grad(f))(params)


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("dtype", "quantiles"), [("float32", ()), ("bfloat16", (0.1, 0.5, 0.9))])
def test_shapes_dtypes_loss_and_grads(dtype, quantiles):
    spec = make_spec(dtype=dtype, quantiles=quantiles)
    graphdef, params = split(build(spec))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    inputs = make_inputs(spec)

    def f(p):
        pred = apply(graphdef, p, inputs, key=jax.random.key(1))["pred"]
        return layers.loss(pred, targets(inputs), spec.quantiles), pred

    (loss, pred), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    assert pred.shape == (B, len(quantiles) or 1) and pred.dtype == jnp.float32
    assert np.isfinite(np.asarray(pred)).all()
    assert np.isfinite(float(loss))
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g in jax.tree.leaves(grads):
        assert g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0


def test_default_config_builds_full_size():
    spec = make_spec(small=False)
    graphdef, params = split(build(spec))
    shapes = {
        "/".join(map(str, k)): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    assert any(s == (3, 14, 64) for s in shapes.values())  # first conv, NWC kernel
    # pooling 'last': the last layer's backward direction never needs Whh_b.
    assert not any("whh_b" in k for k in shapes)
    pred = apply(graphdef, params, make_inputs(spec, batch=2))["pred"]
    assert pred.shape == (2, 1)


@pytest.mark.parametrize(
    "hp",
    [
        {"pooling": "last"},
        {"pooling": "mean"},
        {"pooling": "max"},
        {"pooling": "last", "lstm_layers": 2, "dilations": (1, 2), "kernel": 5},
        {"pooling": "mean", "lstm_layers": 2, "activation": "gelu"},
    ],
)
def test_padded_steps_do_not_change_the_prediction(hp):
    spec = make_spec(static_cardinalities=(3, 5), num_known=2, quantiles=(0.1, 0.5, 0.9), **hp)
    graphdef, params = split(build(spec))
    inputs = make_inputs(spec)
    assert not bool(inputs["mask"].all())  # some rows are padded
    rng = np.random.default_rng(7)
    pad = ~np.asarray(inputs["mask"])[..., None]
    noisy = dict(inputs)
    noisy["x"] = jnp.where(
        pad, jnp.asarray(rng.normal(0, 1e3, (B, T, F)), jnp.float32), inputs["x"]
    )
    noisy["known"] = jnp.where(
        pad, jnp.asarray(rng.normal(0, 1e3, (B, T, 2)), jnp.float32), inputs["known"]
    )
    run = jax.jit(lambda p, i: apply(graphdef, p, i)["pred"])
    a, b = run(params, inputs), run(params, noisy)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    # ... while the valid steps do matter.
    other = dict(inputs, x=inputs["x"].at[:, -1].add(1.0))
    assert not np.allclose(np.asarray(run(params, other)), np.asarray(a))


@pytest.fixture(scope="module")
def remat_reference():
    spec = make_spec(pooling="mean")
    _, params = split(build(spec))
    inputs = make_inputs(spec)
    key = jax.random.key(3)
    return params, inputs, key, loss_and_grads(spec, params, split(build(spec))[0], inputs, key)


@pytest.mark.parametrize("policy", list(layers.REMAT_POLICIES))
def test_remat_gives_the_same_loss_and_grads(policy, remat_reference):
    params, inputs, key, ref = remat_reference
    spec = make_spec(pooling="mean", remat=("conv", "lstm"), remat_policy=policy)
    assert spec.remat == ("conv", "lstm")
    graphdef, _ = split(build(spec))
    got = loss_and_grads(spec, params, graphdef, inputs, key)
    assert_tree_close(ref, got)


def test_unknown_remat_block_is_a_config_error():
    with pytest.raises(ConfigError, match="remat"):
        build(make_spec(remat=("conv", "attention")))


@pytest.mark.parametrize(
    "hp", [{"pooling": "first"}, {"activation": "swish"}, {"dilations": (1, 2, 4)}]
)
def test_bad_hyperparameters_are_config_errors(hp):
    with pytest.raises(ConfigError):
        build(make_spec(**hp))


def test_dropout_follows_the_key():
    spec = make_spec(dropout=0.5, lstm_layers=2)
    graphdef, params = split(build(spec))
    inputs = make_inputs(spec)
    run = jax.jit(lambda p, k: apply(graphdef, p, inputs, key=k)["pred"])
    plain = jax.jit(lambda p: apply(graphdef, p, inputs)["pred"])
    np.testing.assert_array_equal(np.asarray(plain(params)), np.asarray(plain(params)))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(np.asarray(run(params, k1)), np.asarray(run(params, k1)))
    assert not np.allclose(np.asarray(run(params, k1)), np.asarray(run(params, k2)))
    assert not np.allclose(np.asarray(run(params, k1)), np.asarray(plain(params)))


def test_model_grads_with_custom_vjp_match_autodiff():
    # Two layers, pooling 'last': full forward and reverse scans in layer 0, the final-state
    # forward scan and the one-step backward direction in layer 1.
    spec = make_spec(lstm_layers=2, quantiles=(0.1, 0.5, 0.9))
    graphdef, params = split(build(spec))
    inputs = make_inputs(spec)
    key = jax.random.key(0)
    got = loss_and_grads(spec, params, graphdef, inputs, key)
    ref_spec = with_hparams(spec, custom_vjp=False)
    graphdef_ref, _ = split(build(ref_spec))
    ref = loss_and_grads(ref_spec, params, graphdef_ref, inputs, key)
    assert_tree_close(ref, got, rtol=1e-5, atol=1e-6)


def test_overfits_a_tiny_set():
    spec = make_spec(small=False)  # the shipped sizes
    graphdef, params = split(build(spec, seed=0))
    inputs = make_inputs(spec, seed=5, batch=64)
    y = targets(inputs)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    def loss_fn(p, key):
        return layers.loss(apply(graphdef, p, inputs, key=key)["pred"], y, spec.quantiles)

    @jax.jit
    def step(p, s, key):
        key, sub = jax.random.split(key)
        loss, g = jax.value_and_grad(loss_fn)(p, sub)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, key, loss

    evaluate = jax.jit(lambda p: loss_fn(p, None))
    first = float(evaluate(params))
    key = jax.random.key(0)
    for _ in range(120):
        params, opt_state, key, _ = step(params, opt_state, key)
    last = float(evaluate(params))
    assert last <= 0.1 * first, (first, last)
