"""RED-Diff solver: arithmetic against a float64 reference, analytic Gaussian prior, batching,
determinism, replay, progress, errors. Tiny images (8x8x3), few steps, analytic eps_fn (no UNet)."""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reddiff_jax import diffusion
from reddiff_jax.solvers import (
    RedDiffConfig,
    SolveError,
    SolveStatus,
    StepInput,
    driver,
    snr_weight,
    solve,
    solve_many,
)
from reddiff_jax.solvers.base import split_step_draws
from reddiff_jax.solvers.reddiff import reddiff

SHAPE = (8, 8, 3)
ALPHAS = np.asarray(diffusion.alphas_cumprod())


def step_noise(key, k, shape):
    """The documented draw of step k: ε of x_t from ``split(fold_in(key, k))[0]``."""
    return split_step_draws(("xt",))(key, k, shape)["xt"]


def _inp(t: int, k: int = 0) -> StepInput:
    """The StepInput of timestep t (for driving the step pair by hand)."""
    a = diffusion.alpha_bar(jnp.asarray(ALPHAS), jnp.asarray(t))
    return StepInput(jnp.asarray(k, jnp.int32), jnp.asarray(t, jnp.int32), a, a)


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
    replay = noise if cfg.sigma_x0 > 0 else {"xt": noise["xt"]}
    res = solve(cfg, _toy_eps, Mask(jnp.asarray(mask)), jnp.asarray(y), None, noise=replay)
    mu0 = y * mask if cfg.init == "pinv" else np.zeros_like(y)
    x0_ref, mu_ref, w_ref = _reference(mu0, y, mask, noise["xt"], noise["x0"], ts, cfg=cfg)
    np.testing.assert_allclose(np.asarray(res.state.mu), mu_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.x), x0_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.info["w_t"]), w_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.info["v_t"]), cfg.obs_weight)
    assert res.info["loss"].shape == (len(ts),)
    assert res.info["loss_noise"].shape == (len(ts), batch)
    np.testing.assert_array_equal(np.asarray(res.status), [SolveStatus.SUCCESS] * batch)
    np.testing.assert_array_equal(np.asarray(res.failed_step), [-1] * batch)


def test_regulariser_gradient_matches_gaussian_expectation(problem):
    """E_eps[grad of w_t*mean(sg(eps_hat - eps)*mu)] = (λ/N) σ_t² (μ - m) / (ᾱ_t s² + σ_t²)."""
    lam, s, draws = 0.25, 0.5, 4096
    cfg = RedDiffConfig(num_steps=10, lam=lam, obs_weight=0.0)
    prior = problem["prior"]
    solver = reddiff(prior.eps, Mask(jnp.asarray(problem["masks"][0])), config=cfg)
    mu = jnp.asarray(problem["x"][:1])
    state = solver.init(jnp.zeros((1, *SHAPE)), {**cfg.hyperparams(), "mu0": mu})

    @jax.jit
    def mean_grad(t, key):
        def one(k):
            out = solver.step(state, _inp(t), {"xt": step_noise(k, 0, mu.shape)})[1]
            return out.extras["grad_reg"]

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
    state = solver.init(jnp.asarray(y), {**cfg.hyperparams(), "mu0": jnp.zeros(SHAPE)})
    zero = jnp.zeros((2, *SHAPE))

    def body(st, _):
        return solver.step(st, _inp(t), {"xt": zero})[0], None

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
    res = solve(cfg, guarded, op, y, None, noise=noise)
    ref = solve(cfg, _toy_eps, op, y, None, noise=noise)
    np.testing.assert_array_equal(np.asarray(res.state.mu), np.asarray(ref.state.mu))


def _noise(steps, batch, seed=0):
    """Replayed RED-Diff draws {"xt": [steps, batch, *SHAPE]}."""
    rng = np.random.default_rng(seed)
    return {"xt": rng.standard_normal((steps, batch, *SHAPE)).astype(np.float32)}


