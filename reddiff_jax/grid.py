"""The comparison grid of the main job: truth | measurement | pseudo-inverse | restoration.

Tiles are uint8 [N, H, W, C] (C = 1 or 3); measurements are shown through
:func:`measurement_display`, which maps any measurement to a viewable [H, W, C] image in [-1, 1].
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

__all__ = ["grid_png", "measurement_display"]


def measurement_display(y: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A viewable [H, W, C] image in [-1, 1] for one measurement ``y``.

    Image-shaped ``y`` (inpainting, blur, HDR) is shown as is; a low-resolution ``y`` (SR) is
    upsampled by pixel repetition; any other [P, Q, C] array (phase retrieval's Fourier
    magnitude) is shown as log(1 + |y|), min-max scaled and resized; anything else as grey.
    """
    y = np.asarray(y, np.float32)
    h, w, c = image_shape
    if y.shape == (h, w, c):
        return np.clip(y, -1.0, 1.0)
    if y.ndim == 3 and y.shape[2] == c and h % y.shape[0] == 0 and w % y.shape[1] == 0:
        ry, rx = h // y.shape[0], w // y.shape[1]
        return np.clip(np.repeat(np.repeat(y, ry, 0), rx, 1), -1.0, 1.0)
    if y.ndim == 3 and y.shape[2] == c:
        mag = np.log1p(np.abs(y))
        mag = (mag - mag.min()) / max(float(mag.max() - mag.min()), 1e-12)
        resized = jax.image.resize(jnp.asarray(mag), (h, w, c), "linear")
        return np.clip(np.asarray(resized) * 2.0 - 1.0, -1.0, 1.0)
    return np.zeros((h, w, c), np.float32)


def grid_png(
    columns: Sequence[tuple[str, np.ndarray]],
    *,
    rows: int,
    image_shape: tuple[int, int, int],
    row_titles: Sequence[str] | None = None,
) -> bytes:
    """A labelled grid: one column per (title, uint8 [N, H, W, C]), ``rows`` rows, and
    optionally a title left of each row."""
    h, w, _ = image_shape
    scale = max(1, 96 // max(h, w))
    pad, header = 4, 14
    th, tw = h * scale, w * scale
    if row_titles is not None and len(row_titles) != rows:
        raise ValueError(f"row_titles: expected {rows} titles, got {len(row_titles)}")
    left = pad + 6 * max(map(len, row_titles)) if row_titles else 0  # ~6 px per default glyph
    width = left + len(columns) * (tw + pad) + pad
    height = header + rows * (th + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(row_titles or ()):
        draw.text((pad, header + pad + i * (th + pad) + th // 2 - 5), title, fill=(0, 0, 0))
    for j, (title, tiles) in enumerate(columns):
        x0 = left + pad + j * (tw + pad)
        draw.text((x0, 1), title, fill=(0, 0, 0))
        for i in range(rows):
            tile = tiles[i]
            tile = np.repeat(tile, 3, axis=-1) if tile.shape[-1] == 1 else tile[..., :3]
            im = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            canvas.paste(im, (x0, header + pad + i * (th + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
