"""The DPS step inside a rolled ``lax.scan``, with and without conv canonicalization, on XLA CPU.

DPS differentiates through the network at every step. JAX writes the input gradient of a
convolution with the kernel's I/O dimensions swapped (``dim_labels=..._01oi->...``); XLA CPU
rewrites such convolutions into its fast Eigen form only in the entry computation, so inside a
rolled scan (a ``while`` body) they run on a naive loop nest. ``reddiff_jax.solvers._scan_convs``
rewrites them to the canonical form when the body is traced (see its docstring).

For batch 1 and 8 this prints, measured interleaved in one process (median over rounds):
  * ``one``: one jitted DPS step (forward + input gradient + update), outside any loop;
  * ``rolled``: per-step time of ``jax.lax.scan`` over ``--steps`` DPS steps, and its ratio to
    ``one``;
  * ``fixed``: the same scan through ``_scan_convs.scan`` (goal: ratio <= 1.2);
  * the library itself: ``solvers.solve(DPSConfig(...))`` per step over one jitted call of the
    library's own DPS step (the issue's acceptance ratio, goal <= 1.2);
plus the kernel layouts of the compiled programs and the max |difference| of the two scans.

The step is written here (self-contained), mirroring ``solvers/dps.py``. Model: the tiny fixture
UNet ``tiny_imagenet_like.pt`` (32 px), or the ``tiny`` preset with random weights if absent.
Usage::

    python benchmarks/bench_dps_scan.py [--batch 1 8] [--steps 6] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from reddiff_jax import diffusion, operators, solvers
from reddiff_jax.solvers import _scan_convs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def dps_step(model, A, y, x, t, a_t, a_s, z, zeta=1.0, eta=0.0):
    """One DPS step as in ``solvers/dps.py``: x̂0, eps and d/dx_t sum ||y - A(x̂0(x_t))||^2."""

    def loss(x):
        eps = model.eps(x, t)
        x0 = diffusion.x0_from_eps(x, eps, a_t)
        r = y - A(x0)
        return jnp.sum(r**2), (x0, eps, r)

    grad, (x0, eps, r) = jax.grad(loss, has_aux=True)(x)
    norm = jnp.sqrt(jnp.sum(r.reshape(r.shape[0], -1) ** 2, axis=1))
    coeff = jnp.where(norm > 0, zeta / jnp.where(norm > 0, norm, 1.0), 0.0)
    x_s = diffusion.ddim_step(x0, eps, a_t, a_s, eta=eta, z=z)
    return x_s - coeff.reshape(-1, 1, 1, 1) * grad, norm


def _programs(model, op, batch: int, steps: int):
    A = jax.vmap(op.A)
    ac = diffusion.alphas_cumprod("linear", 1000)
    ts = jnp.asarray(diffusion.timesteps(steps, 1000))  # descending
    a_t = ac[ts]
    a_s = jnp.concatenate([ac[ts[1:]], jnp.ones((1,))])
    keys = jax.random.split(jax.random.key(2), steps)

    def body(model, y):
        def f(x, inp):
            t, at, as_, k = inp
            z = jax.random.normal(k, x.shape)
            return dps_step(model, A, y, x, jnp.full((batch,), t), at, as_, z)

        return f

    @jax.jit
    def one(model, y, x):
        return body(model, y)(x, (ts[0], a_t[0], a_s[0], keys[0]))

    def scan_with(scan):
        @jax.jit
        def run(model, y, x):
            return scan(body(model, y), x, (ts, a_t, a_s, keys))

        return run

    return one, scan_with(jax.lax.scan), scan_with(_scan_convs.scan)


def _library(model, op, y, steps: int):
    """The library's DPS: one jitted call of its step, and ``solvers.solve`` (the driver); the
    model is an argument of both programs (never baked in as constants)."""
    cfg = solvers.DPSConfig(num_steps=steps, zeta=1.0)
    ac = diffusion.alphas_cumprod("linear", 1000)
    x_shape = (y.shape[0], *op.image_shape)
    solver = cfg.build(model.eps, op, alphas_cumprod=ac)
    state = solver.init(y, cfg.hyperparams(), solver.draw_init(jax.random.key(0), x_shape))
    inp = jax.tree.map(lambda v: v[0], solvers.step_inputs(cfg))
    draws = solver.draw_step(jax.random.key(0), inp.k, x_shape)

    @jax.jit
    def step(model, state):
        return cfg.build(model.eps, op, alphas_cumprod=ac).step(state, inp, draws)

    def one():
        return step(model, state)

    def solve():
        return solvers.solve(cfg, model.eps, op, y, jax.random.key(0), throw=False).x

    return one, solve


def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def bench(model, batch: int, steps: int, rounds: int) -> None:
    s, c = model.config.image_size, model.config.in_channels
    op = operators.make_from_spec("sr:4", (s, s, c))
    x_true = jax.random.uniform(jax.random.key(0), (batch, s, s, c), minval=-1.0, maxval=1.0)
    y = jax.vmap(op.A)(x_true)
    x = jax.random.normal(jax.random.key(1), (batch, s, s, c))
    one, rolled, fixed = _programs(model, op, batch, steps)
    for name, fn in (("one", one), ("rolled", rolled), ("fixed", fixed)):
        text = fn.lower(model, y, x).compile().as_text()
        print(f"  {name:6s} conv kernel layouts: {dict(_scan_convs.conv_kernel_layouts(text))}")
    (xr, nr), (xf, nf) = rolled(model, y, x), fixed(model, y, x)
    jax.block_until_ready(one(model, y, x))
    diff = max(float(jnp.max(jnp.abs(xr - xf))), float(jnp.max(jnp.abs(nr - nf))))
    print(f"  max |rolled - fixed| over x_0 and residual norms: {diff:.2e}")
    t_one, t_rolled, t_fixed = [], [], []
    for _ in range(rounds):  # interleaved: each round times all three
        t_one.append(statistics.median(_time(one, model, y, x) for _ in range(3)))
        t_rolled.append(_time(rolled, model, y, x) / steps)
        t_fixed.append(_time(fixed, model, y, x) / steps)
    lib_one, lib_solve = _library(model, op, y, steps)
    jax.block_until_ready((lib_one(), lib_solve()))  # compile both
    t_lib_one, t_lib = [], []
    for _ in range(rounds):
        t_lib_one.append(statistics.median(_time(lib_one) for _ in range(3)))
        t_lib.append(_time(lib_solve) / steps)
    med = statistics.median
    ratio_lib = med(s / o for s, o in zip(t_lib, t_lib_one, strict=True))
    print(
        f"  batch {batch}: library step jitted {med(t_lib_one) * 1e3:7.1f} ms | solvers.solve "
        f"{med(t_lib) * 1e3:7.1f} ms/step ({ratio_lib:.2f}x, goal <= 1.2)"
    )
    ratio_r = med(r / o for r, o in zip(t_rolled, t_one, strict=True))
    ratio_f = med(f / o for f, o in zip(t_fixed, t_one, strict=True))
    print(
        f"  batch {batch}: one {med(t_one) * 1e3:7.1f} ms | rolled {med(t_rolled) * 1e3:7.1f} "
        f"ms/step ({ratio_r:.2f}x) | fixed {med(t_fixed) * 1e3:7.1f} ms/step ({ratio_f:.2f}x)"
        f"   [median over {rounds} rounds of per-round ratios]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=6, help="scan length (DPS steps)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model, name = common.bench_model()
    print(f"model: {name}; backend: {jax.default_backend()}; steps per scan: {args.steps}")
    for b in args.batch:
        bench(model, b, args.steps, args.rounds)


if __name__ == "__main__":
    main()
