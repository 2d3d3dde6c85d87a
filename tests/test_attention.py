"""The attention core (``reddiff_jax.attention``): value, VJP and JVP against a float64 reference.

The reference is the textbook ``softmax(q k^T) v`` evaluated in float64 (jax x64 inside a
context), its derivatives by autodiff of that formula. Tolerances: float32 rounding of logits
of size ~10 over 64 keys (values ~1e-6 relative; gradients ~1e-5 relative to their max).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import attention

SHAPE = (2, 3, 64, 8)  # [N, heads, T, ch]


def _inputs(dtype=np.float32):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=SHAPE).astype(dtype) * s for s in (1.2, 1.2, 1.0))
    ct = rng.normal(size=SHAPE).astype(dtype)
    return q, k, v, ct


def _reference(q, k, v):
    w = jax.nn.softmax(jnp.einsum("nhtc,nhsc->nhts", q, k), axis=-1)
    return jnp.einsum("nhts,nhsc->nhtc", w, v)


def _float64(fn, *args):
    with jax.enable_x64(True):
        out = fn(*(jnp.asarray(a, jnp.float64) for a in args))
        return jax.tree.map(np.asarray, out)


def test_value_matches_float64():
    q, k, v, _ = _inputs()
    got = jax.jit(attention.softmax_attention)(q, k, v)
    chex.assert_shape(got, SHAPE)
    chex.assert_type(got, jnp.float32)
    want = _float64(_reference, q, k, v)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)


def test_vjp_matches_float64():
    q, k, v, ct = _inputs()

    def pullback(f):
        def run(q, k, v, ct):
            return jax.vjp(f, q, k, v)[1](ct)

        return run

    got = jax.jit(pullback(attention.softmax_attention))(q, k, v, ct)
    want = _float64(pullback(_reference), q, k, v, ct)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-5 * np.abs(w).max())


def test_jvp_matches_float64():
    q, k, v, _ = _inputs()
    tangents = tuple(np.float32(0.1) * a for a in _inputs()[1:])  # any direction

    def forward(f):
        def run(q, k, v, dq, dk, dv):
            return jax.jvp(f, (q, k, v), (dq, dk, dv))

        return run

    got = jax.jit(forward(attention.softmax_attention))(q, k, v, *tangents)
    want = _float64(forward(_reference), q, k, v, *tangents)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-5 * np.abs(w).max())


def test_the_two_layouts_agree_and_keep_the_dtype():
    q, k, v, _ = _inputs()
    a, b = attention._query_major(q, k, v), attention._key_major(q, k, v)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)
    low_in = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    low = attention.softmax_attention(*low_in)
    chex.assert_type(low, jnp.bfloat16)

    def textbook_bf16(q, k, v):  # the UNet's formulation before: bf16 logits, f32 softmax
        w = jax.nn.softmax(jnp.einsum("nhtc,nhsc->nhts", q, k).astype(jnp.float32), axis=-1)
        return jnp.einsum("nhts,nhsc->nhtc", w.astype(v.dtype), v)

    err = np.abs(np.asarray(low, np.float32) - np.asarray(a)).max()
    err_textbook = np.abs(np.asarray(textbook_bf16(*low_in), np.float32) - np.asarray(a)).max()
    assert err <= 1.1 * err_textbook, (err, err_textbook)  # bf16 rounding of the logits dominates


@pytest.mark.parametrize("big", [30.0, -30.0])
def test_large_logits_stay_finite(big):
    q, k, v, ct = _inputs()
    q = q * big  # logits of order 1e3: the max subtraction keeps exp in range
    out, pull = jax.vjp(attention.softmax_attention, q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in pull(ct))


def test_vmapped_batches_of_one_match_the_batched_call():
    # solve_many vmaps solves of one image each: the flattened [N * heads, T, ch] core must give
    # what the batched call gives, value and VJP (the same arithmetic: float rounding at most)
    q, k, v, ct = _inputs()

    def value_and_pullback(q, k, v, ct):
        out, pull = jax.vjp(attention.softmax_attention, q, k, v)
        return out, pull(ct)

    want = jax.jit(value_and_pullback)(q, k, v, ct)
    one = jax.vmap(
        lambda *a: jax.tree.map(lambda x: x[0], value_and_pullback(*(x[None] for x in a)))
    )
    got = jax.jit(one)(q, k, v, ct)
    chex.assert_trees_all_equal_shapes(got, want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=0, atol=1e-6 * np.abs(w).max()
        )
