"""Differentiable JPEG compression + decompression (official ``jpeg<qf>``; ``A_dagger`` = identity).

Pipeline on one image in [-1, 1] (C = 3 colour, or C = 1 grayscale = luma only):

1. to [0, 255]; RGB -> YCbCr (JFIF full range, BT.601 weights), minus 128;
2. chroma subsampling 4:2:0 (2×2 average of Cb and Cr);
3. orthonormal 8×8 block DCT-II (identical to the JPEG DCT);
4. quantisation by the standard tables (ITU T.81 Annex K) scaled by the IJG quality formula
   (q < 50: 5000/q %, else 200 - 2q %, entries floor((T·s + 50) / 100) clipped to 1..255),
   rounding with a surrogate (default ``"smooth"``: r + (u - r)³, as DiffJPEG), dequantisation;
5. inverse DCT, chroma upsampling by 2×2 replication, YCbCr -> RGB, to [-1, 1], clip to [-1, 1].

Images whose sides are not multiples of the MCU (16 px for colour, 8 px for grayscale) are
edge-padded and cropped back. Decoded pixels are not rounded to integers (as DiffJPEG).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import struct

from reddiff_jax.operators.base import HIGHEST, Operator, check_image_shape
from reddiff_jax.operators.quantize import _check_rounding, round_surrogate

__all__ = ["JPEG", "LUMA_TABLE", "CHROMA_TABLE", "quality_table"]

LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    np.float64,
)
CHROMA_TABLE = np.full((8, 8), 99.0)
CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

_RGB_TO_YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])


def quality_table(table: np.ndarray, quality: int) -> np.ndarray:
    """IJG quality scaling of a quantisation table (quality 1..100; 100 gives all ones)."""
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    return np.clip(np.floor((table * scale + 50.0) / 100.0), 1.0, 255.0)


@functools.lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    k = np.arange(8)[:, None]
    n = np.arange(8)[None, :]
    d = np.sqrt(2.0 / 8.0) * np.cos(np.pi * (2 * n + 1) * k / 16.0)
    d[0] /= np.sqrt(2.0)
    return d


def _blocks_dct(p: jnp.ndarray, inverse: bool) -> jnp.ndarray:
    """Blockwise 8×8 (inverse) orthonormal DCT of a [Hb*8, Wb*8] plane."""
    h, w = p.shape
    d = jnp.asarray(_dct_matrix(), p.dtype)
    b = p.reshape(h // 8, 8, w // 8, 8)
    spec = "uk,akbl,vl->aubv" if not inverse else "ku,akbl,lv->aubv"
    return jnp.einsum(spec, d, b, d, precision=HIGHEST).reshape(h, w)


class JPEG(Operator):
    """y = decode(encode(x, quality)); [H, W, C] -> [H, W, C], C in (1, 3)."""

    quality: int = struct.field(pytree_node=False, default=20)
    rounding: str = struct.field(pytree_node=False, default="smooth")

    @classmethod
    def create(cls, image_shape, *, quality: int = 20, rounding: str = "smooth") -> JPEG:
        shape = check_image_shape(image_shape)
        if shape[2] not in (1, 3):
            raise ValueError(f"image_shape: jpeg needs C = 1 or 3, got {shape}")
        if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
            raise ValueError(f"quality: expected an int in 1..100, got {quality!r}")
        return cls(image_shape=shape, quality=quality, rounding=_check_rounding(rounding))

    def _quantise(self, plane: jnp.ndarray, table: np.ndarray) -> jnp.ndarray:
        h, w = plane.shape
        q = jnp.asarray(np.tile(quality_table(table, self.quality), (h // 8, w // 8)), plane.dtype)
        coef = _blocks_dct(plane, inverse=False)
        coef = round_surrogate(coef / q, self.rounding) * q
        return _blocks_dct(coef, inverse=True)

    def _A(self, x):
        big_h, big_w, ch = x.shape
        mcu = 16 if ch == 3 else 8
        ph, pw = -big_h % mcu, -big_w % mcu
        v = (jnp.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge") + 1.0) * 127.5
        if ch == 1:
            out = self._quantise(v[..., 0] - 128.0, LUMA_TABLE)[..., None] + 128.0
        else:
            ycc = jnp.einsum("hwc,kc->hwk", v, jnp.asarray(_RGB_TO_YCC, x.dtype), precision=HIGHEST)
            luma = self._quantise(ycc[..., 0] - 128.0, LUMA_TABLE)
            hh, ww = ycc.shape[0] // 2, ycc.shape[1] // 2
            chroma = ycc[..., 1:].reshape(hh, 2, ww, 2, 2).mean(axis=(1, 3))
            chroma = jnp.stack([self._quantise(chroma[..., i], CHROMA_TABLE) for i in (0, 1)], -1)
            chroma = jnp.repeat(jnp.repeat(chroma, 2, axis=0), 2, axis=1)
            ycc = jnp.concatenate([luma[..., None] + 128.0, chroma], -1)
            rgb = jnp.asarray(_YCC_TO_RGB, x.dtype)
            out = jnp.einsum("hwk,ck->hwc", ycc, rgb, precision=HIGHEST)
        return jnp.clip(out[:big_h, :big_w] / 127.5 - 1.0, -1.0, 1.0)

    def _A_dagger(self, y):
        return y
