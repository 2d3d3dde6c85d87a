"""Super-resolution: r×r average pooling (official ``sr<r>``) and antialiased bicubic downsampling.

Both are separable (see :class:`~reddiff_jax.operators.base.SeparableOperator` for the SVD order)
and map [H, W, C] -> [H / r, W / r, C]; ``r`` must divide H and W.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import struct

from reddiff_jax.operators.base import SeparableOperator, _np_axis_svd, check_image_shape

__all__ = ["AvgPoolSR", "BicubicSR", "bicubic_matrix", "keys_cubic"]


def _check_factor(image_shape, factor) -> tuple[tuple[int, int, int], int]:
    shape = check_image_shape(image_shape)
    if not isinstance(factor, int | np.integer) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor: expected a positive int, got {factor!r}")
    if shape[0] % factor or shape[1] % factor:
        raise ValueError(
            f"factor: expected a divisor of the image size {shape[:2]}, got {factor} "
            f"({shape[0]} % {factor} = {shape[0] % factor}, {shape[1]} % {factor} = "
            f"{shape[1] % factor})"
        )
    return shape, int(factor)


def _frozen(*arrays: np.ndarray):
    for a in arrays:
        a.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=64)
def _pool_matrix(size: int, factor: int) -> np.ndarray:
    m = np.zeros((size // factor, size))
    for i in range(size // factor):
        m[i, i * factor : (i + 1) * factor] = 1.0 / factor
    return _frozen(m)[0]


def keys_cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5 as PIL and jax.image; OpenCV uses -0.75)."""
    t = np.abs(np.asarray(t, np.float64))
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(size: int, factor: int) -> np.ndarray:
    """[size / factor, size] float64 matrix of antialiased bicubic downsampling along one axis.

    Output pixel i has centre ``c = (i + 0.5) * factor - 0.5`` in input coordinates; its weights
    are ``keys_cubic((j - c) / factor)`` over input pixels j inside the image (the kernel is
    stretched by the factor: antialiasing), renormalised to sum 1 at the borders. This is the
    definition of PIL's ``resize(BICUBIC)`` and of ``jax.image.resize(method="bicubic",
    antialias=True)``.
    """
    out = size // factor
    j = np.arange(size, dtype=np.float64)
    c = (np.arange(out, dtype=np.float64) + 0.5) * factor - 0.5
    w = keys_cubic((j[None, :] - c[:, None]) / factor)
    w /= w.sum(axis=1, keepdims=True)
    return _frozen(w)[0]


@functools.lru_cache(maxsize=64)
def _svd_of(kind: str, size: int, factor: int):
    mat = _pool_matrix(size, factor) if kind == "avgpool" else bicubic_matrix(size, factor)
    return _frozen(*_np_axis_svd(mat))


class _StaticSR(SeparableOperator):
    factor: int = struct.field(pytree_node=False)

    kind: ClassVar[str] = ""

    def _matrix_shapes(self):
        return (self.image_shape[0] // self.factor, self.image_shape[1] // self.factor)

    def _axis_svds(self, dtype=jnp.float32):
        del dtype  # float64 numpy constants, cast by the caller
        return _svd_of(self.kind, self.image_shape[0], self.factor), _svd_of(
            self.kind, self.image_shape[1], self.factor
        )


class AvgPoolSR(_StaticSR):
    """r×r block average, the official ``sr<r>`` (``SuperResolution``): [H, W, C] -> [H/r, W/r, C].

    ``A_adjoint(y)`` replicates each value into its block divided by r²; ``A_dagger(y)`` replicates
    it unchanged (nearest-neighbour upsampling, the exact pseudo-inverse and the official
    ``H_pinv``). Singular values: 1/r for the m observed components (one per block and channel).
    Note: the official code returns y flattened channel-major (B, C·(H/r)²); here y is an image.
    """

    kind: ClassVar[str] = "avgpool"
    has_svd: ClassVar[bool] = True

    @classmethod
    def create(cls, image_shape, *, factor: int = 4) -> AvgPoolSR:
        shape, factor = _check_factor(image_shape, factor)
        return cls(image_shape=shape, factor=factor)

    def _matrices(self):
        return _pool_matrix(self.image_shape[0], self.factor), _pool_matrix(
            self.image_shape[1], self.factor
        )

    def _blocks(self, x):
        big_h, big_w, ch = x.shape
        r = self.factor
        return x.reshape(big_h // r, r, big_w // r, r, ch)

    def _A(self, x):
        return self._blocks(x).mean(axis=(1, 3))

    def _upsample(self, y):
        r = self.factor
        return jnp.repeat(jnp.repeat(y, r, axis=0), r, axis=1)

    def _A_adjoint(self, y):
        return self._upsample(y) / (self.factor**2)

    def _A_dagger(self, y):
        return self._upsample(y)


class BicubicSR(_StaticSR):
    """Antialiased bicubic downsampling by r (Keys a = -0.5, PIL / ``jax.image.resize``).

    ``A(x)[i, j] = Σ Bh[i, h] x[h, w] Bw[j, w]`` with ``B = bicubic_matrix(size, r)`` (borders
    renormalised, i.e. no padding assumption). ``A_dagger`` is the SVD pseudo-inverse with
    singular values ``<= pinv_threshold`` (default 3e-2, as the official ``SRConv``) dropped.
    """

    pinv_threshold: float = struct.field(pytree_node=False, default=3e-2)

    kind: ClassVar[str] = "bicubic"
    has_svd: ClassVar[bool] = True

    @classmethod
    def create(cls, image_shape, *, factor: int = 4, pinv_threshold: float = 3e-2) -> BicubicSR:
        shape, factor = _check_factor(image_shape, factor)
        if not isinstance(pinv_threshold, int | float) or pinv_threshold < 0:
            raise ValueError(f"pinv_threshold: expected a number >= 0, got {pinv_threshold!r}")
        return cls(image_shape=shape, factor=factor, pinv_threshold=float(pinv_threshold))

    def _matrices(self):
        return bicubic_matrix(self.image_shape[0], self.factor), bicubic_matrix(
            self.image_shape[1], self.factor
        )
