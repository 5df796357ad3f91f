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
pass over [T, B, 4H]); the recurrent `lax.scan` (no unroll) does only h @ Whh and the gates, the
gates as ONE tanh over all 4H columns (sigmoid(z) = tanh(z/2)/2 + 1/2), under a hand-written
`jax.custom_vjp` whose backward is a reverse scan that emits the pre-activation gate gradients
and leaves dWhh and the bias gradient to one matmul / one sum over all steps. With pooling
'last', the last layer's backward direction is read at t = T-1, which is its FIRST step from a
zero state: one cell step on x[T-1] (the Whh_b term is exactly zero, so that layer has no Whh_b).
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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from pdm_jax.errors import ConfigError
from pdm_jax.models import layers
from pdm_jax.models.layers import Inputs, ModelSpec, Outputs

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


# --- the LSTM recurrence ------------------------------------------------------------------
# Gate order along the 4H axis: input, forget, cell (g), output.


def _gate_consts(hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per 4H column: sigmoid(z) = 0.5 * tanh(0.5 z) + 0.5; the g gate is tanh."""
    scale = np.full((4, hidden), 0.5, np.float32)
    scale[2] = 1.0
    shift = np.full((4, hidden), 0.5, np.float32)
    shift[2] = 0.0
    return scale.reshape(-1), shift.reshape(-1)


def _activate(z: jax.Array) -> jax.Array:
    """Activated gates [B, 4H] (i, f, g, o) from pre-activations z [B, 4H] (fp32).

    One tanh over all 4H columns (sigmoid(z) = 0.5 tanh(z / 2) + 0.5) instead of three sigmoids and
    a tanh on slices: XLA:CPU lowers sigmoid to exp and a divide, and this form makes the forward
    recurrence about 1.7x faster there.
    """
    scale, shift = _gate_consts(z.shape[-1] // 4)
    return jnp.tanh(z * scale) * scale + shift


def _gates(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(i, f, g, o), each [B, H]."""
    i, f, g, o = jnp.split(_activate(z), 4, axis=-1)
    return i, f, g, o


def _step(xp_t, m_t, h, c, whh, bias):
    """One masked cell step -> (h', c', activated gates [B, 4H])."""
    z = xp_t.astype(jnp.float32) + bias + jnp.dot(h, whh, preferred_element_type=jnp.float32)
    acts = _activate(z)
    i, f, g, o = jnp.split(acts, 4, axis=-1)
    c_new = f * c + i * g
    h_new = (o * jnp.tanh(c_new)).astype(h.dtype)
    m = m_t[:, None]
    return jnp.where(m, h_new, h), jnp.where(m, c_new, c), acts


def lstm_scan_reference(
    xp: jax.Array,
    whh: jax.Array,
    bias: jax.Array,
    mask: jax.Array,
    reverse: bool,
    return_sequences: bool,
) -> jax.Array:
    """The masked recurrence as a plain `lax.scan` (autodiff's gradients; the custom VJP's primal).

    xp [T, B, 4H] = x @ Wih for every step, whh [H, 4H], bias [4H] (added inside the step, which
    saves a pass over xp), mask [T, B] bool; the state starts at zero and is carried unchanged
    through steps where mask is False. Returns every step's h [T, B, H] (return_sequences) or only
    the final one [B, H] (after step T-1, or step 0 if reverse).
    """
    _, b, g4 = xp.shape
    h0 = jnp.zeros((b, g4 // 4), xp.dtype)
    c0 = jnp.zeros((b, g4 // 4), jnp.float32)
    bias = bias.astype(jnp.float32)

    def body(carry, inp):
        h, c = carry
        h, c, _ = _step(*inp, h, c, whh, bias)
        return (h, c), (h if return_sequences else None)

    (h, _), hs = lax.scan(body, (h0, c0), (xp, mask), reverse=reverse)
    return hs if return_sequences else h


@functools.cache
def _lstm_scan_vjp(reverse: bool, return_sequences: bool) -> Callable[..., jax.Array]:
    """`lstm_scan_reference` with a hand-written VJP (same outputs, cheaper backward).

    The forward scan saves h_prev, c_prev and the activated gates per step. The backward is one
    reverse scan whose only per-step output is the pre-activation gradient dz [B, 4H] and whose
    carry is (dh, dc) with dh = dz @ Whh^T; then dWhh = sum_t h_prev^T dz_t is one matmul over all
    steps, dbias = sum dz, and dxp = dz (flowing on to Wih and the conv by autodiff).
    """

    @jax.custom_vjp
    def scan(xp, whh, bias, mask):
        return lstm_scan_reference(xp, whh, bias, mask, reverse, return_sequences)

    def fwd(xp, whh, bias, mask):
        _, b, g4 = xp.shape
        h0 = jnp.zeros((b, g4 // 4), xp.dtype)
        c0 = jnp.zeros((b, g4 // 4), jnp.float32)
        b32 = bias.astype(jnp.float32)

        def body(carry, inp):
            h, c = carry
            h_new, c_new, acts = _step(*inp, h, c, whh, b32)
            return (h_new, c_new), ((h_new if return_sequences else None), (h, c, acts))

        (h, _), (hs, res) = lax.scan(body, (h0, c0), (xp, mask), reverse=reverse)
        out = hs if return_sequences else h
        return out, (res, mask, whh, bias)

    def bwd(saved, g):
        (h_prev, c_prev, acts), mask, whh, bias = saved
        t, b, hdim = h_prev.shape
        whh_t = whh.T

        def body(carry, inp):
            dh, dc = carry
            if return_sequences:
                m_t, c_p, a, dh_out = inp
                dh = dh + dh_out.astype(jnp.float32)
            else:
                m_t, c_p, a = inp
            m = m_t[:, None]
            i, f, gg, o = jnp.split(a, 4, axis=-1)
            tc = jnp.tanh(f * c_p + i * gg)  # recomputed: cheaper than saving it
            dh_new = jnp.where(m, dh, 0.0)
            dc_new = jnp.where(m, dc, 0.0)
            dc_tot = dc_new + dh_new * o * (1.0 - tc * tc)
            dz = jnp.concatenate(
                [
                    dc_tot * gg * i * (1.0 - i),
                    dc_tot * c_p * f * (1.0 - f),
                    dc_tot * i * (1.0 - gg * gg),
                    dh_new * tc * o * (1.0 - o),
                ],
                axis=-1,
            )
            dh_prev = jnp.dot(
                dz.astype(whh.dtype), whh_t, preferred_element_type=jnp.float32
            ) + jnp.where(m, 0.0, dh)
            dc_prev = dc_tot * f + jnp.where(m, 0.0, dc)
            return (dh_prev, dc_prev), dz

        if return_sequences:
            dh0 = jnp.zeros((b, hdim), jnp.float32)
            xs = (mask, c_prev, acts, g)
        else:
            dh0 = g.astype(jnp.float32)
            xs = (mask, c_prev, acts)
        dc0 = jnp.zeros((b, hdim), jnp.float32)
        _, dz = lax.scan(body, (dh0, dc0), xs, reverse=not reverse)
        dz2 = dz.reshape(t * b, -1)
        dwhh = jnp.dot(  # one [H, T*B] @ [T*B, 4H] matmul over all steps
            h_prev.reshape(t * b, hdim).T,
            dz2.astype(whh.dtype),
            preferred_element_type=jnp.float32,
        )
        dbias = dz2.sum(0)
        return dz.astype(h_prev.dtype), dwhh.astype(whh.dtype), dbias.astype(bias.dtype), None

    scan.defvjp(fwd, bwd)
    return scan


def lstm_scan(
    xp: jax.Array,
    whh: jax.Array,
    bias: jax.Array,
    mask: jax.Array,
    *,
    reverse: bool = False,
    return_sequences: bool = True,
    custom_vjp: bool = True,
) -> jax.Array:
    """The masked LSTM recurrence (see `lstm_scan_reference`), by default with the custom VJP."""
    if custom_vjp:
        return _lstm_scan_vjp(reverse, return_sequences)(xp, whh, bias, mask)
    return lstm_scan_reference(xp, whh, bias, mask, reverse, return_sequences)


def _first_step(z: jax.Array) -> jax.Array:
    """h after one cell step from h = c = 0 with pre-activations z: c = i * g, h = o * tanh(c)."""
    i, _, g, o = _gates(z)
    return o * jnp.tanh(i * g)


# --- the blocks (pure functions of arrays, so jax.checkpoint can wrap them) -----------------


def conv_block(
    params: list[Params], x: jax.Array, mask: jax.Array, *, dilations, activation: str
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

    One 2-D matmul on the time-major rows: XLA:CPU runs an einsum that has to write a transposed
    output ('btc,cg->tbg') about 3x slower than this.
    """
    t, b, c = seq.shape
    xp = jnp.dot(seq.reshape(t * b, c), w, preferred_element_type=jnp.float32)
    return xp.astype(seq.dtype).reshape(t, b, -1)


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
            h_b = _first_step(z_b.astype(f32)).astype(h_f.dtype)
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
        conv = []
        for c_out in channels:
            conv.append(
                {"w": layers.glorot(rngs, (kernel, c_in, c_out)), "b": layers.zeros((c_out,))}
            )
            c_in = c_out
        self.conv = nnx.data(conv)

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
            # With pooling 'last' the last layer's backward direction only ever takes its first
            # step from zero state, where h @ Whh_b is 0: it has no Whh_b.
            if not (li == num_layers - 1 and self.pooling == "last"):
                p["whh_b"] = layers.param(rngs, orthogonal, (hidden, 4 * hidden))
            lstm.append(p)
            c_in = 2 * hidden
        self.lstm = nnx.data(lstm)

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
