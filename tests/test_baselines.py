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

from reddiff_jax import diffusion, solvers
from reddiff_jax.operators import HDR, AvgPoolSR, Inpainting, PhaseRetrieval
from reddiff_jax.solvers import ddim, ddrm, diffpir, dps, driver, pgdm

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
    res = solvers.sample(
        ddim.DDIMConfig(num_steps=N, eta=0.0), EPS_2x2, (B, 2, 2, 2), jax.random.key(1), noise=noise
    )
    K, _ = _ddim_gain(S, N, 0.0)
    a_T = AC64[diffusion.timesteps(N)[0]]
    ref = M + K * (np.asarray(x_T, np.float64) - np.sqrt(a_T) * M)
    # float32 rounding over 20 steps of O(1) values: 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(res.x), ref, atol=1e-5)
    # Deterministic: the z noise is ignored when eta = 0.
    noise2 = {"init": x_T, "z": jnp.ones((N, B, 2, 2, 2))}
    res2 = solvers.sample(
        ddim.DDIMConfig(num_steps=N, eta=0.0),
        EPS_2x2,
        (B, 2, 2, 2),
        jax.random.key(1),
        noise=noise2,
    )
    np.testing.assert_array_equal(np.asarray(res.x), np.asarray(res2.x))


def test_ddim_eta0_ode_sends_noise_to_the_prior():
    """With many steps DDIM (eta 0) maps N(0, I) to N(m, s²) (the probability-flow ODE)."""
    B, N = 2048, 1000
    res = solvers.sample(
        ddim.DDIMConfig(num_steps=N, eta=0.0), EPS_2x2, (B, 2, 2, 2), jax.random.key(2)
    )
    x = np.asarray(res.x, np.float64)
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
    res = solvers.sample(
        ddim.DDIMConfig(num_steps=N, eta=eta), EPS_2x2, (B, 2, 2, 2), jax.random.key(3)
    )
    x = np.asarray(res.x, np.float64)
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
    out = np.asarray(solvers.solve(cfg, gaussian_eps_fn(m, s), op, y, key_run).x, np.float64)

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
    out = np.asarray(solvers.solve(cfg, gaussian_eps_fn(m, s), op, y, key_run).x, np.float64)
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
    res = solvers.solve(
        cfg,
        gaussian_eps_fn(m, s),
        op,
        jnp.asarray(y, jnp.float32),
        jax.random.key(0),
        noise=noise,
        trajectory=True,
    )
    np.testing.assert_allclose(np.asarray(res.x), ref, atol=2e-5 * np.abs(ref).max())
    # x̂0 against the float64 closed form, then the norm arithmetic on that float32 x̂0: the
    # residual is a ~1% cancellation of y, so a float64 norm from the float64 x̂0 would differ by
    # ~eps32 |y| / |r| ~ 1e-5 through x̂0's own rounding alone.
    x0_32 = np.asarray(res.trajectory["x0"][0], np.float64)
    np.testing.assert_allclose(x0_32, x0, rtol=0, atol=1e-6 * np.abs(x0).max())
    y32 = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    r32 = y32 - A(x0_32)
    norm32 = np.sqrt((r32**2).reshape(3, -1).sum(1))
    # float32 rounding of y - A(x̂0) (a mean of 4 and a difference): <= 4 eps32 max|y| per entry,
    # so <= 4 eps32 max|y| sqrt(n) on the norm of the n = 4 entries.
    bound = 4 * np.finfo(np.float32).eps * np.abs(y).max() * np.sqrt(r32[0].size)
    np.testing.assert_allclose(np.asarray(res.info["residual_norm"])[0], norm32, atol=bound)
    np.testing.assert_allclose(norm32, norm.ravel(), rtol=1e-4)  # the conditioning bound above
    # remat recomputes the network in the backward pass: same numbers.
    cfg_r = dps.DPSConfig(num_steps=1, zeta=zeta, eta=1.0, remat=True)
    res_r = solvers.solve(
        cfg_r,
        gaussian_eps_fn(m, s),
        op,
        jnp.asarray(y, jnp.float32),
        jax.random.key(0),
        noise=noise,
    )
    np.testing.assert_allclose(np.asarray(res_r.x), np.asarray(res.x), rtol=1e-6, atol=1e-6)


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
    res = solvers.solve(
        cfg,
        gaussian_eps_fn(m, s),
        op,
        jnp.asarray(y, jnp.float32),
        jax.random.key(0),
        noise=noise,
        trajectory=True,
    )
    np.testing.assert_allclose(
        np.asarray(res.trajectory["x"][0]), ref, atol=2e-6 * np.abs(ref).max() + 1e-6
    )
    np.testing.assert_allclose(np.asarray(res.trajectory["x0"][0]), x0, atol=1e-5)


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
    got = solvers.solve(cfg, EPS_2x2, op, y, jax.random.key(0), noise={"init": n, "z": z})
    ref = solvers.sample(
        ddim.DDIMConfig(num_steps=N, eta=0.0),
        EPS_2x2,
        (B, 2, 2, 2),
        jax.random.key(0),
        noise={"init": x_T, "z": z},
    )
    np.testing.assert_allclose(np.asarray(got.x), np.asarray(ref.x), atol=2e-5)


