"""Data parallelism over every device: one mesh axis, "data".

Parameters are replicated; each batch is split along its first (batch) axis over all devices of all
processes, and `jit` compiles one program for the whole global batch (XLA inserts the gradient
all-reduce). The optimizer state is replicated too, or split over the devices (`split_over_data`,
`train.shard_optimizer_state`), so that each device updates only its share of the parameters. Each
process feeds only its own rows (`shard_batch`), so the same code runs on one CPU, eight GPUs, or a
multi-host TPU pod.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several": set by the user (JAX's own), by
# SLURM or Open MPI launchers, or present on Cloud TPU pod slices.
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")
_DISTRIBUTED_MODES = ("auto", "on", "off")


class DistributedError(RuntimeError):
    """The processes of a multi-host run cannot find or agree with each other; the message says why."""


def _looks_multihost(environ: Mapping[str, str]) -> bool:
    if any(environ.get(name) for name in _MULTIHOST_ENV):
        return True
    for name in _CLUSTER_SIZE_ENV:
        try:
            if int(environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    # Cloud TPU pod slice: more than one worker host listed.
    return len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def parse_address(address: str) -> tuple[str, int]:
    """"host:port" or "[ipv6]:port" -> (host, port); DistributedError naming JAX_COORDINATOR_ADDRESS if malformed."""
    host, sep, port = str(address).strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port (e.g. 10.0.0.1:1234)")
    return host, int(port)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Return once a TCP connection to the coordinator opens; DistributedError after `timeout_s`.

    JAX itself aborts the whole process (a C++ fatal error, exit 134) when its connection times out, so a
    coordinator that is not there is caught here first, with a one-line error.
    """
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"the coordinator {host}:{port} (JAX_COORDINATOR_ADDRESS) did not answer within "
                f"train.distributed_timeout_s={timeout_s:g} s ({last.strerror or last}); start process 0 "
                f"there, or fix the address")
        time.sleep(0.2)


def maybe_initialize_distributed(mode: str = "auto", environ: Mapping[str, str] | None = None, *,
                                 timeout_s: float = 300, heartbeat_timeout_s: float = 100) -> bool:
    """Call `jax.distributed.initialize()` for a multi-host run; returns whether it was called.

    mode "auto" (config `train.distributed`) initialises when the environment says this is one of several
    processes (JAX_COORDINATOR_ADDRESS, SLURM_NTASKS>1, OMPI_COMM_WORLD_SIZE>1, a TPU pod's
    TPU_WORKER_HOSTNAMES); "on" always does; "off" never does. Must run before anything touches a device.

    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, where set,
    are passed on; what is unset JAX detects from the cluster (SLURM, Open MPI, Cloud TPU). `timeout_s`
    (train.distributed_timeout_s) bounds the wait for the coordinator and the other processes;
    `heartbeat_timeout_s` (train.heartbeat_timeout_s) is how long a silent process counts as alive.
    """
    if mode not in _DISTRIBUTED_MODES:
        raise ValueError(f"train.distributed: unknown option {mode!r}; choose one of {', '.join(_DISTRIBUTED_MODES)}")
    environ = os.environ if environ is None else environ
    if mode == "off" or (mode == "auto" and not _looks_multihost(environ)):
        return False
    if jax.distributed.is_initialized():
        return True
    address = environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _env_int(environ, "JAX_NUM_PROCESSES")
    process_id = _env_int(environ, "JAX_PROCESS_ID")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"JAX_PROCESS_ID={process_id} is not in [0, JAX_NUM_PROCESSES={num_processes})")
    if address is not None:
        host, port = parse_address(address)
        if process_id not in (None, 0):  # process 0 starts the coordinator; the others wait for it
            _wait_for_coordinator(host, port, timeout_s)
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=max(1, int(math.ceil(timeout_s))),
                               heartbeat_timeout_seconds=max(1, int(math.ceil(heartbeat_timeout_s))))
    log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def use_every_cpu_core() -> bool:
    """Expose each CPU core as a JAX CPU device (`jax_num_cpu_devices`), so that work split over a batch
    (training's data parallel step, the searches of `translate`) runs on all of them: XLA CPU runs most of
    a decode step's small ops on one thread, one op at a time, and even the train step keeps both cores of
    a 2-core machine busy together only a quarter of the time on one device (benchmarks/README.md). Call
    before anything initialises JAX's backends; returns False (and changes nothing) afterwards, when
    XLA_FLAGS already sets a device count, or on a 1-core machine. Does not change the default backend
    where there is an accelerator."""
    cores = os.cpu_count() or 1
    if cores < 2 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # backends already initialised
        return False
    return True


def local_mesh() -> Mesh | None:
    """A "data" mesh over this process's devices of the default backend, for work that splits a batch
    within one process (the searches); None with one device or several processes."""
    devices = jax.local_devices()
    if len(devices) < 2 or jax.process_count() > 1:
        return None
    return make_mesh(devices)


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


# XLA's CPU client lets 32 programs wait for each device. The launch of one more blocks a thread of the pool
# that also runs the programs; with few cores a multi-device program then waits in its all-reduce for a
# device part that cannot start, and XLA aborts after 40 s ("Termination timeout ... all reduce"). Loops
# that dispatch without fetching wait for the device every this many programs.
CPU_PROGRAMS_IN_FLIGHT = 16


