"""HDR (official ``hdr``): y = clip(scale · x, -1, 1) with scale 2; ``A_dagger(y) = y / scale``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from reddiff_jax.operators.base import Operator, check_image_shape

__all__ = ["HDR"]


class HDR(Operator):
    """y = clip(scale x, -1, 1), [H, W, C] -> [H, W, C] (nonlinear; gradient 0 where clipped)."""

    scale: float = struct.field(pytree_node=False, default=2.0)

    @classmethod
    def create(cls, image_shape, *, scale: float = 2.0) -> HDR:
        shape = check_image_shape(image_shape)
        if not isinstance(scale, int | float) or not scale > 0:
            raise ValueError(f"scale: expected a positive number, got {scale!r}")
        return cls(image_shape=shape, scale=float(scale))

    def _A(self, x):
        return jnp.clip(x * self.scale, -1.0, 1.0)

    def _A_dagger(self, y):
        return y / self.scale