def test_diffpir_nonlinear_operator_uses_gradient_prox():
    op = SquareOpWithInit((2, 2, 2))
    y = jnp.full((3, 2, 2, 2), 0.25)
    cfg = diffpir.DiffPIRConfig(num_steps=10, sigma_y=0.05)
    res = solvers.solve(cfg, EPS_2x2, op, y, jax.random.key(1))
    assert res.x.shape == (3, 2, 2, 2) and bool(jnp.all(jnp.isfinite(res.x)))
    with pytest.raises(TypeError, match="SVD"):
        solvers.solve(dataclasses.replace(cfg, prox="svd"), EPS_2x2, op, y, jax.random.key(1))


# ------------------------------------------------------------------------------------------------
# Structure: one scan under jit, cached executables, vmap over measurements.

SHAPE = (2, 2, 2)
TOY = PoolOp(SHAPE, 2)
Y3 = jax.random.normal(jax.random.key(20), (3, 1, 1, 2)) * 0.3
N_STEPS = 8

# name -> (config, a hyper-parameter of it and a second value for it).
SOLVERS = {
    "ddim": (ddim.DDIMConfig(num_steps=N_STEPS, eta=1.0), "eta", 0.5),
    "dps": (dps.DPSConfig(num_steps=N_STEPS, zeta=0.5, eta=1.0), "zeta", 0.3),
    "pgdm": (pgdm.PGDMConfig(num_steps=N_STEPS, eta=1.0), "w", 0.7),
    "ddrm": (ddrm.DDRMConfig(num_steps=N_STEPS, sigma_y=0.05), "eta", 0.5),
    "diffpir": (diffpir.DiffPIRConfig(num_steps=N_STEPS), "lam", 2.0),
}
JITTED = (driver._init_jit, driver._chunk_jit, driver._finish_jit)


def _cache_sizes():
    return tuple(f._cache_size() for f in JITTED)


def _noise(B, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "init": jax.random.normal(k1, (B, *SHAPE)),
        "z": jax.random.normal(k2, (N_STEPS, B, *SHAPE)),
    }


def _scans(jaxpr):
    """Scan equations of ``jaxpr``: at its top level and inside its top-level jitted calls, which
    must include the driver's three (init, the scan over the steps, finish), once each."""
    calls = [e for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
    driver_calls = [
        c.params["name"]
        for c in calls
        if c.params["name"].startswith(("_init", "_chunk", "_finish"))
    ]
    assert driver_calls == ["_init_core", "_chunk_core", "_finish_core"], driver_calls
    eqns = [*jaxpr.eqns, *(e for c in calls for e in c.params["jaxpr"].jaxpr.eqns)]
    return [e for e in eqns if e.primitive.name == "scan"]


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_is_one_jitted_scan_and_cached(name):
    cfg, hyper_name, hyper_value = SOLVERS[name]
    key = jax.random.key(0)
    jaxpr = jax.make_jaxpr(lambda y: solvers.solve(cfg, EPS_2x2, TOY, y, key, throw=False).x)(Y3)
    scans = _scans(jaxpr.jaxpr)
    assert len(scans) == 1 and scans[0].params["length"] == N_STEPS
    # Same structure and config: the compiled functions are reused (new y, key, noise and
    # hyper-parameter values).
    solvers.solve(cfg, EPS_2x2, TOY, Y3, jax.random.key(1))
    size = _cache_sizes()
    solvers.solve(cfg, EPS_2x2, TOY, Y3 + 1.0, jax.random.key(2))
    new_cfg = dataclasses.replace(cfg, **{hyper_name: hyper_value})
    solvers.solve(new_cfg, EPS_2x2, TOY, Y3 - 1.0, jax.random.key(3))
    assert _cache_sizes() == size


class GaussModel(flax.struct.PyTreeNode):
    """A pytree 'model' whose parameters (m, s) must stay traced arguments, not constants."""

    m: jnp.ndarray
    s: jnp.ndarray

    def eps(self, x_t, t):
        return gaussian_eps_fn(self.m, self.s)(x_t, t)


def test_model_parameters_are_arguments_not_constants():
    cfg = SOLVERS["ddrm"][0]
    m1 = GaussModel(jnp.asarray(M), jnp.asarray(S))
    m2 = GaussModel(jnp.asarray(M) + 0.5, jnp.asarray(S))
    r1 = solvers.solve(cfg, m1.eps, TOY, Y3, jax.random.key(0), noise=_noise(3))
    size = _cache_sizes()
    r2 = solvers.solve(cfg, m2.eps, TOY, Y3, jax.random.key(0), noise=_noise(3))
    assert _cache_sizes() == size  # a new bound method and new values: no retrace
    ref = solvers.solve(
        cfg, gaussian_eps_fn(M + 0.5, S), TOY, Y3, jax.random.key(0), noise=_noise(3)
    )
    np.testing.assert_allclose(np.asarray(r2.x), np.asarray(ref.x), atol=1e-6)
    assert not np.allclose(np.asarray(r1.x), np.asarray(r2.x))


class _CompileCounter:
    """Counts XLA backend compilations while active (a ``jax.monitoring`` duration listener)."""

    def __init__(self):
        self.count = 0
        self.active = False

    def __call__(self, event, duration, **kwargs):
        del duration, kwargs
        if self.active and "backend_compile" in event:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False  # stays inert if it cannot be unregistered
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None) or getattr(
            jax.monitoring, "_unregister_event_duration_listener_by_callback", None
        )
        if unregister is not None:
            unregister(self)


