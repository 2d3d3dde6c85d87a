"""Micro-batching of the network call: ``eps_fn`` over a batch as a ``lax.map`` over small chunks.

Why. On XLA CPU the UNet's activations for a device's whole share of a large batch (16 images
of 32x32x64 floats per layer and more) do not stay in cache between its convolutions, norms and
attention; run four images at a time they do: a RED-Diff solve at batch 32 over 2 CPU devices
ran 1.43x faster (``benchmarks/bench_vs_official.py``, which times both in one run). Under a
VJP of the network (DPS, ΠGDM) the map's backward pass loses what the forward gains (0.94x),
and on GPU/TPU a larger batch is always better, so :func:`auto_rows` selects it for
forward-only algorithms on the CPU backend only.

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

__all__ = ["ROWS", "auto_rows", "microbatched"]

ROWS = 4  # images per device per chunk on XLA CPU (measured: benchmarks/bench_vs_official.py)


def auto_rows(batch: int, devices: int, backend: str, *, backprop: bool = False) -> int:
    """Images per device per chunk for a batch of ``batch`` over ``devices``; 0: no chunking.

    Chunks only on the CPU backend, for an algorithm that does not differentiate the network
    (``backprop=False``), and only when each device holds at least two chunks of :data:`ROWS`
    images that divide its share.
    """
    if backend != "cpu" or backprop or batch % devices:
        return 0
    local = batch // devices
    return ROWS if local >= 2 * ROWS and local % ROWS == 0 else 0


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


def microbatched(
    eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
    rows: int,
    devices: int = 1,
    mesh: Any = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``eps_fn`` run as ``lax.map`` over strided chunks of ``rows * devices`` images.

    Args:
      eps_fn: ``eps_fn(x [B, H, W, C], t [B] int32) -> [B, H, W, C]``, acting per image.
      rows: images per device per chunk (``B`` must be a multiple of ``rows * devices``).
      devices: the size of the data axis the batch is sharded over.
      mesh: that mesh (its chunk axis is pinned to the data axis), or None.
    """
    chunk = rows * devices

    def pin(v: jax.Array) -> jax.Array:  # [n, chunk, ...]: the chunk axis over the devices
        if mesh is None:
            return v
        return jax.lax.with_sharding_constraint(v, sharding_lib.batch_sharding(mesh, axis=1))

    def call(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        if batch <= chunk or batch % chunk:
            return eps_fn(x, t)
        n = batch // chunk

        def split(v: jax.Array) -> jax.Array:  # [B, ...] -> [n, chunk, ...], chunk i: rows j*n+i
            return pin(jnp.swapaxes(v.reshape(chunk, n, *v.shape[1:]), 0, 1))

        t = jnp.broadcast_to(t, (batch,))
        out = jax.lax.map(lambda xt: eps_fn(*xt), (split(x), split(t)))
        return jnp.swapaxes(pin(out), 0, 1).reshape(x.shape[0], *out.shape[2:])

    return call