def test_same_key_same_result_replay_and_progress(problem):
    cfg = RedDiffConfig(num_steps=10, lr=0.2)
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:2] * problem["masks"][0])
    key = jax.random.key(7)
    a = solve(cfg, _toy_eps, op, y, key)
    b = solve(cfg, _toy_eps, op, y, key)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    c = solve(cfg, _toy_eps, op, y, jax.random.key(8))
    assert not np.allclose(np.asarray(a.state.mu), np.asarray(c.state.mu))
    # replaying the documented draws (step_noise) reproduces the keyed run
    noise = {"xt": jnp.stack([step_noise(key, k, y.shape) for k in range(10)])}
    d = solve(cfg, _toy_eps, op, y, None, noise=noise, trajectory=True)
    np.testing.assert_allclose(np.asarray(d.state.mu), np.asarray(a.state.mu), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d.x), np.asarray(a.x), rtol=0, atol=1e-6)
    # chunked scan with a progress bar: identical
    e = solve(cfg, _toy_eps, op, y, None, noise=noise, trajectory=True, progress=5)
    for u, v in zip(jax.tree.leaves(d), jax.tree.leaves(e), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # output convention: x is mu before the final update (sigma_x0 = 0)
    np.testing.assert_array_equal(np.asarray(d.x), np.asarray(d.trajectory["x"][-2]))
    np.testing.assert_array_equal(np.asarray(d.state.mu), np.asarray(d.trajectory["x"][-1]))
    np.testing.assert_array_equal(np.asarray(d.x), np.asarray(d.trajectory["x0"][-1]))


def test_solve_many_equals_separate_solves(problem):
    """4 measurements, each with its own mask, λ, lr and key, in one call."""
    cfg = RedDiffConfig(num_steps=10, lr=0.1)
    masks = jnp.asarray(problem["masks"])
    ys = jnp.asarray(problem["x"] * problem["masks"])
    lams = jnp.asarray([0.1, 0.25, 0.5, 1.0])
    lrs = jnp.asarray([0.05, 0.1, 0.1, 0.2])
    keys = jax.random.split(jax.random.key(3), 4)
    eps_fn = problem["prior"].eps
    many = solve_many(cfg, eps_fn, Mask(masks), ys, keys, hyper={"lam": lams, "lr": lrs})
    assert many.x.shape == (4, *SHAPE) and many.info["loss"].shape == (4, 10)
    for i in range(4):
        one_cfg = RedDiffConfig(num_steps=10, lr=float(lrs[i]), lam=float(lams[i]))
        one = solve(one_cfg, eps_fn, Mask(masks[i]), ys[i : i + 1], keys[i])
        for got, want in ((many.x[i], one.x[0]), (many.state.mu[i, 0], one.state.mu[0])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(many.info["loss"][i]), np.asarray(one.info["loss"]), rtol=1e-5
        )


def test_solve_many_sweeps_sigma_x0(problem):
    """A sweep over sigma_x0 from a config without jitter: its cells > 0 jitter (the static
    draw is switched on) and equal the separate solves; it is never silently ignored."""
    cfg = RedDiffConfig(num_steps=10, lr=0.1)
    mask = Mask(jnp.asarray(problem["masks"][0]))
    ys = jnp.asarray(problem["x"][:1] * problem["masks"][0]).repeat(3, axis=0)
    sigmas = jnp.asarray([0.0, 0.1, 0.3])
    keys = jax.random.split(jax.random.key(4), 3)
    eps_fn = problem["prior"].eps
    many = solve_many(cfg, eps_fn, mask, ys, keys, hyper={"sigma_x0": sigmas}, op_axis=None)
    for i in (1, 2):
        one = solve(RedDiffConfig(num_steps=10, lr=0.1, sigma_x0=float(sigmas[i])), eps_fn,
                    mask, ys[i : i + 1], keys[i])  # fmt: skip
        np.testing.assert_allclose(np.asarray(many.x[i]), np.asarray(one.x[0]), atol=1e-5)
    assert not np.allclose(np.asarray(many.x[1]), np.asarray(many.x[2]), atol=1e-3)
    # under an outer jit the values are traced: the config's own switch decides
    jitted = jax.jit(lambda s: RedDiffConfig().admitting({"sigma_x0": s}).sigma_x0 + 0 * s[0])
    assert float(jitted(sigmas)) == 0.0


def test_image_mean_batch_equals_separate_solves(problem):
    """With image_mean a batch of 4 (shared operator) is 4 independent solves."""
    cfg = RedDiffConfig(num_steps=10, reduction="image_mean", lam=0.5)
    op = Mask(jnp.asarray(problem["masks"][2]))
    ys = jnp.asarray(problem["x"] * problem["masks"][2])
    noise = _noise(10, 4, seed=5)
    batch = solve(cfg, _toy_eps, op, ys, None, noise=noise)
    for i in range(4):
        one_noise = {"xt": noise["xt"][:, i : i + 1]}
        one = solve(cfg, _toy_eps, op, ys[i : i + 1], None, noise=one_noise)
        np.testing.assert_allclose(
            np.asarray(batch.state.mu[i]), np.asarray(one.state.mu[0]), atol=1e-6
        )
        np.testing.assert_allclose(np.asarray(batch.info["loss_obs"][:, i]),
                                   np.asarray(one.info["loss_obs"][:, 0]), rtol=1e-6)  # fmt: skip


def test_nonfinite_detection_names_the_step(problem):
    def eps_fn(x_t, t):  # finite for t >= 500, nan below: step 5 of the grid 900..0
        return jnp.where((t < 500)[:, None, None, None], jnp.nan, 0.0) + _toy_eps(x_t, t)

    cfg = RedDiffConfig(num_steps=10)
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:1] * problem["masks"][0])
    noise = _noise(10, 1)
    with pytest.raises(SolveError, match=r"step 5 \(t = 400\)"):
        solve(cfg, eps_fn, op, y, None, noise=noise)
    res = solve(cfg, eps_fn, op, y, None, noise=noise, throw=False)
    assert int(res.status[0]) == SolveStatus.NONFINITE and int(res.failed_step[0]) == 5
    assert not bool(res.ok[0])
    # vmapped: only the measurement with lam = inf fails, the others keep status SUCCESS
    ys = jnp.asarray(problem["x"] * problem["masks"][0])
    lams = jnp.asarray([0.25, jnp.inf, 0.25, 0.25])
    noise4 = {"xt": _noise(10, 4)["xt"].transpose(1, 0, 2, 3, 4)}
    kw = dict(hyper={"lam": lams}, op_axis=None, noise=noise4)
    many = solve_many(cfg, _toy_eps, op, ys, None, throw=False, **kw)
    np.testing.assert_array_equal(np.asarray(many.status), [0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(many.failed_step), [-1, 0, -1, -1])
    assert np.isfinite(np.asarray(many.state.mu[np.array([0, 2, 3])])).all()
    with pytest.raises(SolveError, match=r"measurement 1"):
        solve_many(cfg, _toy_eps, op, ys, None, **kw)


def test_compiled_once_per_structure(problem):
    """Different values (y, lam, lr, obs_weight, mask, prior params) reuse the compiled scan."""
    scan_jit = driver._chunk_jit
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:1] * problem["masks"][0])
    prior = problem["prior"]
    noise = _noise(10, 1)
    r1 = solve(RedDiffConfig(num_steps=10), prior.eps, op, y, None, noise=noise)
    size = scan_jit._cache_size()
    other = prior.replace(mean=prior.mean + 0.1)
    cfg2 = RedDiffConfig(num_steps=10, lam=0.7, lr=0.3, obs_weight=2.0)
    r2 = solve(cfg2, other.eps, Mask(op.mask * 0 + 1), y * 0.5, None, noise=noise)
    r3 = solve(cfg2, functools.partial(other.eps), op, y, None, noise=noise)
    assert scan_jit._cache_size() == size
    assert not np.allclose(np.asarray(r1.state.mu), np.asarray(r2.state.mu))
    assert not np.allclose(np.asarray(r2.state.mu), np.asarray(r3.state.mu))


