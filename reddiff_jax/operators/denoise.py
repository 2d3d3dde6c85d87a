"""Denoising: the identity operator (official ``deno``); noise comes from ``measure``."""

from __future__ import annotations

import jax.numpy as jnp

from reddiff_jax.operators.base import DiagonalOperator, check_image_shape

__all__ = ["Denoising"]


class Denoising(DiagonalOperator):
    """y = x. ``A_adjoint = A_dagger = identity``; SVD: U = V = identity, singulars all 1."""

    @classmethod
    def create(cls, image_shape) -> Denoising:
        return cls(image_shape=check_image_shape(image_shape))

    def _A(self, x):
        return x

    def _diagonal(self):
        return jnp.ones(self.image_shape, jnp.float32)
