"""Data parallelism over devices and hosts: the ``data`` mesh, padding and placement helpers.

A solve is data parallel: images are independent, so the batch axis (``solve``), the measurement
axis (``solve_many``) and a sweep's grid axis are sharded over the ``"data"`` axis of a
:class:`jax.sharding.Mesh`; network parameters and shared operator leaves are replicated. A
batch that does not divide the data-axis size is padded with copies of its last entry and the
padding is dropped from the result.

One CPU host: XLA CPU runs most of a network's ops on one thread, so :func:`use_cpu_cores`
(called by the ``reddiff-jax`` command line before any JAX work) exposes one CPU device per
core; a batch sharded over :func:`data_mesh` then keeps every core busy.

Multi-host: :func:`initialize` calls ``jax.distributed.initialize`` once (with the given
coordinator, process count and id, or JAX's own cluster detection); every process then runs the
same program on the global mesh of :func:`data_mesh` and feeds its own slice of each batch
(:func:`global_batch`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA",
    "barrier",
    "batch_sharding",
    "check_mesh",
    "data_mesh",
    "data_size",
    "global_batch",
    "initialize",
    "local_rows",
    "max_over_processes",
    "pad_rows",
    "padded_size",
    "process_span",
    "put",
    "replicated",
    "use_cpu_cores",
]

DATA = "data"  # the mesh axis the batch is sharded over


def check_mesh(mesh: Any, *, name: str = "mesh") -> Mesh:
    """``mesh`` if it is a :class:`jax.sharding.Mesh` with a ``"data"`` axis; else an error."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{name}: expected a jax.sharding.Mesh with a {DATA!r} axis (e.g. "
            f"reddiff_jax.sharding.data_mesh()), got {type(mesh).__name__}"
        )
    if DATA not in mesh.axis_names:
        raise ValueError(
            f"{name}: expected a mesh with a {DATA!r} axis (the batch is sharded over it), got "
            f"axes {tuple(mesh.axis_names)}"
        )
    return mesh


def data_size(mesh: Mesh) -> int:
    """Number of shards of the batch: the size of the mesh's ``"data"`` axis."""
    return int(mesh.shape[DATA])


def data_mesh(
    devices: int | str | Sequence[Any] | None = "all", *, at_most: int | None = None
) -> Mesh:
    """A one-axis ``("data",)`` mesh.

    Args:
      devices: ``"all"`` (or None): every device of every process (``jax.devices()``); an int
        N: the first N local devices (one process only); or a sequence of devices.
      at_most: with ``"all"`` and one process, use at most this many devices (e.g. the batch
        size, so that a small batch is not padded to one row per CPU core). Multi-process
        meshes always hold every device.
    """
    if devices is None or devices == "all":
        devs = jax.devices()
        if at_most is not None and jax.process_count() == 1:
            devs = devs[: max(1, int(at_most))]
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        local = jax.local_devices()
        if jax.process_count() > 1:
            if int(devices) != len(local):
                raise ValueError(
                    f"devices: with {jax.process_count()} processes every process uses all "
                    f"of its {len(local)} local devices; pass 'all', got {devices}"
                )
            devs = jax.devices()
        elif not 1 <= int(devices) <= len(local):
            raise ValueError(
                f"devices: expected 'all' or an int in 1 .. {len(local)} (the local devices), "
                f"got {devices}"
            )
        else:
            devs = local[: int(devices)]
    elif isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) > 0:
        devs = list(devices)
    else:
        raise ValueError(f"devices: expected 'all', a positive int or devices, got {devices!r}")
    return Mesh(np.asarray(devs), (DATA,))


