"""Compressed sensing: a random subsampled orthogonal transform, y = (Q x)[idx] in R^m.

``Q = DCT · diag(signs)`` acts on ``vec(x)`` (row-major [H, W, C], n = H·W·C): a random ±1 sign
flip followed by the orthonormal DCT-II of length n. ``idx`` holds the first ``m = round(ratio·n)``
entries of a random permutation ``perm`` of 0..n-1. The rows of A are orthonormal (A Aᵀ = I), so
``A_dagger = A_adjoint``. Signs and permutation are leaves (vmappable per image); m is static.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jax.scipy import fft as jfft

from reddiff_jax.operators.base import LinearOperator, check_image_shape

__all__ = ["CompressedSensing"]


@functools.partial(jax.jit, static_argnums=1)
def _draw(key: jax.Array, n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    k_sign, k_perm = jax.random.split(key)
    signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)
    return signs, jax.random.permutation(k_perm, n).astype(jnp.int32)


class CompressedSensing(LinearOperator):
    """y = DCT(signs ⊙ vec(x))[perm[:m]], [H, W, C] -> [m].

    SVD order: V = Qᵀ permuted by ``perm`` (``Vt(x) = (Q vec x)[perm]``), U = identity on y,
    singulars = 1 for the first m entries and 0 after.
    """

    signs: jnp.ndarray  # [n] float32 (±1)
    perm: jnp.ndarray  # [n] int32, a permutation; the measured indices are perm[:m]
    num_measurements: int = struct.field(pytree_node=False, default=1)  # m

    has_svd: ClassVar[bool] = True

    @classmethod
    def create(cls, key: jax.Array, image_shape, *, ratio: float = 0.25) -> CompressedSensing:
        """Random operator measuring ``m = round(ratio * n)`` coefficients (1 <= m <= n)."""
        shape = check_image_shape(image_shape)
        n = shape[0] * shape[1] * shape[2]
        if not isinstance(ratio, int | float) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio: expected a number in (0, 1] (m / n), got {ratio!r}")
        m = max(1, int(round(ratio * n)))
        signs, perm = _draw(key, n)
        return cls(image_shape=shape, signs=signs, perm=perm, num_measurements=m)

    @property
    def y_shape(self) -> tuple[int, ...]:
        return (self.num_measurements,)

    def _transform(self, x):
        return jfft.dct(x.ravel() * self.signs.astype(x.dtype), norm="ortho")

    def _inverse(self, z):
        return (jfft.idct(z, norm="ortho") * self.signs.astype(z.dtype)).reshape(self.image_shape)

    def _A(self, x):
        return self._transform(x)[self.perm[: self.num_measurements]]

    def _A_adjoint(self, y):
        n = self.signs.shape[0]
        z = jnp.zeros((n,), y.dtype).at[self.perm[: self.num_measurements]].set(y)
        return self._inverse(z)

    def _A_dagger(self, y):
        return self._A_adjoint(y)

    def _svd_Vt(self, x):
        return self._transform(x)[self.perm]

    def _svd_V(self, v):
        return self._inverse(jnp.zeros_like(v).at[self.perm].set(v))

    def _svd_Ut(self, y):
        n = self.signs.shape[0]
        return jnp.concatenate([y, jnp.zeros((n - y.shape[0],), y.dtype)])

    def _svd_U(self, c):
        return c[: self.num_measurements]

    def _svd_singulars(self):
        n, m = self.signs.shape[0], self.num_measurements
        return jnp.concatenate([jnp.ones((m,), jnp.float32), jnp.zeros((n - m,), jnp.float32)])
