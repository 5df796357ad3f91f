"""Pieces both model families share: the spec they are built from, the output head and its loss,
dropout with an explicit key, remat, and mixed-precision casting.

Models are Flax NNX modules whose only state is `nnx.Param` (fp32). Dropout takes an explicit
PRNG key instead of NNX RNG state, so `nnx.split(model)` yields plain arrays alone: the training
step jits over them with `jax.jit`, sharding and Orbax see an ordinary pytree, and the same key
gives the same dropout on any layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pdm_jax.errors import ConfigError

Inputs = dict[str, jax.Array]
Outputs = dict[str, jax.Array]

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything a model constructor needs: config.model plus the data's shapes."""

    name: str
    num_features: int
    window: int
    quantiles: tuple[float, ...] = ()
    dropout: float = 0.1
    dtype: str = "float32"  # compute dtype; params are always fp32
    static_cardinalities: tuple[int, ...] = ()  # categorical static inputs (dataset id, ...)
    num_known: int = 0  # known-future / known time-varying inputs per step
    remat: tuple[str, ...] = ()  # blocks to rematerialise in the backward pass
    remat_policy: str = "nothing_saveable"
    hparams: tuple[tuple[str, Any], ...] = ()  # model-family keys, e.g. config.model.tft
    # Outputs are head values times this, so the head works at order 1 while RUL is in cycles:
    # from a zero-mean init, reaching RUL ~75 by Adam's ~lr-sized steps would take ~10^4 steps
    # (the long loss plateau C-MAPSS models are known for).
    target_scale: float = 1.0
    # ... plus this: the head then starts near the middle of the RUL range instead of at 0.
    target_offset: float = 0.0
    point_loss: str = "mse"  # point heads: 'mse' | 'huber'
    huber_delta: float = 10.0  # cycles
    ensemble: int = 1  # members trained side by side, outputs averaged (pdm_jax.models.init)

    @property
    def num_outputs(self) -> int:
        return max(len(self.quantiles), 1)

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def hp(self, key: str, default: Any) -> Any:
        return dict(self.hparams).get(key, default)


def spec_from_config(
    model_cfg: Any,
    num_features: int,
    window: int,
    static_cardinalities: Sequence[int] = (),
    num_known: int = 0,
    dtype: str = "float32",
) -> ModelSpec:
    """Builds the spec from `config.model`; `dtype` is the resolved config.compute.dtype."""
    name = model_cfg.name
    hparams = model_cfg.get(name)
    if dtype not in DTYPES:
        raise ConfigError(f"config.compute.dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    policy = model_cfg.remat_policy
    if policy not in REMAT_POLICIES:
        raise ConfigError(
            f"config.model.remat_policy: expected one of {tuple(REMAT_POLICIES)}, got {policy!r}"
        )
    return ModelSpec(
        name=name,
        num_features=num_features,
        window=window,
        quantiles=tuple(float(q) for q in model_cfg.quantiles),
        dropout=float(model_cfg.dropout),
        dtype=dtype,
        static_cardinalities=tuple(int(c) for c in static_cardinalities),
        num_known=num_known,
        # 'auto' is the hardware layout's call (hardware.decide); unresolved it means off.
        remat=() if model_cfg.remat == "auto" else tuple(model_cfg.remat),
        remat_policy=policy,
        target_scale=float(model_cfg.target_scale),
        target_offset=float(model_cfg.target_offset),
        point_loss=str(model_cfg.point_loss),
        huber_delta=float(model_cfg.huber_delta),
        ensemble=int(model_cfg.ensemble),
        hparams=tuple(
            sorted(
                dict(hparams.to_dict() if hasattr(hparams, "to_dict") else hparams or {}).items()
            )
        ),
    )


def check_remat(spec: ModelSpec, blocks: Sequence[str]) -> None:
    unknown = [b for b in spec.remat if b not in blocks]
    if unknown:
        raise ConfigError(
            f"config.model.remat: unknown block(s) {', '.join(map(repr, unknown))} for "
            f"{spec.name}; expected some of {tuple(blocks)}"
        )


def maybe_remat(fn: Callable[..., Any], spec: ModelSpec, block: str) -> Callable[..., Any]:
    """`fn` under jax.checkpoint when config.model.remat names `block`.

    `fn` must be a pure function of arrays (params passed in, not closed over as NNX state), so
    the rematerialised backward pass recomputes from its inputs alone.
    """
    if block not in spec.remat:
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[spec.remat_policy])


