"""The driver's scan keeps every convolution on XLA CPU's canonical (fast) path.

XLA CPU canonicalises convolutions only in the entry computation; JAX's input gradient of a
convolution has kernel layout ``01oi``, so inside a rolled scan DPS / PGDM ran those on a naive
loop (3-4x slower per step). ``solvers._scan_convs`` rewrites the body; this checks the compiled
program of a real DPS solve, and that the detector sees the problem in a plain ``lax.scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import operators
from reddiff_jax.solvers import DPSConfig, _scan_convs, solve


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA CPU code-generation property")
@pytest.mark.parametrize("config", [DPSConfig(num_steps=2, zeta=0.5)])
def test_backprop_solvers_compile_to_canonical_convolutions(tiny_model, config):
    op = operators.make_from_spec("sr:4", (32, 32, 1))
    y = jnp.zeros((2, 8, 8, 1))

    def run(model, y):
        return solve(config, model.eps, op, y, jax.random.key(0), throw=False).x

    text = jax.jit(run).lower(tiny_model, y).compile().as_text()
    layouts = _scan_convs.conv_kernel_layouts(text)
    assert layouts.total() > 0 and set(layouts) == {"01io"}, layouts

    # the same body under a plain lax.scan has the slow layout (the detector works)
    def body(x, t):
        g = jax.grad(lambda v: jnp.sum(tiny_model.eps(v, jnp.full((2,), t)) ** 2))(x)
        return x - 1e-3 * g, None

    x = jnp.ones((2, 32, 32, 1))
    ts = jnp.array([900, 100])
    plain = jax.jit(lambda x: jax.lax.scan(body, x, ts)[0])
    fixed = jax.jit(lambda x: _scan_convs.scan(body, x, ts)[0])
    assert _scan_convs.conv_kernel_layouts(plain.lower(x).compile().as_text())["01oi"] > 0
    assert "01oi" not in _scan_convs.conv_kernel_layouts(fixed.lower(x).compile().as_text())
    # a relabelling of the same arithmetic: equal up to float rounding
    np.testing.assert_allclose(np.asarray(fixed(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-6)
