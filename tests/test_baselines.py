"""Tests of the baseline samplers (DDIM, DPS, ΠGDM, DDRM, DiffPIR) on analytic Gaussian priors.

For a prior x ~ N(m, diag(s²)) the noised score is exact: with a = ᾱ_t,
eps(x_t) = sqrt(1-a) (x_t - sqrt(a) m) / (a s² + 1 - a), so x̂0(x_t) = E[x0 | x_t] exactly.
Every numeric check below states its reference (closed form in float64, Monte Carlo with a
tolerance from the standard error, or an identity).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import diffusion
from reddiff_jax.operators import HDR, AvgPoolSR, Inpainting, PhaseRetrieval
from reddiff_jax.solvers import ddim, ddrm, diffpir, dps, pgdm

AC32 = diffusion.alphas_cumprod()
AC64 = np.asarray(AC32, np.float64)


# ------------------------------------------------------------------------------------------------
# Toy operators implementing the operator contract (contracts.md), independent of
# reddiff_jax.operators so the solvers are tested on their own.


class _IdentitySVD(flax.struct.PyTreeNode):
    mask: jnp.ndarray

    def Vt(self, x):
        return x.reshape(-1)

    def V(self, v):
        return v.reshape(self.mask.shape)

    def Ut(self, y):
        return (y * self.mask).reshape(-1)

    def U(self, c):
        return c.reshape(self.mask.shape) * self.mask

    @property
    def singulars(self):
        return self.mask.reshape(-1)


class MaskOp(flax.struct.PyTreeNode):
    """Inpainting: y = mask * x (zeros in the holes); U = V = identity, singulars = mask."""

    mask: jnp.ndarray  # [H, W, C] 0/1
    is_linear = True

    @property
    def image_shape(self):
        return tuple(self.mask.shape)

    def A(self, x):
        return x * self.mask

    __call__ = A

    def A_adjoint(self, y):
        return y * self.mask

    def A_dagger(self, y):
        return y * self.mask

    @property
    def svd(self):
        return _IdentitySVD(self.mask)


def _block_basis(r: int) -> np.ndarray:
    """Orthogonal r²×r² matrix whose first column is the normalised all-ones vector."""
    q, _ = np.linalg.qr(np.concatenate([np.ones((r * r, 1)), np.eye(r * r)[:, 1:]], axis=1))
    return (q * np.sign(q[0, 0])).astype(np.float32)


class _PoolSVD(flax.struct.PyTreeNode):
    r: int = flax.struct.field(pytree_node=False)
    shape: tuple = flax.struct.field(pytree_node=False)

    def _blocks(self, x):
        H, W, C = self.shape
        r = self.r
        return x.reshape(H // r, r, W // r, r, C).transpose(0, 2, 4, 1, 3).reshape(-1, r * r)

    def _unblocks(self, b):
        H, W, C = self.shape
        r = self.r
        return b.reshape(H // r, W // r, C, r, r).transpose(0, 3, 1, 4, 2).reshape(H, W, C)

    def Vt(self, x):
        return (self._blocks(x) @ _block_basis(self.r)).reshape(-1)

    def V(self, v):
        return self._unblocks(v.reshape(-1, self.r**2) @ _block_basis(self.r).T)

    def Ut(self, y):
        c = jnp.zeros((y.size, self.r**2), y.dtype)
        return c.at[:, 0].set(y.reshape(-1)).reshape(-1)

    def U(self, c):
        H, W, C = self.shape
        return c.reshape(-1, self.r**2)[:, 0].reshape(H // self.r, W // self.r, C)

    @property
    def singulars(self):
        n = int(np.prod(self.shape))
        s = np.zeros((n // self.r**2, self.r**2), np.float32)
        s[:, 0] = 1.0 / self.r
        return jnp.asarray(s.reshape(-1))


class PoolOp(flax.struct.PyTreeNode):
    """r×r block average (the official sr<r>): y [H/r, W/r, C]; A_dagger replicates (exact A⁺)."""

    image_shape: tuple = flax.struct.field(pytree_node=False)
    r: int = flax.struct.field(pytree_node=False, default=2)
    is_linear = True

    def A(self, x):
        H, W, C = self.image_shape
        return x.reshape(H // self.r, self.r, W // self.r, self.r, C).mean(axis=(1, 3))

    __call__ = A

    def A_dagger(self, y):
        return jnp.repeat(jnp.repeat(y, self.r, axis=0), self.r, axis=1)

    @property
    def svd(self):
        return _PoolSVD(self.r, tuple(self.image_shape))


class SquareOp(flax.struct.PyTreeNode):
    """Nonlinear y = x² (no SVD, no pseudo-inverse)."""

    image_shape: tuple = flax.struct.field(pytree_node=False)
    is_linear = False

    def A(self, x):
        return x**2

    @property
    def svd(self):
        return None


class SquareOpWithInit(SquareOp):
    def A_dagger(self, y):
        return jnp.sqrt(jnp.maximum(y, 0.0))


# ------------------------------------------------------------------------------------------------
# Gaussian prior.


def gaussian_eps_fn(m, s):
    """Exact eps of x ~ N(m, diag(s²)) (m, s broadcastable to [H, W, C])."""
    m = jnp.asarray(m, jnp.float32)
    s2 = jnp.asarray(s, jnp.float32) ** 2

    def eps_fn(x_t, t):
        a = diffusion.alpha_bar(AC32, t).reshape(-1, 1, 1, 1)
        return jnp.sqrt(1.0 - a) * (x_t - jnp.sqrt(a) * m) / (a * s2 + 1.0 - a)

    return eps_fn


def _alphas64(num_steps):
    ts = diffusion.timesteps(num_steps)
    ss = diffusion.prev_timesteps(num_steps)
    a_t = AC64[ts]
    a_s = np.where(ss < 0, 1.0, AC64[np.maximum(ss, 0)])
    return a_t, a_s


def _affine_gain(s, num_steps, coeffs):
    """float64 (K, c): for the Gaussian prior every DDIM-type step is affine in d = x - sqrt(a) m,
    d_s = k_t d_t + c1 z with k_t = (sqrt(a_s a_t) s² + c2 sqrt(1 - a_t)) / (a_t s² + 1 - a_t),
    so x_0 - m = K (x_T - sqrt(a_T) m) + noise of variance c. ``coeffs(a_t, a_s) -> (c1, c2)``."""
    s2 = np.asarray(s, np.float64) ** 2
    K, var = np.ones_like(s2), np.zeros_like(s2)
    for at, as_ in zip(*_alphas64(num_steps), strict=True):
        c1, c2 = coeffs(at, as_)
        k = (np.sqrt(as_ * at) * s2 + c2 * np.sqrt(1 - at)) / (at * s2 + 1 - at)
        K, var = K * k, var * k**2 + c1**2
    return K, var


def _ddim_gain(s, num_steps, eta):
    """DDIM: c1 = eta sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t)), c2 = sqrt(1 - a_s - c1²)."""

    def coeffs(at, as_):
        c1 = eta * np.sqrt(max((1 - at / as_) * (1 - as_) / (1 - at), 0.0))
        return c1, np.sqrt(max(1 - as_ - c1**2, 0.0))

    return _affine_gain(s, num_steps, coeffs)


def _ddrm_unobserved_gain(s, num_steps, eta):
    """DDRM on a component with singular value 0 (in x = sqrt(a) x̄ variables):
    x_s = sqrt(a_s) x̂0 + sqrt(1 - a_s) (sqrt(1 - η²) eps + η z)."""
    return _affine_gain(
        s,
        num_steps,
        lambda at, as_: (eta * np.sqrt(1 - as_), np.sqrt(1 - eta**2) * np.sqrt(1 - as_)),
    )


M = np.array([0.3, -0.2, 0.5, 0.0], np.float32).reshape(2, 2, 1) * np.ones((2, 2, 2), np.float32)
S = np.array([0.5, 0.8, 1.0, 0.3], np.float32).reshape(2, 2, 1) * np.ones((2, 2, 2), np.float32)
EPS_2x2 = gaussian_eps_fn(M, S)


# ------------------------------------------------------------------------------------------------
# DDIM.


def test_ddim_eta0_is_the_exact_affine_map_of_the_gaussian_prior():
    """eta = 0: each step is affine, so x_0 = m + K (x_T - sqrt(a_T) m) per sample exactly."""
    B, N = 16, 20
    x_T = jax.random.normal(jax.random.key(0), (B, 2, 2, 2))
    noise = {"init": x_T, "z": jnp.zeros((N, B, 2, 2, 2))}
    res = ddim.sample(
        EPS_2x2, (B, 2, 2, 2), ddim.DDIMConfig(num_steps=N, eta=0.0), jax.random.key(1), noise=noise
    )
    K, _ = _ddim_gain(S, N, 0.0)
    a_T = AC64[diffusion.timesteps(N)[0]]
    ref = M + K * (np.asarray(x_T, np.float64) - np.sqrt(a_T) * M)
    # float32 rounding over 20 steps of O(1) values: 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(res.x0_pred), ref, atol=1e-5)
    # Deterministic: the z noise is ignored when eta = 0.
    noise2 = {"init": x_T, "z": jnp.ones((N, B, 2, 2, 2))}
    res2 = ddim.sample(
        EPS_2x2,
        (B, 2, 2, 2),
        ddim.DDIMConfig(num_steps=N, eta=0.0),
        jax.random.key(1),
        noise=noise2,
    )
    np.testing.assert_array_equal(np.asarray(res.x0_pred), np.asarray(res2.x0_pred))


def test_ddim_eta0_ode_sends_noise_to_the_prior():
    """With many steps DDIM (eta 0) maps N(0, I) to N(m, s²) (the probability-flow ODE)."""
    B, N = 2048, 1000
    res = ddim.sample(
        EPS_2x2, (B, 2, 2, 2), ddim.DDIMConfig(num_steps=N, eta=0.0), jax.random.key(2)
    )
    x = np.asarray(res.x0_pred, np.float64)
    # The 1000-step discretisation and the N(0, I) start (mean 0, not sqrt(a_T) m) offset the
    # exact law by these float64 closed-form amounts, small next to the Monte Carlo errors:
    K, _ = _ddim_gain(S, N, 0.0)
    bias_std = np.abs(K - S)  # <= 0.5% of s
    bias_mean = np.abs(K * np.sqrt(AC64[diffusion.timesteps(N)[0]]) * M)  # <= 1% of |m|
    se_mean = S / np.sqrt(B)
    se_std = S / np.sqrt(2 * B)
    assert np.all(bias_std < se_std) and np.all(bias_mean < se_mean)
    np.testing.assert_array_less(np.abs(x.mean(0) - M), 4.5 * se_mean + bias_mean)
    np.testing.assert_array_less(np.abs(x.std(0) - S), 4.5 * se_std + bias_std)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_mean_and_variance_match_closed_form(eta):
    """x_0 = m + K (x_T - sqrt(a_T) m) + noise of variance c (closed form), x_T ~ N(0, I)."""
    B, N = 4096, 20
    res = ddim.sample(
        EPS_2x2, (B, 2, 2, 2), ddim.DDIMConfig(num_steps=N, eta=eta), jax.random.key(3)
    )
    x = np.asarray(res.x0_pred, np.float64)
    K, c = _ddim_gain(S, N, eta)
    a_T = AC64[diffusion.timesteps(N)[0]]
    mean = M - K * np.sqrt(a_T) * M
    var = K**2 + c
    se_mean = np.sqrt(var / B)
    se_var = var * np.sqrt(2.0 / (B - 1))
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4.5 * se_mean)
    np.testing.assert_array_less(np.abs(x.var(0, ddof=1) - var), 4.5 * se_var)


# ------------------------------------------------------------------------------------------------
# DDRM: exact posterior mean of a Gaussian prior with noiseless measurements.


def _ddrm_observed_law(s):
    """Noiseless observed component (before-branch, η_b = 1): the state fed to the last step
    (t = 0) is sqrt(a0) (ȳ + σ_0 z) with σ_0 = sqrt((1-a0)/a0), and the result is the prior
    denoiser E[x0 | x_0-state] = m + g (ȳ + σ_0 z - m), g = a0 s² / (a0 s² + 1 - a0).
    Returns (g, std) in float64: mean = ȳ - (1 - g)(ȳ - m), std = g σ_0."""
    a0 = AC64[0]
    g = a0 * s**2 / (a0 * s**2 + 1 - a0)
    return g, g * np.sqrt((1 - a0) / a0)


@pytest.mark.parametrize("real_op", [False, True], ids=["toy_mask", "Inpainting"])
def test_ddrm_inpainting_recovers_the_exact_posterior_mean(real_op):
    """Prior N(m, diag s²), y = mask * x (sigma_y = 0): the posterior mean is y on observed
    pixels and m elsewhere (independent pixels). DDRM's samples average to it within Monte Carlo
    tolerance; the small deterministic offsets DDRM has at finite steps (float64 closed forms:
    the last step's shrinkage (1 - g)(y - m) ~ 1e-4, and the N(0, I) start's K sqrt(a_T) m ~ 1e-2
    m) are added to the tolerance, and the per-pixel variance matches DDRM's closed form."""
    H, W, C = 4, 4, 2
    key_m, key_s, key_x, key_mask, key_run = jax.random.split(jax.random.key(4), 5)
    m = np.asarray(jax.random.uniform(key_m, (H, W, C), minval=-0.5, maxval=0.5), np.float64)
    s = np.asarray(jax.random.uniform(key_s, (H, W, C), minval=0.4, maxval=1.0), np.float64)
    mask = np.asarray(jax.random.bernoulli(key_mask, 0.5, (H, W, C)), np.float32)
    x_true = m + s * np.asarray(jax.random.normal(key_x, (H, W, C)), np.float64)
    op = Inpainting.create((H, W, C), mask=mask) if real_op else MaskOp(jnp.asarray(mask))
    y1 = np.asarray(op.A(jnp.asarray(x_true, jnp.float32)), np.float64)
    B, N, eta = 4096, 20, 0.85
    y = jnp.broadcast_to(jnp.asarray(y1, jnp.float32), (B, H, W, C))
    cfg = ddrm.DDRMConfig(num_steps=N, eta=eta)
    out = np.asarray(ddrm.solve(gaussian_eps_fn(m, s), op, y, cfg, key_run).x0_pred, np.float64)

    post_mean = mask * y1 + (1 - mask) * m
    g, sd_obs = _ddrm_observed_law(s)
    K, c = _ddrm_unobserved_gain(s, N, eta)
    a_T = AC64[diffusion.timesteps(N)[0]]
    offset = np.where(mask > 0, (1 - g) * np.abs(y1 - m), np.abs(K * np.sqrt(a_T) * m))
    sd = np.where(mask > 0, sd_obs, np.sqrt(K**2 + c))
    assert np.all(offset < 0.02)  # the offsets are small: this is a posterior-mean check
    err = np.abs(out.mean(0) - post_mean)
    np.testing.assert_array_less(err, 5 * sd / np.sqrt(B) + offset)
    # Spread: DDRM's closed-form per-pixel variance (5 standard errors of a variance estimate).
    np.testing.assert_array_less(
        np.abs(out.var(0, ddof=1) - sd**2), 5 * sd**2 * np.sqrt(2.0 / (B - 1))
    )


