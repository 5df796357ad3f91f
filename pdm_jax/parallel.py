"""Data parallelism over a `jax.sharding.Mesh`, on one host or many, with JAX's own machinery.

Why this shape: the global batch is split on a `data` axis and the parameters and optimizer state
are replicated, so the same jitted step (explicit in/out shardings, donated state) runs on one CPU,
eight GPUs or a pod. A `model` axis of size 1 is reserved so model sharding can come later
without changing checkpoints or call sites. Multi-host goes through `jax.distributed` only: each
process feeds its contiguous share of every global batch and
`jax.make_array_from_process_local_data` stitches the global array.

Axes are `AxisType.Auto` (jax.make_mesh now defaults to Explicit, which would change how every
jitted function in the package propagates shardings).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pdm_jax.errors import ConfigError

log = logging.getLogger(__name__)
DATA, MODEL = "data", "model"


def make_mesh(shape: tuple[int, int], devices: list[Any] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = (int(s) for s in shape)
    if data * model != len(devices):
        raise ConfigError(
            f"config.compute.mesh: ({data}, {model}) needs {data * model} devices, "
            f"found {len(devices)}"
        )
    return jax.make_mesh(
        (data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (identical on every process) -> arrays replicated over the whole mesh.

    `make_array_from_callback` rather than `device_put`: it works the same whether or not the mesh
    spans processes.
    """
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's contiguous share of a global batch -> global arrays sharded on `data`."""
    sharding = batch_sharding(mesh)
    count = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (np.shape(v)[0] * count, *np.shape(v)[1:])
        )
        for k, v in local.items()
    }


def to_host(tree: Any) -> Any:
    """Replicated global arrays -> numpy on this process (its local copy; no cross-host fetch)."""

    def get(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def wants_distributed(config: Any, env: Mapping[str, str] | None = None) -> bool:
    """True when the config names a coordinator or the environment is a multi-process launch."""
    env = os.environ if env is None else env
    dist = config.get("distributed")
    if dist is not None and dist.get("coordinator"):
        return True
    if dist is not None and dist.get("enabled") in (True, False):
        return bool(dist.get("enabled"))
    if env.get("SLURM_NTASKS", "1") not in ("", "1"):
        return True
    if env.get("OMPI_COMM_WORLD_SIZE", "1") not in ("", "1"):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1 or bool(env.get("JAX_COORDINATOR_ADDRESS"))


def initialize(config: Any, env: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` once when this is a multi-process run.

    Explicit `config.distributed.{coordinator,num_processes,process_id}` win; otherwise JAX's
    cluster detection (SLURM, MPI, TPU pods, GKE) fills them in. Must run before any device query.
    """
    if not wants_distributed(config, env):
        return False
    if jax.distributed.is_initialized():
        return True
    dist = config.get("distributed") or {}
    kwargs: dict[str, Any] = {}
    if dist.get("coordinator"):
        kwargs["coordinator_address"] = dist["coordinator"]
    if dist.get("num_processes"):
        kwargs["num_processes"] = int(dist["num_processes"])
    if dist.get("process_id") is not None and dist.get("process_id") >= 0:
        kwargs["process_id"] = int(dist["process_id"])
    if dist.get("timeout_s"):
        kwargs["initialization_timeout"] = int(dist["timeout_s"])
    log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)
    return True


def agree(flag: bool) -> bool:
    """Process 0's decision, on every process (e.g. "save now" from its clock): a save that only
    some processes enter would deadlock. Free on one process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, dtype=np.int32)))
