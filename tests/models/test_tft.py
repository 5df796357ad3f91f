"""The TFT: shapes, masking, causality, interpretability, remat, learning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pdm_jax import models
from pdm_jax.errors import ConfigError
from pdm_jax.models import grn, layers, tft
from tests.conftest import load_config

B, T, F = 8, 12, 5


def _spec(dtype="float32", static=(), known=0, **tft_hp):
    cfg = load_config("tft")
    cfg.model.tft.hidden = 16
    cfg.model.tft.heads = 4
    cfg.model.tft.var_hidden = 8
    for k, v in tft_hp.items():
        if k in ("remat", "remat_policy", "dropout"):
            cfg.model[k] = v
        else:
            cfg.model.tft[k] = v
    return layers.spec_from_config(
        cfg.model,
        num_features=F,
        window=T,
        static_cardinalities=static,
        num_known=known,
        dtype=dtype,
    )


def _inputs(seed=0, static=(), known=0, pad=(0, 3, 11, 0, 5, 0, 0, 1)):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), bool)
    for i, p in enumerate(pad):
        mask[i, :p] = False
    x = rng.normal(size=(B, T, F)).astype(np.float32)
    x[~mask] = 0
    out = {
        "x": jnp.asarray(x),
        "mask": jnp.asarray(mask),
        "y": jnp.asarray(rng.uniform(0, 1, B).astype(np.float32)),
    }
    if static:
        out["static"] = jnp.asarray(np.stack([rng.integers(0, c, B) for c in static], 1), jnp.int32)
    if known:
        out["known"] = jnp.asarray(rng.normal(size=(B, T, known)).astype(np.float32))
    return out


@functools.cache
def _model(spec, seed=0):
    """(apply, params): apply(params, inputs, key=None, details=False) is jitted, as in training
    (eager op-by-op dispatch would be slow and test a path nobody runs); cached per spec so tests
    sharing a spec share the compilations."""
    graphdef, params = models.split(tft.TFT(spec, rngs=nnx.Rngs(params=seed)))
    apply = jax.jit(functools.partial(models.apply, graphdef), static_argnames=("details",))
    return apply, params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_dtypes_finite_loss_and_grads(dtype):
    spec = _spec(dtype, static=(3, 2), known=2)
    g, params = _model(spec)
    inputs = _inputs(static=(3, 2), known=2)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    out = g(params, inputs, details=True)
    assert out["pred"].shape == (B, 3) and out["pred"].dtype == jnp.float32
    assert out["variable_weights"].shape == (B, T, F + 2)
    assert out["static_weights"].shape == (B, 2)
    assert out["attention"].shape == (B, 4, T, T)

    def loss_fn(p):
        pred = g(p, inputs, key=jax.random.key(1))["pred"]
        return layers.loss(pred, inputs["y"], spec.quantiles)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in leaves)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_padded_values_do_not_change_predictions():
    spec = _spec(static=(3,), known=1)
    g, params = _model(spec)
    inputs = _inputs(static=(3,), known=1)
    base = g(params, inputs)["pred"]
    noisy = dict(inputs)
    pad = ~np.asarray(inputs["mask"])
    rng = np.random.default_rng(5)
    x = np.asarray(inputs["x"]).copy()
    x[pad] = rng.normal(size=x[pad].shape) * 1e3
    known = np.asarray(inputs["known"]).copy()
    known[pad] = 1e3
    noisy["x"], noisy["known"] = jnp.asarray(x), jnp.asarray(known)
    np.testing.assert_array_equal(g(params, noisy)["pred"], base)


def test_future_steps_do_not_change_earlier_outputs():
    spec = _spec()
    g, params = _model(spec)
    inputs = _inputs(pad=(0,) * B)
    base = g(params, inputs, details=True)
    for t in (3, 7):
        changed = dict(inputs)
        changed["x"] = inputs["x"].at[:, t + 1].add(5.0)
        out = g(params, changed, details=True)
        np.testing.assert_allclose(
            out["temporal"][:, : t + 1], base["temporal"][:, : t + 1], atol=1e-6
        )
        np.testing.assert_allclose(
            out["attention"][:, :, : t + 1], base["attention"][:, :, : t + 1], atol=1e-6
        )
        assert not np.allclose(out["temporal"][:, t + 1], base["temporal"][:, t + 1])


def test_selection_and_attention_weights_are_distributions():
    spec = _spec(static=(4,))
    g, params = _model(spec)
    inputs = _inputs(static=(4,))
    out = g(params, inputs, details=True)
    np.testing.assert_allclose(out["variable_weights"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["static_weights"].sum(-1), 1.0, rtol=1e-5)
    attn = np.asarray(out["attention"])  # [B, H, Tq, Tk]
    mask = np.asarray(inputs["mask"])
    causal = np.tril(np.ones((T, T), bool))
    visible = causal[None] & mask[:, None, :]  # [B, Tq, Tk]
    rows_with_keys = visible.any(-1)
    sums = attn.sum(-1)  # [B, H, Tq]
    np.testing.assert_allclose(
        sums[np.broadcast_to(rows_with_keys[:, None], sums.shape)], 1.0, rtol=1e-5
    )
    assert (attn[np.broadcast_to(~visible[:, None], attn.shape)] == 0).all()


def test_training_path_equals_interpretability_path():
    spec = _spec(static=(3,), known=1)
    g, params = _model(spec)
    inputs = _inputs(static=(3,), known=1)
    fast = g(params, inputs)["pred"]
    full = g(params, inputs, details=True)["pred"]
    np.testing.assert_allclose(fast, full, rtol=1e-5, atol=1e-5)


def _reference_grn(p, a, context=None):
    """The GRN as written in the paper: fc1, ELU, fc2, then a separate GLU; no folding."""
    h = a @ p["w1"] + p["b1"]
    if context is not None:
        h = h + context @ p["wc"]
    h = jax.nn.elu(h) @ p["w2"] + p["b2"]
    z = h @ p["wg"] + p["bg"]
    half = z.shape[-1] // 2
    residual = a @ p["ws"] + p["bs"] if "ws" in p else a
    return layers.layer_norm(
        residual + z[..., :half] * jax.nn.sigmoid(z[..., half:]), p["ln_s"], p["ln_b"]
    )


def test_folded_variable_selection_equals_the_unfolded_network():
    spec = _spec()
    model = tft.TFT(spec, rngs=nnx.Rngs(params=3))
    x = _inputs()["x"]
    pv, pf = tft.arrays(model.vsn), tft.arrays(model.vsn_flat)
    selected, weights = grn.select(pv, pf, x, None, None, 0.0)
    p = tft.arrays(model.vsn)
    emb = x[..., None] * p["emb_w"] + p["emb_b"]  # [B, T, V, DV]: scalar embeddings

    def per_var(pv, e):
        return _reference_grn(pv, e)

    keys = ("w1", "b1", "w2", "b2", "wg", "bg", "ws", "bs", "ln_s", "ln_b")
    stacked = {k: p[k] for k in keys}
    hv = jax.vmap(per_var, in_axes=(0, 2), out_axes=2)(stacked, emb)  # [B, T, V, D]
    flat = emb.reshape(B, T, -1)
    ref_w = jax.nn.softmax(_reference_grn(tft.arrays(model.vsn_flat), flat), -1)
    ref = jnp.einsum("btv,btvd->btd", ref_w, hv)
    np.testing.assert_allclose(weights, ref_w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(selected, ref, rtol=2e-5, atol=2e-5)
    # And the folded GRN on its own.
    pg = tft.arrays(model.positionwise)
    a = jax.random.normal(jax.random.key(0), (4, 16))
    np.testing.assert_allclose(grn.grn(pg, a), _reference_grn(pg, a), rtol=1e-5, atol=1e-5)


def test_selection_one_variable_at_a_time_is_the_whole_selection():
    """What `model.remat=('vsn',)` runs (a rematerialised scan over variables) gives the one-einsum
    selection's outputs, dropout masks included."""
    model = tft.TFT(_spec(), rngs=nnx.Rngs(params=3))
    x = _inputs()["x"]
    pv, pf = tft.arrays(model.vsn), tft.arrays(model.vsn_flat)
    for key in (None, jax.random.key(5)):
        whole = grn.select(pv, pf, x, None, key, 0.3)
        scanned = grn.select_by_variable(pv, pf, x, None, key, 0.3, "nothing_saveable")
        for a, b in zip(whole, scanned, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@functools.cache
def _loss_and_grads(remat, policy, dropout_key):
    inputs = _inputs(static=(3,))
    spec = _spec(static=(3,), remat=remat, remat_policy=policy)
    graphdef, params = models.split(tft.TFT(spec, rngs=nnx.Rngs(params=0)))
    key = jax.random.key(2) if dropout_key else None

    def loss_fn(p):
        pred = models.apply(graphdef, p, inputs, key=key)["pred"]
        return layers.loss(pred, inputs["y"], spec.quantiles)

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize(
    "policy,dropout_key",
    # With dropout, the rematerialised forward must redraw exactly the same masks.
    [("nothing_saveable", True), ("dots_saveable", False), ("everything_saveable", False)],
)
def test_remat_gives_the_same_loss_and_gradients(policy, dropout_key):
    l0, g0 = _loss_and_grads((), "nothing_saveable", dropout_key)
    l1, g1 = _loss_and_grads(("vsn", "lstm", "attention"), policy, dropout_key)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_remat_block_and_bad_heads():
    with pytest.raises(ConfigError, match=r"config\.model\.remat: unknown block"):
        tft.TFT(_spec(remat=("conv",)), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="divisible"):
        tft.TFT(_spec(heads=3), rngs=nnx.Rngs(0))


def test_dropout_keys():
    spec = _spec()
    g, params = _model(spec)
    inputs = _inputs()
    a = g(params, inputs, key=jax.random.key(0))["pred"]
    b = g(params, inputs, key=jax.random.key(0))["pred"]
    c = g(params, inputs, key=jax.random.key(1))["pred"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    e1 = g(params, inputs)["pred"]
    np.testing.assert_array_equal(e1, g(params, inputs)["pred"])


def test_overfits_a_tiny_set():
    spec = _spec(dropout=0.0)
    g, params = _model(spec)
    inputs = _inputs(seed=1, pad=(0,) * B)
    # A target the inputs determine: the mean of the last step's features.
    inputs["y"] = inputs["x"][:, -1].mean(-1) * 3 + 1
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p):
        return layers.loss(g(p, inputs)["pred"], inputs["y"], spec.quantiles)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = float(loss_fn(params))
    for _ in range(300):
        params, state, loss = step(params, state)
    assert float(loss) < 0.1 * first