@pytest.mark.parametrize("real_op", [False, True], ids=["toy_pool", "AvgPoolSR"])
def test_ddrm_super_resolution_recovers_the_exact_posterior_mean(real_op):
    """Isotropic prior N(m, s² I), noiseless y = A x (2x2 block mean): the posterior mean is
    m + A⁺(y - A m) (float64 closed form). Exercises the SVD path with V != identity."""
    H, W, C, s = 4, 4, 1, 0.7
    key_m, key_x, key_run = jax.random.split(jax.random.key(5), 3)
    m = np.asarray(jax.random.uniform(key_m, (H, W, C), minval=-0.5, maxval=0.5), np.float64)
    x_true = m + s * np.asarray(jax.random.normal(key_x, (H, W, C)), np.float64)
    op = AvgPoolSR.create((H, W, C), factor=2) if real_op else PoolOp((H, W, C), 2)
    pool = lambda v: v.reshape(2, 2, 2, 2, C).mean(axis=(1, 3))  # noqa: E731
    up = lambda v: np.repeat(np.repeat(v, 2, 0), 2, 1)  # noqa: E731  (A⁺ = replication)
    y1 = pool(x_true)
    post_mean = m + up(y1 - pool(m))
    B, N = 4096, 20
    y = jnp.broadcast_to(jnp.asarray(y1, jnp.float32), (B, 2, 2, C))
    cfg = ddrm.DDRMConfig(num_steps=N)
    out = np.asarray(ddrm.solve(gaussian_eps_fn(m, s), op, y, cfg, key_run).x0_pred, np.float64)
    g, sd_obs = _ddrm_observed_law(np.float64(s))
    K, c = _ddrm_unobserved_gain(np.float64(s), N, cfg.eta)
    a_T = AC64[diffusion.timesteps(N)[0]]
    # Offsets (closed form): observed part shrunk by (1 - g); null-space part starts at 0.
    offset = np.abs((1 - g) * up(y1 - pool(m))) + np.abs(K * np.sqrt(a_T) * (m - up(pool(m))))
    # Per pixel: 1/4 of the observed component's variance (V's block vector is 1/2 per pixel),
    # 3/4 of the unobserved components'.
    sd = np.sqrt(sd_obs**2 / 4 + 3 * (K**2 + c) / 4)
    err = np.abs(out.mean(0) - post_mean)
    assert np.all(offset < 0.02)
    np.testing.assert_array_less(err, 5 * sd / np.sqrt(B) + offset)
    # Data consistency of every sample: A x = g y + (1 - g) A m + O(sigma_0 noise), float64.
    Ax = out.reshape(B, 2, 2, 2, 2, C).mean(axis=(2, 4))
    np.testing.assert_array_less(np.abs(Ax - (g * y1 + (1 - g) * pool(m))), 6 * sd_obs)


