"""Batched restoration with resume: measurements, fixed batches, per-image records.

Shared by the main job (:mod:`reddiff_jax.restore`) and the evaluation
(:mod:`reddiff_jax.evaluate`). Image i's random draws come from ``fold_in(key, i)``, so how the
images are split into batches, devices and processes does not change a result. Images are
float32 NHWC [-1, 1]; measurements ``y`` are ``[N, *y_shape]``. A run's output folder holds one
finished pair per image: its PNG and its record (``records/<name>.json``, written after the
PNG), so a rerun skips finished images.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import operators, sharding, solvers
from reddiff_jax.solvers import SolverConfig
from reddiff_jax.solvers.common import merge_static, split_static

__all__ = [
    "BatchResult",
    "config_record",
    "image_keys",
    "key_data",
    "prepare_out",
    "pseudo_inverse",
    "read_record",
    "simulate",
    "solve_batches",
]


@functools.partial(jax.jit, static_argnames=("sigma_y",))
def _measure_batch(op: Any, x: jax.Array, keys: jax.Array, *, sigma_y: float) -> jax.Array:
    return jax.vmap(lambda xi, ki: operators.measure(op, xi, ki, sigma_y))(x, keys)


def simulate(op: Any, x: jax.Array, key: jax.Array, *, sigma_y: float) -> jax.Array:
    """Measurements [N, *y_shape] of images x [N, H, W, C]; image i draws from fold_in(key, i)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
    return _measure_batch(op, x, keys, sigma_y=float(sigma_y))


@jax.jit
def pseudo_inverse(op: Any, y: jax.Array) -> jax.Array:
    """``A_dagger(y)`` per measurement: [N, *y_shape] -> [N, H, W, C]."""
    return jax.vmap(op.A_dagger)(y)


@dataclasses.dataclass(frozen=True)
class BatchResult:
    """One solved batch: its image indices, restorations and per-image status."""

    indices: np.ndarray  # [b] int, positions in the input list
    x: np.ndarray  # [b, H, W, C] float32 restorations ([-1, 1] unless diverged)
    status: np.ndarray  # [b] int32 SolveStatus
    failed_step: np.ndarray  # [b] int32, -1 if none
    seconds: float  # wall time of the solve (compilation included for the first batch)


