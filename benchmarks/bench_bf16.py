"""bfloat16 against float32: how far a RED-Diff restoration moves when the UNet computes in bf16.

For each task, the same held-out digits, measurements, keys and settings are restored twice with
the embedded MNIST prior: once with ``UNetConfig(dtype="float32")`` and once with
``dtype="bfloat16"`` (activations and matmuls in bf16, norms and softmax statistics in float32,
output cast to float32). Printed per task: the max abs difference of the two restorations (images
in [-1, 1]), the PSNR of the bf16 restoration against the float32 one, each one's PSNR against
the ground truth, and the time of each (the CPU has no bf16 matmul units, so bf16 is not faster
here; ``benchmarks/gpu_suite.py`` times it on a GPU). Usage::

    python benchmarks/bench_bf16.py [--n 16] [--steps 100] [--tasks sr:4,blur:gaussian,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from reddiff_jax import sharding

if __name__ == "__main__":  # before any JAX work: one CPU device per core, as the CLI does
    sharding.use_cpu_cores()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from reddiff_jax import imageio, metrics, operators, splits  # noqa: E402
from reddiff_jax.model import ScoreModel, resolve_model  # noqa: E402
from reddiff_jax.restore import algo_config, per_image  # noqa: E402
from reddiff_jax.solvers import solve  # noqa: E402

TASKS = "sr:4,blur:gaussian,inpaint:box,inpaint:random"


def restore_both(model: ScoreModel, task: str, x: jax.Array, steps: int, key: jax.Array):
    """float32 and bfloat16 RED-Diff restorations [N, H, W, C] of ``x`` and their times (s)."""
    op = operators.make_from_spec(task, x.shape[1:], key=jax.random.fold_in(key, 0))
    y = jax.vmap(op.A)(x)
    config = per_image(algo_config("reddiff", task, steps=steps, sigma_y=0.0, overrides=None))
    n = len(x)
    mesh = sharding.data_mesh(min(n, jax.local_device_count()))
    mesh = mesh if mesh.size > 1 and n % mesh.size == 0 else None
    out, times = {}, {}
    for dtype in ("float32", "bfloat16"):
        m = ScoreModel(dataclasses.replace(model.config, dtype=dtype), model.params)
        run = lambda m=m: solve(config, m.eps, op, y, jax.random.fold_in(key, 1), mesh=mesh).x  # noqa: E731
        jax.block_until_ready(run())  # compile
        t0 = time.perf_counter()
        out[dtype] = np.asarray(jax.block_until_ready(run()))
        times[dtype] = time.perf_counter() - t0
    return out, times


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean PSNR (dB) of [N, H, W, C] images in [-1, 1] (clipped) against ``b``."""
    return float(np.mean(np.asarray(metrics.psnr(jnp.asarray(a), jnp.asarray(b)))))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="held-out digits")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    model, name = resolve_model(None)
    cfg = model.config
    _, images = splits.load(
        "test", args.n, image_shape=(cfg.image_size, cfg.image_size, cfg.in_channels)
    )
    x = jnp.asarray(imageio.from_uint8(images))
    key = jax.random.key(0)
    print(f"model {name}; {args.n} held-out digits; RED-Diff, {args.steps} steps, task "
          f"defaults; {jax.local_device_count()} {jax.default_backend()} device(s)")  # fmt: skip
    print(f"{'task':16} {'max |bf16-f32|':>14} {'PSNR bf16 vs f32':>16} {'PSNR f32':>9} "
          f"{'PSNR bf16':>9} {'s f32':>7} {'s bf16':>7}")  # fmt: skip
    rows = []
    for task in args.tasks.split(","):
        out, times = restore_both(model, task, x, args.steps, jax.random.fold_in(key, len(rows)))
        f32, b16 = out["float32"], out["bfloat16"]
        row = {"task": task, "max_abs": float(np.max(np.abs(b16 - f32))),
               "psnr_bf16_vs_f32": psnr(b16, f32), "psnr_f32": psnr(f32, np.asarray(x)),
               "psnr_bf16": psnr(b16, np.asarray(x)), "s_f32": times["float32"],
               "s_bf16": times["bfloat16"]}  # fmt: skip
        rows.append(row)
        print(f"{task:16} {row['max_abs']:14.4f} {row['psnr_bf16_vs_f32']:16.2f} "
              f"{row['psnr_f32']:9.2f} {row['psnr_bf16']:9.2f} {row['s_f32']:7.2f} "
              f"{row['s_bf16']:7.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
