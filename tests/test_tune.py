"""Gradient tuning: the gradient through the whole solve against finite differences, the
per-step weight schedule, and the tuned-settings file."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import imageio, operators, splits
from reddiff_jax import tune as tune_lib
from reddiff_jax.solvers import RedDiffConfig, registry, solve

K = 10  # num_steps=10: a 10-step grid, so a 10-value schedule


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip


def smooth_eps(params, x, t):
    """A tiny dtype-generic eps network (conv, time embedding, tanh, conv): float64 all through,
    unlike the UNet, whose GroupNorm statistics and output are float32 by design."""
    emb = jnp.sin(t[:, None].astype(x.dtype) * params["f"][None, :])
    h = jnp.tanh(_conv(x, params["w1"]) + (emb @ params["e"])[:, None, None, :])
    return _conv(h, params["w2"])


def _smooth_params(dtype):
    k = jax.random.split(jax.random.key(11), 4)
    p = {"w1": 0.3 * jax.random.normal(k[0], (3, 3, 1, 8)),
         "w2": 0.3 * jax.random.normal(k[1], (3, 3, 8, 1)),
         "e": 0.5 * jax.random.normal(k[2], (4, 8)),
         "f": jnp.asarray([1e-3, 3e-3, 1e-2, 3e-2])}  # fmt: skip
    return jax.tree.map(lambda v: jnp.asarray(v, dtype), p)


def _problem(dtype, n=2, task="sr:4"):
    _, truth = splits.load("validation", n, image_shape=(32, 32, 1))
    x = jnp.asarray(imageio.from_uint8(truth), dtype)
    op = operators.make_from_spec(task, (32, 32, 1), key=jax.random.key(0))
    return op, jax.vmap(op.A)(x), jax.random.split(jax.random.key(1), n), x


def _grads_and_fd(eps_fn, dtype, h=1e-3):
    """(autodiff gradient, central differences) of the validation loss w.r.t. lam, lr and a
    10-step schedule; every finite difference is a relative step h of the value."""
    op, ys, keys, x = _problem(dtype)
    base = RedDiffConfig(num_steps=K, lr=0.1, lam=0.25, differentiable=True)

    def loss(s):
        cfg = tune_lib.apply_settings(base, s)
        return tune_lib.validation_loss(cfg, eps_fn, op, ys, keys, x)

    s0 = {"lam": jnp.asarray(0.25, dtype), "lr": jnp.asarray(0.1, dtype),
          "step_weights": jnp.linspace(0.5, 1.5, K).astype(dtype)}  # fmt: skip
    grad = jax.jit(jax.grad(loss))(s0)
    f = jax.jit(loss)

    def central(name, i=None):
        v = s0[name]
        step = h * (float(v) if i is None else float(v[i]))
        e = step if i is None else jnp.zeros_like(v).at[i].set(step)
        return float((f({**s0, name: v + e}) - f({**s0, name: v - e})) / (2 * step))

    fd = {"lam": central("lam"), "lr": central("lr"),
          "step_weights": np.asarray([central("step_weights", i) for i in range(K)])}  # fmt: skip
    return jax.tree.map(np.asarray, grad), fd


def test_gradient_equals_central_differences_in_float64():
    """jax.grad through the whole 10-step solve (remat, differentiable) = central finite
    differences to 1e-4 relative, for lam, lr and each of the 10 schedule weights."""
    with jax.enable_x64(True):
        eps_fn = functools.partial(smooth_eps, _smooth_params(jnp.float64))
        grad, fd = _grads_and_fd(eps_fn, jnp.float64, h=1e-4)
        assert grad["lam"].dtype == np.float64
    for name in ("lam", "lr"):
        assert grad[name] == pytest.approx(fd[name], rel=1e-4), name
    g, d = grad["step_weights"], fd["step_weights"]
    assert g[-1] == 0.0  # the output is the last step's x0, taken before its update
    np.testing.assert_allclose(g, d, rtol=1e-4, atol=1e-4 * np.abs(d).max())


def test_float32_gradient_on_the_tiny_unet(tiny_model):
    """The float32 gradient (the tuning path) on the tiny UNet against float64 central
    differences of the same model: within 2e-2 relative for lam and lr, and 5e-2 of the
    schedule gradient's norm (the float64 differences themselves are limited to about 2e-4 by
    the UNet's float32 GroupNorm statistics and output cast)."""
    op, ys, keys, x = _problem(jnp.float32)
    base = RedDiffConfig(num_steps=K, lr=0.1, lam=0.25, differentiable=True)
    s0 = {"lam": jnp.float32(0.25), "lr": jnp.float32(0.1),
          "step_weights": jnp.linspace(0.5, 1.5, K, dtype=jnp.float32)}  # fmt: skip

    def loss(s):
        return tune_lib.validation_loss(tune_lib.apply_settings(base, s), tiny_model.eps, op, ys,
                                        keys, x)  # fmt: skip

    grad32 = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(s0))
    assert grad32["lam"].dtype == np.float32
    with jax.enable_x64(True):
        model64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), tiny_model)
        _, fd = _grads_and_fd(model64.eps, jnp.float64, h=1e-3)
    for name in ("lam", "lr"):
        assert grad32[name] == pytest.approx(fd[name], rel=2e-2), name
    d = fd["step_weights"]
    assert np.linalg.norm(grad32["step_weights"] - d) <= 5e-2 * np.linalg.norm(d)


