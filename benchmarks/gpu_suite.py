"""One-GPU benchmark suite for the ADM-256 UNet and the solvers, written to one JSON file.

Measures, with random weights (timing only):

* ``forward``: the ADM ImageNet-256 unconditional UNet (preset ``imagenet256_uncond``) forward
  ms at batch 1 / 8 / 16 in three precisions -- ``float32`` (matmul precision "highest"),
  ``tf32`` (float32 params and activations, the backend's default matmul precision: TF32 on
  NVIDIA GPUs) and ``bfloat16`` (``UNetConfig(dtype="bfloat16")``, default precision) -- with
  the FLOPs of the compiled call (XLA ``cost_analysis``), achieved TFLOP/s and the MFU against
  the measured bf16 matmul peak;
* ``peak``: the jitted square matmul peak (TFLOP/s) in bfloat16, tf32 and float32;
* ``reddiff_step``: one RED-Diff step (a compiled K-step solve / K) over one forward at the
  same batch;
* ``dps``: DPS time per step and XLA's temporary memory for the whole solve over RED-Diff's
  (plus the device's peak bytes in use where the backend reports it);
* ``many``: M measurements (default 16) solved by one vmapped ``solve_many`` call against M
  sequential batch-1 solves;
* compile times of every program above (lower + compile).

The JSON is rewritten after every part, so a run cut short keeps what it measured.
``--size tiny`` runs the same on a tiny config (CPU, seconds; used by tests/test_benchmarks.py).
The solver calls sit in three small functions (``reddiff_solve``, ``reddiff_solve_many``,
``dps_solve``) so a change of the solver API touches only them. Usage::

    python benchmarks/gpu_suite.py --out gpu_suite.json [--size 256|tiny] [--parts ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import operators, solvers
from reddiff_jax.model import ScoreModel
from reddiff_jax.unet import UNetConfig, get_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PARTS = ("peak", "forward", "reddiff_step", "dps", "many")
PRECISIONS = ("float32", "tf32", "bfloat16")

# The tiny CPU configuration: every block kind, compiled and run in seconds.
TINY = UNetConfig(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult=(1,),
    attention_resolutions=(8,),
    learn_sigma=True,
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
SIZES: dict[str, dict[str, Any]] = {
    "256": dict(config=get_preset("imagenet256_uncond"), batches=(1, 8, 16), solve_batch=8,
                steps=10, dps_batch=1, many=16, many_steps=10, matmul_n=8192, repeats=10),
    "tiny": dict(config=TINY, batches=(1,), solve_batch=1, steps=2, dps_batch=1, many=4,
                 many_steps=2, matmul_n=256, repeats=3),
}  # fmt: skip


# --------------------------------------------------------------------------------------
# The solver calls (the only code that depends on the solver API).
# --------------------------------------------------------------------------------------


def reddiff_solve(model: ScoreModel, op: Any, y: jax.Array, key: jax.Array, steps: int) -> Any:
    """RED-Diff on a batch y [B, *y_shape]; returns the restored x [B, H, W, C]."""
    config = solvers.RedDiffConfig(num_steps=steps, lr=0.1)
    return solvers.solve(config, model.eps, op, y, key, throw=False).x


def reddiff_solve_many(
    model: ScoreModel, op: Any, ys: jax.Array, keys: jax.Array, steps: int
) -> Any:
    """M independent batch-1 RED-Diff solves in one vmapped call; ys [M, *y_shape]."""
    config = solvers.RedDiffConfig(num_steps=steps, lr=0.1)
    return solvers.solve_many(config, model.eps, op, ys, keys, op_axis=None, throw=False).x


def dps_solve(model: ScoreModel, op: Any, y: jax.Array, key: jax.Array, steps: int) -> Any:
    """DPS (differentiates through the UNet every step) on a batch y."""
    config = solvers.DPSConfig(num_steps=steps, zeta=1.0)
    return solvers.solve(config, model.eps, op, y, key, throw=False).x


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def _precision(name: str) -> str:
    return "highest" if name == "float32" else "default"


def compile_call(fn: Callable, *args: Any, precision: str = "default") -> dict[str, Any]:
    """Lowers and compiles fn(*args) once; returns the callable, compile seconds, FLOPs, memory."""
    t0 = time.perf_counter()
    with jax.default_matmul_precision(precision):
        compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    return {
        "call": lambda: compiled(*args),
        "executable": compiled,
        "compile_s": seconds,
        "flops": float((cost or {}).get("flops", float("nan"))),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None) if mem is not None else None,
    }


def median_ms(call: Callable[[], Any], repeats: int) -> float:
    return common.median_s(call, repeats) * 1e3


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _problem(config: UNetConfig, n: int) -> tuple[Any, jax.Array]:
    shape = (config.image_size, config.image_size, config.in_channels)
    op = operators.make("sr", shape, factor=4 if config.image_size >= 16 else 2)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (n, *shape)), jnp.float32)
    return op, jax.vmap(op.A)(x)


# --------------------------------------------------------------------------------------
# Parts.
# --------------------------------------------------------------------------------------


def part_peak(spec: dict[str, Any], out: dict[str, Any]) -> None:
    n = spec["matmul_n"]
    rows = {}
    for name, dtype in (
        ("bfloat16", jnp.bfloat16),
        ("tf32", jnp.float32),
        ("float32", jnp.float32),
    ):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        c = compile_call(jnp.matmul, a, a, precision=_precision(name))
        ms = median_ms(c["call"], spec["repeats"])
        rows[name] = {"n": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9}
    out["peak_matmul"] = rows


def part_forward(model: ScoreModel, spec: dict[str, Any], out: dict[str, Any]) -> None:
    peak = out.get("peak_matmul", {}).get("bfloat16", {}).get("tflops")
    cfg = model.config
    rows = []
    for prec in PRECISIONS:
        m = model
        if prec == "bfloat16":
            m = ScoreModel(cfg.replace(dtype="bfloat16"), model.params)
        for b in spec["batches"]:
            x = jax.random.normal(jax.random.key(0), (b, cfg.image_size, cfg.image_size, 3))
            t = jnp.full((b,), 500, jnp.int32)
            c = compile_call(ScoreModel.apply, m, x, t, precision=_precision(prec))
            ms = median_ms(c["call"], spec["repeats"])
            tflops = c["flops"] / ms / 1e9
            rows.append({
                "precision": prec, "batch": b, "ms": ms, "gflop": c["flops"] / 1e9,
                "tflops": tflops, "mfu_vs_bf16_matmul": tflops / peak if peak else None,
                "compile_s": c["compile_s"],
            })  # fmt: skip
            out["forward"] = rows


def _solve_row(c: dict[str, Any], repeats: int, steps: int) -> dict[str, Any]:
    ms = median_ms(c["call"], max(1, repeats // 2))
    return {
        "step_ms": ms / steps, "solve_ms": ms, "compile_s": c["compile_s"],
        "temp_bytes": c["temp_bytes"], "peak_bytes_in_use": peak_bytes(),
    }  # fmt: skip


def part_reddiff_step(model: ScoreModel, spec: dict[str, Any], out: dict[str, Any]) -> None:
    b, steps = spec["solve_batch"], spec["steps"]
    op, y = _problem(model.config, b)
    s = model.config.image_size
    x = jax.random.normal(jax.random.key(0), (b, s, s, model.config.in_channels))
    t = jnp.full((b,), 500, jnp.int32)
    fwd = compile_call(ScoreModel.eps, model, x, t)
    fwd_ms = median_ms(fwd["call"], spec["repeats"])
    c = compile_call(lambda m, y, k: reddiff_solve(m, op, y, k, steps), model, y, jax.random.key(1))
    row = _solve_row(c, spec["repeats"], steps)
    out["reddiff_step"] = {
        "batch": b, "steps": steps, "eps_ms": fwd_ms, "eps_compile_s": fwd["compile_s"], **row,
        "step_over_eps": row["step_ms"] / fwd_ms,
    }  # fmt: skip


def part_dps(model: ScoreModel, spec: dict[str, Any], out: dict[str, Any]) -> None:
    b, steps = spec["dps_batch"], spec["steps"]
    op, y = _problem(model.config, b)
    key = jax.random.key(1)
    rows = {}
    for name, fn in (("reddiff", reddiff_solve), ("dps", dps_solve)):
        c = compile_call(lambda m, y, k, fn=fn: fn(m, op, y, k, steps), model, y, key)
        rows[name] = _solve_row(c, spec["repeats"], steps)
    r, d = rows["reddiff"], rows["dps"]
    ratio_mem = d["temp_bytes"] / r["temp_bytes"] if r["temp_bytes"] else None
    out["dps"] = {
        "batch": b, "steps": steps, **rows,
        "dps_over_reddiff_step_time": d["step_ms"] / r["step_ms"],
        "dps_over_reddiff_temp_memory": ratio_mem,
    }  # fmt: skip


def part_many(model: ScoreModel, spec: dict[str, Any], out: dict[str, Any]) -> None:
    m, steps = spec["many"], spec["many_steps"]
    op, ys = _problem(model.config, m)
    keys = jax.random.split(jax.random.key(2), m)
    many = compile_call(
        lambda mo, ys, ks: reddiff_solve_many(mo, op, ys, ks, steps), model, ys, keys
    )
    one = compile_call(lambda mo, y, k: reddiff_solve(mo, op, y, k, steps), model, ys[:1], keys[0])
    many_ms = median_ms(many["call"], max(1, spec["repeats"] // 3))
    args = [(model, ys[i : i + 1], keys[i]) for i in range(m)]
    exe = one["executable"]  # compiled once, called M times
    loop_ms = median_ms(lambda: [exe(*a) for a in args], max(1, spec["repeats"] // 3))
    out["many"] = {
        "measurements": m, "steps": steps, "vmapped_ms": many_ms, "looped_ms": loop_ms,
        "looped_over_vmapped": loop_ms / many_ms, "vmapped_compile_s": many["compile_s"],
        "single_compile_s": one["compile_s"],
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="256")
    p.add_argument("--out", type=Path, default=Path("gpu_suite.json"))
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    args = p.parse_args(argv)
    spec = SIZES[args.size]
    parts = [q for q in args.parts.split(",") if q]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; valid: {PARTS}")
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    out: dict[str, Any] = {
        "size": args.size, "config": spec["config"].to_dict(), "backend": jax.default_backend(),
        "device": dev.device_kind, "jax": jax.__version__, "host": platform.node(),
    }  # fmt: skip
    model = common.random_model(spec["config"])
    runners = {
        "peak": lambda: part_peak(spec, out),
        "forward": lambda: part_forward(model, spec, out),
        "reddiff_step": lambda: part_reddiff_step(model, spec, out),
        "dps": lambda: part_dps(model, spec, out),
        "many": lambda: part_many(model, spec, out),
    }
    for part in PARTS:
        if part in parts:
            t0 = time.perf_counter()
            runners[part]()
            out.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
            out["total_seconds"] = time.perf_counter() - t_start
            args.out.write_text(json.dumps(out, indent=1))
            print(f"{part}: done in {out['part_seconds'][part]:.1f} s", flush=True)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
