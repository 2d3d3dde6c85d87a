"""Micro-batching of the network call: ``eps_fn`` over a batch as a ``lax.map`` over small chunks.

Why. On XLA CPU the UNet's activations for a device's whole share of a large batch (16 images
of 32x32x64 floats per layer and more) do not stay in cache between its convolutions, norms and
attention; run four images at a time they do: a RED-Diff solve at batch 32 over 2 CPU devices
ran 1.43x faster (``benchmarks/bench_vs_official.py``, which times both in one run). On GPU/TPU
a larger batch is always better, so :func:`auto_rows` selects it on the CPU backend only.

Algorithms that differentiate the network (DPS, ΠGDM) call :func:`map_chunks`: each chunk's
forward and VJP run together inside the map, so only one chunk's activations are live at a
time. That lowers the temporary memory of a DPS solve at batch 32 (fixture UNet) from 414 MiB to
57 MiB at 4 images a chunk. Its time: 5.73-6.04 s vs 5.91 s whole for 10 steps in a first run;
after the GroupNorm changes of 2026-12-03, 3.99 vs 4.15 s at batch 32 and 1.90 vs 2.08 s at
batch 16 (2 CPU devices, medians of 5 interleaved). Never slower, so it is the default too.
The chunk size for DPS (sr4, 10 steps, 2 CPU devices, medians of 5 interleaved, 2026-12-04):
2 / 4 / 8 / 16 (whole) images a device at batch 32 took 2.567 / 2.564 / 2.741 / 2.872 s, 4 / 8 /
16 at batch 64 4.96 / 5.21 / 5.37 s, 4 / 8 (whole) at batch 16 1.28 / 1.37 s: :data:`ROWS` = 4
serves the differentiating algorithms too.

One CPU device is the exception: there the chunked solve was the slower one (fixture UNet, sr4,
min of 4-6 interleaved rounds, 2026-12-04): RED-Diff at batch 16 2.36 s chunked against 2.20 s
whole, DPS at batch 16 2.90 against 2.75 s, and for ``solve_many`` 2.37 / 2.25 s (RED-Diff, 16),
2.41 / 2.20 s (RED-Diff, 32), 6.04 / 5.64 s (DPS, 32). So :func:`auto_rows` chunks on a mesh of
two or more CPU devices only (the command line's one device per core); ``micro_batch=`` still
chunks one device on request (a DPS solve's memory).

A share too small for :data:`ROWS` still gains for DPS at :data:`VJP_ROWS` = 2 (2 CPU devices,
sr4, 10 steps, medians of 5 interleaved with torch, 2026-12-04): batch 8 (4 a device) 0.785 /
0.853 / 0.772 s against 0.917 / 0.909 / 0.777 s whole in three runs; batch 12 (6 a device)
1.155 / 1.141 against 1.190 / 1.159 s. RED-Diff lost at 2 (0.366 / 0.351 s at batch 8, 0.503
/ 0.479 s at 12), so only the differentiating algorithms take it.

Layout. A batch sharded over D devices holds rows ``[d * B/D, (d+1) * B/D)`` on device d. The
chunks are strided: with ``n = B / (rows * D)`` chunks, chunk i holds the rows ``j * n + i``
(``j < rows * D``), ``rows`` of them on every device, so every device works on every chunk.
Each image's eps is the network's own (the ADM UNet couples no two images), so the result
equals the unchunked call up to float rounding of the per-chunk kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from reddiff_jax import sharding as sharding_lib
from reddiff_jax.solvers import _scan_convs

__all__ = ["ROWS", "VJP_ROWS", "Microbatched", "auto_rows", "map_chunks"]

ROWS = 4  # images per device per chunk on XLA CPU (measured: benchmarks/bench_vs_official.py)
VJP_ROWS = 2  # the same for a forward + VJP when ROWS does not fit (a share of 4 or 6)


def auto_rows(batch: int, devices: int, backend: str, backprop: bool = False) -> int:
    """Images per device per chunk for a batch of ``batch`` over ``devices``; 0: no chunking.

    Chunks only on the CPU backend with two or more devices: :data:`ROWS` when each device
    holds at least two chunks of it that divide its share; else, for an algorithm that
    differentiates the network (``backprop``), :data:`VJP_ROWS` on the same terms.
    """
    if backend != "cpu" or devices < 2 or batch % devices:
        return 0
    local = batch // devices
    for rows in (ROWS, VJP_ROWS) if backprop else (ROWS,):
        if local >= 2 * rows and local % rows == 0:
            return rows
    return 0


def check_rows(rows: Any, batch: int, devices: int) -> int:
    """Validates a user's ``micro_batch`` (images per device per chunk; 0 turns it off)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"micro_batch: expected None (auto), 0 (off) or rows >= 1, got {rows!r}")
    if rows and (batch % devices or (batch // devices) % rows):
        raise ValueError(
            f"micro_batch: {rows} images per device does not divide the batch of {batch} over "
            f"{devices} device(s) ({batch / devices:g} each); pass a divisor, 0 or None"
        )
    return rows


class Microbatched:
    """``eps_fn`` run as ``lax.map`` over strided chunks of ``rows * devices`` images.

    Calling it is calling ``eps_fn`` on the whole batch (same result up to float rounding);
    :meth:`map` runs a per-image computation around the network (a VJP through it) chunk by
    chunk, so a chunk's forward and backward pass run back to back while its activations are
    in cache.

    Args:
      eps_fn: ``eps_fn(x [B, H, W, C], t [B] int32) -> [B, H, W, C]``, acting per image.
      rows: images per device per chunk (``B`` must be a multiple of ``rows * devices``).
      devices: the size of the data axis the batch is sharded over.
      mesh: that mesh (its chunk axis is pinned to the data axis), or None.
    """

    def __init__(self, eps_fn: Callable, rows: int, devices: int = 1, mesh: Any = None):
        self.inner, self.chunk, self.mesh = eps_fn, rows * devices, mesh

    def _pin(self, v: jax.Array) -> jax.Array:  # [n, chunk, ...]: the chunk axis over devices
        if self.mesh is None:
            return v
        return jax.lax.with_sharding_constraint(v, sharding_lib.batch_sharding(self.mesh, axis=1))

    def _split(self, v: jax.Array, n: int) -> jax.Array:  # [B, ...] -> [n, chunk, ...]
        return self._pin(jnp.swapaxes(v.reshape(self.chunk, n, *v.shape[1:]), 0, 1))

    def _join(self, v: jax.Array) -> jax.Array:  # [n, chunk, ...] -> [B, ...]
        v = jnp.swapaxes(self._pin(v), 0, 1)
        return v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])

    def map(self, f: Callable[..., Any], *batched: jax.Array) -> Any:
        """``f(self.inner, *batched)`` computed chunk by chunk (chunk i: rows ``j * n + i``).

        ``f`` must act per image (row b of every output depends on row b of the inputs only);
        every input and output leaf leads with the batch axis [B, ...]. The loop body's
        convolutions are made canonical (see ``_scan_convs``), the input-gradient ones of a
        VJP inside ``f`` included. A batch of at most one chunk, or one the chunk does not
        divide, is computed whole.
        """
        batch = batched[0].shape[0]
        if batch <= self.chunk or batch % self.chunk:
            return f(self.inner, *batched)
        n = batch // self.chunk
        body = _scan_convs.canonicalize_convs(lambda xs: f(self.inner, *xs))
        out = jax.lax.map(body, tuple(self._split(v, n) for v in batched))
        return jax.tree.map(self._join, out)

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(t, x.shape[:1])
        return self.map(lambda eps_fn, xb, tb: eps_fn(xb, tb), x, t)


def map_chunks(eps_fn: Callable, f: Callable[..., Any], *batched: jax.Array) -> Any:
    """``f(eps_fn, *batched)``, chunk by chunk when ``eps_fn`` is :class:`Microbatched`.

    For an algorithm that differentiates the network: ``f`` takes the network and batch-leading
    arrays and computes per image (e.g. x̂0 and its VJP); the result equals ``f`` on the whole
    batch up to float rounding.
    """
    if isinstance(eps_fn, Microbatched):
        return eps_fn.map(f, *batched)
    return f(eps_fn, *batched)
