"""Gated residual networks and the TFT's variable selection, as pure functions of params.

The variable selection is most of a TFT train step's time and memory (docs/DESIGN.md): every
variable's GRN works on a [V, N, *] tensor in a variable-first layout, as one einsum over the
stacked variable axis, never a Python loop over variables. Consecutive linear maps are folded
exactly from the fp32 params at every call (the scalar embedding into each variable GRN's first
layer, every GRN's second layer into its GLU), so dropout sits after each GRN's ELU, where it
breaks no fold.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pdm_jax.models import layers
from pdm_jax.models.layers import dropout, layer_norm


def glu(z: jax.Array) -> jax.Array:
    half = z.shape[-1] // 2
    return z[..., :half] * layers.sigmoid(z[..., half:])


def grn(
    p: dict[str, jax.Array],
    a: jax.Array,
    context: jax.Array | None = None,
    key: jax.Array | None = None,
    rate: float = 0.0,
) -> jax.Array:
    """Gated residual network: LN(skip(a) + GLU(W2 · dropout(ELU(W1 a + Wc c + b1)) + b2)).

    W2 and the GLU's linear map are folded into one matmul (no nonlinearity or dropout between).
    """
    h = a @ p["w1"] + p["b1"]
    if context is not None:
        h = h + context @ p["wc"]
    h = dropout(jax.nn.elu(h), rate, key)
    wz = p["w2"] @ p["wg"]
    bz = p["b2"] @ p["wg"] + p["bg"]
    residual = a @ p["ws"] + p["bs"] if "ws" in p else a
    return layer_norm(residual + glu(h @ wz + bz), p["ln_s"], p["ln_b"])


def gate_add_norm(
    p: dict[str, jax.Array],
    x: jax.Array,
    residual: jax.Array,
    w_pre: jax.Array | None = None,
    b_pre: jax.Array | None = None,
) -> jax.Array:
    """LN(residual + GLU(x)); an optional linear map before the GLU is folded into it."""
    wg, bg = p["wg"], p["bg"]
    if w_pre is not None:
        bg = b_pre @ wg + bg
        wg = w_pre @ wg
    return layer_norm(residual + glu(x @ wg + bg), p["ln_s"], p["ln_b"])


def variable_grns(
    p: dict[str, jax.Array], xv: jax.Array, drop: Callable[[jax.Array], jax.Array]
) -> jax.Array:
    """xv [V, N] -> [V, N, D]: each variable's GRN over its embedded reading, the scalar
    embedding folded into the first layer and the second layer into the GLU; `drop` is the
    dropout after the ELU. Params carry a leading V axis, so one variable is V = 1."""
    a = jnp.einsum("vi,vih->vh", p["emb_w"], p["w1"])
    c = jnp.einsum("vi,vih->vh", p["emb_b"], p["w1"]) + p["b1"]
    h = jax.nn.elu(xv[..., None] * a[:, None, :] + c[:, None, :])  # [V, N, DVh]
    h = drop(h)
    m = jnp.einsum("vhd,vde->vhe", p["w2"], p["wg"])
    bz = jnp.einsum("vd,vde->ve", p["b2"], p["wg"]) + p["bg"]
    gated = glu(jnp.einsum("vnh,vhe->vne", h, m) + bz[:, None, :])  # [V, N, D]
    we = jnp.einsum("vi,vid->vd", p["emb_w"], p["ws"])
    be = jnp.einsum("vi,vid->vd", p["emb_b"], p["ws"]) + p["bs"]
    skip = xv[..., None] * we[:, None, :] + be[:, None, :]
    return layer_norm(skip + gated, p["ln_s"][:, None, :], p["ln_b"][:, None, :])


def selection_weights(
    p: dict[str, jax.Array],
    pf: dict[str, jax.Array],
    xt: jax.Array,
    ctx_s: jax.Array | None,
    key: jax.Array | None,
    t: int,
    rate: float,
) -> jax.Array:
    """xt [N, V] -> [N, V] softmax weights from one GRN over all embedded variables (the
    embedding folded into its first layer and skip)."""
    v = xt.shape[1]
    dv = p["emb_w"].shape[1]
    w1 = pf["w1"].reshape(v, dv, -1)
    flat = {**pf}
    flat_in_w = jnp.einsum("vi,vih->vh", p["emb_w"], w1)
    flat_in_b = jnp.einsum("vi,vih->h", p["emb_b"], w1)
    ws = pf["ws"].reshape(v, dv, -1)
    flat["w1"] = flat_in_w
    flat["b1"] = pf["b1"] + flat_in_b
    flat["ws"] = jnp.einsum("vi,vio->vo", p["emb_w"], ws)
    flat["bs"] = pf["bs"] + jnp.einsum("vi,vio->o", p["emb_b"], ws)
    ctx = None if ctx_s is None else jnp.repeat(ctx_s, t, axis=0)
    logits = grn(flat, xt, ctx, key, rate)  # [N, V]
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(xt.dtype)


def select(
    p: dict[str, jax.Array],
    pf: dict[str, jax.Array],
    x: jax.Array,
    ctx_s: jax.Array | None,
    key: jax.Array | None,
    rate: float,
) -> tuple[jax.Array, jax.Array]:
    """x [B, T, V] -> (selected [B, T, D], weights [B, T, V])."""
    b, t, v = x.shape
    k1, k2 = layers.split_key(key, 2)
    xt = x.reshape(b * t, v)  # [N, V]
    hv = variable_grns(p, xt.T, lambda h: dropout(h, rate, k1))
    weights = selection_weights(p, pf, xt, ctx_s, k2, t, rate)
    selected = jnp.einsum("nv,vnd->nd", weights, hv)
    return selected.reshape(b, t, -1), weights.reshape(b, t, v)


def select_by_variable(
    p: dict[str, jax.Array],
    pf: dict[str, jax.Array],
    x: jax.Array,
    ctx_s: jax.Array | None,
    key: jax.Array | None,
    rate: float,
    policy: str,
) -> tuple[jax.Array, jax.Array]:
    """`select` for `model.remat` naming 'vsn': the per-variable GRNs' [V, N, *] tensors are the
    train step's memory peak (rematerialising the block whole recomputes them all at once,
    so the peak stays), so here they run one variable at a time in a scan whose body is
    rematerialised: the backward pass holds one variable's tensors and the running sum.
    The dropout mask is drawn whole up front, the same bits `select` draws."""
    b, t, v = x.shape
    k1, k2 = layers.split_key(key, 2)
    xt = x.reshape(b * t, v)
    weights = selection_weights(p, pf, xt, ctx_s, k2, t, rate)
    keep = None
    if k1 is not None and rate > 0.0:
        keep = jax.random.bernoulli(k1, 1.0 - rate, (v, b * t, p["w1"].shape[-1]))

    def one(total, inputs):
        pv, xv, w, kv = inputs

        def drop(h):
            if kv is None:
                return h
            return jnp.where(kv[None], h / (1.0 - rate), jnp.zeros((), h.dtype))

        hv = variable_grns(jax.tree.map(lambda a: a[None], pv), xv[None], drop)[0]
        return total + w[:, None] * hv, None

    body = jax.checkpoint(one, policy=layers.REMAT_POLICIES[policy])
    start = jnp.zeros((b * t, p["ln_s"].shape[-1]), x.dtype)
    selected, _ = jax.lax.scan(body, start, (p, xt.T, weights.T, keep))
    return selected.reshape(b, t, -1), weights.reshape(b, t, v)