def test_hyperparameter_sweep_compiles_once():
    """Numeric hyper-parameters are traced: a sweep over DPS zeta (solve) or DDRM eta
    (solve_many) compiles nothing after the first call; solve_many over [M] etas equals M
    separate solves."""
    keys = [jax.random.key(k) for k in range(4)]
    zetas = [0.2, 0.7, 1.3]
    solvers.solve(dps.DPSConfig(num_steps=3, zeta=0.1), EPS_2x2, TOY, Y3, keys[0])  # warm-up
    with _CompileCounter() as counter:
        outs = [
            solvers.solve(dps.DPSConfig(num_steps=3, zeta=z), EPS_2x2, TOY, Y3, k).x
            for z, k in zip(zetas, keys[1:], strict=True)
        ]
        jax.block_until_ready(outs)
    assert counter.count == 0
    # The values did reach the program: a different zeta, a different result (same key).
    same_key = [
        solvers.solve(dps.DPSConfig(num_steps=3, zeta=z), EPS_2x2, TOY, Y3, keys[0]).x
        for z in zetas[:2]
    ]
    assert not np.allclose(np.asarray(same_key[0]), np.asarray(same_key[1]))

    cfg = ddrm.DDRMConfig(num_steps=N_STEPS, sigma_y=0.05)
    ys = Y3
    many_keys = jax.random.split(jax.random.key(30), 3)
    etas1 = jnp.array([0.0, 0.5, 0.95])
    etas2 = jnp.array([0.2, 0.85, 0.4])
    first = solvers.solve_many(cfg, EPS_2x2, TOY, ys, many_keys, hyper={"eta": etas1}, op_axis=None)
    with _CompileCounter() as counter:
        second = solvers.solve_many(
            cfg, EPS_2x2, TOY, ys, many_keys, hyper={"eta": etas2}, op_axis=None
        )
        jax.block_until_ready(second.x)
    assert counter.count == 0
    for etas, many in ((etas1, first), (etas2, second)):
        assert many.x.shape == (3, *SHAPE) and many.status.shape == (3,)
        for m in range(3):
            one_cfg = dataclasses.replace(cfg, eta=float(etas[m]))
            one = solvers.solve(one_cfg, EPS_2x2, TOY, ys[m : m + 1], many_keys[m]).x
            np.testing.assert_allclose(np.asarray(many.x[m]), np.asarray(one[0]), atol=1e-6)