def test_step_pair_and_custom_optimizer(problem):
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:2] * problem["masks"][0])
    cfg = RedDiffConfig(num_steps=10, optimizer=optax.sgd(10.0))
    solver = reddiff(_toy_eps, op, config=cfg)
    state = solver.init(y)
    np.testing.assert_array_equal(np.asarray(state.mu), np.asarray(y))  # pinv of a mask
    noise = _noise(10, 2)
    xt0 = {"xt": noise["xt"][0]}
    new, out = jax.jit(solver.step)(state, _inp(900), xt0)
    grad = out.extras["grad_reg"] + out.extras["grad_obs"]
    np.testing.assert_allclose(np.asarray(new.mu), np.asarray(state.mu - 10.0 * grad), atol=1e-6)
    assert int(new.count) == 1 and out.stats["loss_noise"].shape == (2,)
    with pytest.raises(ValueError, match="learning_rate"):
        solver.init(y, {**cfg.hyperparams(), "lr": 0.5})
    res = solve(cfg, _toy_eps, op, y, None, noise=noise)
    assert np.isfinite(np.asarray(res.state.mu)).all()
    # the first step of solve is that step
    one_step = RedDiffConfig(num_steps=1, optimizer=cfg.optimizer)
    first = solve(one_step, _toy_eps, op, y, None, noise={"xt": noise["xt"][:1]})
    by_hand = jax.jit(solver.step)(state, _inp(0), xt0)[0].mu
    np.testing.assert_allclose(np.asarray(first.state.mu), np.asarray(by_hand), rtol=0, atol=1e-6)


