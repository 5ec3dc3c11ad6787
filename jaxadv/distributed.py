"""Many processes on JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same program on its own devices; `jax.devices()` then spans all
processes, and jitted programs over global arrays run their collectives over the
runtime's transport (gloo on CPU, NCCL on GPU, ICI/DCN on TPU). jaxadv adds no RPC,
collective or scheduler of its own; this module only

  * starts the runtime from flags or the environment (`initialize`), a no-op for one
    process, with a bounded wait for the others and a one-line error if one never joins;
  * says who writes (`is_primary`: process 0 writes every result file, atomically);
  * moves host data to and from global arrays so that each process supplies only the
    shards of its own devices (`replicate`) and fetches results (`gather`).

What runs where: training is one global program (params replicated over all devices of
all processes, each global batch split over them, gradients all-reduced by XLA). The
evaluation layer gives each process its slice of every global batch, attacks it on its
local devices, and gathers the per-example results, so attacks that drive a host loop
(DeepFool's compaction, AutoAttack's early exit) need nothing new. Per-example attack
keys are folded from dataset indices, so results equal those of one process.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, NamedTuple

import numpy as np

ENV = {"coordinator": "JAXADV_COORDINATOR", "num_processes": "JAXADV_NUM_PROCESSES",
       "process_id": "JAXADV_PROCESS_ID", "timeout": "JAXADV_JOIN_TIMEOUT"}  # fmt: skip
JOIN_EXIT_CODE = 75  # EX_TEMPFAIL: the job could not start; the launcher forwards it

_state = {"initialized": False}


class DistributedError(ValueError):
    """A bad distributed setting (printed as one line by the CLI)."""


class Settings(NamedTuple):
    coordinator: str | None  # "host:port", "auto" (cluster auto-detection), or None (one process)
    num_processes: int | None
    process_id: int | None
    timeout: int  # seconds to wait for every process to join


def settings(coordinator=None, num_processes=None, process_id=None, timeout=None, env=None) -> Settings:
    """Explicit values, else `JAXADV_COORDINATOR` / `_NUM_PROCESSES` / `_PROCESS_ID` / `_JOIN_TIMEOUT`."""
    env = os.environ if env is None else env

    def pick(value, name, cast):
        if value is not None:
            return value
        raw = env.get(ENV[name])
        if raw in (None, ""):
            return None
        try:
            return cast(raw)
        except ValueError:
            raise DistributedError(f"${ENV[name]}={raw!r} is not a valid {name.replace('_', ' ')}") from None

    s = Settings(pick(coordinator, "coordinator", str), pick(num_processes, "num_processes", int),
                 pick(process_id, "process_id", int), pick(timeout, "timeout", int) or 300)  # fmt: skip
    if s.coordinator in (None, "auto"):
        if s.coordinator is None and (s.num_processes or 1) > 1:
            raise DistributedError(f"{s.num_processes} processes need a coordinator address (--coordinator HOST:PORT)")
        return s
    if ":" not in s.coordinator or not s.coordinator.rsplit(":", 1)[1].isdigit():
        raise DistributedError(f"coordinator must be HOST:PORT or 'auto', not {s.coordinator!r}")
    if s.num_processes is None or s.process_id is None:
        raise DistributedError("a coordinator address needs --num-processes and --process-id (or their JAXADV_ variables)")
    if s.num_processes < 1 or not 0 <= s.process_id < s.num_processes:
        raise DistributedError(f"process id {s.process_id} is not in [0, {s.num_processes})")
    if s.timeout <= 0:
        raise DistributedError(f"join timeout must be positive, got {s.timeout}")
    return s


def _missing(s: Settings) -> str:
    others = [i for i in range(s.num_processes or 0) if i != s.process_id]
    if len(others) == 1:
        return f"process {others[0]}"
    return f"one or more of processes {', '.join(map(str, others))}"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout: int | None = None, heartbeat_seconds: int = 60) -> Settings:  # fmt: skip
    """Start JAX's distributed runtime; call before anything touches a JAX device.

    Args:
      coordinator: "HOST:PORT" of process 0's coordination service; "auto" to let
        `jax.distributed.initialize()` detect the cluster (SLURM, TPU pods, ...); None (and
        no `JAXADV_COORDINATOR`) for a single process, where this is a no-op.
      num_processes, process_id: this process's place in the job (with an address).
      timeout: seconds to wait for all processes to join (default `$JAXADV_JOIN_TIMEOUT`
        or 300). A process that is still waiting then prints one line naming the
        process(es) that did not join and exits with code 75, instead of hanging or
        dying in the runtime's own stack trace.
      heartbeat_seconds: after the join, a process that stops (killed, crashed) is
        declared dead by the runtime after this long, and the others stop with an error
        naming it, instead of waiting forever in a collective.

    Returns:
      The settings used.
    """
    s = settings(coordinator, num_processes, process_id, timeout)
    if s.coordinator is None or _state["initialized"]:
        return s
    import jax

    # CPU collectives across processes go over gloo (the default, "none", has none). It
    # only matters for CPU devices and must be set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    done = threading.Event()
    if s.coordinator != "auto":
        def watchdog():
            if not done.wait(s.timeout):
                print(f"jaxadv: error: process {s.process_id} of {s.num_processes} waited {s.timeout} s at the "
                      f"coordinator {s.coordinator} and {_missing(s)} did not join; start all {s.num_processes} "
                      f"processes with the same coordinator (or raise --join-timeout)", file=sys.stderr, flush=True)
                os._exit(JOIN_EXIT_CODE)

        threading.Thread(target=watchdog, daemon=True, name="jaxadv-join-watchdog").start()
        kwargs = dict(coordinator_address=s.coordinator, num_processes=s.num_processes, process_id=s.process_id)
    else:
        kwargs = {}
    try:
        # The runtime's own deadline comes after the watchdog's, so the one-line message wins.
        jax.distributed.initialize(**kwargs, initialization_timeout=s.timeout + 60,
                                   heartbeat_timeout_seconds=heartbeat_seconds)  # fmt: skip
    except (ValueError, RuntimeError) as e:
        raise DistributedError(f"cannot start the distributed runtime: {str(e).splitlines()[0]}") from None
    finally:
        done.set()
    _state["initialized"] = True
    return s


def _runtime(field: str, default: int) -> int:
    # JAX's own record of the job, set by `jax.distributed.initialize` however it was
    # called (here, or by the user); reading it starts no backend.
    try:
        from jax._src import distributed as _d

        return int(getattr(_d.global_state, field) or default)
    except (ImportError, AttributeError):  # a private API; if it moved, assume one process
        return default


def process_index() -> int:
    """This process's index (0 when the distributed runtime is not running); starts no backend."""
    return _runtime("process_id", 0)


