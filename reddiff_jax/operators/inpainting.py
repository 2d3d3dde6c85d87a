"""Inpainting: y = m ⊙ x (full size, zeros in the holes), and its masks (box, random, free-form).

Official ``Inpainting2`` (``in2_<type>``): ``H(x) = x * m``, ``H_pinv(y) = y * m`` (the true
pseudo-inverse of a 0/1 diagonal). Masks are 1 where observed, 0 in the hole, shared by all channels
when built here (a user mask may differ per channel).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax.operators.base import DiagonalOperator, _asarray, _is_concrete, check_image_shape

__all__ = ["Inpainting", "box_mask", "freeform_mask", "random_mask"]


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return int(v), int(v)
    try:
        a, b = v
        if all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in (a, b)):
            return int(a), int(b)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")


def box_mask(image_shape, *, size=None, position=None) -> jnp.ndarray:
    """Mask with one rectangular hole.

    Args:
      image_shape: (H, W, C).
      size: hole size, int or (h, w); default (H // 2, W // 2).
      position: top-left corner (row, col) of the hole; default centred
        ((H - h) // 2, (W - w) // 2).

    Returns:
      float32 [H, W, C] mask, 1 = observed, 0 in the hole. The official fixture ``in2_box`` is
      ``box_mask((32, 32, 3))`` (rows/cols 8:24).
    """
    big_h, big_w, ch = check_image_shape(image_shape)
    h, w = _pair(size if size is not None else (big_h // 2, big_w // 2), "size")
    if not (0 < h <= big_h and 0 < w <= big_w):
        raise ValueError(f"size: expected a hole within 1..{(big_h, big_w)}, got {(h, w)}")
    r, c = (
        _pair(position, "position")
        if position is not None
        else ((big_h - h) // 2, (big_w - w) // 2)
    )
    if not (0 <= r <= big_h - h and 0 <= c <= big_w - w):
        raise ValueError(
            f"position: expected the {h}x{w} hole inside the {big_h}x{big_w} image, got top-left "
            f"{(r, c)}"
        )
    m = np.ones((big_h, big_w, ch), np.float32)
    m[r : r + h, c : c + w] = 0.0
    return _asarray(m)


def random_mask(key: jax.Array, image_shape, *, fraction: float = 0.5) -> jnp.ndarray:
    """Mask keeping exactly ``round(fraction * H * W)`` pixels chosen uniformly (all channels).

    Args:
      key: PRNG key.
      image_shape: (H, W, C).
      fraction: fraction of pixels KEPT (observed), in [0, 1].

    Returns:
      float32 [H, W, C] mask, 1 = observed. jit/vmap-safe over ``key``.
    """
    big_h, big_w, ch = check_image_shape(image_shape)
    if not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a number in [0, 1] (fraction kept), got {fraction!r}")
    return _random_mask(key, (big_h, big_w, ch), np.int32(round(fraction * big_h * big_w)))


@functools.partial(jax.jit, static_argnums=1)
def _random_mask(key, shape, kept):
    rank = jax.random.permutation(key, shape[0] * shape[1])
    m = (rank < kept).astype(jnp.float32).reshape(shape[0], shape[1], 1)
    return jnp.broadcast_to(m, shape)


def _segment_distance(q: jnp.ndarray, p0: jnp.ndarray, p1: jnp.ndarray) -> jnp.ndarray:
    """Distance of points q [..., 2] to the segment p0-p1 ([2] each)."""
    d = p1 - p0
    t = jnp.clip(jnp.sum((q - p0) * d, -1) / jnp.maximum(jnp.sum(d * d), 1e-12), 0.0, 1.0)
    return jnp.linalg.norm(q - p0 - t[..., None] * d, axis=-1)


def freeform_mask(
    key: jax.Array,
    image_shape,
    *,
    hole_fraction: float | tuple[float, float] = (0.2, 0.3),
    max_strokes: int = 48,
    vertices: int = 5,
) -> jnp.ndarray:
    """Free-form mask made of random brush strokes, with a target hole fraction.

    Each stroke is a polyline of ``vertices`` points (random start, heading turning by up to
    ±60° per segment, segment length 5-15% and brush width 5-10% of sqrt(H*W), at least 2 px).
    Strokes are added one by one and the union whose hole fraction is closest to the target is
    kept, so the realised fraction is within about half a stroke (~1-2% of the image) of it.

    Args:
      key: PRNG key.
      image_shape: (H, W, C).
      hole_fraction: target fraction of MISSING pixels, a number in (0, 1) or a range (lo, hi)
        from which the target is drawn uniformly (default 20-30%, as Palette's "freeform 20-30%").
      max_strokes: number of candidate strokes (static).
      vertices: points per stroke (static).

    Returns:
      float32 [H, W, C] mask, 1 = observed, 0 in the strokes. jit/vmap-safe over ``key``.
    """
    big_h, big_w, ch = check_image_shape(image_shape)
    if isinstance(hole_fraction, int | float):
        lo = hi = float(hole_fraction)
    else:
        try:
            lo, hi = (float(v) for v in hole_fraction)
        except (TypeError, ValueError):
            lo, hi = -1.0, -1.0
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(
            "hole_fraction: expected a number or a range (lo, hi) within (0, 1), got "
            f"{hole_fraction!r}"
        )
    lo, hi = np.float32(lo), np.float32(hi)  # traced: one compilation for all fractions
    return _freeform_mask(key, (big_h, big_w, ch), lo, hi, int(max_strokes), int(vertices))


@functools.partial(jax.jit, static_argnums=(1, 4, 5))
def _freeform_mask(key, shape, lo, hi, max_strokes, vertices):
    big_h, big_w, ch = shape
    scale = math.sqrt(big_h * big_w)
    k_target, k_strokes = jax.random.split(key)
    target = jax.random.uniform(k_target, (), minval=lo, maxval=hi)

    rows, cols = jnp.meshgrid(jnp.arange(big_h) + 0.5, jnp.arange(big_w) + 0.5, indexing="ij")
    q = jnp.stack([rows, cols], -1)  # [H, W, 2]

    # All random numbers in one draw (fast to compile): per stroke 2 start, 1 heading,
    # (vertices - 1) turns, (vertices - 1) lengths, 1 width.
    u = jax.random.uniform(k_strokes, (max_strokes, 2 * vertices + 2))

    def stroke(ui):
        start = ui[0:2] * jnp.array([big_h, big_w], jnp.float32)
        a0 = ui[2] * 2 * math.pi
        turns = (ui[3 : 2 + vertices] * 2 - 1) * (math.pi / 3)
        lengths = (0.05 + 0.10 * ui[2 + vertices : 1 + 2 * vertices]) * scale
        angles = a0 + jnp.cumsum(turns)
        steps = jnp.stack([jnp.sin(angles), jnp.cos(angles)], -1) * lengths[:, None]
        pts = start + jnp.concatenate([jnp.zeros((1, 2)), jnp.cumsum(steps, 0)], 0)
        pts = jnp.clip(pts, 0.0, jnp.array([big_h, big_w], jnp.float32))
        width = jnp.maximum((0.05 + 0.05 * ui[1 + 2 * vertices]) * scale, 2.0)
        dist = jax.vmap(lambda a, b: _segment_distance(q, a, b))(pts[:-1], pts[1:])
        return jnp.min(dist, 0) <= width / 2  # [H, W]

    holes = jax.vmap(stroke)(u)  # [K, H, W]
    unions = jax.lax.cummax(holes.astype(jnp.float32), axis=0)
    fractions = unions.mean(axis=(1, 2))
    best = jnp.argmin(jnp.abs(fractions - target))
    return jnp.broadcast_to((1.0 - unions[best])[:, :, None], shape)


class Inpainting(DiagonalOperator):
    """y = mask ⊙ x, full size [H, W, C] with zeros in the holes (official ``Inpainting2``).

    ``A_adjoint = A`` (diagonal) and ``A_dagger(y) = mask ⊙ y`` is the exact pseudo-inverse (the
    official init ``mu0 = y * mask``).

    SVD order: V = U = identity (pixel order [H, W, C] row-major), ``singulars = mask.ravel()``,
    so zeros sit at the holes; m = n.
    """

    mask: jnp.ndarray  # [H, W, C] float32, 1 = observed

    @classmethod
    def create(cls, image_shape, *, mask) -> Inpainting:
        """Build from a 0/1 mask of shape [H, W], [H, W, 1] or [H, W, C] (1 = observed)."""
        big_h, big_w, ch = check_image_shape(image_shape)
        traced = not _is_concrete(mask)
        xp = jnp if traced else np  # concrete masks are prepared on the host (no compilation)
        mask = mask if traced else np.asarray(mask)
        given = tuple(mask.shape)
        if mask.ndim == 2:
            mask = mask[:, :, None]
        if mask.ndim != 3 or mask.shape[:2] != (big_h, big_w) or mask.shape[2] not in (1, ch):
            raise ValueError(
                f"mask: expected shape {(big_h, big_w)}, {(big_h, big_w, 1)} or "
                f"{(big_h, big_w, ch)} for image_shape {(big_h, big_w, ch)}, got "
                f"{given}"
            )
        if not traced and not np.all((mask == 0) | (mask == 1)):
            raise ValueError("mask: expected values in {0, 1} (1 = observed), got other values")
        mask = xp.broadcast_to(mask.astype(np.float32), (big_h, big_w, ch))
        return cls(image_shape=(big_h, big_w, ch), mask=mask if traced else _asarray(mask))

    @property
    def observed_fraction(self) -> jnp.ndarray:
        """Fraction of observed entries."""
        return jnp.mean(self.mask)

    def _diagonal(self):
        return self.mask
