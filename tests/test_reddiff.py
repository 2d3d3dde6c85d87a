"""RED-Diff solver: arithmetic against a float64 reference, analytic Gaussian prior, batching,
determinism, replay, progress, errors. Tiny images (8x8x3), few steps, analytic eps_fn (no UNet)."""

from __future__ import annotations

import functools
import importlib

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reddiff_jax import diffusion
from reddiff_jax.solvers import (
    NonFiniteError,
    RedDiffConfig,
    SolveStatus,
    reddiff,
    snr_weight,
    solve,
    solve_many,
    step_noise,
)

SHAPE = (8, 8, 3)
ALPHAS = np.asarray(diffusion.alphas_cumprod())


class Mask(flax.struct.PyTreeNode):
    """Inpainting y = mask * x on one image [H, W, C] (a linear, self-adjoint operator)."""

    mask: jax.Array  # [H, W, C] in {0, 1}
    image_shape: tuple = flax.struct.field(pytree_node=False, default=SHAPE)
    is_linear = True

    def A(self, x):
        return x * self.mask

    def A_dagger(self, y):
        return y * self.mask


class GaussianPrior(flax.struct.PyTreeNode):
    """Prior x ~ N(mean, std² I): its noised eps is exact.

    eps(x_t, t) = σ_t (x_t - √ᾱ_t mean) / (ᾱ_t std² + σ_t²), σ_t = √(1 - ᾱ_t).
    """

    mean: jax.Array  # [H, W, C]
    std: jax.Array  # []
    alphas: jax.Array  # [T]

    def eps(self, x_t, t):
        a = self.alphas[t][:, None, None, None]
        sig = jnp.sqrt(1.0 - a)
        return sig * (x_t - jnp.sqrt(a) * self.mean) / (a * self.std**2 + sig**2)


def _toy_eps(x_t, t):
    """A smooth non-Gaussian eps_fn for the arithmetic check. (The Gaussian eps nearly cancels
    the drawn eps at large t, so float32 rounding there is ill-conditioned; this one does not.)"""
    return 0.5 * jnp.sin(2.0 * x_t) + (t / 1000.0)[:, None, None, None] * jnp.cos(x_t)


def _toy_eps_np(x_t, t):
    return 0.5 * np.sin(2.0 * x_t) + (t / 1000.0) * np.cos(x_t)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, *SHAPE)).astype(np.float32)
    masks = (rng.uniform(size=(4, *SHAPE)) < 0.6).astype(np.float32)
    mean = rng.uniform(-0.5, 0.5, SHAPE).astype(np.float32)
    prior = GaussianPrior(jnp.asarray(mean), jnp.float32(0.5), jnp.asarray(ALPHAS))
    return {"x": x, "masks": masks, "mean": mean, "prior": prior}


def _reference(mu0, y, mask, noise_xt, noise_x0, ts, *, cfg: RedDiffConfig):
    """float64 numpy RED-Diff with torch's Adam, following the fixture README arithmetic."""
    mu = mu0.astype(np.float64)
    m = np.zeros_like(mu)
    v = np.zeros_like(mu)
    b = mu.shape[0]
    n = int(np.prod(mu.shape[1:]))
    f = {
        "linear": lambda s: s,
        "sqrt": np.sqrt,
        "square": np.square,
        "log": lambda s: np.log(1 + s),
        "trunc_linear": lambda s: min(s, 1.0),
        "power2over3": lambda s: s ** (2 / 3),
        "const": lambda s: 1.0,
    }[cfg.weighting]
    scale = {"batch_mean": 1.0 / (b * n), "image_mean": 1.0 / n, "sum": 1.0}[cfg.reduction]
    ws = []
    for k, t in enumerate(ts):
        a = np.float64(ALPHAS[t])
        x0 = mu + cfg.sigma_x0 * noise_x0[k] if cfg.sigma_x0 > 0 else mu
        xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise_xt[k]
        e = _toy_eps_np(xt, t)
        w = cfg.lam * f(np.sqrt(1 - a) / np.sqrt(a))
        ws.append(w)
        # mask op: M = N per image
        g = w * (e - noise_xt[k]) * scale - cfg.obs_weight * mask * (y - mask * x0) * scale
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        mhat = m / (1 - 0.9 ** (k + 1))
        vhat = v / (1 - 0.99 ** (k + 1))
        mu = mu - cfg.lr * mhat / (np.sqrt(vhat) + 1e-8)
        x0_last = x0
    return x0_last, mu, np.array(ws)


