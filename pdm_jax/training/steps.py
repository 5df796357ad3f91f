"""The jitted train step, a pure function of plain pytrees (the predict step: `prediction`).

`jax.jit` over `(params, opt_state, batch, key)` rather than `nnx.jit` over a module: on this CPU
nnx.jit measured about twice the per-step overhead, and plain pytrees are what sharding and Orbax
want. The graphdef (the model's static structure) is closed over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pdm_jax import models, parallel
from pdm_jax.models import layers
from pdm_jax.models.layers import ModelSpec
from pdm_jax.prediction import MODEL_INPUTS, model_inputs


def make_loss_fn(graphdef: Any, spec: ModelSpec) -> Callable[..., jax.Array]:
    """(params, batch, key) -> loss. An ensemble's loss is the sum of its members' own losses:
    each member gets exactly the gradient it would get trained alone (a loss on the averaged
    output would instead train the members as one wider model and lose their diversity)."""

    def member_loss(pred: jax.Array, batch: dict[str, Any]) -> jax.Array:
        return layers.loss(
            pred,
            batch["y"],
            spec.quantiles,
            batch.get("weight"),
            point_loss=spec.point_loss,
            huber_delta=spec.huber_delta,
        )

    def loss_fn(params: Any, batch: dict[str, Any], key: jax.Array | None) -> jax.Array:
        if isinstance(graphdef, models.Ensemble):
            out = models.members(graphdef, params, model_inputs(batch), key=key)
            return jnp.sum(jax.vmap(lambda pred: member_loss(pred, batch))(out["pred"]))
        out = models.apply(graphdef, params, model_inputs(batch), key=key)
        return member_loss(out["pred"], batch)

    return loss_fn


def noisy_inputs(batch: dict[str, Any], key: jax.Array, std: float) -> dict[str, Any]:
    """The batch with Gaussian noise of `std` (in scaled-feature units) added to the observed
    readings `x`; left-padding (mask 0) stays zero. On C-MAPSS the models fit the few training
    units' exact sensor traces within ~8 epochs, and jitter is the usual answer; at 0.15 it did not
    improve FD001's or FD003's validation RMSE (experiments/README.md), so it is off by default."""
    x = batch["x"]
    noise = std * jax.random.normal(key, x.shape, x.dtype)
    mask = batch["mask"].astype(x.dtype)[..., None]
    return {**batch, "x": x + noise * mask}


def microbatches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """[B, ...] -> [accum, B/accum, ...], microbatch j = rows j, j+accum, j+2*accum, ...

    Strided rather than contiguous: every device's shard of the data axis holds an equal part of
    each microbatch, so accumulating moves no data between devices.
    """

    def split(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: Any,
    spec: ModelSpec,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    grad_accum: int = 1,
    seed: int = 0,
    compiler_options: dict[str, Any] | None = None,
    input_noise: float = 0.0,
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """(params, opt_state, batch, step) -> (params, opt_state, metrics); params and optimizer
    state are donated. The dropout key is `fold_in(key(seed), step)`, made inside the step: an
    integer crosses process boundaries as a replicated input where a host-made key would not.

    With a mesh the step is jitted with explicit shardings: batch split on the data axis, state and
    metrics replicated. With `grad_accum` > 1 the global batch is scanned as that many
    microbatches and their mean gradient makes one update, the same update (up to float rounding
    and dropout draws) as the whole batch at once. `input_noise` > 0 jitters the readings
    (`noisy_inputs`) with a key split off the step's key; at 0 the step is unchanged.
    """
    loss_and_grad = jax.value_and_grad(make_loss_fn(graphdef, spec))
    accum = int(grad_accum)
    size = models.ensemble_size(graphdef)

    def gradients(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[Any, Any]:
        if accum == 1:
            return loss_and_grad(params, batch, key)

        def body(carry, inputs):
            index, micro = inputs
            loss, grads = loss_and_grad(params, micro, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        xs = (jnp.arange(accum), microbatches(batch, accum))
        total, _ = jax.lax.scan(body, zeros, xs)
        return jax.tree.map(lambda t: t / accum, total)

    def train_step(params, opt_state, batch, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        if input_noise > 0:
            noise_key, key = jax.random.split(key)
            batch = noisy_inputs(batch, noise_key, input_noise)
        loss, grads = gradients(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # An ensemble reports its members' mean loss, comparable with a single model's.
        return params, opt_state, {"loss": loss / size, "grad_norm": optax.tree.norm(grads)}

    options = {"compiler_options": compiler_options} if compiler_options else {}
    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0, 1), **options)
    state, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state, state, data, state),
        out_shardings=(state, state, state),
        donate_argnums=(0, 1),
        **options,
    )


TRAIN_KEYS = (*MODEL_INPUTS, "y", "weight")


def host_arrays(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a host batch a train step reads (others, e.g. `time`, stay home)."""
    return {k: v for k, v in batch.items() if k in TRAIN_KEYS}


def train_arrays(batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Host batch -> single-device arrays for the keys a train step reads."""
    return {k: jnp.asarray(v) for k, v in host_arrays(batch).items()}
