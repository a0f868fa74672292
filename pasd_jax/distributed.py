"""JAX's multi-controller runtime for our command lines: when to start it, and host-level exchange of results.

Launch conventions (the same as `train.py`'s `config.distributed`): every host runs the same command; the
coordinator address, process count and process id come from flags, else from `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, else JAX detects them (SLURM, Open MPI, Kubernetes, Cloud TPU).
`mode="auto"` starts the runtime when any of those is given or a multi-process cluster job is detected;
`"on"` always (JAX must then detect what was not given); `"off"` never.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from pasd_jax.errors import ConfigError

MODES = ("auto", "on", "off")
ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Launch:
    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name}={value!r} is not an integer") from None


def launch_from(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
                process_id: int | None = None) -> Launch:
    """Flags win over the environment; unset values (None, '', negative) stay unset for JAX to detect."""
    if mode not in MODES:
        raise ConfigError(f"--distributed must be one of {MODES}, got {mode!r}")
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None and num_processes > 0 else _env_int(ENV_COUNT)
    pid = process_id if process_id is not None and process_id >= 0 else _env_int(ENV_ID)
    if count is not None and pid is not None and not 0 <= pid < count:
        raise ConfigError(f"process id {pid} is outside 0..{count - 1} (--process-id / ${ENV_ID})")
    return Launch(mode, address, count, pid)


def cluster_job() -> bool:
    """A job of several processes that JAX can configure itself (SLURM, Open MPI, a multi-host TPU slice)."""
    for var in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        if (os.environ.get(var, "").strip() or "1") not in ("0", "1"):
            return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def wanted(launch: Launch) -> bool:
    if launch.mode != "auto":
        return launch.mode == "on"
    given = (launch.coordinator_address, launch.num_processes, launch.process_id)
    if launch.num_processes == 1:
        return False
    return any(v is not None for v in given) or cluster_job()


def initialize(launch: Launch) -> bool:
    """Start `jax.distributed` if `launch` asks for it (before anything touches a JAX backend); True if started."""
    import jax

    if not wanted(launch) or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes exchange results too
    kw = {k: v for k, v in dataclasses.asdict(launch).items() if k != "mode" and v is not None}
    try:
        jax.distributed.initialize(**kw)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot start the multi-process runtime ({e}); give --coordinator-address HOST:PORT, "
                          "--num-processes and --process-id (or the JAX_* variables), or --distributed off") from e
    return True


def process() -> tuple[int, int]:
    """(this process's index, the process count); (0, 1) without the runtime."""
    import jax

    return jax.process_index(), jax.process_count()


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (a collective: every process must call it)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, sizes)]
