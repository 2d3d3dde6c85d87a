"""GroupNorm32 (``reddiff_jax.norm``): value, JVP and VJP against float64 autodiff of the formula.

The reference is the textbook GroupNorm ``(x - mean) / sqrt(var + eps) * scale + bias``, then
``* (1 + m_scale) + m_shift`` and SiLU, evaluated in float64 (jax x64 inside a context) and
differentiated by plain autodiff. Tolerances: float32 rounding of O(1) values over 64-element
groups (values ~1e-6; derivatives ~1e-5 relative to their max). In float64, ``check_grads``
also checks both modes and second order against finite differences.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from reddiff_jax.norm import _group_mean, group_norm

N, H, W, C = 2, 4, 4, 64


def _inputs(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = (2 * rng.normal(size=(N, H, W, C)) + 0.5).astype(dtype)  # an offset: two passes matter
    scale, bias = (rng.normal(size=C).astype(dtype) for _ in range(2))
    m_scale, m_shift = (s * rng.normal(size=(N, C)).astype(dtype) for s in (0.3, 1.0))
    return x, scale, bias, m_scale, m_shift


def _reference(x, scale, bias, m_scale, m_shift, *, modulate, silu):
    xg = x.reshape(x.shape[0], H * W, 32, C // 32)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    y = ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
    if modulate:
        y = y * (1 + m_scale[:, None, None]) + m_shift[:, None, None]
    return jax.nn.silu(y) if silu else y


def _ours(x, scale, bias, m_scale, m_shift, *, modulate, silu):
    mod = (m_scale, m_shift) if modulate else None
    return group_norm(x, scale, bias, modulation=mod, silu=silu)


def _float64(fn, *args):
    with jax.enable_x64(True):
        out = fn(*(jnp.asarray(a, jnp.float64) for a in args))
        return jax.tree.map(np.asarray, out)


def _close(got, want, rel):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=rel * max(np.abs(w).max(), 1e-30))


CASES = pytest.mark.parametrize(
    "modulate, silu", [(False, False), (False, True), (True, False), (True, True)]
)


@CASES
def test_value_matches_float64(modulate, silu):
    args = _inputs()
    got = jax.jit(lambda *a: _ours(*a, modulate=modulate, silu=silu))(*args)
    chex.assert_shape(got, (N, H, W, C))
    chex.assert_type(got, jnp.float32)
    want = _float64(lambda *a: _reference(*a, modulate=modulate, silu=silu), *args)
    _close(got, want, 2e-6)


@CASES
def test_vjp_matches_float64(modulate, silu):
    args = _inputs()
    ct = np.random.default_rng(1).normal(size=(N, H, W, C)).astype(np.float32)

    def pullback(f):
        def run(*a):
            return jax.vjp(lambda *p: f(*p, modulate=modulate, silu=silu), *a[:-1])[1](a[-1])

        return run

    got = jax.jit(pullback(_ours))(*args, ct)
    want = _float64(pullback(_reference), *args, ct)
    if not modulate:  # the modulation is unused: its cotangents are exact zeros
        for g in got[3:]:
            np.testing.assert_array_equal(np.asarray(g), 0)
        got, want = got[:3], want[:3]
    _close(got, want, 2e-5)


@CASES
def test_jvp_matches_float64(modulate, silu):
    args = _inputs()
    rng = np.random.default_rng(3)  # any direction
    tangents = tuple(rng.normal(size=a.shape).astype(np.float32) for a in args)

    def forward(f):
        def run(*a):
            primals, tans = a[:5], a[5:]
            return jax.jvp(lambda *p: f(*p, modulate=modulate, silu=silu), primals, tans)

        return run

    got = jax.jit(forward(_ours))(*args, *tangents)
    want = _float64(forward(_reference), *args, *tangents)
    _close(got, want, 2e-5)


def test_input_gradient_alone_matches_float64():
    """The DPS case: only x is differentiated, through a modulated GroupNorm + SiLU."""
    x, scale, bias, m_scale, m_shift = _inputs()
    ct = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)

    def input_grad(f):
        def run(x, scale, bias, m_scale, m_shift, ct):
            out = lambda x: f(x, scale, bias, m_scale, m_shift, modulate=True, silu=True)  # noqa: E731
            return jax.grad(lambda x: jnp.sum(out(x) * ct))(x)

        return run

    got = jax.jit(input_grad(_ours))(x, scale, bias, m_scale, m_shift, ct)
    want = _float64(input_grad(_reference), x, scale, bias, m_scale, m_shift, ct)
    _close(got, want, 2e-5)


def test_derivatives_match_finite_differences_in_float64():
    """Both modes and second order against central differences."""
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in _inputs())
        f = lambda *a: _ours(*a, modulate=True, silu=True)  # noqa: E731
        check_grads(f, args, order=2, modes=("fwd", "rev"))


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics():
    x, scale, bias, m_scale, m_shift = _inputs()
    xb = jnp.asarray(x, jnp.bfloat16)
    got = group_norm(xb, scale, bias, modulation=(m_scale, m_shift), silu=True)
    chex.assert_type(got, jnp.bfloat16)
    want = _float64(
        lambda *a: _reference(*a, modulate=True, silu=True),
        np.asarray(xb, np.float32),
        scale,
        bias,
        m_scale,
        m_shift,
    )
    _close(np.asarray(got, np.float32), want, 1e-2)  # bfloat16 output rounding (8 bits)
    grad = jax.grad(lambda x: jnp.sum(group_norm(x, scale, bias, silu=True).astype(jnp.float32)))
    chex.assert_type(grad(xb), jnp.bfloat16)


def test_channels_must_split_into_groups():
    x = jnp.zeros((1, 2, 2, 48))
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        group_norm(x, jnp.ones(48), jnp.zeros(48))


@pytest.mark.parametrize("channels", [32, 64, 256])
def test_group_mean_repeat_by_product_is_exact(channels):
    """The one-hot product that repeats each group's mean equals reshape-mean-repeat bit for bit."""
    v = jax.random.normal(jax.random.key(7), (3, channels)) * 10.0
    size = channels // 32
    want = jnp.repeat(jnp.mean(v.reshape(3, 32, size), axis=-1), size, axis=-1)
    got = jax.jit(_group_mean, static_argnums=1)(v, 32)
    chex.assert_shape(got, (3, channels))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_batch_of_one_matches_float64():
    """Batch 1 takes the einsum form of the per-(n, c) product (``norm._scale_rows``)."""
    args = tuple(a[:1] for a in _inputs())
    ct = np.random.default_rng(4).normal(size=(1, H, W, C)).astype(np.float32)
    f = lambda *a: _ours(*a, modulate=True, silu=True)  # noqa: E731
    ref = lambda *a: _reference(*a, modulate=True, silu=True)  # noqa: E731
    _close(jax.jit(f)(*args), _float64(ref, *args), 2e-6)
    pullback = lambda g: lambda *a: jax.vjp(g, *a[:-1])[1](a[-1])  # noqa: E731
    _close(jax.jit(pullback(f))(*args, ct), _float64(pullback(ref), *args, ct), 2e-5)
    with jax.enable_x64(True):
        check_grads(
            f, tuple(jnp.asarray(a, jnp.float64) for a in args), order=2, modes=("fwd", "rev")
        )