# ------------------------------------------------------------------------------------------------
# DPS / ΠGDM: one step (t = 0, s = -1) against a float64 closed form of the gradient.


def _one_step_setup(seed=6):
    H, W, C = 4, 4, 1
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    m = np.asarray(jax.random.uniform(k1, (H, W, C), minval=-0.5, maxval=0.5), np.float64)
    s = 0.6
    B = 3
    y = np.asarray(jax.random.normal(k2, (B, 2, 2, C)), np.float64) * 0.5
    init = np.asarray(jax.random.normal(k3, (B, H, W, C)), np.float64)
    return m, s, y, init


def _x0_affine(m, s, a):
    """x̂0(x_t) = m + g (x_t - sqrt(a) m) with g = sqrt(a) s² / (a s² + 1 - a)."""
    return np.sqrt(a) * s**2 / (a * s**2 + 1 - a)


def test_dps_one_step_matches_float64_closed_form():
    m, s, y, init = _one_step_setup()
    op = PoolOp((4, 4, 1), 2)
    a = AC64[0]
    g = _x0_affine(m, s, a)
    A = lambda x: x.reshape(-1, 2, 2, 2, 2, 1).mean(axis=(2, 4))  # noqa: E731
    At = lambda r: np.repeat(np.repeat(r, 2, 1), 2, 2) / 4  # noqa: E731  (adjoint of A)
    x_t = np.sqrt(a) * np.repeat(np.repeat(y, 2, 1), 2, 2) + np.sqrt(1 - a) * init
    x0 = m + g * (x_t - np.sqrt(a) * m)
    r = y - A(x0)
    grad = -2 * g * At(r)  # d/dx_t sum ||y - A x0(x_t)||²
    norm = np.sqrt((r**2).reshape(3, -1).sum(1)).reshape(-1, 1, 1, 1)
    zeta = 0.7
    ref = x0 - zeta / norm * grad  # a_s = 1: c1 = c2 = 0
    cfg = dps.DPSConfig(num_steps=1, zeta=zeta, eta=1.0)
    noise = {"init": jnp.asarray(init, jnp.float32), "z": jnp.ones((1, 3, 4, 4, 1))}
    res = dps.solve(
        gaussian_eps_fn(m, s), op, jnp.asarray(y, jnp.float32), cfg, jax.random.key(0), noise=noise
    )
    np.testing.assert_allclose(np.asarray(res.x0_pred), ref, atol=2e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(res.info["residual_norm"])[0], norm.ravel(), rtol=1e-5)
    # remat recomputes the network in the backward pass: same numbers.
    cfg_r = dps.DPSConfig(num_steps=1, zeta=zeta, eta=1.0, remat=True)
    res_r = dps.solve(
        gaussian_eps_fn(m, s),
        op,
        jnp.asarray(y, jnp.float32),
        cfg_r,
        jax.random.key(0),
        noise=noise,
    )
    np.testing.assert_allclose(
        np.asarray(res_r.x0_pred), np.asarray(res.x0_pred), rtol=1e-6, atol=1e-6
    )