@pytest.mark.parametrize(
    "batch, kw",
    [
        (1, dict(weighting="linear")),
        (2, dict(weighting="sqrt", obs_weight=0.5, sigma_x0=0.05)),
        (2, dict(weighting="log", reduction="image_mean", lam=1.0)),
        (3, dict(weighting="power2over3", reduction="sum", lr=0.02, init="zeros")),
    ],
)
def test_matches_float64_reference(problem, batch, kw):
    cfg = RedDiffConfig(num_steps=10, **{"lr": 0.1, "lam": 0.25, **kw})
    ts = cfg.timesteps()
    rng = np.random.default_rng(batch)
    mask = problem["masks"][0]
    y = (problem["x"][:batch] * mask).astype(np.float32)
    noise = {
        "xt": rng.standard_normal((len(ts), batch, *SHAPE)).astype(np.float32),
        "x0": rng.standard_normal((len(ts), batch, *SHAPE)).astype(np.float32),
    }
    res = solve(_toy_eps, Mask(jnp.asarray(mask)), jnp.asarray(y), cfg, None, noise=noise)
    mu0 = y * mask if cfg.init == "pinv" else np.zeros_like(y)
    x0_ref, mu_ref, w_ref = _reference(mu0, y, mask, noise["xt"], noise["x0"], ts, cfg=cfg)
    np.testing.assert_allclose(np.asarray(res.mu), mu_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.x0_pred), x0_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.w_t), w_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.v_t), cfg.obs_weight)
    assert res.loss.shape == (len(ts),) and res.loss_noise.shape == (len(ts), batch)
    assert int(res.status) == SolveStatus.SUCCESS and int(res.nonfinite_step) == -1


def test_regulariser_gradient_matches_gaussian_expectation(problem):
    """E_eps[grad of w_t*mean(sg(eps_hat - eps)*mu)] = (λ/N) σ_t² (μ - m) / (ᾱ_t s² + σ_t²)."""
    lam, s, draws = 0.25, 0.5, 4096
    cfg = RedDiffConfig(num_steps=10, lam=lam, obs_weight=0.0)
    prior = problem["prior"]
    solver = reddiff(prior.eps, Mask(jnp.asarray(problem["masks"][0])), config=cfg)
    mu = jnp.asarray(problem["x"][:1])
    state = solver.init(jnp.zeros((1, *SHAPE)), mu0=mu)

    @jax.jit
    def mean_grad(t, key):
        def one(k):
            return solver.step(state, t, step_noise(k, 0, mu.shape))[1].grad_reg

        return jnp.mean(jax.vmap(one)(jax.random.split(key, draws)), axis=0)

    for t in (900, 500, 100, 10):
        g = np.asarray(mean_grad(t, jax.random.key(t)), np.float64)
        a = np.float64(ALPHAS[t])
        sig2 = 1 - a
        n = mu.size
        d = a * s**2 + sig2
        expected = lam / n * sig2 * (np.asarray(mu, np.float64) - problem["mean"]) / d
        # Per element grad = w_t (e - eps)/N whose random part is w_t (σ²/D - 1) eps / N.
        mc_std = lam * np.sqrt(sig2 / a) * abs(sig2 / d - 1) / n / np.sqrt(draws)
        err = np.abs(g - expected)
        assert np.all(err <= 6 * mc_std + 1e-5 * np.abs(expected).max()), (t, (err / mc_std).max())


def test_fixed_point_gaussian_prior_linear_operator(problem):
    """Zero noise, fixed t, 'sum' reduction, plain SGD: mu converges to the closed-form
    stationary point a(μ - m) + v·mask(μ - y) = 0, a = λσ_t²/(ᾱ_t s² + σ_t²)."""
    t, lam, v, s = 500, 1.0, 1.0, 0.5
    a_t = np.float64(ALPHAS[t])
    a = lam * (1 - a_t) / (a_t * s**2 + 1 - a_t)
    cfg = RedDiffConfig(
        num_steps=10,
        lam=lam,
        obs_weight=v,
        reduction="sum",
        optimizer=optax.sgd(1.0 / (a + v)),
    )
    mask = problem["masks"][1]
    y = problem["x"][:2] * mask
    solver = reddiff(problem["prior"].eps, Mask(jnp.asarray(mask)), config=cfg)
    state = solver.init(jnp.asarray(y), mu0="zeros")
    zero = jnp.zeros((2, *SHAPE))

    def body(st, _):
        return solver.step(st, t, zero)[0], None

    state, _ = jax.jit(lambda st: jax.lax.scan(body, st, None, length=80))(state)
    expected = (a * problem["mean"] + v * mask * y) / (a + v * mask)
    np.testing.assert_allclose(np.asarray(state.mu), expected, rtol=0, atol=1e-5)


