"""Hybrid CNN-BiLSTM: a dilated Conv1D stack, a bidirectional LSTM, pooling and a dense head.

    x [B, T, F] (++ known [B, T, K]) -> Conv1D x len(channels) ('same', activation)
      -> BiLSTM x lstm_layers (hidden per direction) -> pooling ('last' | 'mean' | 'max')
      -> Dense(dense) (+ static embeddings) -> activation -> dropout -> Dense(num_outputs)

Masking (padding is on the left: False steps come first, the last step is always valid). The
input is zeroed at padded steps and so is every conv layer's output, so a valid step near the
boundary sees the same zeros as 'same' padding would give; the forward LSTM keeps its zero
initial state through padded steps (carry = where(mask_t, new, old)); the backward LSTM starts at
the last step and reaches padded steps only after every valid one, and mean/max pooling mask
them. Values at padded steps therefore never reach the prediction.

Speed (XLA on CPU; measured facts in shared/docs/cnn-bilstm-probe.md): the conv is one
`lax.conv_general_dilated` per layer in NWC layout; each direction's input projection x @ Wih is
one 2-D matmul over all steps, outside the scan (the bias is added inside the step, which saves a
pass over [T, B, 4H]); the recurrence itself, with its hand-written VJP, is the kernel in
`pdm_jax/models/scan.py`. With pooling 'last', the last layer's backward direction is read at
t = T-1, which is its FIRST step from a zero state: one cell step on x[T-1] (the Whh_b term is
exactly zero, so that layer has no Whh_b).
That shortcut is exact and used only there; everything else runs the full reverse scan.
`hparams['custom_vjp'] = False` (not a config key) switches to plain autodiff of the same scan.

Dropout (rate config.model.dropout, only with a key): after the head's hidden Dense+activation,
and on the sequence between stacked LSTM layers (as torch.nn.LSTM's `dropout=`). Not inside the
recurrence (it would have to be a per-sequence mask carried through the scan, and the recurrent
path is where the speed is) and not on the conv features (regularising the small head is what
matters for RUL windows; dropping conv features costs a mask over B*T*C per step for little).

Compute dtype: params (fp32) and inputs are cast to `spec.compute_dtype`; LSTM gates and the cell
state run in fp32 (matmuls accumulate in fp32), h is carried in the compute dtype, pooling sums
in fp32, and the final projection to the outputs is fp32 so a bf16 run keeps RUL resolution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from pdm_jax.errors import ConfigError
from pdm_jax.models import layers
from pdm_jax.models.layers import Inputs, ModelSpec, Outputs
from pdm_jax.models.scan import first_step, lstm_scan

Params = dict[str, Any]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
}
POOLINGS = ("last", "mean", "max")
REMAT_BLOCKS = ("conv", "lstm")
_NWC = ("NWC", "WIO", "NWC")


def _is_param(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _arrays(tree: Any) -> Any:
    """The raw arrays of a (nested) container of nnx.Params."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=_is_param)


# --- the blocks (pure functions of arrays, so jax.checkpoint can wrap them) -----------------


