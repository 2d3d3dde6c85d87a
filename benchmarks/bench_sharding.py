"""Data-parallel scaling of a RED-Diff solve over the local devices (issue 11).

For D = 1, 2, 4, ... up to every local device, solves a batch of ``per_device * D`` images
sharded over a ``("data",)`` mesh of D devices (per-image keys, ``reduction="image_mean"``) and
prints the compile time (first call minus a warm call) and the warm throughput in images/s;
images are independent, so the throughput should grow about linearly in D on real devices.
Simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) share the same
cores, so there it only checks that the program runs (no speed-up is expected).

Usage::

    python benchmarks/bench_sharding.py [--size 32|256] [--per-device 4] [--steps 20] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import operators, sharding
from reddiff_jax.solvers import RedDiffConfig, solve

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32, choices=(32, 256))
    p.add_argument("--per-device", type=int, default=4, help="images per device")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    model, _ = common.bench_model(args.size, fixture=False)
    c = model.config
    shape = (c.image_size, c.image_size, c.in_channels)
    op = operators.make_from_spec("inpaint:box", shape, key=jax.random.key(1))
    cfg = RedDiffConfig(num_steps=args.steps, reduction="image_mean")
    n_local = len(jax.local_devices())
    counts = sorted({d for d in (1, 2, 4, 8, 16, 32, 64) if d <= n_local} | {n_local})
    rows = []
    for d in counts:
        mesh = sharding.data_mesh(d)
        b = args.per_device * d
        x = np.random.default_rng(0).uniform(-1, 1, (b, *shape)).astype(np.float32)
        y = jax.vmap(op.A)(jnp.asarray(x))
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(b))

        def run(mesh=mesh, y=y, keys=keys):
            t0 = time.perf_counter()
            jax.block_until_ready(solve(cfg, model.eps, op, y, keys, mesh=mesh, throw=False).x)
            return time.perf_counter() - t0

        first = run()
        warm = min(run() for _ in range(args.repeats))
        rows.append({"devices": d, "batch": b, "compile_s": round(first - warm, 3),
                     "solve_s": round(warm, 4), "images_per_s": round(b / warm, 2)})  # fmt: skip
        print(f"{d:>3} devices  batch {b:>4}  compile {first - warm:7.2f} s  solve {warm:8.3f} s"
              f"  {b / warm:9.2f} images/s")  # fmt: skip
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / base, 2)
    result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
              "size": args.size, "steps": args.steps, "rows": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
