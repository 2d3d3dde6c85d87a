"""Phase retrieval: y = |F(pad(x))|, the Fourier magnitude of the zero-padded image (nonlinear).

Official ``PhaseRetrievalOperator`` (``utils/degredations.py``, ``utils/fft_utils.py``):
``F = fftshift ∘ fft2(norm="ortho") ∘ ifftshift`` over the two spatial axes, per channel; ``pad``
zeros on each side, upstream ``int(oversample / 8 * 256)`` (= 64 for oversample 2, whatever the
image size). Here the default follows the formula with the actual size, ``int(oversample / 8 *
H)`` (and W), which keeps upstream's 256-px geometry (padded size 1.5 × image for oversample 2);
pass ``pad=64`` to reproduce the unpatched upstream at any size.

``A_dagger(y) = crop(|F⁻¹(y)|)`` with ``F⁻¹ = fftshift ∘ ifft2(norm="ortho") ∘ ifftshift``, as
upstream: the magnitude of the inverse transform of the amplitude (an autocorrelation-like image,
not an estimate of x); it is the official initialisation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from reddiff_jax.operators.base import Operator, check_image_shape

__all__ = ["PhaseRetrieval"]

_AXES = (0, 1)


def _complex_dtype(dtype):
    return jnp.complex128 if dtype == jnp.float64 else jnp.complex64


class PhaseRetrieval(Operator):
    """y = |fftshift(fft2(ifftshift(pad(x)), norm="ortho"))|, [H, W, C] -> [H + 2 ph, W + 2 pw, C].

    Computed in complex64 (complex128 for float64 input), like upstream.
    """

    pad_h: int = struct.field(pytree_node=False, default=0)
    pad_w: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def create(cls, image_shape, *, oversample: float = 2.0, pad=None) -> PhaseRetrieval:
        """``pad`` (int or (ph, pw)) overrides ``int(oversample / 8 * size)`` per side."""
        shape = check_image_shape(image_shape)
        if not isinstance(oversample, int | float) or oversample < 0:
            raise ValueError(f"oversample: expected a number >= 0, got {oversample!r}")
        if pad is None:
            ph, pw = int(oversample / 8 * shape[0]), int(oversample / 8 * shape[1])
        else:
            ph, pw = (pad, pad) if isinstance(pad, int | np.integer) else tuple(pad)
            if not all(
                isinstance(p, int | np.integer) and not isinstance(p, bool) for p in (ph, pw)
            ):
                raise ValueError(f"pad: expected an int or a pair of ints >= 0, got {pad!r}")
        if ph < 0 or pw < 0:
            raise ValueError(f"pad: expected an int or a pair of ints >= 0, got {pad!r}")
        return cls(image_shape=shape, pad_h=int(ph), pad_w=int(pw))

    @property
    def y_shape(self) -> tuple[int, ...]:
        big_h, big_w, ch = self.image_shape
        return (big_h + 2 * self.pad_h, big_w + 2 * self.pad_w, ch)

    def _A(self, x):
        xp = jnp.pad(x, ((self.pad_h, self.pad_h), (self.pad_w, self.pad_w), (0, 0)))
        z = jnp.fft.ifftshift(xp.astype(_complex_dtype(x.dtype)), axes=_AXES)
        z = jnp.fft.fftshift(jnp.fft.fft2(z, axes=_AXES, norm="ortho"), axes=_AXES)
        return jnp.abs(z).astype(x.dtype)

    def _A_dagger(self, y):
        z = jnp.fft.ifftshift(y.astype(_complex_dtype(y.dtype)), axes=_AXES)
        z = jnp.fft.fftshift(jnp.fft.ifft2(z, axes=_AXES, norm="ortho"), axes=_AXES)
        big_h, big_w, _ = self.image_shape
        crop = z[self.pad_h : self.pad_h + big_h, self.pad_w : self.pad_w + big_w]
        return jnp.abs(crop).astype(y.dtype)
