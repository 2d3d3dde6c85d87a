"""Quantization to ``bits`` per channel (official ``quant<n>``), and rounding surrogates.

Official: ``floor(((x + 1) / 2) (2ⁿ - 1) + 0.5) / (2ⁿ - 1) · 2 - 1``, ``H_pinv`` = identity.
The exact rounding has zero gradient almost everywhere; ``rounding`` selects a surrogate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from reddiff_jax.operators.base import Operator, check_image_shape

__all__ = ["ROUNDINGS", "Quantization", "round_surrogate"]

ROUNDINGS = ("exact", "ste", "smooth")


def _check_rounding(rounding) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def round_surrogate(u: jnp.ndarray, rounding: str) -> jnp.ndarray:
    """Round half up, ``r = floor(u + 0.5)``, with a choice of gradient.

    * ``"exact"``: r (gradient 0 almost everywhere, as upstream's torch.floor);
    * ``"ste"``: value r, gradient 1 (straight-through estimator);
    * ``"smooth"``: ``r + (u - r)³`` (Shin & Song 2017 / DiffJPEG): within 0.125 of r, gradient
      ``3 (u - r)²``, continuous in u.
    """
    _check_rounding(rounding)
    r = jnp.floor(u + 0.5)
    if rounding == "exact":
        return r
    if rounding == "ste":
        return u + jax.lax.stop_gradient(r - u)
    r = jax.lax.stop_gradient(r)
    return r + (u - r) ** 3


class Quantization(Operator):
    """y = round_n(x) on the [-1, 1] scale with ``2**bits`` levels; ``A_dagger`` = identity."""

    bits: int = struct.field(pytree_node=False, default=4)
    rounding: str = struct.field(pytree_node=False, default="exact")

    @classmethod
    def create(cls, image_shape, *, bits: int = 4, rounding: str = "exact") -> Quantization:
        shape = check_image_shape(image_shape)
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise ValueError(f"bits: expected an int in 1..16, got {bits!r}")
        return cls(image_shape=shape, bits=bits, rounding=_check_rounding(rounding))

    def _A(self, x):
        levels = 2.0**self.bits - 1.0
        u = (x + 1.0) / 2.0 * levels
        return round_surrogate(u, self.rounding) / levels * 2.0 - 1.0

    def _A_dagger(self, y):
        return y
