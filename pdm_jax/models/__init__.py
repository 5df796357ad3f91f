"""Model registry: `config.model.name` -> constructor, plus the functional view training uses.

`build(spec)` returns an NNX module whose state is fp32 `nnx.Param`s only; `split` turns it into
(graphdef, params) and `apply(graphdef, params, inputs, key)` is the pure function a `jax.jit`
training step calls, so params are a plain pytree for sharding and Orbax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from pdm_jax.errors import ConfigError
from pdm_jax.models.layers import Inputs, ModelSpec, Outputs, spec_from_config


def _registry() -> dict[str, Callable[..., nnx.Module]]:
    from pdm_jax.models.cnn_bilstm import CNNBiLSTM
    from pdm_jax.models.tft import TFT

    return {"tft": TFT, "cnn_bilstm": CNNBiLSTM}


MODEL_NAMES = ("tft", "cnn_bilstm")


def build(spec: ModelSpec, seed: int = 0) -> nnx.Module:
    registry = _registry()
    if spec.name not in registry:
        raise ConfigError(f"config.model.name: unknown model {spec.name!r}; expected {MODEL_NAMES}")
    return registry[spec.name](spec, rngs=nnx.Rngs(params=seed))


def split(model: nnx.Module) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, params): params is a pytree of fp32 arrays."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, state


def apply(
    graphdef: nnx.GraphDef,
    params: Any,
    inputs: Inputs,
    key: jax.Array | None = None,
    **kwargs: Any,
) -> Outputs:
    """Runs the model on `inputs`; `key` enables dropout (training), None is evaluation."""
    model = nnx.merge(graphdef, params)
    out = model(inputs, key=key, **kwargs)
    scale, offset = model.spec.target_scale, model.spec.target_offset
    if scale != 1.0 or offset != 0.0:
        out = {**out, "pred": out["pred"] * scale + offset}
    return out


__all__ = ["MODEL_NAMES", "ModelSpec", "apply", "build", "spec_from_config", "split"]