def test_pgdm_one_step_matches_float64_closed_form():
    m, s, y, init = _one_step_setup(7)
    op = PoolOp((4, 4, 1), 2)
    ts = diffusion.timesteps(2)  # [500, 0]: check the first step (t = 500, s = 0)
    a, a_s = AC64[ts[0]], AC64[ts[1]]
    g = _x0_affine(m, s, a)
    up = lambda r: np.repeat(np.repeat(r, 2, 1), 2, 2)  # noqa: E731  (A⁺)
    A = lambda x: x.reshape(-1, 2, 2, 2, 2, 1).mean(axis=(2, 4))  # noqa: E731
    aT = AC64[ts[0]]
    x_t = np.sqrt(aT) * up(y) + np.sqrt(1 - aT) * init
    x0 = m + g * (x_t - np.sqrt(a) * m)
    eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)
    resid = up(y) - up(A(x0))
    grad = g * resid  # VJP of x0(x_t) = m + g(x_t - ...) with cotangent resid
    eta, w = 0.6, 1.3
    z = np.asarray(jax.random.normal(jax.random.key(9), (2, 3, 4, 4, 1)), np.float64)
    c1 = eta * np.sqrt((1 - a / a_s) * (1 - a_s) / (1 - a))
    c2 = np.sqrt(1 - a_s - c1**2)
    ref = np.sqrt(a_s) * x0 + c1 * z[0] + c2 * eps + np.sqrt(a_s) * np.sqrt(a) * w * grad
    cfg = pgdm.PGDMConfig(num_steps=2, w=w, eta=eta)
    noise = {"init": jnp.asarray(init, jnp.float32), "z": jnp.asarray(z, jnp.float32)}
    res = pgdm.solve(
        gaussian_eps_fn(m, s),
        op,
        jnp.asarray(y, jnp.float32),
        cfg,
        jax.random.key(0),
        noise=noise,
        trajectory=True,
    )
    np.testing.assert_allclose(np.asarray(res.xs[0]), ref, atol=2e-6 * np.abs(ref).max() + 1e-6)
    np.testing.assert_allclose(np.asarray(res.x0s[0]), x0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# DiffPIR.


def _dense(op, shape):
    """float64 matrix of a linear operator on one image (columns = A of basis images)."""
    n = int(np.prod(shape))
    cols = jax.vmap(lambda e: op.A(e.reshape(shape)).reshape(-1))(jnp.eye(n, dtype=jnp.float32))
    return np.asarray(cols, np.float64).T


@pytest.mark.parametrize("which", ["toy_pool", "AvgPoolSR", "Inpainting"])
def test_diffpir_closed_form_prox_solves_the_normal_equations(which):
    """x̂ = (AᵀA + rho I)⁻¹ (Aᵀy + rho x0), float64 dense reference."""
    shape = (4, 4, 2)
    k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
    mask = jax.random.bernoulli(k3, 0.6, shape).astype(jnp.float32)
    op = {
        "toy_pool": PoolOp(shape, 2),
        "AvgPoolSR": AvgPoolSR.create(shape, factor=2),
        "Inpainting": Inpainting.create(shape, mask=mask),
    }[which]
    x0 = jax.random.normal(k1, (2, *shape))
    y = jax.vmap(op.A)(jax.random.normal(k2, (2, *shape)))
    Am = _dense(op, shape)
    for rho in (0.05, 3.0):
        got = np.asarray(diffpir.prox(op, y, x0, rho, mode="svd"), np.float64)
        lhs = Am.T @ Am + rho * np.eye(Am.shape[1])
        rhs = np.asarray(y, np.float64).reshape(2, -1) @ Am + rho * np.asarray(x0).reshape(2, -1)
        ref = np.linalg.solve(lhs, rhs.T).T.reshape(got.shape)
        np.testing.assert_allclose(got, ref, atol=2e-5)  # float32 SVD round trip
        # The gradient fallback converges to the same minimiser (contraction 1 - rho/(1+rho)).
        grad = diffpir.prox(op, y, x0, rho, mode="gradient", steps=400, lr=1.0)
        np.testing.assert_allclose(np.asarray(grad), ref, atol=1e-4)


def test_diffpir_with_infinite_lambda_and_zeta0_is_ddim_eta0():
    """lam -> inf keeps x0 (prox = identity) and zeta = 0 removes fresh noise: the update is then
    exactly DDIM with eta = 0 from the same x_T (identity check)."""
    B, N = 4, 10
    op = PoolOp((2, 2, 2), 2)
    y = jax.random.normal(jax.random.key(12), (B, 1, 1, 2))
    x_T = jax.random.normal(jax.random.key(13), (B, 2, 2, 2))
    a_T = AC32[diffusion.timesteps(N)[0]]
    # DiffPIR starts at sqrt(a_T) A⁺y + sqrt(1 - a_T) n: choose n so that its x_T is ours.
    n = (x_T - jnp.sqrt(a_T) * jax.vmap(op.A_dagger)(y)) / jnp.sqrt(1 - a_T)
    z = jnp.zeros((N, B, 2, 2, 2))
    cfg = diffpir.DiffPIRConfig(num_steps=N, lam=1e20, zeta=0.0)
    got = diffpir.solve(EPS_2x2, op, y, cfg, jax.random.key(0), noise={"init": n, "z": z})
    ref = ddim.sample(
        EPS_2x2, (B, 2, 2, 2), ddim.DDIMConfig(num_steps=N, eta=0.0), jax.random.key(0),
        noise={"init": x_T, "z": z},
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got.x0_pred), np.asarray(ref.x0_pred), atol=2e-5)


