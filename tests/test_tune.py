"""Gradient tuning: the gradient through the whole solve against finite differences, the
per-step weight schedule, and the tuned-settings file."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import imageio, operators, splits
from reddiff_jax import tune as tune_lib
from reddiff_jax.model import ScoreModel
from reddiff_jax.solvers import RedDiffConfig, registry, solve

K = 10  # num_steps=10: a 10-step grid, so a 10-value schedule
FD_SIZE = 8  # the gradient checks run the tiny UNet on 8x8 block means of the digits (sr:2)


def _problem(dtype, n=2, task="sr:4", size=32):
    _, truth = splits.load("validation", n, image_shape=(32, 32, 1))
    x = imageio.from_uint8(truth)
    if size != 32:  # block means of the 32x32 digits
        f = 32 // size
        x = x.reshape(n, size, f, size, f, 1).mean(axis=(2, 4))
    x = jnp.asarray(x, dtype)
    op = operators.make_from_spec(task, (size, size, 1), key=jax.random.key(0))
    return op, jax.vmap(op.A)(x), jax.random.split(jax.random.key(1), n), x


def _tiny_unet(tiny_model, dtype):
    """The tiny UNet's weights (`tiny_model`, random: its out conv is not zero-initialised)
    at FD_SIZE x FD_SIZE (one level, no resampling: the same network on a smaller image),
    computing in ``dtype`` with params of that dtype; float64 needs x64 on."""
    cfg = tiny_model.config.replace(image_size=FD_SIZE, dtype=jnp.dtype(dtype).name)
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), tiny_model.params)
    return ScoreModel(config=cfg, params=params)


def _validation_loss(model, dtype):
    """(loss(settings), starting settings): the validation loss of a 10-step differentiable
    RED-Diff solve (remat, as ``tune``) of sr:2 on two 8x8 digits, in ``dtype``."""
    op, ys, keys, x = _problem(dtype, task="sr:2", size=FD_SIZE)
    base = RedDiffConfig(num_steps=K, lr=0.1, lam=0.25, differentiable=True)

    def loss(s):
        cfg = tune_lib.apply_settings(base, s)
        return tune_lib.validation_loss(cfg, model.eps, op, ys, keys, x)

    s0 = {"lam": jnp.asarray(0.25, dtype), "lr": jnp.asarray(0.1, dtype),
          "step_weights": jnp.linspace(0.5, 1.5, K).astype(dtype)}  # fmt: skip
    return loss, s0


@pytest.fixture(scope="module")
def fd64(tiny_model):
    """Float64 central differences of the tiny UNet's validation loss w.r.t. lam, lr and each
    of the 10 schedule weights; every step is 1e-4 of the value (truncation ~1e-8 relative)."""
    h = 1e-4
    with jax.enable_x64(True):
        loss, s0 = _validation_loss(_tiny_unet(tiny_model, jnp.float64), jnp.float64)
        f = jax.jit(loss)

        def central(name, i=None):
            v = s0[name]
            step = h * (float(v) if i is None else float(v[i]))
            e = step if i is None else jnp.zeros_like(v).at[i].set(step)
            return float((f({**s0, name: v + e}) - f({**s0, name: v - e})) / (2 * step))

        weights = np.asarray([central("step_weights", i) for i in range(K)])
        return {"lam": central("lam"), "lr": central("lr"), "step_weights": weights}


def test_gradient_equals_central_differences_in_float64(tiny_model, fd64):
    """On the tiny UNet computing in float64 (float64 params, dtype="float64": GroupNorm,
    softmax, sinusoid and output in float64 too), jax.grad through the whole 10-step solve
    (remat, differentiable) = central differences to 1e-4 relative for lam, lr and each of the
    10 schedule weights (measured: lam 8.7e-9, lr 1.7e-10, schedule max |g - d| / max |d|
    2.0e-9, 3.7e-7 relative on its smallest weight gradient). Not vacuous: the out conv is
    not zero (std of its kernel > 0.01, so the network's output moves with mu), and lam, lr
    and the schedule norm have gradients above 1e-3 (measured 0.024, 2.7, 0.033)."""
    assert float(jnp.std(tiny_model.params["out_2"]["kernel"])) > 0.01
    with jax.enable_x64(True):
        model = _tiny_unet(tiny_model, jnp.float64)
        assert model.params["out_2"]["kernel"].dtype == jnp.float64
        loss, s0 = _validation_loss(model, jnp.float64)
        grad = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(s0))
    assert grad["lam"].dtype == np.float64
    for name in ("lam", "lr"):
        assert abs(grad[name]) > 1e-3, name
        assert grad[name] == pytest.approx(fd64[name], rel=1e-4), name
    g, d = grad["step_weights"], fd64["step_weights"]
    assert np.linalg.norm(g) > 1e-3
    assert g[-1] == 0.0  # the output is the last step's x0, taken before its update
    np.testing.assert_allclose(g, d, rtol=1e-4, atol=1e-4 * np.abs(d).max())


def test_float32_gradient_on_the_tiny_unet(tiny_model, fd64):
    """The float32 gradient (the tuning path: float32 params and compute) of the same solve
    against the float64 central differences: within 1e-3 relative for lam and lr, and 1e-3 of
    the schedule gradient's norm (measured on CPU: lam 1.8e-6, lr 1.7e-8, schedule 6.0e-7)."""
    loss, s0 = _validation_loss(_tiny_unet(tiny_model, jnp.float32), jnp.float32)
    grad32 = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(s0))
    assert grad32["lam"].dtype == np.float32
    for name in ("lam", "lr"):
        assert float(grad32[name]) == pytest.approx(fd64[name], rel=1e-3), name
    g, d = np.asarray(grad32["step_weights"], np.float64), fd64["step_weights"]
    assert np.linalg.norm(g - d) <= 1e-3 * np.linalg.norm(d)


