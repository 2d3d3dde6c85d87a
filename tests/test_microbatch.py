"""Micro-batching of the network call (``solve(micro_batch=)``): the chunked call equals the whole
one, when the default selects it, and the errors. The sharded case is in test_sharding."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import operators
from reddiff_jax.solvers import (
    DPSConfig,
    PGDMConfig,
    RedDiffConfig,
    _microbatch,
    solve,
    solve_many,
)
from reddiff_jax.solvers.base import schedule_of

SHAPE = (4, 4, 2)


def per_image_eps(x, t):
    """A per-image eps that mixes pixels within an image (so a misplaced row shows)."""
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return 0.3 * jnp.tanh(x + mean) + (t / 1000.0)[:, None, None, None] * jnp.sin(x)


OP = operators.make("sr", SHAPE, factor=2)  # 2x2 block average; nearest-neighbour A_dagger


def _recording(fn):
    """``fn`` that records the batch size of every traced call."""
    seen = []

    def call(x, t):
        seen.append(x.shape[0])
        return fn(x, t)

    return call, seen


CASES = [(8, 4, 1, 4), (12, 4, 1, 4), (16, 2, 2, 4), (8, 8, 1, 8), (6, 4, 1, 6)]


@pytest.mark.parametrize(("batch", "rows", "devices", "calls"), CASES)
def test_chunked_call_equals_the_whole_call(batch, rows, devices, calls):
    x = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, *SHAPE)), jnp.float32)
    t = jnp.arange(batch, dtype=jnp.int32) * 50  # a different t per row
    eps, seen = _recording(per_image_eps)
    got = jax.jit(_microbatch.Microbatched(eps, rows, devices))(x, t)
    np.testing.assert_allclose(got, per_image_eps(x, t), rtol=1e-6, atol=1e-7)
    assert seen == [calls]  # traced once, on chunks of rows * devices (or whole: 8 <= 8, 6 % 4)


def test_auto_rows():
    auto = _microbatch.auto_rows
    assert auto(32, 2, "cpu") == 4 and auto(16, 2, "cpu") == 4 and auto(24, 2, "cpu") == 4
    assert auto(8, 2, "cpu") == 0  # 4 a device: one chunk, nothing to gain
    assert auto(20, 2, "cpu") == 0 and auto(18, 2, "cpu") == 0  # 4 does not divide the share
    assert auto(8, 1, "cpu") == 0 and auto(32, 1, "cpu") == 0  # one CPU device: whole is faster
    # a network VJP (DPS, ΠGDM) also chunks a share of 4 or 6 by 2; a share of 8+ still by 4
    assert auto(8, 2, "cpu", backprop=True) == 2 and auto(12, 2, "cpu", backprop=True) == 2
    assert auto(16, 2, "cpu", backprop=True) == 4 and auto(24, 2, "cpu", backprop=True) == 4
    assert auto(4, 2, "cpu", backprop=True) == 0 and auto(10, 2, "cpu", backprop=True) == 0
    assert auto(8, 1, "cpu", backprop=True) == 0 and auto(8, 2, "gpu", backprop=True) == 0
    assert auto(32, 2, "gpu") == 0 and auto(32, 1, "tpu") == 0


def test_solve_chunks_the_network_call_on_request():
    """One device: whole by default (measured faster there); micro_batch=4 runs chunks of 4 with
    the whole call's result. The multi-device default is in test_sharding."""
    x = np.random.default_rng(0).uniform(-1, 1, (8, *SHAPE)).astype(np.float32)
    y, key = jax.vmap(OP.A)(jnp.asarray(x)), jax.random.key(1)
    cfg = RedDiffConfig(num_steps=4, lr=0.2, reduction="image_mean")
    eps, seen = _recording(per_image_eps)
    whole = solve(cfg, eps, OP, y, key)
    assert set(seen) == {8}
    eps, seen = _recording(per_image_eps)
    four = solve(cfg, eps, OP, y, key, micro_batch=4)
    assert set(seen) == {4}
    np.testing.assert_allclose(four.x, whole.x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(four.info["loss"], whole.info["loss"], rtol=1e-5)

    # DPS differentiates the network: its forward and VJP run per chunk
    dps = DPSConfig(num_steps=4, zeta=0.02)
    eps, seen = _recording(per_image_eps)
    four = solve(dps, eps, OP, y, key, micro_batch=4)
    assert set(seen) == {4}
    whole = solve(dps, per_image_eps, OP, y, key)
    np.testing.assert_allclose(four.x, whole.x, rtol=1e-5, atol=1e-6)


def _many_inputs(num: int):
    """num measurements, each with its own 2x2-block mask (stacked operator leaves)."""
    rng = np.random.default_rng(num)
    x = jnp.asarray(rng.uniform(-1, 1, (num, *SHAPE)), jnp.float32)
    masks = jnp.asarray(rng.uniform(size=(num, *SHAPE)) > 0.3, jnp.float32)
    ops = jax.vmap(lambda m: operators.Inpainting.create(SHAPE, mask=m))(masks)
    return ops, x * ops.mask, jax.random.split(jax.random.key(7), num)


@pytest.mark.parametrize(
    "config",
    [RedDiffConfig(num_steps=4, lr=0.2), DPSConfig(num_steps=4, zeta=0.02, eta=0.5)],
    ids=["reddiff", "dps"],
)
def test_solve_many_in_chunks_equals_the_whole_vmap(config, monkeypatch):
    """micro_batch=2: the 12 solves run as 6 chunks of 2 (stacked operators, a per-measurement
    hyper-parameter, trajectories); every output equals the unchunked call's."""
    ops, ys, keys = _many_inputs(12)
    name = "lam" if isinstance(config, RedDiffConfig) else "zeta"
    hyper = {name: jnp.linspace(0.01, 0.3, 12)}
    whole = solve_many(config, per_image_eps, ops, ys, keys, hyper=hyper, trajectory=True)
    chunks, real_map = [], _microbatch.Microbatched.map

    def spy(self, f, *batched):
        chunks.append((batched[0].shape[0], self.chunk))
        return real_map(self, f, *batched)

    monkeypatch.setattr(_microbatch.Microbatched, "map", spy)
    two = solve_many(config, per_image_eps, ops, ys, keys, hyper=hyper, trajectory=True,
                     micro_batch=2)  # fmt: skip
    assert chunks == [(12, 2)]  # traced once: 12 measurements in chunks of 2
    assert jax.tree.structure(two) == jax.tree.structure(whole)
    for got, want in zip(jax.tree.leaves(two), jax.tree.leaves(whole), strict=True):
        chex.assert_equal_shape([got, want])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a shared operator and replayed draws chunk alike
    one_op = jax.tree.map(lambda v: v[0], ops)
    solver = config.build(per_image_eps, one_op, alphas_cumprod=schedule_of(config, None))
    k, rng = config.num_iterations, np.random.default_rng(5)
    noise = {n: rng.normal(size=(12, *SHAPE)) for n in solver.init_draws}
    noise.update({n: rng.normal(size=(12, k, *SHAPE)) for n in solver.step_draws})
    kw = {"op_axis": None, "noise": noise}
    whole = solve_many(config, per_image_eps, one_op, ys, None, **kw)
    three = solve_many(config, per_image_eps, one_op, ys, None, micro_batch=3, **kw)
    np.testing.assert_allclose(three.x, whole.x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [DPSConfig(num_steps=3, zeta=0.05), PGDMConfig(num_steps=3)])
def test_backprop_algorithms_take_the_vjp_chunk_by_chunk(config):
    """DPS / ΠGDM with micro_batch: each chunk's forward and VJP run together inside the map,
    so the result is the whole batch's and only one chunk's activations are live at a time."""
    x = np.random.default_rng(1).uniform(-1, 1, (8, *SHAPE)).astype(np.float32)
    y, key = jax.vmap(OP.A)(jnp.asarray(x)), jax.random.key(2)
    whole = solve(config, per_image_eps, OP, y, key, micro_batch=0)
    two = solve(config, per_image_eps, OP, y, key, micro_batch=2)
    np.testing.assert_allclose(two.x, whole.x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two.info["residual_norm"], whole.info["residual_norm"], rtol=1e-5)


def test_chunked_vjp_lowers_the_temporary_memory(tiny_model):
    op = operators.make_from_spec("sr:4", (32, 32, 1))
    y = jnp.zeros((8, 8, 8, 1))

    def temp_bytes(rows):
        def run(model, y):
            cfg = DPSConfig(num_steps=2)
            return solve(cfg, model.eps, op, y, jax.random.key(0), throw=False, micro_batch=rows).x

        return jax.jit(run).lower(tiny_model, y).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(2)
    assert chunked < 0.6 * whole, (chunked, whole)  # 4 chunks: the activations of one


@pytest.mark.parametrize("bad", [3, -1, True, 2.0])
def test_bad_micro_batch(bad):
    y = jnp.zeros((8, 2, 2, 2))
    with pytest.raises(ValueError, match="micro_batch"):
        solve(RedDiffConfig(num_steps=2), per_image_eps, OP, y, jax.random.key(0), micro_batch=bad)
    with pytest.raises(ValueError, match="micro_batch"):
        solve_many(RedDiffConfig(num_steps=2), per_image_eps, OP, y, jax.random.key(0),
                   op_axis=None, micro_batch=bad)  # fmt: skip