def test_diffpir_nonlinear_operator_uses_gradient_prox():
    op = SquareOpWithInit((2, 2, 2))
    y = jnp.full((3, 2, 2, 2), 0.25)
    cfg = diffpir.DiffPIRConfig(num_steps=10, sigma_y=0.05)
    res = diffpir.solve(EPS_2x2, op, y, cfg, jax.random.key(1))
    assert res.x0_pred.shape == (3, 2, 2, 2) and bool(jnp.all(jnp.isfinite(res.x0_pred)))
    with pytest.raises(TypeError, match="SVD"):
        diffpir.solve(EPS_2x2, op, y, dataclasses.replace(cfg, prox="svd"), jax.random.key(1))


# ------------------------------------------------------------------------------------------------
# Structure: one scan under jit, cached executables, vmap over measurements.

SHAPE = (2, 2, 2)
TOY = PoolOp(SHAPE, 2)
Y3 = jax.random.normal(jax.random.key(20), (3, 1, 1, 2)) * 0.3
N_STEPS = 8

SOLVERS = {
    "ddim": (ddim, ddim.DDIMConfig(num_steps=N_STEPS, eta=1.0), ddim._ddim_jit),
    "dps": (dps, dps.DPSConfig(num_steps=N_STEPS, zeta=0.5, eta=1.0), dps._dps_jit),
    "pgdm": (pgdm, pgdm.PGDMConfig(num_steps=N_STEPS, eta=1.0), pgdm._pgdm_jit),
    "ddrm": (ddrm, ddrm.DDRMConfig(num_steps=N_STEPS, sigma_y=0.05), ddrm._ddrm_jit),
    "diffpir": (diffpir, diffpir.DiffPIRConfig(num_steps=N_STEPS), diffpir._diffpir_jit),
}


