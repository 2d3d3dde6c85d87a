"""Gradient-tuning benchmark: peak memory and time of tune's backward pass vs one forward solve.

For each step count (default 25 and 100) it compiles, for a batch of ``--batch`` measurements
(each a batch of one, as ``tune`` solves them):

  forward        the validation loss (one solve_many of the batch, no gradient)
  grad, remat    value_and_grad of the loss w.r.t. (lam, lr, a K-step schedule) with
                 jax.checkpoint on the scan body (what ``tune`` runs: one state per step)
  grad, no remat the same without checkpointing (the backward pass keeps every step's network
                 activations)

and prints XLA's memory analysis of each compiled program (peak = arguments + outputs + temps,
the buffers live at once; on a GPU also the device's measured peak), and the median wall time of
``--repeat`` warm calls. Usage::

    python benchmarks/bench_tune.py [--model mnist32|tiny] [--steps 25 100] [--batch 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import imageio, load_pretrained, operators, splits
from reddiff_jax import tune as tune_lib
from reddiff_jax.model import ScoreModel
from reddiff_jax.solvers import RedDiffConfig
from reddiff_jax.unet import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _model(name: str) -> ScoreModel:
    if name != "tiny":
        return load_pretrained(name)
    cfg = dataclasses.replace(PRESETS["tiny"], in_channels=1, out_channels=None,
                              channel_mult=(1,), attention_resolutions=(), learn_sigma=False,
                              resblock_updown=False)  # fmt: skip
    return common.random_model(cfg)


def _peak(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20


def _time(fn, args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device_peak() -> float | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return None if not stats or "peak_bytes_in_use" not in stats else stats["peak_bytes_in_use"]


def run(model_name: str, steps: int, batch: int, repeat: int) -> list[dict]:
    model = _model(model_name)
    shape = (model.config.image_size, model.config.image_size, model.config.in_channels)
    _, truth = splits.load("validation", batch, image_shape=shape)
    x = jnp.asarray(imageio.from_uint8(truth))
    op = operators.make_from_spec("sr:4", shape, key=jax.random.key(0))
    ys = jax.vmap(op.A)(x)
    keys = jax.random.split(jax.random.key(1), batch)
    base = RedDiffConfig(num_steps=steps, lr=0.1, lam=0.25, differentiable=True)
    k = base.num_iterations
    s0 = {"lam": jnp.float32(0.25), "lr": jnp.float32(0.1),
          "step_weights": jnp.ones((k,), jnp.float32)}  # fmt: skip

    def loss(s, model, remat):
        cfg = tune_lib.apply_settings(base, s)
        return tune_lib.validation_loss(cfg, model.eps, op, ys, keys, x, remat=remat)

    rows = []
    variants = [("forward", lambda s, m: loss(s, m, False)),
                ("grad, remat", jax.value_and_grad(lambda s, m: loss(s, m, True))),
                ("grad, no remat", jax.value_and_grad(lambda s, m: loss(s, m, False)))]  # fmt: skip
    for name, fn in variants:
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(s0, model).compile()
        compile_s = time.perf_counter() - t0
        peak = _peak(compiled)
        seconds = _time(compiled, (s0, model), repeat)
        rows.append({"steps": k, "variant": name, "peak_mib": peak, "seconds": seconds,
                     "compile_s": compile_s, "device_peak": _device_peak()})  # fmt: skip
        del compiled
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mnist32", help="mnist32 (embedded) or tiny (random)")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 100])
    p.add_argument("--batch", type=int, default=4, help="measurements per loss (default 4)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), model "
          f"{args.model}, batch {args.batch} (each a batch of one), sr:4, RED-Diff")  # fmt: skip
    print(f"{'steps':>5}  {'variant':<15} {'peak MiB':>9} {'x fwd':>6} {'seconds':>8} "
          f"{'x fwd':>6} {'compile s':>9}")  # fmt: skip
    for steps in args.steps:
        rows = run(args.model, steps, args.batch, args.repeat)
        fwd = rows[0]
        for r in rows:
            print(f"{r['steps']:5d}  {r['variant']:<15} {r['peak_mib']:9.1f} "
                  f"{r['peak_mib'] / fwd['peak_mib']:6.2f} {r['seconds']:8.3f} "
                  f"{r['seconds'] / fwd['seconds']:6.2f} {r['compile_s']:9.1f}")  # fmt: skip
    if np.isfinite(rows[0]["peak_mib"]):
        print("peak = XLA memory analysis of the compiled program (arguments + outputs + temps)")


if __name__ == "__main__":
    main()