def test_schedule_of_ones_is_the_official_solve_and_remat_changes_nothing(tiny_model):
    """On the tiny UNet at FD_SIZE (box inpainting of two 8x8 digits: a quarter of the compile
    of 32x32, the same properties), an explicit schedule of ones with remat is bit for bit the
    official solve, and the gradient with and without remat agrees to 1e-5."""
    model = _tiny_unet(tiny_model, jnp.float32)
    op, ys, keys, x = _problem(jnp.float32, n=2, task="inpaint:box", size=FD_SIZE)
    cfg = RedDiffConfig(num_steps=K, lr=0.2)
    a = solve(cfg, model.eps, op, ys, keys[0])
    ones = RedDiffConfig(num_steps=K, lr=0.2, step_weights=np.ones(K), differentiable=True)
    b = solve(ones, model.eps, op, ys, keys[0], remat=True)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    with pytest.raises(ValueError, match="expected 20 values"):
        RedDiffConfig(num_steps=20, step_weights=np.ones(K))

    def loss(lam, remat):
        cfg = RedDiffConfig(num_steps=K, lr=0.2, lam=lam, differentiable=True)
        return tune_lib.validation_loss(cfg, model.eps, op, ys, keys, x, remat=remat)

    g1 = jax.jit(jax.grad(loss), static_argnums=1)(jnp.float32(0.25), True)
    g0 = jax.jit(jax.grad(loss), static_argnums=1)(jnp.float32(0.25), False)
    np.testing.assert_allclose(float(g1), float(g0), rtol=1e-5)


def test_tune_writes_a_file_that_restore_settings_read(tiny_model, tmp_path):
    """The file round trip (the exact gradient through the network is checked above, so this
    run keeps the network under stop_gradient: through_network=False, a cheaper compile)."""
    path = tmp_path / "tuned.json"
    rec = tune_lib.tune(jax.random.key(0), task="sr:4", learn=("lam", "schedule"), n=4,
                        steps=4, iters=2, batch=2, model=tiny_model, through_network=False,
                        out=path, progress=False)  # fmt: skip
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
