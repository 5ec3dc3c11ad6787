"""Data parallelism over all local devices with `jax.sharding`: one code path for 1 or N.

The batch axis is split over a 1-D mesh named "batch"; params, optimizer state and the
device-resident dataset are replicated. Under `jit`, XLA (GSPMD) partitions the step and
inserts the gradient all-reduce, so BatchNorm statistics and the loss are those of the
global batch, exactly as on one device. Many processes: `jaxadv.distributed.initialize()`
first; `batch_mesh()` then spans the devices of all processes (training), and
`local_mesh()` those of this process (the evaluation layer, see `jaxadv.distributed`).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def batch_mesh(devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(devices, ("batch",))


def local_mesh() -> Mesh:
    """The batch mesh of this process's own devices (all devices when there is one process)."""
    return Mesh(list(jax.local_devices()), ("batch",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("batch"))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"{what} {batch_size} is not divisible by the {n} devices; choose a multiple of {n}")
