"""Micro-batching of the network call (``solve(micro_batch=)``): the chunked call equals the whole
one, when the default selects it, and the errors. The sharded case is in test_sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import operators
from reddiff_jax.solvers import DPSConfig, PGDMConfig, RedDiffConfig, _microbatch, solve

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
    assert auto(32, 2, "cpu") == 4 and auto(8, 1, "cpu") == 4 and auto(12, 1, "cpu") == 4
    assert auto(8, 2, "cpu") == 0  # 4 a device: one chunk, nothing to gain
    assert auto(10, 1, "cpu") == 0 and auto(9, 2, "cpu") == 0  # 4 does not divide the share
    assert auto(32, 2, "gpu") == 0 and auto(32, 1, "tpu") == 0


def test_solve_default_chunks_the_network_call():
    x = np.random.default_rng(0).uniform(-1, 1, (8, *SHAPE)).astype(np.float32)
    y, key = jax.vmap(OP.A)(jnp.asarray(x)), jax.random.key(1)
    cfg = RedDiffConfig(num_steps=4, lr=0.2, reduction="image_mean")
    eps, seen = _recording(per_image_eps)
    auto = solve(cfg, eps, OP, y, key)
    assert set(seen) == ({4} if jax.default_backend() == "cpu" else {8})
    whole = solve(cfg, per_image_eps, OP, y, key, micro_batch=0)
    np.testing.assert_allclose(auto.x, whole.x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(auto.info["loss"], whole.info["loss"], rtol=1e-5)

    # DPS differentiates the network: chunked by default too (forward and VJP per chunk)
    dps = DPSConfig(num_steps=4, zeta=0.02)
    eps, seen = _recording(per_image_eps)
    auto = solve(dps, eps, OP, y, key)
    assert set(seen) == ({4} if jax.default_backend() == "cpu" else {8})
    whole = solve(dps, per_image_eps, OP, y, key, micro_batch=0)
    np.testing.assert_allclose(auto.x, whole.x, rtol=1e-5, atol=1e-6)


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
