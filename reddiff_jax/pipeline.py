"""Batched restoration with resume: measurements, fixed batches, per-image records.

Shared by the main job (:mod:`reddiff_jax.restore`) and the evaluation
(:mod:`reddiff_jax.evaluate`). Images are float32 NHWC [-1, 1]; measurements ``y`` are
``[N, *y_shape]``. A run's output folder holds one finished pair per image: its PNG and its
record (``records/<name>.json``, written after the PNG), so a rerun skips finished images.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import operators, solvers
from reddiff_jax.solvers import SolverConfig

__all__ = [
    "BatchResult",
    "config_record",
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


def _batches(n: int, batch: int, todo: set[int]) -> list[np.ndarray]:
    spans = [np.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
    return [idx for idx in spans if todo & set(idx.tolist())]


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
) -> list[BatchResult]:
    """Solves the measurements ``y`` [N, *y_shape] in fixed batches of ``batch``.

    Batch j holds images ``j*batch .. (j+1)*batch - 1`` and uses ``fold_in(key, j)``; the last
    one is padded (repeating its last measurement) so every call has one shape and the compiled
    solve is reused. Batches with no index in ``todo`` are skipped. The progress bar counts
    solver steps over all batches (rate and time left). A diverging image does not stop the
    run: its status is reported in the result.

    Args:
      on_batch: called with each :class:`BatchResult` as soon as it is solved (write it there,
        so an interruption keeps what is finished).

    Returns:
      The :class:`BatchResult` of every solved batch, in order.
    """
    from tqdm.auto import tqdm

    n = len(y)
    if not isinstance(batch, int | np.integer) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    todo_set = set(range(n)) if todo is None else {int(i) for i in todo}
    spans = _batches(n, int(batch), todo_set)
    steps = config.num_iterations
    results = []
    with tqdm(total=len(spans) * steps, desc=desc, unit="step", disable=not progress) as bar:
        for idx in spans:
            j = int(idx[0]) // batch
            yb = np.asarray(y[idx])
            if len(idx) < batch:
                yb = np.concatenate([yb, np.repeat(yb[-1:], batch - len(idx), axis=0)])
            start = time.perf_counter()
            sol = solvers.solve(config, eps_fn, op, jnp.asarray(yb), jax.random.fold_in(key, j),
                                progress=bar if progress else False, throw=False)  # fmt: skip
            x = np.asarray(jax.block_until_ready(sol.x))[: len(idx)]
            res = BatchResult(idx, x, np.asarray(sol.status)[: len(idx)],
                              np.asarray(sol.failed_step)[: len(idx)],
                              time.perf_counter() - start)  # fmt: skip
            results.append(res)
            if on_batch is not None:
                on_batch(res)
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
