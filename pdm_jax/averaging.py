"""Polyak (exponential moving) averages of the parameters, carried inside the optimizer state.

Why in the optimizer state: it is then sharded, donated, checkpointed and restored exactly like
the rest of it, with no extra arguments through the train step. Evaluation, early stopping and
the test report use the average when `train.ema_decay` > 0: on small run-to-failure sets the
raw parameters wander from step to step and the average generalises better.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ParamAverage(NamedTuple):
    count: jax.Array
    average: Any


def track_average(decay: float) -> optax.GradientTransformation:
    """Last in an optax chain: sees the final updates and averages `params + updates`.

    The effective decay ramps up as min(decay, (1 + t) / (10 + t)), so early averages are not
    dominated by the initial parameters.
    """

    def init(params: Any) -> ParamAverage:
        return ParamAverage(jnp.zeros((), jnp.int32), jax.tree.map(jnp.array, params))

    def update(updates: Any, state: ParamAverage, params: Any = None) -> tuple[Any, ParamAverage]:
        if params is None:
            raise ValueError("track_average needs params")
        new = optax.apply_updates(params, updates)
        t = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        average = jax.tree.map(lambda a, p: d * a + (1.0 - d) * p, state.average, new)
        return updates, ParamAverage(state.count + 1, average)

    return optax.GradientTransformation(init, update)


def averaged(opt_state: Any) -> Any | None:
    """The parameter average inside an optimizer state, or None when averaging is off."""
    for part in opt_state if isinstance(opt_state, tuple) else ():
        if isinstance(part, ParamAverage):
            return part.average
    return None
