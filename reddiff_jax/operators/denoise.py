"""Denoising: the identity operator (official ``deno``); noise comes from ``measure``."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from reddiff_jax.operators.base import LinearOperator, check_image_shape

__all__ = ["Denoising"]


class Denoising(LinearOperator):
    """y = x. ``A_adjoint = A_dagger = identity``; SVD: U = V = identity, singulars all 1."""

    has_svd: ClassVar[bool] = True

    @classmethod
    def create(cls, image_shape) -> Denoising:
        return cls(image_shape=check_image_shape(image_shape))

    def _A(self, x):
        return x

    def _A_adjoint(self, y):
        return y

    def _A_dagger(self, y):
        return y

    def _svd_Vt(self, x):
        return x.ravel()

    def _svd_V(self, v):
        return v.reshape(self.image_shape)

    def _svd_Ut(self, y):
        return y.ravel()

    def _svd_U(self, c):
        return c.reshape(self.image_shape)

    def _svd_singulars(self):
        n = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        return jnp.ones((n,), jnp.float32)