def sigmoid(x: jax.Array) -> jax.Array:
    """Logistic function as 0.5 * tanh(x / 2) + 0.5: the same function, but XLA:CPU vectorises
    tanh and lowers the logistic to exp plus a divide (measured ~1.7x faster in an LSTM scan)."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; `key=None` (evaluation) is the identity."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def cast(tree: Any, dtype: Any) -> Any:
    """Casts floating arrays of a pytree (params on their way into compute)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def param(rngs: nnx.Rngs, init: Callable[..., jax.Array], shape: Sequence[int]) -> nnx.Param:
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32))


def glorot(rngs: nnx.Rngs, shape: Sequence[int]) -> nnx.Param:
    return param(rngs, jax.nn.initializers.glorot_uniform(), shape)


def zeros(shape: Sequence[int]) -> nnx.Param:
    return nnx.Param(jnp.zeros(tuple(shape), jnp.float32))


def ones(shape: Sequence[int]) -> nnx.Param:
    return nnx.Param(jnp.ones(tuple(shape), jnp.float32))


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis, statistics in fp32 whatever the compute dtype.

    `scale`/`bias` broadcast against x (per-variable norms pass [V, 1, D]). The backward pass is
    written by hand: autodiff of the two-pass statistics made several more passes over the
    [V, N, D] tensors of the TFT's variable selection, its hottest spot on CPU.
    """
    return _layer_norm(x, scale, bias, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    centered = x32 - x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
    xhat = centered * rstd
    y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (xhat, rstd, scale, bias)


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast gradient back to a parameter's shape."""
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _layer_norm_bwd(eps, residuals, dy):
    del eps
    xhat, rstd, scale, bias = residuals
    dtype = dy.dtype  # the cotangent has the output's (= the input's) dtype
    dy = dy.astype(jnp.float32)
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    dscale = _sum_to(dy * xhat, scale.shape).astype(scale.dtype)
    dbias = _sum_to(dy, bias.shape).astype(bias.dtype)
    return dx.astype(dtype), dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# --- the shared output head and its losses -----------------------------------------------


def quantile_loss(
    pred: jax.Array, y: jax.Array, quantiles: Sequence[float], weight: jax.Array | None = None
) -> jax.Array:
    """Pinball loss averaged over quantiles and (weighted) examples, in fp32.

    For quantile q and error e = y - pred: q * e if e >= 0 else (q - 1) * e.
    """
    q = jnp.asarray(quantiles, jnp.float32)
    err = y.astype(jnp.float32)[:, None] - pred.astype(jnp.float32)
    per = jnp.maximum(q * err, (q - 1.0) * err).mean(-1)
    return _weighted_mean(per, weight)


def mse_loss(pred: jax.Array, y: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    err = pred.astype(jnp.float32)[:, 0] - y.astype(jnp.float32)
    return _weighted_mean(jnp.square(err), weight)


def _weighted_mean(values: jax.Array, weight: jax.Array | None) -> jax.Array:
    if weight is None:
        return values.mean()
    w = weight.astype(jnp.float32)
    return (values * w).sum() / jnp.maximum(w.sum(), 1.0)


def huber_loss(
    pred: jax.Array, y: jax.Array, delta: float, weight: jax.Array | None = None
) -> jax.Array:
    """Quadratic within `delta` cycles, linear beyond: outlying units pull less than under MSE."""
    err = jnp.abs(pred.astype(jnp.float32)[:, 0] - y.astype(jnp.float32))
    quad = jnp.minimum(err, delta)
    return _weighted_mean(0.5 * quad**2 + delta * (err - quad), weight)


POINT_LOSSES = ("mse", "huber")


def loss(
    pred: jax.Array,
    y: jax.Array,
    quantiles: Sequence[float],
    weight: jax.Array | None = None,
    point_loss: str = "mse",
    huber_delta: float = 10.0,
) -> jax.Array:
    """The head's training loss: pinball for quantile heads, MSE or Huber for a point head."""
    if quantiles:
        return quantile_loss(pred, y, quantiles, weight)
    if point_loss == "huber":
        return huber_loss(pred, y, huber_delta, weight)
    return mse_loss(pred, y, weight)


def point_index(quantiles: Sequence[float]) -> int | None:
    """The output the point prediction reads: the quantile nearest 0.5 (None: a point model)."""
    if not quantiles:
        return None
    return min(range(len(quantiles)), key=lambda i: abs(float(quantiles[i]) - 0.5))


def point_prediction(pred: jax.Array, quantiles: Sequence[float]) -> jax.Array:
    """The RUL estimate: the median quantile (or the one nearest 0.5), else the point output."""
    idx = point_index(quantiles)
    return pred[:, 0 if idx is None else idx].astype(jnp.float32)
