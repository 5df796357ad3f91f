"""The jitted train and predict steps, as pure functions of plain pytrees.

`jax.jit` over `(params, opt_state, batch, key)` rather than `nnx.jit` over a module: on this CPU
nnx.jit measured about twice the per-step overhead, and plain pytrees are what sharding and Orbax
want. The graphdef (the model's static structure) is closed over.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pdm_jax import models
from pdm_jax.models import layers
from pdm_jax.models.layers import ModelSpec

MODEL_INPUTS = ("x", "mask", "static", "known")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a data batch the models read."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def make_loss_fn(graphdef: nnx.GraphDef, spec: ModelSpec) -> Callable[..., jax.Array]:
    def loss_fn(params: Any, batch: dict[str, Any], key: jax.Array | None) -> jax.Array:
        out = models.apply(graphdef, params, model_inputs(batch), key=key)
        return layers.loss(out["pred"], batch["y"], spec.quantiles, batch.get("weight"))

    return loss_fn


def make_train_step(
    graphdef: nnx.GraphDef, spec: ModelSpec, optimizer: optax.GradientTransformation
) -> Callable[..., tuple[Any, Any, dict[str, jax.Array]]]:
    """(params, opt_state, batch, key) -> (params, opt_state, metrics); params and optimizer
    state are donated, the dropout key for this step is `fold_in(key, step)` by the caller."""
    loss_fn = make_loss_fn(graphdef, spec)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_predict_step(
    graphdef: nnx.GraphDef, spec: ModelSpec
) -> Callable[[Any, dict[str, Any]], dict[str, jax.Array]]:
    """(params, batch) -> {"pred": [B, Q] fp32, "point": [B] fp32}."""

    @jax.jit
    def predict_step(params, batch):
        out = models.apply(graphdef, params, model_inputs(batch))
        return {"pred": out["pred"], "point": layers.point_prediction(out["pred"], spec.quantiles)}

    return predict_step


def as_arrays(batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Host batch -> device arrays for the keys a step reads (others, e.g. `time`, stay home)."""
    keep = (*MODEL_INPUTS, "y", "weight")
    return {k: jnp.asarray(v) for k, v in batch.items() if k in keep}