def programs_in_flight(mesh: Mesh) -> int | None:
    """How many programs a loop may dispatch on `mesh` before it waits for them: `CPU_PROGRAMS_IN_FLIGHT`
    on several CPU devices, None (no limit) on one device or on accelerators."""
    devices = mesh.devices.flat
    if mesh.devices.size > 1 and all(d.platform == "cpu" for d in devices):
        return CPU_PROGRAMS_IN_FLIGHT
    return None


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Rows split over the "data" axis; the other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def split_over_data(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """An array of `shape` split over the "data" axis along its longest dimension that the axis size divides
    (ZeRO-1's partitioned optimizer state); replicated where none does (scalars, odd sizes, one device)."""
    n = mesh.shape[DATA_AXIS]
    dims = [i for i, size in enumerate(shape) if size >= n and size % n == 0]
    if n == 1 or not dims:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[max(dims, key=lambda i: shape[i])] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (of host or device arrays) on every device of `mesh`."""
    return jax.device_put(tree, replicated(mesh))


def local_devices_in(mesh: Mesh) -> int:
    """How many of the mesh's devices this process feeds (its share of every global batch)."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows (host numpy) -> global arrays split over the mesh's "data" axis.

    With P processes each holding B rows, the global batch has P*B rows; B must divide evenly over this
    process's devices in the mesh.
    """
    sharding = batch_sharded(mesh)
    n_local = local_devices_in(mesh)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % n_local:
            raise ValueError(f"batch field {name!r} has {value.shape[0]} rows, which do not split evenly over "
                             f"{n_local} local devices; the data pipeline must be built with num_devices={n_local}")
        global_shape = (value.shape[0] * (mesh.devices.size // n_local),) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def pad_batch(batch: Mapping[str, np.ndarray], rows: int, length: int) -> dict[str, np.ndarray]:
    """Pad every [B, L] field with zeros (PAD, segment 0) to [rows, length]; padding carries no loss."""
    out = {}
    for name, value in batch.items():
        b, n = value.shape
        out[name] = value if (b, n) == (rows, length) else np.pad(value, ((0, rows - b), (0, length - n)))
    return out


def global_batches(batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
                   stats: dict | None = None) -> Iterator[dict[str, jax.Array]]:
    """Global sharded batches from this process's host batches.

    One process: each batch as is. Several: the processes' batches can differ in shape (each batches its
    own shard into its own length buckets) and in number (an evaluation split divides unevenly), so before
    each step they agree, with one small all-gather, on the largest shape; smaller batches are padded to it,
    and a process whose data has ended contributes all-PAD rows until every process has ended. Padded
    rows and columns have zero loss weight, so sums over the global batch are unchanged. `stats`, if
    given, counts "batches" and "padded" (batches where the processes' shapes differed).
    """
    iterator = iter(batches)
    stats = {} if stats is None else stats
    if jax.process_count() == 1:
        for batch in iterator:
            stats["batches"] = stats.get("batches", 0) + 1
            yield shard_batch(batch, mesh)
        return
    from jax.experimental import multihost_utils

    template = None
    while True:
        batch = next(iterator, None)
        if batch is not None:
            template = batch
        rows, length = next(iter(batch.values())).shape if batch is not None else (0, 0)
        shapes = np.asarray(multihost_utils.process_allgather(np.asarray([rows, length], np.int32)))
        if not shapes[:, 0].any():
            return
        rows, length = int(shapes[:, 0].max()), int(shapes[:, 1].max())
        stats["batches"] = stats.get("batches", 0) + 1
        if (shapes != shapes[0]).any():
            if not stats.get("padded"):
                log.info("the processes' batches differ in shape (rows x length per process: %s); each is padded "
                         "to %dx%d (logged once)", ", ".join(f"{r}x{n}" for r, n in shapes.tolist()), rows, length)
            stats["padded"] = stats.get("padded", 0) + 1
        if batch is None:
            if template is None:
                raise ValueError(f"process {jax.process_index()} got no batches at all while others did; "
                                 "its data shard is empty")
            batch = {name: np.zeros((0, 0), value.dtype) for name, value in template.items()}
        yield shard_batch(pad_batch(batch, rows, length), mesh)


def any_process_later(flag: bool, mesh: Mesh) -> jax.Array:
    """Start an all-reduce of `flag` over every process and return at once; `bool()` of the result is
    whether any process's flag was true.

    The reduction is queued behind the device work already dispatched, so reading it a step later (as the
    training loop does for its stop vote) waits only for the step before, while the next one keeps the
    accelerator busy; a blocking all-gather every step would leave it idle while the host waits.
    """
    flags = jax.make_array_from_process_local_data(batch_sharded(mesh),
                                                   np.full((len(mesh.local_devices),), flag, np.int32))
    return _max_to_all(mesh)(flags) > 0


@functools.lru_cache(maxsize=None)
def _max_to_all(mesh: Mesh):
    return jax.jit(lambda x: x.max(), out_shardings=replicated(mesh))


def allgather_ints(value: int) -> list[int]:
    """Every process's integer `value`, in process order."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).reshape(-1)]


def allgather_json(value: Any) -> list:
    """Every process's JSON-serializable `value`, in process order (e.g. each one's data iterator position)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([encoded.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:size]).decode("utf-8")) for row, size in zip(gathered, sizes)]


def to_local(tree: Any) -> Any:
    """A replicated pytree as single-device arrays this process can use alone (decoding, averaging)."""
    def one(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return x.addressable_data(0)
        return x
    return jax.tree.map(one, tree)