def test_network_is_never_differentiated(problem):
    @jax.custom_vjp
    def guarded(x_t, t):
        return _toy_eps(x_t, t)

    def fwd(x_t, t):
        return guarded(x_t, t), None

    def bwd(res, g):
        raise RuntimeError("eps_fn was differentiated")

    guarded.defvjp(fwd, bwd)
    cfg = RedDiffConfig(num_steps=10)
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:1] * problem["masks"][0])
    noise = _noise(10, 1)
    res = solve(guarded, op, y, cfg, None, noise=noise)
    ref = solve(_toy_eps, op, y, cfg, None, noise=noise)
    np.testing.assert_array_equal(np.asarray(res.mu), np.asarray(ref.mu))


def _noise(steps, batch, seed=0):
    return np.random.default_rng(seed).standard_normal((steps, batch, *SHAPE)).astype(np.float32)


def test_same_key_same_result_replay_and_progress(problem):
    cfg = RedDiffConfig(num_steps=10, lr=0.2)
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:2] * problem["masks"][0])
    key = jax.random.key(7)
    a = solve(_toy_eps, op, y, cfg, key)
    b = solve(_toy_eps, op, y, cfg, key)
    for f in ("mu", "x0_pred", "loss"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    c = solve(_toy_eps, op, y, cfg, jax.random.key(8))
    assert not np.allclose(np.asarray(a.mu), np.asarray(c.mu))
    # replaying the documented draws (step_noise) reproduces the keyed run
    noise = jnp.stack([step_noise(key, k, y.shape).xt for k in range(10)])
    d = solve(_toy_eps, op, y, cfg, None, noise=noise, trajectory=True)
    np.testing.assert_allclose(np.asarray(d.mu), np.asarray(a.mu), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d.x0_pred), np.asarray(a.x0_pred), rtol=0, atol=1e-6)
    # chunked scan with a progress bar: identical
    e = solve(_toy_eps, op, y, cfg, None, noise=noise, trajectory=True, progress=5)
    for f in ("mu", "x0_pred", "loss", "loss_obs", "w_t", "mu_trajectory"):
        np.testing.assert_array_equal(np.asarray(getattr(d, f)), np.asarray(getattr(e, f)))
    # output convention: x0_pred is mu before the final update (sigma_x0 = 0)
    np.testing.assert_array_equal(np.asarray(d.x0_pred), np.asarray(d.mu_trajectory[-2]))
    np.testing.assert_array_equal(np.asarray(d.mu), np.asarray(d.mu_trajectory[-1]))


def test_solve_many_equals_separate_solves(problem):
    """4 measurements, each with its own mask, λ, lr and key, in one call."""
    cfg = RedDiffConfig(num_steps=10, lr=0.1)
    masks = jnp.asarray(problem["masks"])
    ys = jnp.asarray(problem["x"] * problem["masks"])
    lams = jnp.asarray([0.1, 0.25, 0.5, 1.0])
    lrs = jnp.asarray([0.05, 0.1, 0.1, 0.2])
    keys = jax.random.split(jax.random.key(3), 4)
    eps_fn = problem["prior"].eps
    many = solve_many(eps_fn, Mask(masks), ys, cfg, keys, lam=lams, lr=lrs)
    assert many.x0_pred.shape == (4, *SHAPE) and many.loss.shape == (4, 10)
    for i in range(4):
        one_cfg = RedDiffConfig(num_steps=10, lr=float(lrs[i]), lam=float(lams[i]))
        one = solve(eps_fn, Mask(masks[i]), ys[i : i + 1], one_cfg, keys[i])
        for f in ("x0_pred", "mu"):
            got, want = np.asarray(getattr(many, f)[i]), np.asarray(getattr(one, f)[0])
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(many.loss[i]), np.asarray(one.loss), rtol=1e-5)


