"""Colorization: y = Σ_c w_c x_c per pixel, [H, W, 3] -> [H, W, 1] (official ``color``)."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from reddiff_jax.operators.base import (
    HIGHEST,
    LinearOperator,
    _all_finite,
    _asarray,
    _is_concrete,
    check_image_shape,
)

__all__ = ["OFFICIAL_WEIGHTS", "Colorization"]

OFFICIAL_WEIGHTS = (0.3333, 0.3334, 0.3333)


class Colorization(LinearOperator):
    """Per-pixel luminance with weights ``w`` (official: 0.3333, 0.3334, 0.3333); needs C = 3.

    ``A_dagger(y) = y w / ||w||²`` per pixel (exact pseudo-inverse, the official ``H_pinv``).

    SVD order: per pixel an orthogonal 3×3 ``Q`` whose first column is ``w / ||w||`` (Householder
    completion). ``Vt(x)`` lists ``(x @ Q)[..., 0]`` for all pixels (row-major; singular
    ``||w||``) then ``(x @ Q)[..., 1:]`` (row-major; singular 0). U = identity on y.
    """

    weights: jnp.ndarray  # [3] float32

    has_svd: ClassVar[bool] = True

    @classmethod
    def create(cls, image_shape, *, weights=OFFICIAL_WEIGHTS) -> Colorization:
        shape = check_image_shape(image_shape)
        if shape[2] != 3:
            raise ValueError(f"image_shape: colorize needs C = 3 (RGB), got {shape}")
        w = _asarray(weights, np.float32)
        if w.shape != (3,):
            raise ValueError(f"weights: expected 3 values (R, G, B), got shape {w.shape}")
        if not _all_finite(w) or (_is_concrete(w) and not np.any(np.asarray(w) != 0)):
            raise ValueError(f"weights: expected finite, not all zero, got {weights!r}")
        return cls(image_shape=shape, weights=w)

    @property
    def y_shape(self) -> tuple[int, ...]:
        return (self.image_shape[0], self.image_shape[1], 1)

    def _A(self, x):
        return jnp.einsum("hwc,c->hw", x, self.weights.astype(x.dtype), precision=HIGHEST)[
            ..., None
        ]

    def _A_adjoint(self, y):
        return y * self.weights.astype(y.dtype)

    def _A_dagger(self, y):
        w = self.weights.astype(y.dtype)
        return y * (w / jnp.sum(w * w))

    def _basis(self, dtype):
        """Orthogonal Q [3, 3] with Q[:, 0] = w / ||w||."""
        w = self.weights.astype(dtype)
        u = w / jnp.linalg.norm(w)
        s = jnp.where(u[0] >= 0, 1.0, -1.0).astype(dtype)
        e1 = jnp.eye(3, dtype=dtype)[0]
        v = u + s * e1  # never zero
        house = jnp.eye(3, dtype=dtype) - 2.0 * jnp.outer(v, v) / jnp.dot(v, v)
        # house @ e1 = -s u; flip the first column to get +u.
        return house * jnp.stack([-s, jnp.ones((), dtype), jnp.ones((), dtype)])

    def _svd_Vt(self, x):
        c = jnp.einsum("hwc,ck->hwk", x, self._basis(x.dtype), precision=HIGHEST)
        return jnp.concatenate([c[..., 0].ravel(), c[..., 1:].ravel()])

    def _svd_V(self, v):
        big_h, big_w, _ = self.image_shape
        m = big_h * big_w
        c = jnp.concatenate([v[:m].reshape(big_h, big_w, 1), v[m:].reshape(big_h, big_w, 2)], -1)
        return jnp.einsum("hwk,ck->hwc", c, self._basis(v.dtype), precision=HIGHEST)

    def _svd_Ut(self, y):
        return jnp.concatenate([y.ravel(), jnp.zeros((2 * y.size,), y.dtype)])

    def _svd_U(self, c):
        return c[: self.image_shape[0] * self.image_shape[1]].reshape(self.y_shape)

    def _svd_singulars(self):
        big_h, big_w, _ = self.image_shape
        m = big_h * big_w
        norm = jnp.linalg.norm(self.weights.astype(jnp.float32))
        return jnp.concatenate([jnp.full((m,), norm), jnp.zeros((2 * m,), jnp.float32)])
