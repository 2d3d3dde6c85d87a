"""RED-Diff benchmark: step overhead over the network, vmapped many-measurement solve, compile time.

Prints, in one run:
  1. time of one RED-Diff step (inside the compiled scan of ``solve``) over the time of one jitted
     ``eps_fn`` call at the same batch (goal <= 1.05: the solver adds ~nothing to the UNet);
  2. a 16-measurement ``solve_many`` (one compiled call) versus 16 sequential ``solve`` calls,
     and versus one ``solve`` of the 16 as a batch (goal: solve_many / batch <= 1);
  3. compile times (first call minus a warm call).

Default: the tiny fixture UNet (``tiny_imagenet_like.pt`` converted, or the ``tiny`` preset with
random weights if the fixture is absent) at 32x32 on whatever JAX runs on (CPU here).
``--size 256``: the ADM ImageNet-256 unconditional config with random weights (timing only), for
a GPU. Usage::

    python benchmarks/bench_reddiff.py [--size 32|256] [--batch 1] [--steps 20] [--many 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import operators
from reddiff_jax.model import ScoreModel
from reddiff_jax.solvers import RedDiffConfig, solve, solve_many

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _best_time(fn, repeats: int) -> float:
    return min(_time(fn) for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, choices=(32, 256), default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--many", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10, help="timing rounds (best is kept)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)

    model, label = common.bench_model(args.size, args.dtype)
    s = model.config.image_size
    shape = (s, s, model.config.in_channels)
    op = operators.make("sr", shape, factor=4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (args.many, *shape)), jnp.float32)
    ys = jax.vmap(op.A)(x)
    y = ys[: args.batch] if args.batch <= args.many else jnp.tile(ys[:1], (args.batch, 1, 1, 1))
    config = RedDiffConfig(num_steps=args.steps, lr=0.1)
    key = jax.random.key(0)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); model: {label}; "
          f"image {shape}; batch {args.batch}; {args.steps} steps; sr4")  # fmt: skip

    # 1. one eps call vs one RED-Diff step. The three are timed in alternating rounds and the
    # best round is kept (timeit's advice: the minimum is the least disturbed by other load).
    eps_jit = jax.jit(ScoreModel.eps)
    x_t = jnp.asarray(rng.standard_normal((args.batch, *shape)), jnp.float32)
    t = jnp.full((args.batch,), 500, jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(eps_jit(model, x_t, t))
    eps_compile = time.perf_counter() - t0

    @jax.jit
    def eps_scan(model, x_t):  # the same number of eps calls chained in one compiled scan
        def body(x, _):
            return x + 1e-3 * model.eps(x, t), None

        return jax.lax.scan(body, x_t, None, length=args.steps)[0]

    def eps_calls():
        return [eps_jit(model, x_t, t) for _ in range(args.steps)]

    def run_solve(y, key):
        return solve(config, model.eps, op, y, key).state.mu

    jax.block_until_ready(eps_scan(model, x_t))
    t0 = time.perf_counter()
    jax.block_until_ready(run_solve(y, key))
    solve_first = time.perf_counter() - t0
    rounds = {"eps": [], "eps_scan": [], "solve": []}
    for _ in range(args.repeats):
        rounds["eps"].append(_time(eps_calls) / args.steps)
        rounds["eps_scan"].append(_time(lambda: eps_scan(model, x_t)) / args.steps)
        rounds["solve"].append(_time(lambda: run_solve(y, key)) / args.steps)
    eps_time, eps_scan_time, step_time = (min(rounds[k]) for k in ("eps", "eps_scan", "solve"))
    solve_time = step_time * args.steps
    print(f"eps_fn call (jitted, batch {args.batch}):    {eps_time * 1e3:9.3f} ms")
    print(f"eps_fn in a {args.steps}-step scan, per call: {eps_scan_time * 1e3:9.3f} ms")
    print(f"RED-Diff step (solve / steps):        {step_time * 1e3:9.3f} ms")
    print(f"  ratio step / eps call:              {step_time / eps_time:9.3f}   (goal <= 1.05)")
    print(f"  ratio step / eps in scan:           {step_time / eps_scan_time:9.3f}")
    print(
        "  (median ratio step / eps call: "
        f"{statistics.median(rounds['solve']) / statistics.median(rounds['eps']):.3f})"
    )

    # 2. many measurements: one vmapped call vs sequential calls
    m = args.many
    keys = jax.random.split(key, m)
    many = RedDiffConfig(num_steps=args.steps, lr=0.1)

    def run_many():
        return solve_many(many, model.eps, op, ys, keys, op_axis=None).state.mu

    def run_seq():
        return [solve(many, model.eps, op, ys[i : i + 1], keys[i]).state.mu for i in range(m)]

    def run_batch():  # the same m images as one batch (solve's defaults, micro-batching included)
        return solve(many, model.eps, op, ys, keys).state.mu

    t0 = time.perf_counter()
    jax.block_until_ready(run_many())
    many_first = time.perf_counter() - t0
    jax.block_until_ready(run_seq())  # warm (the batch-1 solve is compiled once)
    jax.block_until_ready(run_batch())
    many_time = seq_time = batch_time = float("inf")
    for _ in range(max(1, args.repeats // 3)):
        many_time = min(many_time, _time(run_many))
        seq_time = min(seq_time, _time(run_seq))
        batch_time = min(batch_time, _time(run_batch))
    print(f"{m} measurements, solve_many (1 call): {many_time:9.3f} s")
    print(f"{m} measurements, {m} x solve:          {seq_time:9.3f} s")
    print(f"{m} measurements, one solve of batch {m}: {batch_time:7.3f} s")
    print(f"  speed-up over {m} x solve:          {seq_time / many_time:9.2f} x")
    print(f"  ratio solve_many / one batch:      {many_time / batch_time:9.2f}   (goal <= 1)")

    # 3. compile times
    print(
        f"compile: eps_fn {eps_compile:.2f} s (first call); solve {solve_first - solve_time:.2f} s;"
        f" solve_many {many_first - many_time:.2f} s"
    )


if __name__ == "__main__":
    main()