def test_image_mean_batch_equals_separate_solves(problem):
    """With image_mean a batch of 4 (shared operator) is 4 independent solves."""
    cfg = RedDiffConfig(num_steps=10, reduction="image_mean", lam=0.5)
    op = Mask(jnp.asarray(problem["masks"][2]))
    ys = jnp.asarray(problem["x"] * problem["masks"][2])
    noise = _noise(10, 4, seed=5)
    batch = solve(_toy_eps, op, ys, cfg, None, noise=noise)
    for i in range(4):
        one = solve(_toy_eps, op, ys[i : i + 1], cfg, None, noise=noise[:, i : i + 1])
        np.testing.assert_allclose(np.asarray(batch.mu[i]), np.asarray(one.mu[0]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(batch.loss_obs[:, i]), np.asarray(one.loss_obs[:, 0]),
                                   rtol=1e-6)  # fmt: skip


def test_nonfinite_detection_names_the_step(problem):
    def eps_fn(x_t, t):  # finite for t >= 500, nan below: step 5 of the grid 900..0
        return jnp.where((t < 500)[:, None, None, None], jnp.nan, 0.0) + _toy_eps(x_t, t)

    cfg = RedDiffConfig(num_steps=10)
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:1] * problem["masks"][0])
    noise = _noise(10, 1)
    with pytest.raises(NonFiniteError, match=r"step 5 \(t = 400\)"):
        solve(eps_fn, op, y, cfg, None, noise=noise)
    res = solve(eps_fn, op, y, cfg, None, noise=noise, throw=False)
    assert int(res.status) == SolveStatus.NONFINITE and int(res.nonfinite_step) == 5
    assert not bool(res.ok)
    # vmapped: only the measurement with lam = inf fails, the others keep status SUCCESS
    ys = jnp.asarray(problem["x"] * problem["masks"][0])
    lams = jnp.asarray([0.25, jnp.inf, 0.25, 0.25])
    noise4 = _noise(10, 4)[:, :, None].transpose(1, 0, 2, 3, 4, 5)[:, :, 0]
    kw = dict(lam=lams, op_axis=None, noise=noise4)
    many = solve_many(_toy_eps, op, ys, cfg, None, throw=False, **kw)
    np.testing.assert_array_equal(np.asarray(many.status), [0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(many.nonfinite_step), [-1, 0, -1, -1])
    assert np.isfinite(np.asarray(many.mu[np.array([0, 2, 3])])).all()
    with pytest.raises(NonFiniteError, match=r"measurement 1"):
        solve_many(_toy_eps, op, ys, cfg, None, **kw)


def test_compiled_once_per_structure(problem):
    """Different values (y, lam, lr, obs_weight, mask, prior params) reuse the compiled scan."""
    scan_jit = importlib.import_module("reddiff_jax.solvers.reddiff")._scan_jit
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:1] * problem["masks"][0])
    prior = problem["prior"]
    noise = _noise(10, 1)
    r1 = solve(prior.eps, op, y, RedDiffConfig(num_steps=10), None, noise=noise)
    size = scan_jit._cache_size()
    other = prior.replace(mean=prior.mean + 0.1)
    cfg2 = RedDiffConfig(num_steps=10, lam=0.7, lr=0.3, obs_weight=2.0)
    r2 = solve(other.eps, Mask(op.mask * 0 + 1), y * 0.5, cfg2, None, noise=noise)
    r3 = solve(functools.partial(other.eps), op, y, cfg2, None, noise=noise)
    assert scan_jit._cache_size() == size
    assert not np.allclose(np.asarray(r1.mu), np.asarray(r2.mu))
    assert not np.allclose(np.asarray(r2.mu), np.asarray(r3.mu))


def test_step_pair_and_custom_optimizer(problem):
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:2] * problem["masks"][0])
    cfg = RedDiffConfig(num_steps=10, optimizer=optax.sgd(10.0))
    solver = reddiff(_toy_eps, op, config=cfg)
    state = solver.init(y)
    np.testing.assert_array_equal(np.asarray(state.mu), np.asarray(y))  # pinv of a mask
    noise = _noise(10, 2)
    new, info = jax.jit(solver.step)(state, 900, noise[0])
    grad = info.grad_reg + info.grad_obs
    np.testing.assert_allclose(np.asarray(new.mu), np.asarray(state.mu - 10.0 * grad), atol=1e-6)
    assert int(new.count) == 1 and info.loss_noise.shape == (2,)
    with pytest.raises(ValueError, match="learning_rate"):
        solver.init(y, lr=0.5)
    res = solve(_toy_eps, op, y, cfg, None, noise=noise)
    assert np.isfinite(np.asarray(res.mu)).all()
    # the first step of solve is that step
    one_step = RedDiffConfig(num_steps=1, optimizer=cfg.optimizer)
    first = solve(_toy_eps, op, y, one_step, None, noise=noise[:1])
    by_hand = jax.jit(solver.step)(state, 0, noise[0])[0].mu
    np.testing.assert_allclose(np.asarray(first.mu), np.asarray(by_hand), rtol=0, atol=1e-6)