def batch_sharding(mesh: Mesh, *, axis: int = 0) -> NamedSharding:
    """Sharding of an array whose axis ``axis`` is the batch (split over ``"data"``)."""
    return NamedSharding(mesh, P(*([None] * axis), DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array every device holds whole."""
    return NamedSharding(mesh, P())


def padded_size(n: int, mesh: Mesh) -> int:
    """``n`` rounded up to a multiple of the data-axis size."""
    d = data_size(mesh)
    return int(math.ceil(n / d) * d)


def pad_rows(x: Any, size: int, *, axis: int = 0) -> Any:
    """``x`` padded along ``axis`` to ``size`` with copies of its last entry (numpy or jax)."""
    n = x.shape[axis]
    if n == size:
        return x
    if n > size:
        raise ValueError(f"pad_rows: cannot pad {n} rows down to {size}")
    lib = np if isinstance(x, np.ndarray) else jnp
    last = lib.take(x, lib.asarray([n - 1]), axis=axis)
    reps = [1] * x.ndim
    reps[axis] = size - n
    return lib.concatenate([x, lib.tile(last, reps)], axis=axis)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def put(x: Any, sharding: NamedSharding) -> Any:
    """``x`` placed with ``sharding`` (a no-op when it is already so placed).

    With several processes, a host value (numpy, or a local jax array) is taken to hold the same
    global value on every process; each process places the pieces its devices own.
    """
    if isinstance(x, jax.core.Tracer):  # under an outer jit: a constraint
        return jax.lax.with_sharding_constraint(x, sharding)
    if isinstance(x, jax.Array) and not _is_key(x) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # a global array: reshard
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if _is_key(x):
        raise TypeError("put: pass a key's raw data (jax.random.key_data) across processes")
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# ------------------------------------------------------------------------------------------------
# CPU cores


def _cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_devices_set() -> int | None:
    """The CPU device count the user already chose (``jax_num_cpu_devices`` /
    ``JAX_NUM_CPU_DEVICES``, or ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``)."""
    if int(jax.config.jax_num_cpu_devices) > 0:
        return int(jax.config.jax_num_cpu_devices)
    found = re.findall(
        r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    return int(found[-1]) if found else None


def use_cpu_cores(n: int | None = None) -> int:
    """Makes the CPU backend expose ``n`` devices (default: one per core), before JAX starts.

    XLA CPU runs most of the UNet's ops (its fusions, GroupNorm reductions, attention) on one
    thread, so one CPU device keeps about 1.2 of 2 cores busy. With one device per core, a batch
    sharded over :func:`data_mesh` runs its shards side by side (``benchmarks/bench_unet.py``
    shows the gain; the forward at batch 8 on a 2-core CPU: 145 -> 67 ms, the same output bit
    for bit). It sets JAX's process-wide ``jax_num_cpu_devices``, which only the CPU backend
    reads: a GPU's or TPU's devices are unchanged. This is the library's one such setting; the
    command line calls it before parsing.

    Args:
      n: CPU devices wanted; None: one per core this process may run on, unless the user set a
        count (``JAX_NUM_CPU_DEVICES``, ``jax.config.update("jax_num_cpu_devices", ...)`` or
        ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``), which is kept.

    Returns:
      The CPU device count in effect (once JAX has started, only the backend knows it; then
      ``n=None`` leaves it as it is).

    Raises:
      RuntimeError: ``n`` is given, differs from the count in effect and JAX has already run.
    """
    if n is not None and (isinstance(n, bool) or int(n) < 1):
        raise ValueError(f"use_cpu_cores: n must be a positive int, got {n!r}")
    chosen = _cpu_devices_set()
    want = int(n) if n is not None else (chosen or _cores())
    if want == chosen:
        return want
    try:
        jax.config.update("jax_num_cpu_devices", want)
    except RuntimeError:  # the backend has started: the count is fixed
        have = len(jax.devices("cpu"))
        if n is not None and have != want:
            raise RuntimeError(
                f"use_cpu_cores: JAX has already started with {have} CPU device(s); call it "
                f"before the first JAX operation (right after `import jax`) to get {want}"
            ) from None
        return have
    return want


# ------------------------------------------------------------------------------------------------
# processes


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` with these values (None: JAX's own cluster detection:
    TPU pods, SLURM, Open MPI, ...). Call it before any other JAX work; a second call is a
    no-op."""
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if coordinator is not None:
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = int(num_processes)
    if process_id is not None:
        kwargs["process_id"] = int(process_id)
    jax.distributed.initialize(**kwargs)


def process_span(n: int, *, index: int | None = None, count: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that process ``index`` of ``count`` owns (default:
    this process of all); blocks differ in size by at most one, in process order."""
    index = jax.process_index() if index is None else int(index)
    count = jax.process_count() if count is None else int(count)
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


def global_batch(local: np.ndarray, mesh: Mesh, *, axis: int = 0) -> jax.Array:
    """The global batch of which this process holds ``local`` (its rows, in process order), as
    one array sharded over ``"data"`` (``jax.make_array_from_process_local_data``)."""
    local = np.asarray(local)
    shape = list(local.shape)
    shape[axis] = local.shape[axis] * jax.process_count()
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, axis=axis), local, tuple(shape)
    )


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """The rows of the global batch ``x`` that this process fed (:func:`global_batch`), in
    order, as numpy (every row with one process)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    want = batch_sharding(mesh)
    if x.sharding != want:
        x = jax.jit(lambda v: v, out_shardings=want)(x)
    pieces: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        pieces.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([pieces[s] for s in sorted(pieces)], axis=0)


def max_over_processes(value: int) -> int:
    """The largest ``value`` any process passes (every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([int(value)], np.int64))))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
