"""Posterior sampling: S restorations per measurement with S keys, their mean and per-pixel std.

``posterior(config, eps_fn, op, y, key, samples=S)`` solves every measurement ``y[i]`` S times,
sample s with the key ``fold_in(fold_in(key, i), s)``, all (image, sample) pairs as measurements of
one :func:`reddiff_jax.solvers.solve_many` program (chunked, the last chunk padded, so one
compilation). For RED-Diff the spread comes from the fresh noise of each step and, with
``sigma_x0 > 0``, from the jitter ``x0 = mu + sigma_x0 eps0`` of its variational posterior
(the official output is one such draw); set ``sigma_x0`` > 0 for posterior samples. The
diffusion samplers (DPS, PGDM, DDRM, DiffPIR) are stochastic in their own right.

:func:`write_posterior` writes, per image ``name`` into ``out/posterior/``: ``name_mean.png``,
``name_std.png`` (the per-pixel std, ``std / std_scale`` shown white at 1), ``name_sample_XX.png``
and ``name.npz`` (float32 ``mean``, ``std``, ``samples`` in [-1, 1] units).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import imageio
from reddiff_jax.solvers import solve_many

__all__ = ["Posterior", "posterior", "write_posterior"]


@dataclasses.dataclass(frozen=True)
class Posterior:
    """S solves per measurement.

    Attributes:
      samples: [N, S, H, W, C] float32 restorations (non-finite where a solve diverged).
      mean: [N, H, W, C] mean over the finite samples.
      std: [N, H, W, C] per-pixel standard deviation over them (ddof 0).
      status: [N, S] int32 SolveStatus of each solve.
    """

    samples: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    status: np.ndarray


def posterior(
    config: Any,
    eps_fn: Any,
    op: Any,
    y: Any,
    key: jax.Array,
    *,
    samples: int = 8,
    chunk: int | None = None,
) -> Posterior:
    """S restorations of every measurement ``y`` [N, *y_shape] and their mean and std.

    Args:
      config, eps_fn, op: as in :func:`reddiff_jax.solve` (``op`` shared by all).
      key: sample s of image i uses ``fold_in(fold_in(key, i), s)``.
      samples: S >= 2.
      chunk: solves per compiled call (default all N * S in one call).
    """
    if not isinstance(samples, int | np.integer) or isinstance(samples, bool) or samples < 2:
        raise ValueError(f"samples: expected an int >= 2, got {samples!r}")
    y = jnp.asarray(y)
    n, s = int(y.shape[0]), int(samples)
    total = n * s
    chunk = total if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk}")
    img = np.repeat(np.arange(n), s)  # image-major pairs (i, s)
    smp = np.tile(np.arange(s), n)
    keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(key, i), j))(
        jnp.asarray(img), jnp.asarray(smp)
    )
    xs, status = [], []
    for c in range(math.ceil(total / chunk)):
        idx = np.arange(c * chunk, min((c + 1) * chunk, total))
        pad = np.concatenate([idx, np.repeat(idx[-1:], chunk - len(idx))])
        sol = solve_many(config, eps_fn, op, y[img[pad]], keys[pad], op_axis=None, throw=False)
        xs.append(np.asarray(sol.x)[: len(idx)])
        status.append(np.asarray(sol.status)[: len(idx)])
    x = np.concatenate(xs).reshape(n, s, *xs[0].shape[1:]).astype(np.float32)
    status_arr = np.concatenate(status).reshape(n, s).astype(np.int32)
    ok = np.isfinite(x).all(axis=(2, 3, 4), keepdims=True)
    count = np.maximum(ok.sum(axis=1), 1)
    safe = np.where(ok, x, 0.0)
    mean = safe.sum(axis=1) / count
    std = np.sqrt((np.where(ok, x - mean[:, None], 0.0) ** 2).sum(axis=1) / count)
    return Posterior(samples=x, mean=mean.astype(np.float32), std=std.astype(np.float32),
                     status=status_arr)  # fmt: skip


def write_posterior(
    out: str | os.PathLike,
    names: Sequence[str],
    post: Posterior,
    *,
    std_scale: float | None = None,
) -> dict[str, Any]:
    """Writes the mean, std map and samples of every image into ``out/posterior/``.

    ``std_scale``: the std shown white (default: the largest std over all images, so the maps
    compare); returned with the written paths.
    """
    folder = Path(out) / "posterior"
    folder.mkdir(parents=True, exist_ok=True)
    if len(names) != len(post.mean):
        raise ValueError(f"names: expected {len(post.mean)} names, got {len(names)}")
    scale = float(std_scale) if std_scale is not None else float(np.max(post.std)) or 1.0
    written: dict[str, Any] = {"std_scale": scale, "images": {}}
    for i, name in enumerate(names):
        files = {}
        mean = imageio.to_uint8(post.mean[i])
        files["mean"] = folder / f"{name}_mean.png"
        imageio.atomic_write_bytes(files["mean"], imageio.png_bytes(mean))
        std01 = np.clip(post.std[i] / scale, 0.0, 1.0)
        files["std"] = folder / f"{name}_std.png"
        imageio.atomic_write_bytes(files["std"], imageio.png_bytes(imageio.to_uint8(std01 * 2 - 1)))
        for j, x in enumerate(post.samples[i]):
            p = folder / f"{name}_sample_{j:02d}.png"
            imageio.atomic_write_bytes(p, imageio.png_bytes(imageio.to_uint8(np.nan_to_num(x))))
        npz = folder / f"{name}.npz"
        np.savez_compressed(npz, mean=post.mean[i], std=post.std[i], samples=post.samples[i])
        files["npz"] = npz
        written["images"][name] = {k: str(v) for k, v in files.items()}
    return written