def test_ddrm_eta_one_stays_finite():
    """eta = 1 (the upper bound; the official batch scripts' value): sig_tilde = sqrt(sig_s² -
    (eta sig_s)²) is exactly 0, so every image must stay finite."""
    cfg = ddrm.DDRMConfig(num_steps=N_STEPS, sigma_y=0.05, eta=1.0)
    sol = solvers.solve(cfg, EPS_2x2, TOY, Y3, jax.random.key(0), throw=False)
    np.testing.assert_array_equal(np.asarray(sol.status), 0)
    assert np.all(np.isfinite(np.asarray(sol.x)))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_batch_equals_separate_solves_and_vmap(name):
    """A batch of B measurements = B separate solves (same draws); jax.vmap over measurements
    (and over per-measurement operators) gives the same."""
    cfg = SOLVERS[name][0]
    noise = _noise(3)
    batch = solvers.solve(cfg, EPS_2x2, TOY, Y3, jax.random.key(0), noise=noise).x
    for b in range(3):
        nb = {"init": noise["init"][b : b + 1], "z": noise["z"][:, b : b + 1]}
        one = solvers.solve(cfg, EPS_2x2, TOY, Y3[b : b + 1], jax.random.key(0), noise=nb).x
        np.testing.assert_allclose(np.asarray(one[0]), np.asarray(batch[b]), atol=1e-5)

    def single(y, init, z):
        nb = {"init": init[None], "z": z[:, None]}
        # throw=False under vmap (the status is returned, not raised).
        sol = solvers.solve(cfg, EPS_2x2, TOY, y[None], jax.random.key(0), noise=nb, throw=False)
        return sol.x[0]

    vm = jax.vmap(single, in_axes=(0, 0, 1))(Y3, noise["init"], noise["z"])
    np.testing.assert_allclose(np.asarray(vm), np.asarray(batch), atol=1e-5)


def test_vmap_over_per_measurement_operators():
    """Different masks per measurement in one vmapped call (DDRM: the SVD differs per image)."""
    cfg = SOLVERS["ddrm"][0]
    masks = jax.random.bernoulli(jax.random.key(21), 0.5, (3, *SHAPE)).astype(jnp.float32)
    ops = jax.vmap(MaskOp)(masks)
    ys = jax.random.normal(jax.random.key(22), (3, *SHAPE)) * masks
    keys = jax.random.split(jax.random.key(23), 3)

    def one(o, y, k):
        return solvers.solve(cfg, EPS_2x2, o, y[None], k, throw=False).x[0]

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
    res = solvers.solve(cfg, EPS_2x2, op, y, jax.random.key(0), trajectory=True)
    np.testing.assert_allclose(
        np.asarray(res.trajectory["x0"] * masks),
        np.asarray(jnp.broadcast_to(y, res.trajectory["x0"].shape)),
        atol=1e-6,
    )
    # awd=False recomputes eps from x0: without projection that is the network's eps again.
    base = SOLVERS["pgdm"][0]
    r1 = solvers.solve(base, EPS_2x2, TOY, Y3, jax.random.key(0), noise=_noise(3))
    r2 = solvers.solve(
        dataclasses.replace(base, awd=False), EPS_2x2, TOY, Y3, jax.random.key(0), noise=_noise(3)
    )
    assert np.all(np.isfinite(np.asarray(r2.x)))
    assert not np.allclose(np.asarray(r1.x), np.asarray(r2.x))


def test_same_key_same_result_and_keys_matter():
    cfg = SOLVERS["dps"][0]
    a = solvers.solve(cfg, EPS_2x2, TOY, Y3, jax.random.key(3)).x
    b = solvers.solve(cfg, EPS_2x2, TOY, Y3, jax.random.key(3)).x
    c = solvers.solve(cfg, EPS_2x2, TOY, Y3, jax.random.key(4)).x
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors.