def test_timestep_grid_and_init_array(problem):
    cfg = RedDiffConfig(num_steps=30, init=jnp.full(SHAPE, 0.3))
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:1] * problem["masks"][0])
    res = solve(_toy_eps, op, y, cfg, None, noise=_noise(31, 1), trajectory=True)
    np.testing.assert_array_equal(np.asarray(res.ts), np.arange(0, 1000, 33)[::-1])
    assert res.mu_trajectory.shape == (31, 1, *SHAPE) and res.loss.shape == (31,)
    one = solve(_toy_eps, op, y, RedDiffConfig(num_steps=1, init=jnp.full(SHAPE, 0.3)), None,
                noise=_noise(1, 1))  # fmt: skip
    assert int(one.ts[0]) == 0
    np.testing.assert_array_equal(np.asarray(one.x0_pred), np.full((1, *SHAPE), 0.3, np.float32))


@pytest.mark.parametrize("name", ["linear", "sqrt", "square", "log", "trunc_linear",
                                  "power2over3", "const"])  # fmt: skip
def test_snr_weight(name):
    x = np.array([0.01, 0.5, 1.0, 3.0, 150.0])
    ref = {
        "linear": x,
        "sqrt": np.sqrt(x),
        "square": x**2,
        "log": np.log1p(x),
        "trunc_linear": np.minimum(x, 1),
        "power2over3": x ** (2 / 3),
        "const": np.ones_like(x),
    }[name]
    np.testing.assert_allclose(np.asarray(snr_weight(name, jnp.asarray(x, jnp.float32))), ref,
                               rtol=1e-6)  # fmt: skip


def test_bad_inputs(problem):
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:1] * problem["masks"][0])
    eps_fn = problem["prior"].eps
    key = jax.random.key(0)
    cfg = RedDiffConfig(num_steps=4)
    with pytest.raises(ValueError, match="weighting"):
        RedDiffConfig(weighting="cubic")
    with pytest.raises(ValueError, match="reduction"):
        RedDiffConfig(reduction="mean")
    for n in (0, 1001, -3):
        with pytest.raises(ValueError, match="num_steps"):
            RedDiffConfig(num_steps=n)
    RedDiffConfig(num_steps=1000)
    with pytest.raises(ValueError, match="lr"):
        RedDiffConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="init"):
        RedDiffConfig(init="random")
    with pytest.raises(ValueError, match=r"y: expected shape \[B, \*\(8, 8, 3\)\]"):
        solve(eps_fn, op, y[:, :4], cfg, key)
    with pytest.raises(ValueError, match=r"y\[None\]"):
        solve(eps_fn, op, y[0], cfg, key)
    with pytest.raises(ValueError, match="y: expected finite"):
        solve(eps_fn, op, y.at[0, 1, 1, 1].set(jnp.nan), cfg, key)
    with pytest.raises(ValueError, match="key"):
        solve(eps_fn, op, y, cfg, None)
    with pytest.raises(ValueError, match="noise: expected xt of shape"):
        solve(eps_fn, op, y, cfg, None, noise=jnp.zeros((3, 1, *SHAPE)))
    with pytest.raises(ValueError, match="x0"):
        solve(eps_fn, op, y, RedDiffConfig(num_steps=4, sigma_x0=0.1), None,
              noise=jnp.zeros((4, 1, *SHAPE)))  # fmt: skip
    with pytest.raises(ValueError, match="eps_fn"):
        solve(lambda x, t: x[..., :1], op, y, cfg, key)
    with pytest.raises(ValueError, match="lam"):
        solve_many(eps_fn, op, jnp.concatenate([y, y]), cfg, key, lam=jnp.ones(3), op_axis=None)