def process_count() -> int:
    """The number of processes in the job (1 without the distributed runtime); starts no backend."""
    return _runtime("num_processes", 1)


def is_primary() -> bool:
    """True on the process that writes result files (process 0, or the only one)."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------
# Host data <-> global arrays
# ---------------------------------------------------------------------------------------


def replicate(tree: Any, sharding) -> Any:
    """Host (or single-device) arrays -> arrays replicated on every device of `sharding`.

    Each process copies the value only to its own devices, so this works for a sharding
    that spans processes (every process must hold the same value), where `device_put`
    of a host array would have to reach devices of other processes.
    """
    import jax

    def put(a):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            a = a.addressable_data(0)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def local(tree: Any) -> Any:
    """Arrays replicated over several processes -> copies on this process's first device.

    Evaluation runs per process on its local devices; params that come out of a
    multi-process training are global arrays, and a local program cannot take them.
    """
    import jax

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if not a.is_fully_replicated:
                raise ValueError("a sharded multi-process array cannot be used locally; gather it first")
            return a.addressable_data(0)
        return a

    return jax.tree.map(one, tree)


def gather(local_rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every process's rows (axis 0, in process order); identity for one process.

    All processes must call it with the same keys and shapes (each holds its own slice
    of a fixed-size global batch, so they do).
    """
    if process_count() == 1:
        return local_rows
    from jax.experimental import multihost_utils

    out = multihost_utils.process_allgather({k: np.asarray(v) for k, v in local_rows.items()}, tiled=False)
    return {k: np.concatenate(list(np.asarray(v)), axis=0) if np.ndim(local_rows[k]) else np.asarray(v)
            for k, v in out.items()}  # fmt: skip


def slice_rows(n: int) -> slice:
    """This process's rows of a global batch of `n` rows (n divisible by the process count)."""
    p, k = process_index(), process_count()
    if n % k:
        raise ValueError(f"a global batch of {n} rows does not split over {k} processes")
    return slice(p * n // k, (p + 1) * n // k)