def test_timestep_grid_and_init_array(problem):
    cfg = RedDiffConfig(num_steps=30, init=jnp.full(SHAPE, 0.3))
    op = Mask(jnp.asarray(problem["masks"][0]))
    y = jnp.asarray(problem["x"][:1] * problem["masks"][0])
    res = solve(cfg, _toy_eps, op, y, None, noise=_noise(31, 1), trajectory=True)
    np.testing.assert_array_equal(np.asarray(res.ts), np.arange(0, 1000, 33)[::-1])
    assert res.trajectory["x"].shape == (31, 1, *SHAPE) and res.info["loss"].shape == (31,)
    one = solve(RedDiffConfig(num_steps=1, init=jnp.full(SHAPE, 0.3)), _toy_eps, op, y, None,
                noise=_noise(1, 1))  # fmt: skip
    assert int(one.ts[0]) == 0
    np.testing.assert_array_equal(np.asarray(one.x), np.full((1, *SHAPE), 0.3, np.float32))


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
        solve(cfg, eps_fn, op, y[:, :4], key)
    with pytest.raises(ValueError, match=r"y\[None\]"):
        solve(cfg, eps_fn, op, y[0], key)
    with pytest.raises(ValueError, match="y: expected finite"):
        solve(cfg, eps_fn, op, y.at[0, 1, 1, 1].set(jnp.nan), key)
    with pytest.raises(ValueError, match="key"):
        solve(cfg, eps_fn, op, y, None)
    with pytest.raises(ValueError, match=r'noise\["xt"\]: expected shape'):
        solve(cfg, eps_fn, op, y, None, noise={"xt": jnp.zeros((3, 1, *SHAPE))})
    with pytest.raises(ValueError, match="x0"):
        solve(RedDiffConfig(num_steps=4, sigma_x0=0.1), eps_fn, op, y, None,
              noise={"xt": jnp.zeros((4, 1, *SHAPE))})  # fmt: skip
    with pytest.raises(ValueError, match="eps_fn"):
        solve(cfg, lambda x, t: x[..., :1], op, y, key)
    with pytest.raises(ValueError, match="lam"):
        solve_many(cfg, eps_fn, op, jnp.concatenate([y, y]), key, hyper={"lam": jnp.ones(3)},
                   op_axis=None)  # fmt: skip
    for name, value in (("lam", -0.1), ("lr", -1.0), ("obs_weight", float("inf"))):
        with pytest.raises(ValueError, match=name):
            RedDiffConfig(**{name: value})