def conv_block(
    params: list[Params],
    x: jax.Array,
    mask: jax.Array,
    *,
    dilations: Sequence[int],
    activation: str,
) -> jax.Array:
    """Conv1D stack, 'same' padding, NWC: x [B, T, C] -> [B, T, channels[-1]], zero where masked."""
    act = ACTIVATIONS[activation]
    m = mask[..., None]
    h = jnp.where(m, x, jnp.zeros((), x.dtype))
    for p, d in zip(params, dilations, strict=True):
        k = p["w"].shape[0]
        total = d * (k - 1)
        h = lax.conv_general_dilated(
            h,
            p["w"],
            window_strides=(1,),
            padding=[(total // 2, total - total // 2)],
            rhs_dilation=(d,),
            dimension_numbers=_NWC,
        )
        h = act(h + p["b"])
        # Padded positions must read as zeros for the next layer and the LSTM.
        h = jnp.where(m, h, jnp.zeros((), h.dtype))
    return h


def _project(seq: jax.Array, w: jax.Array) -> jax.Array:
    """x @ Wih for every step at once: [T, B, C] -> [T, B, 4H] (the bias is added in the scan).

    One matmul on the time-major rows, written over both leading axes rather than as a reshape
    to [T*B, C]: merging T with B hides the batch axis from the sharding partitioner, which then
    gathered the whole global batch onto every device (found by lowering for 8 GPUs,
    scripts/lower.py). XLA:CPU runs it as fast as the reshaped 2-D matmul; an einsum that has to
    write a transposed output ('btc,cg->tbg') is about 3x slower.
    """
    xp = jnp.einsum("tbc,cg->tbg", seq, w, preferred_element_type=jnp.float32)
    return xp.astype(seq.dtype)


def lstm_block(
    params: list[Params],
    x: jax.Array,
    mask: jax.Array,
    keys: list[jax.Array | None],
    *,
    pooling: str,
    rate: float,
    custom_vjp: bool,
) -> jax.Array:
    """Stacked BiLSTM + pooling: x [B, T, C], mask [B, T] -> features [B, 2H]."""
    seq = jnp.swapaxes(x, 0, 1)  # time-major [T, B, C]
    mask_t = jnp.swapaxes(mask, 0, 1)
    f32 = jnp.float32
    n = len(params)
    for li, p in enumerate(params):
        last = li == n - 1
        xp_f = _project(seq, p["wih_f"])
        if last and pooling == "last":
            h_f = lstm_scan(
                xp_f, p["whh_f"], p["b_f"], mask_t, return_sequences=False, custom_vjp=custom_vjp
            )
            z_b = jnp.dot(seq[-1], p["wih_b"], preferred_element_type=f32) + p["b_b"]
            h_b = first_step(z_b.astype(f32)).astype(h_f.dtype)
            return jnp.concatenate([h_f, h_b], axis=-1)
        xp_b = _project(seq, p["wih_b"])
        hs_f = lstm_scan(xp_f, p["whh_f"], p["b_f"], mask_t, custom_vjp=custom_vjp)
        hs_b = lstm_scan(xp_b, p["whh_b"], p["b_b"], mask_t, reverse=True, custom_vjp=custom_vjp)
        hs = jnp.concatenate([hs_f, hs_b], axis=-1)  # [T, B, 2H]
        hs = jnp.where(mask_t[..., None], hs, jnp.zeros((), hs.dtype))
        if not last:
            seq = layers.dropout(hs, rate, keys[li])
            continue
        if pooling == "mean":
            count = jnp.maximum(mask_t.sum(0).astype(f32), 1.0)[:, None]
            return (hs.astype(f32).sum(0) / count).astype(hs.dtype)
        low = jnp.asarray(jnp.finfo(hs.dtype).min, hs.dtype)
        return jnp.where(mask_t[..., None], hs, low).max(0)
    raise AssertionError("unreachable")


# --- the module -----------------------------------------------------------------------------


def _conv_params(rngs: nnx.Rngs, c_in: int, channels: Sequence[int], kernel: int) -> list[Params]:
    conv = []
    for c_out in channels:
        conv.append({"w": layers.glorot(rngs, (kernel, c_in, c_out)), "b": layers.zeros((c_out,))})
        c_in = c_out
    return conv


def _lstm_params(
    rngs: nnx.Rngs, c_in: int, hidden: int, num_layers: int, last_whh_b: bool
) -> list[Params]:
    """The BiLSTM layers' params; `last_whh_b=False` leaves Whh_b out of the last layer, whose
    backward direction then takes only its first step from zero state (pooling 'last')."""

    def bias() -> nnx.Param:
        # Forget-gate bias 1: the usual LSTM initialisation, so early gradients flow in time.
        return nnx.Param(jnp.zeros((4 * hidden,), jnp.float32).at[hidden : 2 * hidden].set(1.0))

    orthogonal = jax.nn.initializers.orthogonal()
    lstm = []
    for li in range(num_layers):
        p = {
            "wih_f": layers.glorot(rngs, (c_in, 4 * hidden)),
            "whh_f": layers.param(rngs, orthogonal, (hidden, 4 * hidden)),
            "b_f": bias(),
            "wih_b": layers.glorot(rngs, (c_in, 4 * hidden)),
            "b_b": bias(),
        }
        if last_whh_b or li < num_layers - 1:
            p["whh_b"] = layers.param(rngs, orthogonal, (hidden, 4 * hidden))
        lstm.append(p)
        c_in = 2 * hidden
    return lstm


class CNNBiLSTM(nnx.Module):
    """CNN-BiLSTM regressor; state is fp32 nnx.Params only (dropout takes an explicit key)."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        layers.check_remat(spec, REMAT_BLOCKS)
        self.spec = spec
        channels = tuple(int(c) for c in spec.hp("channels", (64, 64)))
        kernel = int(spec.hp("kernel", 3))
        dilations = spec.hp("dilations", (1,) * len(channels))
        dilations = (
            (int(dilations),) * len(channels)
            if isinstance(dilations, int)
            else tuple(int(d) for d in dilations)
        )
        self.activation = str(spec.hp("activation", "relu"))
        self.pooling = str(spec.hp("pooling", "last"))
        hidden = int(spec.hp("lstm_hidden", 64))
        num_layers = int(spec.hp("lstm_layers", 1))
        dense = int(spec.hp("dense", 64))
        self.custom_vjp = bool(spec.hp("custom_vjp", True))
        where = f"config.model.{spec.name}"
        if len(dilations) != len(channels):
            raise ConfigError(
                f"{where}.dilations: {len(dilations)} values for {len(channels)} conv layers"
            )
        if kernel < 1 or any(c < 1 for c in channels) or any(d < 1 for d in dilations):
            raise ConfigError(f"{where}: kernel, channels and dilations must be >= 1")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"{where}.activation: expected one of {tuple(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.pooling not in POOLINGS:
            raise ConfigError(f"{where}.pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        if hidden < 1 or num_layers < 1 or dense < 1:
            raise ConfigError(f"{where}: lstm_hidden, lstm_layers and dense must be >= 1")
        self.dilations = dilations

        c_in = spec.num_features + spec.num_known
        self.conv = nnx.data(_conv_params(rngs, c_in, channels, kernel))
        c_lstm = (c_in, *channels)[-1]  # no conv layers: the LSTM reads the inputs
        last_whh_b = self.pooling != "last"
        self.lstm = nnx.data(_lstm_params(rngs, c_lstm, hidden, num_layers, last_whh_b))

        embed = jax.nn.initializers.normal(0.1)
        self.static_emb = nnx.data(
            [layers.param(rngs, embed, (card, dense)) for card in spec.static_cardinalities]
        )
        self.head = nnx.data(
            {
                "w1": layers.glorot(rngs, (2 * hidden, dense)),
                "b1": layers.zeros((dense,)),
                "w2": layers.glorot(rngs, (dense, spec.num_outputs)),
                "b2": layers.zeros((spec.num_outputs,)),
            }
        )

    def __call__(self, inputs: Inputs, *, key: jax.Array | None = None) -> Outputs:
        spec = self.spec
        dtype = spec.compute_dtype
        rate = spec.dropout
        act = ACTIVATIONS[self.activation]
        mask = inputs["mask"].astype(bool)
        x = inputs["x"]
        if spec.num_known:
            x = jnp.concatenate([x, inputs["known"].astype(x.dtype)], axis=-1)
        x = x.astype(dtype)
        k_head, *k_lstm = layers.split_key(key, 1 + len(self.lstm))

        conv = layers.maybe_remat(
            functools.partial(conv_block, dilations=self.dilations, activation=self.activation),
            spec,
            "conv",
        )
        h = conv(layers.cast(_arrays(self.conv), dtype), x, mask)
        lstm = layers.maybe_remat(
            functools.partial(
                lstm_block, pooling=self.pooling, rate=rate, custom_vjp=self.custom_vjp
            ),
            spec,
            "lstm",
        )
        feats = lstm(layers.cast(_arrays(self.lstm), dtype), h, mask, k_lstm)

        head = _arrays(self.head)
        z = jnp.dot(feats, head["w1"].astype(dtype), preferred_element_type=jnp.float32)
        z = z + head["b1"]
        if spec.static_cardinalities:
            static = inputs["static"]
            for i, table in enumerate(self.static_emb):
                z = z + jnp.take(table[...], static[:, i], axis=0, mode="clip")
        z = act(z.astype(dtype))
        z = layers.dropout(z, rate, k_head)
        # The output projection runs in fp32 whatever the compute dtype (RUL resolution).
        pred = z.astype(jnp.float32) @ head["w2"] + head["b2"]
        return {"pred": pred}
