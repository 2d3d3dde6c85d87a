"""RED-Diff benchmark: step overhead over the network, vmapped many-measurement solve, compile time.

Prints, in one run:
  1. time of one RED-Diff step (inside the compiled scan of ``solve``) over the time of one jitted
     ``eps_fn`` call at the same batch (goal <= 1.05: the solver adds ~nothing to the UNet);
  2. a 16-measurement ``solve_many`` (one compiled call) versus 16 sequential ``solve`` calls,
     and versus one ``solve`` of the 16 as a batch (goal: solve_many / batch <= 1), for
     ``--algo`` (RED-Diff or DPS); with ``--devices N`` both are sharded over N CPU devices (as
     the command line runs them), and ``solve_many`` unchunked (``micro_batch=0``) is timed in
     the same rounds;
  3. compile times (first call minus a warm call).

Default: the tiny fixture UNet (``tiny_imagenet_like.pt`` converted, or the ``tiny`` preset with
random weights if the fixture is absent) at 32x32 on whatever JAX runs on (CPU here).
``--size 256``: the ADM ImageNet-256 unconditional config with random weights (timing only), for
a GPU. Usage::

    python benchmarks/bench_reddiff.py [--size 32|256] [--batch 1] [--steps 20] [--many 16]
        [--algo reddiff|dps] [--devices 1]
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

from reddiff_jax import operators, sharding
from reddiff_jax.model import ScoreModel
from reddiff_jax.solvers import DPSConfig, RedDiffConfig, solve, solve_many

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _time(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _best_time(fn, repeats: int) -> float:
    return min(_time(fn) for _ in range(repeats))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the benchmark, prints its table and returns its figures (seconds and ratios)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, choices=(32, 256), default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--many", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10, help="timing rounds (best is kept)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--algo", choices=("reddiff", "dps"), default="reddiff",
                   help="the solver of section 2 (solve_many vs one batch)")  # fmt: skip
    p.add_argument("--devices", type=int, default=1,
                   help="CPU devices section 2 shards over (set before JAX starts)")  # fmt: skip
    args = p.parse_args(argv)
    if args.devices > 1:
        sharding.use_cpu_cores(args.devices)

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

    # 2. many measurements: one vmapped call vs sequential calls vs one batch, in alternating
    # rounds (best kept); the sequential batch-1 solves run on one device
    m = args.many
    keys = jax.random.split(key, m)
    if args.algo == "reddiff":
        many = RedDiffConfig(num_steps=args.steps, lr=0.1)
    else:
        many = DPSConfig(num_steps=args.steps)
    mesh = sharding.data_mesh(args.devices) if args.devices > 1 else None

    def run_many(micro_batch=None):
        return solve_many(many, model.eps, op, ys, keys, op_axis=None, mesh=mesh,
                          micro_batch=micro_batch).x  # fmt: skip

    def run_seq():
        return [solve(many, model.eps, op, ys[i : i + 1], keys[i]).x for i in range(m)]

    def run_batch():  # the same m images as one batch (solve's defaults, micro-batching included)
        return solve(many, model.eps, op, ys, keys, mesh=mesh).x

    t0 = time.perf_counter()
    jax.block_until_ready(run_many())
    many_first = time.perf_counter() - t0
    jax.block_until_ready(run_many(0))
    jax.block_until_ready(run_seq())  # warm (the batch-1 solve is compiled once)
    jax.block_until_ready(run_batch())
    best = dict.fromkeys(("many", "many_whole", "seq", "batch"), float("inf"))
    for _ in range(max(1, args.repeats // 3)):
        for name, fn in (("many", run_many), ("many_whole", lambda: run_many(0)),
                         ("seq", run_seq), ("batch", run_batch)):  # fmt: skip
            best[name] = min(best[name], _time(fn))
    where = f"{args.devices} device(s)"
    print(f"{m} measurements, {args.algo}, on {where}:")
    print(f"  solve_many (1 call, defaults):     {best['many']:9.3f} s")
    print(f"  solve_many, micro_batch=0:         {best['many_whole']:9.3f} s")
    print(f"  {m} x solve (batch 1, one device):  {best['seq']:9.3f} s")
    print(f"  one solve of batch {m}:             {best['batch']:9.3f} s")
    print(f"  speed-up over {m} x solve:          {best['seq'] / best['many']:9.2f} x")
    print(f"  ratio solve_many / one batch:      {best['many'] / best['batch']:9.3f}   (goal <= 1)")
    print(f"  ratio defaults / micro_batch=0:    {best['many'] / best['many_whole']:9.3f}")

    # 3. compile times
    print(
        f"compile: eps_fn {eps_compile:.2f} s (first call); solve {solve_first - solve_time:.2f} s;"
        f" solve_many {many_first - best['many']:.2f} s"
    )
    return {
        "eps_call_s": eps_time,
        "step_s": step_time,
        "step_over_eps": step_time / eps_time,
        **{f"{name}_s": v for name, v in best.items()},
        "many_over_batch": best["many"] / best["batch"],
    }


if __name__ == "__main__":
    main()
