"""Measurement noise: y = A(x) + noise, kept separate from the clean operators.

``sigma_y`` is in [0, 1] pixel units, as in the official code (``main.py``: ``y = H(x) + 2 sigma_y
n``), so the Gaussian noise std on [-1, 1] images is ``2 sigma_y``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from reddiff_jax.operators.base import Operator, _all_finite, _asarray, _is_concrete

__all__ = ["KINDS", "gaussian_noise", "measure", "poisson_noise"]

KINDS = ("gaussian", "poisson")


def gaussian_noise(key: jax.Array, y: jnp.ndarray, sigma_y) -> jnp.ndarray:
    """``y + 2 sigma_y n`` with n ~ N(0, 1) of y's shape and dtype."""
    return y + (2.0 * sigma_y) * jax.random.normal(key, y.shape, y.dtype)


def poisson_noise(key: jax.Array, y: jnp.ndarray, sigma_y) -> jnp.ndarray:
    """Shot noise on the [0, 1] intensity ``u = clip((y + 1) / 2, 0)``.

    ``u_noisy = g · Poisson(u / g)`` with gain ``g = sigma_y²``: mean u, variance ``sigma_y² u``,
    so the [0, 1]-unit std at full intensity equals ``sigma_y`` (the Gaussian level). Returned on
    the [-1, 1] scale (``2 u_noisy - 1``); ``sigma_y = 0`` returns ``y`` unchanged (clipped).
    """
    u = jnp.clip((y + 1.0) / 2.0, 0.0, None)
    gain = jnp.asarray(sigma_y, jnp.float32) ** 2
    safe = jnp.where(gain > 0, gain, 1.0)
    counts = jax.random.poisson(key, (u / safe).astype(jnp.float32), y.shape)
    noisy = jnp.where(gain > 0, counts.astype(jnp.float32) * safe, u.astype(jnp.float32))
    return (2.0 * noisy - 1.0).astype(y.dtype)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _measure(op, x, key, sigma_y, kind: str, batched: bool):
    noise_fn = gaussian_noise if kind == "gaussian" else poisson_noise

    def one(xi, ki):
        y = op.A(xi)
        return noise_fn(ki, y, jnp.asarray(sigma_y, y.dtype))

    if batched:
        return jax.vmap(one)(x, jax.random.split(key, x.shape[0]))
    return one(x, key)


def measure(op: Operator, x, key: jax.Array, sigma_y, *, kind: str = "gaussian") -> jnp.ndarray:
    """Noisy measurement ``y = op(x) + noise``.

    Args:
      op: an operator for one image.
      x: one image [H, W, C] or a batch [B, H, W, C] in [-1, 1] (a batch gets independent noise
        per image from ``jax.random.split(key, B)``).
      key: PRNG key; the same key gives the same y.
      sigma_y: noise level in [0, 1] pixel units (Gaussian std on [-1, 1] is ``2 sigma_y``).
      kind: ``"gaussian"`` or ``"poisson"`` (see :func:`poisson_noise`).

    Returns:
      y with ``op.y_shape`` (batched when x is), x's dtype.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if _is_concrete(sigma_y):
        s = float(sigma_y)
        if not (s >= 0.0 and s < float("inf")):
            raise ValueError(
                f"sigma_y: expected a finite number >= 0 ([0, 1] pixel units), got {s}"
            )
    x = _asarray(x)
    batched = x.ndim == len(op.image_shape) + 1
    if not batched:
        op.check_x(x)
    elif x.shape[1:] != tuple(op.image_shape):
        op.check_x(x[0])  # raises with the expected shape
    y = _measure(op, x, key, sigma_y, kind, batched)
    if not _all_finite(y):
        raise ValueError("x: the measurement op(x) + noise is not finite; check x for NaN or inf")
    return y
