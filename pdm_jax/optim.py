"""The optimizer, its schedule, the compute dtype and the parameters evaluation uses.

Training builds its state from these, and inference needs the same structure to restore a
checkpoint's parameters (Orbax restores into a target tree), so they live outside `training/`:
`inference/` may import this module, never the training loop.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from pdm_jax import averaging


def resolve_dtype(requested: str) -> str:
    """'auto' without a layout: float32 on CPU (bf16 measured slower on XLA:CPU), else bf16."""
    if requested != "auto":
        return requested
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def learning_rate_schedule(train_cfg: Any) -> optax.Schedule:
    """Linear warm-up, then cosine or linear decay over `schedule_steps` to 1 % of the peak (flat
    after), or constant."""
    peak = float(train_cfg.learning_rate)
    warmup = int(train_cfg.warmup_steps)
    kind = train_cfg.schedule
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    decay = max(int(train_cfg.schedule_steps), warmup + 1)
    if kind == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, warmup),
                optax.linear_schedule(peak, 0.01 * peak, decay - warmup),
            ],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay, end_value=0.01 * peak)


def make_optimizer(
    train_cfg: Any, members: int = 1
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the schedule, after global-norm clipping. For an ensemble (`members` > 1,
    parameters stacked on axis 0) the whole chain is vmapped over the members: each is clipped,
    updated and averaged on its own, exactly as if it trained alone."""
    schedule = learning_rate_schedule(train_cfg)
    parts = []
    if train_cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(train_cfg.clip_norm)))
    parts.append(optax.adamw(schedule, weight_decay=float(train_cfg.weight_decay)))
    if train_cfg.ema_decay:
        parts.append(averaging.track_average(float(train_cfg.ema_decay)))
    optimizer = optax.chain(*parts)
    if members > 1:
        optimizer = optax.GradientTransformation(
            jax.vmap(optimizer.init), jax.vmap(optimizer.update)
        )
    return optimizer, schedule


def eval_params(params: Any, opt_state: Any) -> Any:
    """The parameters evaluation uses: the Polyak average when train.ema_decay > 0."""
    average = averaging.averaged(opt_state)
    return params if average is None else average