def image_keys(key: jax.Array, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Raw uint32 [n, 2] keys ``fold_in(key, i)`` of the images ``indices`` (every draw of image
    i comes from these alone)."""
    idx = jnp.asarray(np.asarray(indices, np.int64).reshape(-1), jnp.int32)
    return np.asarray(_fold_all(key, idx))


@jax.jit
def _fold_all(key: jax.Array, idx: jax.Array) -> jax.Array:
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    return jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys


def _rounds(todo: list[int], size: int, rounds: int, fill: int) -> list[tuple[np.ndarray, int]]:
    """``rounds`` batches of ``size`` positions: ``todo`` in order, then copies of the last one
    (or of ``fill`` when there is none); each with its count of real entries."""
    out = []
    for r in range(rounds):
        real = todo[r * size : (r + 1) * size]
        pad = real[-1] if real else fill
        out.append((np.asarray(real + [pad] * (size - len(real)), np.int64), len(real)))
    return out


def _place_replicated(obj: Any, mesh: Any) -> Any:
    """``obj`` (an eps_fn or an operator) with its arrays replicated on ``mesh`` once, so each
    batch's solve finds them placed."""
    static, dynamic = split_static(obj)
    rep = sharding.replicated(mesh)
    return merge_static(static, jax.tree_util.tree_map(lambda v: sharding.put(v, rep), dynamic))


def solve_batches(
    config: SolverConfig,
    eps_fn: Callable,
    op: Any,
    y: np.ndarray,
    key: jax.Array,
    *,
    batch: int,
    todo: Sequence[int] | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
    progress: bool = True,
    desc: str = "restore",
    mesh: Any = None,
) -> list[BatchResult]:
    """Solves the measurements ``y`` [N, *y_shape] in batches of ``batch``.

    Image i draws from ``fold_in(key, i)`` alone (per-image keys), so with a reduction that
    couples no images (RED-Diff ``image_mean``, every baseline) its result does not depend on
    ``batch``, on the devices or processes, or on what an earlier run finished. The images of
    ``todo`` (default: all) are taken in order; the last batch is padded (repeating its last
    measurement), so every call has one shape and one compiled solve serves all. Batch j + 1 is
    dispatched before batch j's results are fetched, so the host writes while the devices
    solve. A diverging image does not stop the run: its status is in the result.

    Args:
      mesh: a ``("data",)`` mesh (:func:`reddiff_jax.sharding.data_mesh`): each batch is
        sharded over it (``batch`` rounded up to a multiple of its size). When it spans several
        processes, every process must call this with the same arguments: process p solves the
        images of ``sharding.process_span(N)`` (its part of every global batch, built with
        ``make_array_from_process_local_data``), and gets and reports only those.
      on_batch: called with each :class:`BatchResult` as soon as it is solved (write it there,
        so an interruption keeps what is finished). When a later dispatch is interrupted, the
        batch in flight is finished and reported first.
      progress: a tqdm bar over the solver steps of all batches (process 0 only): advanced per
        chunk of steps on one device, per batch when sharded.

    Returns:
      The :class:`BatchResult` of every solved batch, in order (this process's images only).
    """
    from tqdm.auto import tqdm

    n = len(y)
    if not isinstance(batch, int | np.integer) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    procs = 1 if mesh is None else len({d.process_index for d in mesh.devices.flat})
    if mesh is not None:
        sharding.check_mesh(mesh)
        batch = sharding.padded_size(int(batch), mesh)
        eps_fn, op = _place_replicated(eps_fn, mesh), _place_replicated(op, mesh)
    owned = set(range(n)) if procs == 1 else set(sharding.process_span(n))
    todo_list = sorted(owned if todo is None else {int(i) for i in todo} & owned)
    local = int(batch) // procs
    rounds = math.ceil(len(todo_list) / local)
    if procs > 1:  # every process runs the same number of solves (they are collectives)
        rounds = sharding.max_over_processes(rounds)
    fill = min(owned) if owned else 0
    spans = _rounds(todo_list, local, rounds, fill)
    steps = config.num_iterations
    show = progress and jax.process_index() == 0
    # One device: the bar advances per chunk of steps inside each solve (rate and time left even
    # for a single batch); sharded: per batch, so dispatching the next batch never waits.
    chunked = show and mesh is None
    results: list[BatchResult] = []

    def dispatch(idx: np.ndarray, bar):
        yb, kb = np.asarray(y[idx]), image_keys(key, idx)
        if procs > 1:
            yb, kb = sharding.global_batch(yb, mesh), sharding.global_batch(kb, mesh)
        else:
            yb, kb = jnp.asarray(yb), jnp.asarray(kb)
        start = time.perf_counter()
        sol = solvers.solve(config, eps_fn, op, yb, kb, mesh=mesh,
                            progress=bar if chunked else False, throw=False)  # fmt: skip
        return sol, start

    def finish(span, sol, start, bar) -> None:
        idx, real = span
        rows = functools.partial(sharding.local_rows, mesh=mesh) if procs > 1 else np.asarray
        x = rows(jax.block_until_ready(sol.x))[:real]
        seconds = time.perf_counter() - start
        res = BatchResult(idx[:real], x, rows(sol.status)[:real], rows(sol.failed_step)[:real],
                          seconds)  # fmt: skip
        if not chunked:
            bar.update(steps)
        if real:
            results.append(res)
            if on_batch is not None:
                on_batch(res)

    with tqdm(total=len(spans) * steps, desc=desc, unit="step", disable=not show) as bar:
        pending = None
        for span in spans:
            try:
                sol, start = dispatch(span[0], bar)
            except BaseException:
                if pending is not None:  # finish what the devices already have
                    finish(*pending, bar)
                raise
            if pending is not None:
                prev, pending = pending, None
                finish(*prev, bar)
            pending = (span, sol, start)
        if pending is not None:
            finish(*pending, bar)
    return results


def key_data(key: jax.Array) -> list[int]:
    """The key's raw uint32 words (for a JSON record)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(v) for v in np.asarray(key).reshape(-1)]


def config_record(config: SolverConfig) -> dict[str, Any]:
    """The config's fields as JSON values (``repr`` of non-scalars; no unset optimizer)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name == "optimizer" and v is None:
            continue
        out[f.name] = v if isinstance(v, bool | int | float | str | type(None)) else repr(v)
    return out


def prepare_out(out: str | Path, *, subdirs: Sequence[str] = ()) -> Path:
    """Creates ``out`` and its ``subdirs`` and checks it is writable; ValueError otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for sub in subdirs:
            (out / sub).mkdir(exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"out: cannot write to the output folder {out}: {err}") from err
    return out


def read_record(path: Path, *, name: str | None = None) -> dict | None:
    """A JSON record (a dict), or None when missing, unreadable or for another ``name``."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or (name is not None and record.get("name") != name):
        return None
    return record
