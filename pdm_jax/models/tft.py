"""Temporal Fusion Transformer (Lim et al., 2021) for RUL at a window's last step.

Complete for a one-step horizon: static covariate encoders (selection, enrichment and LSTM-state
contexts), variable selection networks over observed and known inputs, an LSTM encoder, static
enrichment, interpretable multi-head attention (heads share the value projection) with causal and
padding masks, a position-wise GRN and a quantile head. RUL is read at one step, so there is no
decoder (the horizon is 1); the decoder would run the same blocks over future known inputs.

Why the code looks the way it does (measured on a 2-core CPU, see docs/DESIGN.md):
- Per-variable GRNs are one einsum over a stacked variable axis in a variable-first [V, N, D]
  layout, never a Python loop over variables.
- Consecutive linear maps are folded exactly, from the fp32 params at every call (autodiff goes
  through the fold): the scalar embedding into each variable GRN's first layer (so that layer is an
  elementwise affine map, no matmul), every GRN's second layer into its GLU, and the attention
  output projection into its GLU. Dropout therefore sits where it does not break a fold: after the
  ELU of every GRN, on the LSTM output, and on the mean attention head.
- Training needs the output at the last step only, and everything after attention is position-
  wise, so the training path computes the attention query at that step alone. `details=True`
  runs the same code with queries at every step and returns the interpretability outputs:
  variable-selection weights, static weights and the full attention matrix.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pdm_jax.errors import ConfigError
from pdm_jax.models import grn as grn_lib
from pdm_jax.models import layers
from pdm_jax.models.layers import Inputs, ModelSpec, Outputs, dropout, glorot, zeros
from pdm_jax.models.scan import lstm_scan

REMAT_BLOCKS = ("vsn", "lstm", "attention")


class Params(nnx.Module):
    """A named bag of fp32 parameters; blocks read them as a plain dict of arrays."""

    def __init__(self, **arrays: nnx.Param):
        for name, value in arrays.items():
            setattr(self, name, value)


def arrays(module: nnx.Module) -> dict[str, jax.Array]:
    return {k: v[...] for k, v in vars(module).items() if isinstance(v, nnx.Param)}


class AttentionParams(NamedTuple):
    """The attention stage's parameter groups (as arrays), passed to it as one argument.

    The stage runs under `jax.checkpoint` when remat names it, so its params must come in as
    arguments rather than be read from the module; grouped, they are one pytree argument.
    """

    enrich: dict[str, jax.Array]  # static-enrichment GRN
    attention: dict[str, jax.Array]  # wq, wk, wv (shared by the heads), wo, bo
    attention_gate: dict[str, jax.Array]  # gate-add-norm after attention
    positionwise: dict[str, jax.Array]  # position-wise GRN
    output_gate: dict[str, jax.Array]  # gate-add-norm back onto the temporal features


def _grn_params(rngs: nnx.Rngs, d_in: int, d_hidden: int, d_out: int, d_ctx: int = 0) -> Params:
    p = {
        "w1": glorot(rngs, (d_in, d_hidden)),
        "b1": zeros((d_hidden,)),
        "w2": glorot(rngs, (d_hidden, d_out)),
        "b2": zeros((d_out,)),
        "wg": glorot(rngs, (d_out, 2 * d_out)),
        "bg": zeros((2 * d_out,)),
        "ln_s": layers.ones((d_out,)),
        "ln_b": zeros((d_out,)),
    }
    if d_ctx:
        p["wc"] = glorot(rngs, (d_ctx, d_hidden))
    if d_in != d_out:
        p["ws"] = glorot(rngs, (d_in, d_out))
        p["bs"] = zeros((d_out,))
    return Params(**p)


def _stacked_grn_params(rngs: nnx.Rngs, n: int, d_in: int, d_hidden: int, d_out: int) -> Params:
    """n independent GRNs with their parameters stacked on a leading axis."""
    one = [arrays(_grn_params(rngs, d_in, d_hidden, d_out)) for _ in range(n)]
    return Params(**{k: nnx.Param(jnp.stack([g[k] for g in one])) for k in one[0]})


def _gan_params(rngs: nnx.Rngs, d: int) -> Params:
    return Params(
        wg=glorot(rngs, (d, 2 * d)), bg=zeros((2 * d,)), ln_s=layers.ones((d,)), ln_b=zeros((d,))
    )


class TFT(nnx.Module):
    """Temporal Fusion Transformer; `__call__(inputs, key=None, details=False)`."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        layers.check_remat(spec, REMAT_BLOCKS)
        self.spec = spec
        d = int(spec.hp("hidden", 64))
        heads = int(spec.hp("heads", 4))
        dv = int(spec.hp("var_hidden", 32))
        if d % heads:
            raise ConfigError(
                f"config.model.tft.hidden={d} must be divisible by config.model.tft.heads={heads}"
            )
        if int(spec.hp("lstm_layers", 1)) != 1:
            raise ConfigError("config.model.tft.lstm_layers: only 1 is supported")
        v = spec.num_features + spec.num_known
        dvh = min(dv, d)
        s = len(spec.static_cardinalities)
        self.d, self.heads, self.dv, self.num_vars, self.num_static = d, heads, dv, v, s

        # Time-varying variable selection: scalar embeddings + per-variable GRNs + flat GRN.
        def stacked(shape):
            return glorot(rngs, shape)

        self.vsn = Params(
            emb_w=stacked((v, dv)),
            emb_b=zeros((v, dv)),
            w1=stacked((v, dv, dvh)),
            b1=zeros((v, dvh)),
            w2=stacked((v, dvh, d)),
            b2=zeros((v, d)),
            wg=stacked((v, d, 2 * d)),
            bg=zeros((v, 2 * d)),
            ws=stacked((v, dv, d)),
            bs=zeros((v, d)),
            ln_s=layers.ones((v, d)),
            ln_b=zeros((v, d)),
        )
        hf = min(d, v)
        self.vsn_flat = _grn_params(rngs, v * dv, hf, v, d_ctx=d if s else 0)

        # Static covariate encoders.
        if s:
            self.static_emb = nnx.List(
                [
                    nnx.Param(jax.random.normal(rngs.params(), (c, d)) * 0.1)
                    for c in spec.static_cardinalities
                ]
            )
            self.static_vars = _stacked_grn_params(rngs, s, d, d, d)
            self.static_flat = _grn_params(rngs, s * d, min(d, s), s)
            self.static_ctx = _stacked_grn_params(rngs, 4, d, d, d)  # c_s, c_e, c_h, c_c

        # LSTM encoder and its gate.
        self.lstm = Params(
            wih=glorot(rngs, (d, 4 * d)),
            whh=nnx.Param(jax.nn.initializers.orthogonal()(rngs.params(), (d, 4 * d))),
            b=nnx.Param(jnp.zeros((4 * d,)).at[d : 2 * d].set(1.0)),  # forget-gate bias 1
        )
        self.lstm_gate = _gan_params(rngs, d)
        # Static enrichment, attention, position-wise GRN, output.
        self.enrich = _grn_params(rngs, d, d, d, d_ctx=d if s else 0)
        dk = d // heads
        self.attn = Params(
            wq=glorot(rngs, (heads, d, dk)),
            wk=glorot(rngs, (heads, d, dk)),
            wv=glorot(rngs, (d, dk)),
            wo=glorot(rngs, (dk, d)),
            bo=zeros((d,)),
        )
        self.attn_gate = _gan_params(rngs, d)
        self.positionwise = _grn_params(rngs, d, d, d)
        self.out_gate = _gan_params(rngs, d)
        self.head = Params(w=glorot(rngs, (d, spec.num_outputs)), b=zeros((spec.num_outputs,)))

    # --- blocks: pure functions of (params, arrays) so they can be rematerialised ---------

    def _lstm(self, p, x, mask, h0, c0):
        """Left-padded sequence -> hidden states; padded steps keep the initial state.

        The recurrence is the CNN-BiLSTM's kernel (`models/scan.py`: hand-written VJP, one tanh
        over all gates), started at the static context's (h0, c0).
        """
        xp = jnp.swapaxes(x @ p["wih"], 0, 1)  # [T, B, 4D], hoisted input projection
        hs = lstm_scan(xp, p["whh"], p["b"], jnp.swapaxes(mask, 0, 1), initial=(h0, c0))
        return jnp.swapaxes(hs, 0, 1)

    def _attention(self, params: AttentionParams, temporal, mask, enrich_ctx, key, *, queries):
        """Static enrichment, interpretable attention and the position-wise stack.

        `queries` is the number of last steps that get an output (1 in training, T for details).
        Returns (features [B, Q, D] before the output layer, attention [B, H, Q, T]).
        """
        t = temporal.shape[1]
        rate = self.spec.dropout
        pa = params.attention
        k1, k2, k3 = layers.split_key(key, 3)
        ctx = None if enrich_ctx is None else enrich_ctx[:, None, :]
        enriched = grn_lib.grn(params.enrich, temporal, ctx, k1, rate)  # [B, T, D]
        q_in = enriched[:, t - queries :]
        q = jnp.einsum("bqd,hdk->bhqk", q_in, pa["wq"])
        k = jnp.einsum("btd,hdk->bhtk", enriched, pa["wk"])
        v = enriched @ pa["wv"]  # [B, T, dk], shared by the heads
        scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
        scores = jnp.einsum("bhqk,bhtk->bhqt", q, k).astype(jnp.float32) * scale
        q_pos = jnp.arange(t - queries, t)[:, None]
        visible = (jnp.arange(t)[None, :] <= q_pos)[None, None] & mask[:, None, None, :]
        scores = jnp.where(visible, scores, -1e30)
        attn = jax.nn.softmax(scores, axis=-1)
        attn = jnp.where(visible, attn, 0.0)  # a fully padded query row attends to nothing
        heads = jnp.einsum("bhqt,btk->bhqk", attn.astype(v.dtype), v).mean(axis=1)  # [B, Q, dk]
        heads = dropout(heads, rate, k2)
        post = grn_lib.gate_add_norm(params.attention_gate, heads, q_in, pa["wo"], pa["bo"])
        out = grn_lib.grn(params.positionwise, post, None, k3, rate)
        return grn_lib.gate_add_norm(params.output_gate, out, temporal[:, t - queries :]), attn

    def _static(self, static: jax.Array, key):
        """Static selection -> (weights [B, S], contexts c_s, c_e, c_h, c_c each [B, D])."""
        rate = self.spec.dropout
        k1, k2, k3 = layers.split_key(key, 3)
        emb = jnp.stack(
            [table[...][static[:, i]] for i, table in enumerate(self.static_emb)]
        ).astype(self.spec.compute_dtype)  # [S, B, D]
        pv = layers.cast(arrays(self.static_vars), self.spec.compute_dtype)
        per_var = jax.vmap(lambda p, e: grn_lib.grn(p, e, None, k1, rate))(pv, emb)  # [S, B, D]
        pf = layers.cast(arrays(self.static_flat), self.spec.compute_dtype)
        flat = jnp.swapaxes(emb, 0, 1).reshape(static.shape[0], -1)
        weights = jax.nn.softmax(grn_lib.grn(pf, flat, None, k2, rate).astype(jnp.float32), axis=-1)
        vec = jnp.einsum("bs,sbd->bd", weights.astype(emb.dtype), per_var)
        pc = layers.cast(arrays(self.static_ctx), self.spec.compute_dtype)
        contexts = jax.vmap(lambda p: grn_lib.grn(p, vec, None, k3, rate))(pc)  # [4, B, D]
        return weights, contexts

    def __call__(
        self, inputs: Inputs, *, key: jax.Array | None = None, details: bool = False
    ) -> Outputs:
        spec = self.spec
        dtype = spec.compute_dtype
        mask = inputs["mask"].astype(bool)
        x = inputs["x"]
        if spec.num_known:
            x = jnp.concatenate([x, inputs["known"]], axis=-1)
        x = jnp.where(mask[..., None], x, 0).astype(dtype)
        b, t, _ = x.shape
        k_static, k_vsn, k_lstm, k_att = layers.split_key(key, 4)
        out: Outputs = {}
        ctx_s = ctx_e = None
        h0 = c0 = jnp.zeros((b, self.d), dtype)
        if self.num_static:
            static_w, (ctx_s, ctx_e, h0, c0) = self._static(inputs["static"], k_static)
            out["static_weights"] = static_w
        cast = lambda m: layers.cast(arrays(m), dtype)

        vsn_params = (cast(self.vsn), cast(self.vsn_flat), x, ctx_s, k_vsn, spec.dropout)
        if "vsn" in spec.remat:
            selected, var_w = grn_lib.select_by_variable(*vsn_params, spec.remat_policy)
        else:
            selected, var_w = grn_lib.select(*vsn_params)
        lstm = layers.maybe_remat(self._lstm, spec, "lstm")
        hs = lstm(cast(self.lstm), selected, mask, h0, c0)
        hs = dropout(hs, spec.dropout, k_lstm)
        temporal = grn_lib.gate_add_norm(cast(self.lstm_gate), hs, selected)
        queries = t if details else 1
        attention = layers.maybe_remat(
            functools.partial(self._attention, queries=queries), spec, "attention"
        )
        attention_params = AttentionParams(
            enrich=cast(self.enrich),
            attention=cast(self.attn),
            attention_gate=cast(self.attn_gate),
            positionwise=cast(self.positionwise),
            output_gate=cast(self.out_gate),
        )
        feats, attn = attention(attention_params, temporal, mask, ctx_e, k_att)
        head = cast(self.head)
        pred = (feats[:, -1] @ head["w"] + head["b"]).astype(jnp.float32)
        out["pred"] = pred
        if details:
            out["variable_weights"] = var_w.astype(jnp.float32)
            out["attention"] = attn
            out["temporal"] = feats.astype(jnp.float32)
        return out