def test_missing_capabilities_are_clear_errors():
    y_sq = jnp.ones((2, *SHAPE))
    with pytest.raises(TypeError, match="SVD capability"):
        solvers.solve(ddrm.DDRMConfig(), EPS_2x2, SquareOpWithInit(SHAPE), y_sq, jax.random.key(0))
    with pytest.raises(TypeError, match="SVD capability"):
        solvers.solve(ddrm.DDRMConfig(), EPS_2x2, HDR.create(SHAPE), y_sq, jax.random.key(0))
    with pytest.raises(TypeError, match="SVD capability"):
        pr = PhaseRetrieval.create(SHAPE, pad=1)
        solvers.solve(ddrm.DDRMConfig(), EPS_2x2, pr, jnp.ones((2, *pr.y_shape)), jax.random.key(0))
    with pytest.raises(TypeError, match="A_dagger"):
        solvers.solve(pgdm.PGDMConfig(), EPS_2x2, SquareOp(SHAPE), y_sq, jax.random.key(0))
    with pytest.raises(TypeError, match="A_dagger"):
        solvers.solve(dps.DPSConfig(), EPS_2x2, SquareOp(SHAPE), y_sq, jax.random.key(0))
    with pytest.raises(TypeError, match="`A` method"):
        solvers.solve(dps.DPSConfig(), EPS_2x2, object(), y_sq, jax.random.key(0))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bad_arguments_are_clear_errors(name):
    cfg = SOLVERS[name][0]
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"y: expected shape \[B, \*\(1, 1, 2\)\]"):
        solvers.solve(cfg, EPS_2x2, TOY, jnp.ones((3, 2, 2, 2)), key)
    with pytest.raises(ValueError, match="add a leading batch axis"):
        solvers.solve(cfg, EPS_2x2, TOY, Y3[0], key)
    with pytest.raises(ValueError, match="finite"):
        solvers.solve(cfg, EPS_2x2, TOY, Y3.at[0, 0, 0, 0].set(jnp.nan), key)
    with pytest.raises(ValueError, match=r'noise\["z"\]: expected shape \(8, 3, 2, 2, 2\)'):
        solvers.solve(
            cfg, EPS_2x2, TOY, Y3, key, noise={"init": _noise(3)["init"], "z": jnp.ones(3)}
        )
    with pytest.raises(ValueError, match=r"noise: expected a dict with keys \['init', 'z'\]"):
        solvers.solve(cfg, EPS_2x2, TOY, Y3, key, noise={"init": _noise(3)["init"]})
    # The config's class chooses the algorithm: anything that is not a config instance is refused.
    with pytest.raises(TypeError, match="config: expected an algorithm config"):
        solvers.solve(dataclasses.asdict(cfg), EPS_2x2, TOY, Y3, key)
    with pytest.raises(TypeError, match="config: expected an algorithm config"):
        solvers.solve(type(cfg), EPS_2x2, TOY, Y3, key)
    with pytest.raises(TypeError, match="eps_fn: expected a callable"):
        solvers.solve(cfg, None, TOY, Y3, key)
    with pytest.raises(TypeError, match="key: expected one jax PRNG key"):
        solvers.solve(cfg, EPS_2x2, TOY, Y3, 0)
    with pytest.raises(ValueError, match="eps_fn: expected an output of shape"):
        solvers.solve(cfg, lambda x, t: x[..., :1], TOY, Y3, key)


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
        solvers.sample(ddim.DDIMConfig(), EPS_2x2, (2, 2, 2), jax.random.key(0))
    with pytest.raises(TypeError, match="config: DPSConfig needs a measurement"):
        solvers.sample(dps.DPSConfig(), EPS_2x2, (2, 2, 2, 2), jax.random.key(0))
    # Numeric hyper-parameters: bounds (negative step sizes / weights refused; DDRM eta and
    # DiffPIR zeta in [0, 1]), finiteness and type, each error naming the field.
    for cls, name, bad in [
        (dps.DPSConfig, "zeta", -0.1),
        (dps.DPSConfig, "eta", -0.5),
        (pgdm.PGDMConfig, "w", -1.0),
        (pgdm.PGDMConfig, "eta", -0.5),
        (ddrm.DDRMConfig, "eta", -0.1),
        (diffpir.DiffPIRConfig, "lam", -1.0),
        (diffpir.DiffPIRConfig, "zeta", -0.1),
        (diffpir.DiffPIRConfig, "sigma_y", -0.1),
        (diffpir.DiffPIRConfig, "prox_lr", -1.0),
        (ddim.DDIMConfig, "eta", float("nan")),
        (dps.DPSConfig, "zeta", float("inf")),
        (ddrm.DDRMConfig, "eta_b", float("nan")),
    ]:
        with pytest.raises(ValueError, match=f"{name}: expected a finite value"):
            cls(**{name: bad})
    with pytest.raises(TypeError, match="zeta: expected a real scalar"):
        dps.DPSConfig(zeta="0.1")
    with pytest.raises(TypeError, match="w: expected a real scalar"):
        pgdm.PGDMConfig(w=jnp.ones(2))
    with pytest.raises(TypeError, match="eta: expected a real scalar"):
        ddim.DDIMConfig(eta=True)
    # Edges of the bounds are accepted; a scalar array is a real scalar.
    ddrm.DDRMConfig(eta=0.0)
    ddrm.DDRMConfig(eta=1.0)
    diffpir.DiffPIRConfig(zeta=1.0)
    dps.DPSConfig(zeta=jnp.float32(0.2))
    # Configs are keyword-only.
    with pytest.raises(TypeError):
        dps.DPSConfig(10, 0.5)
