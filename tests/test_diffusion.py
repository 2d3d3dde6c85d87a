"""Tests for reddiff_jax.diffusion: schedule vs the official fixtures, grid, conversions, DDIM."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import diffusion

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL = FIXTURES / "reddiff_official"


def _official(name: str):
    return np.load(OFFICIAL / f"{name}.npz")


@pytest.mark.parametrize("case", ["reddiff_sr4", "reddiff_in2_box", "dps_sr4"])
def test_alpha_bar_matches_official_exactly(case):
    d = _official(case)
    ac = diffusion.alphas_cumprod("linear", 1000)
    got = np.asarray(diffusion.alpha_bar(ac, jnp.asarray(d["ts"], jnp.int32)))
    assert got.dtype == np.float32
    # Upstream's float32 cumprod is reproduced bit for bit: tolerance 0.
    np.testing.assert_array_equal(got, d["alpha_t"])


def test_alphas_cumprod_vs_float64_reference():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ref = np.cumprod(1.0 - betas)
    got = np.asarray(diffusion.alphas_cumprod(), np.float64)
    # README: float64 cumprod rounded differs by <= 2.7e-7 relative at the fixture ts; allow 5e-7
    # over all t (a few float32 ulps).
    np.testing.assert_allclose(got, ref, rtol=5e-7, atol=0)
    assert got.shape == (1000,)
    assert np.all(np.diff(got) < 0) and got[0] == np.float32(1 - 1e-4)


def test_cosine_schedule_analytic():
    ac = np.asarray(diffusion.alphas_cumprod("cosine", 1000), np.float64)
    t = np.arange(1000)
    f = np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    f_next = np.cos(((t + 1) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    ref = np.cumprod(1 - np.minimum(1 - f_next / f, 0.999))
    np.testing.assert_allclose(ac, ref, rtol=1e-5, atol=1e-7)
    # Closed form ᾱ_t = f(t+1)/f(0) away from the clipped tail.
    np.testing.assert_allclose(ac[:900], (f_next / f[0])[:900], rtol=1e-5)
    assert np.all(np.diff(ac) <= 0) and ac[-1] >= 0


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        diffusion.alphas_cumprod("quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        diffusion.alphas_cumprod("linear", 0)


def test_alpha_bar_minus_one_and_shapes():
    ac = diffusion.alphas_cumprod()
    t = jnp.array([[-1, 0], [999, 500]], jnp.int32)
    got = diffusion.alpha_bar(ac, t)
    assert got.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(got), [[1.0, ac[0]], [ac[999], ac[500]]])
    # jit-safe
    np.testing.assert_array_equal(np.asarray(jax.jit(diffusion.alpha_bar)(ac, t)), np.asarray(got))
    with pytest.raises(TypeError, match="integer"):
        diffusion.alpha_bar(ac, jnp.array([1.0]))


def test_timesteps_match_official_grid():
    d = _official("reddiff_sr4")
    ts = diffusion.timesteps(20)
    assert ts.dtype == np.int32
    np.testing.assert_array_equal(ts, d["ts"])
    ss = diffusion.prev_timesteps(20)
    np.testing.assert_array_equal(ss, list(range(900, -1, -50)) + [-1])
    assert len(ss) == len(ts)


@pytest.mark.parametrize("n", [1, 7, 30, 50, 100, 1000])
def test_timesteps_equal_get_timesteps(n):
    skip = 1000 // n
    ts_up = list(range(0, 1000, skip))  # utils/functions.py::get_timesteps
    ss_up = [-1] + ts_up[:-1]
    np.testing.assert_array_equal(diffusion.timesteps(n), ts_up[::-1])
    np.testing.assert_array_equal(diffusion.prev_timesteps(n), ss_up[::-1])


def test_timesteps_bad_input():
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.timesteps(0)
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.timesteps(1001)


def test_eps_x0_roundtrip():
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (2, 4, 4, 3))
    eps = jax.random.normal(k2, (2, 4, 4, 3))
    a = jnp.array([0.3, 0.9]).reshape(2, 1, 1, 1)
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    np.testing.assert_allclose(diffusion.x0_from_eps(x_t, eps, a), x0, atol=1e-5)
    np.testing.assert_allclose(diffusion.eps_from_x0(x_t, x0, a), eps, atol=1e-5)


def test_ddim_step_formula_and_last_step():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x0 = jax.random.normal(k1, (3, 3, 1))
    eps = jax.random.normal(k2, (3, 3, 1))
    z = jax.random.normal(k3, (3, 3, 1))
    a_t, a_s, eta = 0.4, 0.7, 0.85
    c1 = eta * np.sqrt((1 - a_t / a_s) * (1 - a_s) / (1 - a_t))
    c2 = np.sqrt(1 - a_s - c1**2)
    ref = np.sqrt(a_s) * np.asarray(x0) + c1 * np.asarray(z) + c2 * np.asarray(eps)
    got = diffusion.ddim_step(x0, eps, a_t, a_s, eta=eta, z=z)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    # eta = 0 deterministic: x_s = sqrt(a_s) x0 + sqrt(1-a_s) eps, z not needed.
    got0 = diffusion.ddim_step(x0, eps, a_t, a_s)
    np.testing.assert_allclose(got0, np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps, atol=1e-6)
    # s = -1 (ᾱ = 1): c1 = c2 = 0 exactly, x_s = x0.
    c1, c2 = diffusion.ddim_coefficients(jnp.float32(0.9999), jnp.float32(1.0), eta=1.0)
    assert float(c1) == 0.0 and float(c2) == 0.0
    np.testing.assert_array_equal(diffusion.ddim_step(x0, eps, 0.9999, 1.0, eta=1.0, z=z), x0)
    # A DDIM step with eta = 0 from the exact x0/eps stays on the forward marginal.
    x_t = jnp.sqrt(a_t) * x0 + jnp.sqrt(1 - a_t) * eps
    x0_hat = diffusion.x0_from_eps(x_t, eps, a_t)
    np.testing.assert_allclose(
        diffusion.ddim_step(x0_hat, eps, a_t, a_s),
        jnp.sqrt(a_s) * x0 + jnp.sqrt(1 - a_s) * eps,
        atol=1e-5,
    )


def test_ddim_step_needs_z():
    x = jnp.zeros((2, 2, 1))
    with pytest.raises(ValueError, match="z"):
        diffusion.ddim_step(x, x, 0.5, 0.6, eta=1.0)
    with pytest.raises(ValueError, match="z"):
        diffusion.ddim_step(x, x, 0.5, 0.6, eta=1.0, z=jnp.zeros((3,)))