def _noise(B, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "init": jax.random.normal(k1, (B, *SHAPE)),
        "z": jax.random.normal(k2, (N_STEPS, B, *SHAPE)),
    }


def _scans(jaxpr):
    """Top-level scan equations of the (single) jitted call inside ``jaxpr``."""
    calls = [e for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
    assert len(calls) == 1, [e.primitive.name for e in jaxpr.eqns]
    inner = calls[0].params["jaxpr"].jaxpr
    return [e for e in inner.eqns if e.primitive.name == "scan"]


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_is_one_jitted_scan_and_cached(name):
    mod, cfg, jitted = SOLVERS[name]
    key = jax.random.key(0)
    jaxpr = jax.make_jaxpr(lambda y: mod.solve(EPS_2x2, TOY, y, cfg, key).x0_pred)(Y3)
    scans = _scans(jaxpr.jaxpr)
    assert len(scans) == 1 and scans[0].params["length"] == N_STEPS
    # Same structure and config: the compiled function is reused (new y, key, noise values).
    mod.solve(EPS_2x2, TOY, Y3, cfg, jax.random.key(1))
    size = jitted._cache_size()
    mod.solve(EPS_2x2, TOY, Y3 + 1.0, cfg, jax.random.key(2))
    assert jitted._cache_size() == size


class GaussModel(flax.struct.PyTreeNode):
    """A pytree 'model' whose parameters (m, s) must stay traced arguments, not constants."""

    m: jnp.ndarray
    s: jnp.ndarray

    def eps(self, x_t, t):
        return gaussian_eps_fn(self.m, self.s)(x_t, t)


def test_model_parameters_are_arguments_not_constants():
    _, cfg, jitted = SOLVERS["ddrm"]
    m1 = GaussModel(jnp.asarray(M), jnp.asarray(S))
    m2 = GaussModel(jnp.asarray(M) + 0.5, jnp.asarray(S))
    r1 = ddrm.solve(m1.eps, TOY, Y3, cfg, jax.random.key(0), noise=_noise(3))
    size = jitted._cache_size()
    r2 = ddrm.solve(m2.eps, TOY, Y3, cfg, jax.random.key(0), noise=_noise(3))
    assert jitted._cache_size() == size  # a new bound method and new values: no retrace
    ref = ddrm.solve(gaussian_eps_fn(M + 0.5, S), TOY, Y3, cfg, jax.random.key(0), noise=_noise(3))
    np.testing.assert_allclose(np.asarray(r2.x0_pred), np.asarray(ref.x0_pred), atol=1e-6)
    assert not np.allclose(np.asarray(r1.x0_pred), np.asarray(r2.x0_pred))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_batch_equals_separate_solves_and_vmap(name):
    """A batch of B measurements = B separate solves (same draws); jax.vmap over measurements
    (and over per-measurement operators) gives the same."""
    mod, cfg, _ = SOLVERS[name]
    noise = _noise(3)
    batch = mod.solve(EPS_2x2, TOY, Y3, cfg, jax.random.key(0), noise=noise).x0_pred
    for b in range(3):
        nb = {"init": noise["init"][b : b + 1], "z": noise["z"][:, b : b + 1]}
        one = mod.solve(EPS_2x2, TOY, Y3[b : b + 1], cfg, jax.random.key(0), noise=nb).x0_pred
        np.testing.assert_allclose(np.asarray(one[0]), np.asarray(batch[b]), atol=1e-5)

    def single(y, init, z):
        nb = {"init": init[None], "z": z[:, None]}
        return mod.solve(EPS_2x2, TOY, y[None], cfg, jax.random.key(0), noise=nb).x0_pred[0]

    vm = jax.vmap(single, in_axes=(0, 0, 1))(Y3, noise["init"], noise["z"])
    np.testing.assert_allclose(np.asarray(vm), np.asarray(batch), atol=1e-5)


def test_vmap_over_per_measurement_operators():
    """Different masks per measurement in one vmapped call (DDRM: the SVD differs per image)."""
    mod, cfg, _ = SOLVERS["ddrm"]
    masks = jax.random.bernoulli(jax.random.key(21), 0.5, (3, *SHAPE)).astype(jnp.float32)
    ops = jax.vmap(MaskOp)(masks)
    ys = jax.random.normal(jax.random.key(22), (3, *SHAPE)) * masks
    keys = jax.random.split(jax.random.key(23), 3)

    def one(o, y, k):
        return mod.solve(EPS_2x2, o, y[None], cfg, k).x0_pred[0]

    vm = jax.vmap(one)(ops, ys, keys)
    for b in range(3):
        ref = one(MaskOp(masks[b]), ys[b], keys[b])
        np.testing.assert_allclose(np.asarray(vm[b]), np.asarray(ref), atol=1e-5)


def test_pgdm_project_replaces_observed_pixels_like_official_in2():
    """project=True on inpainting: x̂0 = x0 (1 - mask) + y mask (the official in2 path)."""
    masks = jax.random.bernoulli(jax.random.key(24), 0.5, SHAPE).astype(jnp.float32)
    op = MaskOp(masks)
    y = jax.random.normal(jax.random.key(25), (3, *SHAPE)) * masks
    cfg = pgdm.PGDMConfig(num_steps=N_STEPS, eta=1.0, project=True)
    res = pgdm.solve(EPS_2x2, op, y, cfg, jax.random.key(0), trajectory=True)
    np.testing.assert_allclose(
        np.asarray(res.x0s * masks), np.asarray(jnp.broadcast_to(y, res.x0s.shape)), atol=1e-6
    )
    # awd=False recomputes eps from x0: without projection that is the network's eps again.
    base = SOLVERS["pgdm"][1]
    r1 = pgdm.solve(EPS_2x2, TOY, Y3, base, jax.random.key(0), noise=_noise(3))
    r2 = pgdm.solve(
        EPS_2x2, TOY, Y3, dataclasses.replace(base, awd=False), jax.random.key(0), noise=_noise(3)
    )
    assert np.all(np.isfinite(np.asarray(r2.x0_pred)))
    assert not np.allclose(np.asarray(r1.x0_pred), np.asarray(r2.x0_pred))


def test_same_key_same_result_and_keys_matter():
    cfg = SOLVERS["dps"][1]
    a = dps.solve(EPS_2x2, TOY, Y3, cfg, jax.random.key(3)).x0_pred
    b = dps.solve(EPS_2x2, TOY, Y3, cfg, jax.random.key(3)).x0_pred
    c = dps.solve(EPS_2x2, TOY, Y3, cfg, jax.random.key(4)).x0_pred
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors.


def test_missing_capabilities_are_clear_errors():
    y_sq = jnp.ones((2, *SHAPE))
    with pytest.raises(TypeError, match="SVD capability"):
        ddrm.solve(EPS_2x2, SquareOpWithInit(SHAPE), y_sq, ddrm.DDRMConfig(), jax.random.key(0))
    with pytest.raises(TypeError, match="SVD capability"):
        ddrm.solve(EPS_2x2, HDR.create(SHAPE), y_sq, ddrm.DDRMConfig(), jax.random.key(0))
    with pytest.raises(TypeError, match="SVD capability"):
        pr = PhaseRetrieval.create(SHAPE, pad=1)
        ddrm.solve(EPS_2x2, pr, jnp.ones((2, *pr.y_shape)), ddrm.DDRMConfig(), jax.random.key(0))
    with pytest.raises(TypeError, match="A_dagger"):
        pgdm.solve(EPS_2x2, SquareOp(SHAPE), y_sq, pgdm.PGDMConfig(), jax.random.key(0))
    with pytest.raises(TypeError, match="A_dagger"):
        dps.solve(EPS_2x2, SquareOp(SHAPE), y_sq, dps.DPSConfig(), jax.random.key(0))
    with pytest.raises(TypeError, match="`A` method"):
        dps.solve(EPS_2x2, object(), y_sq, dps.DPSConfig(), jax.random.key(0))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bad_arguments_are_clear_errors(name):
    mod, cfg, _ = SOLVERS[name]
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"y: expected shape \[B, \*\(1, 1, 2\)\]"):
        mod.solve(EPS_2x2, TOY, jnp.ones((3, 2, 2, 2)), cfg, key)
    with pytest.raises(ValueError, match="add a leading batch axis"):
        mod.solve(EPS_2x2, TOY, Y3[0], cfg, key)
    with pytest.raises(ValueError, match="finite"):
        mod.solve(EPS_2x2, TOY, Y3.at[0, 0, 0, 0].set(jnp.nan), cfg, key)
    with pytest.raises(ValueError, match=r'noise\["z"\]: expected shape \(8, 3, 2, 2, 2\)'):
        mod.solve(EPS_2x2, TOY, Y3, cfg, key, noise={"init": _noise(3)["init"], "z": jnp.ones(3)})
    with pytest.raises(ValueError, match='keys "init" and "z"'):
        mod.solve(EPS_2x2, TOY, Y3, cfg, key, noise={"init": _noise(3)["init"]})
    with pytest.raises(TypeError, match="config: expected a"):
        other = ddim.DDIMConfig() if name != "ddim" else dps.DPSConfig()
        mod.solve(EPS_2x2, TOY, Y3, other, key)
    with pytest.raises(TypeError, match="eps_fn: expected a callable"):
        mod.solve(None, TOY, Y3, cfg, key)
    with pytest.raises(TypeError, match="key: expected a jax PRNG key"):
        mod.solve(EPS_2x2, TOY, Y3, cfg, 0)
    with pytest.raises(ValueError, match="eps_fn: expected an output of shape"):
        mod.solve(lambda x, t: x[..., :1], TOY, Y3, cfg, key)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="num_steps"):
        dps.DPSConfig(num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        ddim.DDIMConfig(num_steps=1001)
    with pytest.raises(ValueError, match="schedule"):
        pgdm.PGDMConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="eta"):
        ddim.DDIMConfig(eta=-1.0)
    with pytest.raises(ValueError, match="eta"):
        ddrm.DDRMConfig(eta=1.5)
    with pytest.raises(ValueError, match="sigma_y"):
        ddrm.DDRMConfig(sigma_y=-0.1)
    with pytest.raises(ValueError, match="prox"):
        diffpir.DiffPIRConfig(prox="newton")
    with pytest.raises(ValueError, match="zeta"):
        diffpir.DiffPIRConfig(zeta=2.0)
    with pytest.raises(TypeError, match="remat"):
        dps.DPSConfig(remat=1)
    with pytest.raises(ValueError, match="shape"):
        ddim.sample(EPS_2x2, (2, 2, 2), ddim.DDIMConfig(), jax.random.key(0))
