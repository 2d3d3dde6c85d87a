"""DPS versus RED-Diff on the same model, operator and batch: time per step and peak memory.

DPS backpropagates through the network at every step (forward + VJP, activations kept for the
backward pass); RED-Diff calls the network once per step under ``stop_gradient``. Expected: DPS
several times slower per step and several times larger in temporary memory. DPS with
``remat=True`` (``jax.checkpoint`` of the network) is shown too.

Prints, in one run:
  * time per step: a warm compiled solve divided by its number of steps (median of repeats);
  * peak memory: XLA's ``compiled.memory_analysis()`` of the whole solve (temporaries, i.e.
    activations and loop buffers; arguments = model + inputs), and, where the backend reports it
    (GPU), the device's ``peak_bytes_in_use`` after each solver's runs (runs are ordered by
    increasing expected memory, so each reading is that solver's peak);
  * compile time (first call minus a warm call);
  * for reference, one jitted network forward and forward + VJP outside any loop.

Default: the tiny fixture UNet (``tiny_imagenet_like.pt`` converted; the ``tiny`` preset with
random weights if the fixture is absent) at 32x32 on the default JAX backend (CPU here).
``--size 256``: the ADM ImageNet-256 unconditional config with random weights (timing only), for
a GPU. Usage::

    python benchmarks/bench_dps_vs_reddiff.py [--size 32|256] [--batch 1] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import operators
from reddiff_jax.solvers import DPSConfig, RedDiffConfig, solve

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _mib(n: int | None) -> str:
    return "    n/a" if n is None else f"{n / 2**20:7.1f}"


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, choices=(32, 256), default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")

    model, label = common.bench_model(args.size)
    s = model.config.image_size
    shape = (s, s, model.config.in_channels)
    op = operators.make("sr", shape, factor=4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (args.batch, *shape)), jnp.float32)
    y = jax.vmap(op.A)(x)
    key = jax.random.key(0)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); model: {label}; "
        f"image {shape}; batch {args.batch}; {args.steps} steps; sr4"
    )

    # name -> x0_pred of a solve; ordered by increasing expected memory (see the docstring).
    solvers = {
        "RED-Diff": lambda m, y, k: (
            solve(RedDiffConfig(num_steps=args.steps), m.eps, op, y, k, throw=False).x
        ),
        "DPS (remat)": lambda m, y, k: (
            solve(
                DPSConfig(num_steps=args.steps, zeta=1.0, remat=True), m.eps, op, y, k, throw=False
            ).x  # fmt: skip
        ),
        "DPS": lambda m, y, k: (
            solve(DPSConfig(num_steps=args.steps, zeta=1.0), m.eps, op, y, k, throw=False).x
        ),
    }
    rows = {}
    for name, fn in solvers.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(model, y, key))
        first = time.perf_counter() - t0
        warm = common.median_s(lambda fn=fn: fn(model, y, key), args.repeats, warmup=False)
        peak = _peak_bytes()
        # The whole solve as one program (model passed as an argument) for XLA's memory plan.
        mem = jax.jit(fn).lower(model, y, key).compile().memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        argb = getattr(mem, "argument_size_in_bytes", None) if mem is not None else None
        rows[name] = (warm / args.steps, temp, argb, peak, first - warm)

    # Reference: the network alone, forward and forward + VJP, each as one jitted call.
    x_t = jnp.asarray(rng.standard_normal((args.batch, *shape)), jnp.float32)
    t = jnp.full((args.batch,), 500, jnp.int32)
    fwd = jax.jit(lambda m, x: m.eps(x, t))
    vjp = jax.jit(lambda m, x: jax.grad(lambda v: jnp.sum(m.eps(v, t) ** 2))(x))
    for f in (fwd, vjp):
        jax.block_until_ready(f(model, x_t))
    t_fwd = common.median_s(lambda: fwd(model, x_t), 4 * args.repeats, warmup=False)
    t_vjp = common.median_s(lambda: vjp(model, x_t), 4 * args.repeats, warmup=False)
    print(
        f"network alone (jitted call): forward {t_fwd * 1e3:.2f} ms, forward+VJP "
        f"{t_vjp * 1e3:.2f} ms ({t_vjp / t_fwd:.2f}x)"
    )
    print(f"{'solver':<12} {'ms/step':>9} {'temp MiB':>9} {'args MiB':>9} {'peak MiB':>9} "
          f"{'compile s':>9}")  # fmt: skip
    for name, (step, temp, argb, peak, comp) in rows.items():
        print(f"{name:<12} {step * 1e3:9.2f} {_mib(temp):>9} {_mib(argb):>9} {_mib(peak):>9} "
              f"{comp:9.1f}")  # fmt: skip
    base_step, base_temp = rows["RED-Diff"][0], rows["RED-Diff"][1]
    for name in ("DPS", "DPS (remat)"):
        step, temp = rows[name][0], rows[name][1]
        ratio_mem = f"{temp / base_temp:.2f}x" if temp and base_temp else "n/a"
        print(f"{name} / RED-Diff: time per step {step / base_step:.2f}x, temp memory {ratio_mem}")


if __name__ == "__main__":
    main()
