"""The one driver, for all six algorithms (one table): trajectory, chunked progress, noise replay,
throw= and a per-image status that survives vmap. Tiny images (4x4x2), a toy eps_fn, 6 steps."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import diffusion
from reddiff_jax.solvers import (
    DDIMConfig,
    DDRMConfig,
    DiffPIRConfig,
    DPSConfig,
    PGDMConfig,
    RedDiffConfig,
    SolveError,
    SolveStatus,
    driver,
    solve,
    solve_many,
)

SHAPE = (4, 4, 2)
STEPS = 5
CONFIGS = {
    "reddiff": RedDiffConfig(num_steps=STEPS, lr=0.2, reduction="image_mean"),
    "ddim": DDIMConfig(num_steps=STEPS, eta=0.5),
    "dps": DPSConfig(num_steps=STEPS, zeta=0.02, eta=0.5),
    "pgdm": PGDMConfig(num_steps=STEPS, eta=0.5),
    "ddrm": DDRMConfig(num_steps=STEPS, sigma_y=0.05),
    "diffpir": DiffPIRConfig(num_steps=STEPS, sigma_y=0.05),
}


class _SVD(flax.struct.PyTreeNode):
    mask: jax.Array

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


class Mask(flax.struct.PyTreeNode):
    """y = mask * x, with its SVD (every algorithm applies)."""

    mask: jax.Array
    is_linear = True

    @property
    def image_shape(self):
        return tuple(self.mask.shape)

    def A(self, x):
        return x * self.mask

    def A_adjoint(self, y):
        return y * self.mask

    def A_dagger(self, y):
        return y * self.mask

    @property
    def svd(self):
        return _SVD(self.mask)


def toy_eps(x_t, t):
    """Smooth and elementwise: a non-finite pixel stays in its own image."""
    return 0.3 * jnp.tanh(x_t) + (t / 1000.0)[:, None, None, None] * jnp.sin(x_t)


OP = Mask(jnp.asarray((np.arange(np.prod(SHAPE)) % 3 > 0).reshape(SHAPE), jnp.float32))
X = np.random.default_rng(0).uniform(-1, 1, (3, *SHAPE)).astype(np.float32)
Y = jnp.asarray(X) * OP.mask


def _draws(config, key, batch: int) -> dict:
    """The draws a keyed solve makes, from the solver's own generators (to replay them)."""
    ac = diffusion.alphas_cumprod()
    solver = config.build(toy_eps, OP, alphas_cumprod=ac)
    x_shape = (batch, *SHAPE)
    out = dict(solver.draw_init(key, x_shape))
    steps = [solver.draw_step(key, jnp.int32(k), x_shape) for k in range(config.num_iterations)]
    for name in solver.step_draws:
        out[name] = jnp.stack([s[name] for s in steps])
    return out


def poisoned_eps(x_t, t):
    """toy_eps, but nan for the batch's image 1 from t < 700 on (step 1 of the 5-step grid)."""
    bad = (jnp.arange(x_t.shape[0]) == 1) & (t < 700)
    return toy_eps(x_t, t) + jnp.where(bad, jnp.nan, 0.0)[:, None, None, None]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_progress_and_replay(name):
    cfg = CONFIGS[name]
    key = jax.random.key(3)
    plain = solve(cfg, toy_eps, OP, Y, key, trajectory=True)
    assert plain.x.shape == (3, *SHAPE) and plain.ts.shape == (STEPS,)
    assert plain.trajectory["x"].shape == (STEPS, 3, *SHAPE)
    assert plain.trajectory["x0"].shape == (STEPS, 3, *SHAPE)
    np.testing.assert_array_equal(np.asarray(plain.status), [0, 0, 0])
    chunked = solve(cfg, toy_eps, OP, Y, key, trajectory=True, progress=4)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(chunked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    replayed = solve(cfg, toy_eps, OP, Y, None, noise=_draws(cfg, key, 3), trajectory=True)
    # The same draws, fed in instead of generated: only the fusion of the two programs differs,
    # so they agree to float32 rounding over 5 steps (|x| reaches ~40 here).
    np.testing.assert_allclose(np.asarray(replayed.x), np.asarray(plain.x), rtol=1e-5, atol=1e-6)
    # trajectory=True as above: the same compiled program, only the key differs
    other = solve(cfg, toy_eps, OP, Y, jax.random.key(4), trajectory=True)
    assert not np.allclose(np.asarray(other.x), np.asarray(plain.x)) or name == "ddrm"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_diverging_image_is_flagged_alone(name):
    cfg = CONFIGS[name]
    sol = solve(cfg, poisoned_eps, OP, Y, jax.random.key(0), throw=False)
    np.testing.assert_array_equal(np.asarray(sol.status), [0, SolveStatus.NONFINITE, 0])
    np.testing.assert_array_equal(np.asarray(sol.failed_step), [-1, 1, -1])
    assert np.isfinite(np.asarray(sol.x)[[0, 2]]).all()
    with pytest.raises(SolveError, match=r"image 1 \(1 of 3 failed: \[1\]\).* at step 1"):
        solve(cfg, poisoned_eps, OP, Y, jax.random.key(0))

    # vmapped over measurements: an infinite hyper-parameter fails measurement 1 alone
    first = cfg.HYPER[0]
    hyper = {first: jnp.asarray([getattr(cfg, first), jnp.inf, getattr(cfg, first)])}
    kw = dict(op_axis=None, hyper=hyper)
    many = solve_many(cfg, toy_eps, OP, Y, jax.random.key(0), throw=False, **kw)
    np.testing.assert_array_equal(np.asarray(many.status), [0, SolveStatus.NONFINITE, 0])
    np.testing.assert_array_equal(np.asarray(many.failed_step), [-1, 0, -1])
    with pytest.raises(SolveError, match="measurement 1"):
        solve_many(cfg, toy_eps, OP, Y, jax.random.key(0), **kw)


def test_divergence_bound_and_status_under_an_outer_vmap():
    cfg = RedDiffConfig(num_steps=STEPS, lr=0.5)
    big = solve(cfg, toy_eps, OP, Y * 1e4, jax.random.key(0), throw=False)
    assert set(np.asarray(big.status).tolist()) == {int(SolveStatus.DIVERGED)}
    unbounded = solve(cfg, toy_eps, OP, Y * 1e4, jax.random.key(0), max_abs=None)
    np.testing.assert_array_equal(np.asarray(unbounded.status), [0, 0, 0])

    def one(y, lam):
        c = RedDiffConfig(num_steps=STEPS, lam=lam)
        return solve(c, toy_eps, OP, y[None], jax.random.key(0), throw=False).status[0]

    lams = jnp.asarray([0.25, jnp.inf, 0.5])
    np.testing.assert_array_equal(np.asarray(jax.vmap(one)(Y, lams)), [0, 1, 0])


def test_the_driver_is_the_only_scan():
    """One lax.scan in the compiled solve, and none in any algorithm module."""
    import inspect

    from reddiff_jax.solvers import ddim, ddrm, diffpir, dps, pgdm, reddiff

    for mod in (reddiff, ddim, dps, pgdm, ddrm, diffpir):
        assert "lax.scan" not in inspect.getsource(mod), mod.__name__
    jaxpr = jax.make_jaxpr(lambda y: solve(CONFIGS["dps"], toy_eps, OP, y, jax.random.key(0),
                                           throw=False).x)(Y)  # fmt: skip
    assert str(jaxpr).count("scan[") == 1
    assert driver._chunk_jit._cache_size() >= 1