def test_schedule_of_ones_is_the_official_solve_and_remat_changes_nothing(tiny_model):
    op, ys, keys, x = _problem(jnp.float32, n=2, task="inpaint:box")
    cfg = RedDiffConfig(num_steps=K, lr=0.2)
    a = solve(cfg, tiny_model.eps, op, ys, keys[0])
    ones = RedDiffConfig(num_steps=K, lr=0.2, step_weights=np.ones(K), differentiable=True)
    b = solve(ones, tiny_model.eps, op, ys, keys[0], remat=True)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    with pytest.raises(ValueError, match="expected 20 values"):
        RedDiffConfig(num_steps=20, step_weights=np.ones(K))

    def loss(lam, remat):
        cfg = RedDiffConfig(num_steps=K, lr=0.2, lam=lam, differentiable=True)
        return tune_lib.validation_loss(cfg, tiny_model.eps, op, ys, keys, x, remat=remat)

    g1 = jax.jit(jax.grad(loss), static_argnums=1)(jnp.float32(0.25), True)
    g0 = jax.jit(jax.grad(loss), static_argnums=1)(jnp.float32(0.25), False)
    np.testing.assert_allclose(float(g1), float(g0), rtol=1e-5)


def test_tune_writes_a_file_that_restore_settings_read(tiny_model, tmp_path):
    path = tmp_path / "tuned.json"
    rec = tune_lib.tune(jax.random.key(0), task="sr:4", learn=("lam", "schedule"), n=4,
                        steps=4, iters=2, batch=2, model=tiny_model, out=path,
                        progress=False)  # fmt: skip
    assert len(rec["history"]) == 2 and all(h["loss"] is not None for h in rec["history"])
    assert len(rec["params"]["step_weights"]) == 4 and rec["params"]["lam"] > 0
    assert rec["params"] != rec["start"]  # it moved
    assert json.loads(path.read_text())["format"] == tune_lib.FORMAT
    tuned = tune_lib.load_tuned(path, algo="reddiff")
    assert tuned["num_steps"] == 4
    cfg = registry.config_for("reddiff", "sr:4", steps=tuned["num_steps"],
                              overrides=tuned["params"])  # fmt: skip
    assert cfg.lam == tuned["params"]["lam"] and len(cfg.step_weights) == 4
    with pytest.raises(ValueError, match="not of dps"):
        tune_lib.load_tuned(path, algo="dps")
    with pytest.raises(ValueError, match="schedule"):
        tune_lib.tune(jax.random.key(0), algo="dps", learn=("schedule",), model=tiny_model, n=1)
