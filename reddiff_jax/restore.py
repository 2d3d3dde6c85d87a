"""The main job: restore images from simulated (or measured) degradations with a diffusion prior.

``restore(key, *, inputs, out, task, algo, ...)`` reads clean images (files, folders, or the
held-out digits of the embedded prior with ``demo=True``), simulates the measurement
``y = A(x) + 2 sigma_y n`` (or reads a measured ``y``), solves in fixed batches
(:mod:`reddiff_jax.pipeline`: one compilation, reused), and writes into ``out``:

  restored/<name>.png   the restoration, uint8 (clipped to [-1, 1], then (x + 1) / 2 * 255, rounded)
  records/<name>.json   that image's metrics and solver status (written after its PNG; the pair
                        marks it finished)
  grid.png              truth | measurement | pseudo-inverse | restoration, first ``grid_rows``
  metrics.json          per image and mean PSNR/SSIM of the restoration and of the pseudo-inverse,
                        the images whose solve diverged and the solver iterations actually taken
                        (the official grid may differ from ``steps``)
  run.json              the settings (with those iterations); a rerun with different settings
                        into the same folder is refused unless ``overwrite=True`` (which also
                        removes stale outputs)

Every file is written atomically (:mod:`reddiff_jax.imageio`), so an interruption never leaves a
partial file; a rerun skips the images whose PNG and record exist. Images at the boundary are
files or arrays in [0, 1] / uint8; the library works in float32 NHWC [-1, 1]. Metrics are
computed on the written uint8 images against the uint8 truth (as the official evaluation).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from reddiff_jax import imageio, operators, pipeline, posterior, sharding, tuned_defaults
from reddiff_jax import metrics as metrics_lib
from reddiff_jax.assets import default_heldout_path
from reddiff_jax.grid import grid_png, measurement_display
from reddiff_jax.model import resolve_model
from reddiff_jax.solvers import SolverConfig, SolveStatus, registry
from reddiff_jax.solvers.common import measurement_shape

__all__ = [
    "DEFAULT_STEPS",
    "RestoreOutputs",
    "algo_config",
    "load_heldout",
    "load_images",
    "load_measurements",
    "per_image",
    "restore",
]

DEFAULT_STEPS = 100


def algo_config(
    algo: str,
    task: str,
    *,
    steps: int | None = None,
    sigma_y: float = 0.0,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The config the main job uses: :func:`reddiff_jax.solvers.registry.config_for` with
    ``steps`` defaulting to :data:`DEFAULT_STEPS`."""
    steps = DEFAULT_STEPS if steps is None else int(steps)
    return registry.config_for(algo, task, steps=steps, sigma_y=sigma_y, overrides=overrides)


def per_image(config: SolverConfig, *, params: dict[str, Any] | None = None) -> SolverConfig:
    """``config`` solving each image on its own: RED-Diff's official ``batch_mean`` couples a
    batch's images (1/B and Adam's eps), so it becomes ``image_mean`` unless ``params`` sets a
    ``reduction``; then batch size, devices and resuming change no result. Other configs as is."""
    if getattr(config, "reduction", None) == "batch_mean" and "reduction" not in (params or {}):
        return dataclasses.replace(config, reduction="image_mean")
    return config


# ------------------------------------------------------------------------------------------------
# inputs


def _check_size(arr: np.ndarray, image_shape: tuple[int, int, int], what: str) -> None:
    h, w, _ = image_shape
    if tuple(arr.shape[-3:-1]) != (h, w):
        raise ValueError(
            f"{what}: image size {arr.shape[-3]}x{arr.shape[-2]} does not match the model's "
            f"{h}x{w}; resize or crop the input to {h}x{w} first (no resizing is done here)"
        )


def load_images(
    inputs: Sequence[str | os.PathLike],
    *,
    image_shape: tuple[int, int, int],
    notify: Callable[[str], None] | None = print,
) -> tuple[list[str], np.ndarray]:
    """Reads image files and folders of images (8/16-bit, float, grey, RGB(A), palette).

    Args:
      inputs: file or folder paths (folders: their image files, sorted).
      image_shape: (H, W, C) of the model; the size must match. A channel count other than C
        is converted with a printed notice through ``notify`` (None refuses it).

    Returns:
      (names [N], uint8 images [N, H, W, C]); names are the file stems, made unique.
    """
    paths = imageio.list_images(inputs)
    images = []
    for p in paths:
        x01 = imageio.fit_channels(imageio.read_image(p), image_shape[2], name=str(p),
                                   notify=notify)  # fmt: skip
        _check_size(x01, image_shape, f"inputs: {p}")
        images.append(np.round(x01 * 255.0).astype(np.uint8))
    return imageio.unique_names([p.stem for p in paths]), np.stack(images)


def load_heldout(
    n: int, *, image_shape: tuple[int, int, int], path: str | os.PathLike | None = None
) -> tuple[list[str], np.ndarray]:
    """The first ``n`` held-out digits (names ``heldout_0000``, ...) as uint8 [n, H, W, C]."""
    path = Path(path) if path is not None else default_heldout_path()
    if not path.is_file():
        raise FileNotFoundError(f"demo: the held-out digits {path} are missing")
    with np.load(path) as data:
        images = np.asarray(data["images"])
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 1 <= n <= len(images):
        raise ValueError(f"n: expected an int in 1 .. {len(images)}, got {n!r}")
    images = images[:n]
    images = images[..., None] if images.ndim == 3 else images
    _check_size(images, image_shape, "demo")
    if images.shape[-1] != image_shape[2]:
        raise ValueError(f"demo: the digits are grey; the model expects {image_shape[2]} channels")
    return [f"heldout_{i:04d}" for i in range(n)], images.astype(np.uint8)


def _read_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as data:
            if "y" not in data:
                raise ValueError(f"expected an array named 'y', found {list(data)}")
            return data["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # truncated/garbage files
        raise ValueError(f"y: cannot read {path}: {type(err).__name__}: {err}") from None


def load_measurements(
    path: str | os.PathLike, *, y_shape: tuple[int, ...]
) -> tuple[list[str], np.ndarray]:
    """Reads measured ``y`` for an operator whose measurement of one image has ``y_shape``.

    ``.npy``: float [N, *y_shape] or [*y_shape] in the library's units (images in [-1, 1]);
    ``.npz``: its array ``y`` the same way; an image file or a folder of them: images mapped to
    [-1, 1] (for image-shaped measurements, e.g. a low-resolution image for ``sr``).

    Raises:
      ValueError: wrong shape, non-finite values, or an unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"y: no such file or folder: {path}")
    if path.suffix in (".npy", ".npz"):
        y = _read_array(path)
        if not np.issubdtype(y.dtype, np.floating):
            raise ValueError(f"y: expected float measurements, got dtype {y.dtype} in {path}")
        y = y[None] if tuple(y.shape) == tuple(y_shape) else y
        names = [f"{path.stem}_{i:04d}" for i in range(len(y))] if y.ndim else []
    else:
        names, u8 = load_images([path], image_shape=(*y_shape[:2], y_shape[-1]))
        y = imageio.from_uint8(u8)
    if y.ndim != len(y_shape) + 1 or tuple(y.shape[1:]) != tuple(y_shape):
        raise ValueError(
            f"y: expected measurements of shape [N, *{tuple(y_shape)}] (or one of "
            f"{tuple(y_shape)}) for this task, got {tuple(y.shape)} from {path}"
        )
    if len(y) == 0:
        raise ValueError(f"y: {path} holds no measurements (shape {tuple(y.shape)})")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"y: expected finite values, {path} holds {int((~np.isfinite(y)).sum())}")
    return names, y.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# restore


@dataclasses.dataclass(frozen=True, kw_only=True)
class RestoreOutputs:
    """What :func:`restore` wrote.

    Attributes:
      out: the output folder.
      names: image names, in input order.
      restored: paths of the restored PNGs, aligned with ``names``.
      grid: path of the comparison grid PNG.
      metrics_path: path of metrics.json (None when there is no ground truth).
      metrics: the content of metrics.json (None when there is no ground truth).
      solved: number of images restored in this call; skipped: found finished and kept.
      failed: names of the images whose solve became non-finite or diverged.
      iterations: the solver steps actually taken (the official grid may differ from ``steps``).
    """

    out: Path
    names: list[str]
    restored: list[Path]
    grid: Path
    metrics_path: Path | None
    metrics: dict | None
    solved: int
    skipped: int
    failed: list[str] = dataclasses.field(default_factory=list)
    iterations: int = 0


def _gather(inputs, *, demo, n, y, op, image_shape, key, sigma_y):
    """(names, uint8 truth or None, y [N, *y_shape]) from the inputs, the demo or a measured y."""
    truth, names = None, []
    if demo:
        if inputs:
            raise ValueError("inputs: pass either image files/folders or demo=True, not both")
        names, truth = load_heldout(8 if n is None else n, image_shape=image_shape)
    elif inputs:
        names, truth = load_images(inputs, image_shape=image_shape)
        if n is not None:
            names, truth = names[:n], truth[:n]
    if y is not None:
        y_names, y_arr = load_measurements(y, y_shape=measurement_shape(op))
        if n is not None and truth is None:
            y_names, y_arr = y_names[:n], y_arr[:n]
        if truth is not None and len(truth) != len(y_arr):
            raise ValueError(
                f"y: {len(y_arr)} measurements but {len(truth)} ground-truth images were given"
            )
        return names or y_names, truth, y_arr
    if truth is None:
        raise ValueError("inputs: expected image files/folders, demo=True, or a measured y")
    y_arr = np.asarray(pipeline.simulate(op, imageio.from_uint8(truth), key, sigma_y=sigma_y))
    if not np.all(np.isfinite(y_arr)):
        raise ValueError("y: the simulated measurement is not finite")
    return names, truth, y_arr


def _claim_out(out: Path, settings: dict, names: list[str], overwrite: bool) -> dict[int, dict]:
    """Checks ``run.json`` against ``settings`` and returns the finished records by index.

    A different earlier run is refused unless ``overwrite``, which removes the outputs of
    images not in this run and re-solves the others.
    """
    run_file = out / "run.json"
    previous = pipeline.read_record(run_file) if run_file.is_file() else None
    if previous is not None and previous != settings and not overwrite:
        diff = sorted(k for k in set(settings) | set(previous)
                      if previous.get(k) != settings.get(k))  # fmt: skip
        raise FileExistsError(
            f"out: {out} holds the outputs of a run with other settings (differences: "
            f"{diff}); choose another --out or pass --overwrite"
        )
    if jax.process_index() == 0:  # with several processes, only process 0 writes here
        if overwrite:
            keep = set(names)
            for sub, suffix in (("restored", ".png"), ("records", ".json")):
                for f in (out / sub).glob(f"*{suffix}"):
                    if f.stem not in keep:
                        f.unlink()
        imageio.atomic_write_json(run_file, settings)
    return {} if overwrite else _finished(out, names)


def _finished(out: Path, names: list[str]) -> dict[int, dict]:
    """The records by index of the images whose PNG and record are both written."""
    finished = {}
    for i, name in enumerate(names):
        rec = pipeline.read_record(out / "records" / f"{name}.json", name=name)
        if rec is not None and (out / "restored" / f"{name}.png").is_file():
            finished[i] = rec
    return finished


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _scores(x_u8: np.ndarray, truth_u8: np.ndarray) -> dict[str, np.ndarray]:
    x, t = imageio.from_uint8(x_u8), imageio.from_uint8(truth_u8)
    return {"psnr": np.asarray(metrics_lib.psnr(x, t)), "ssim": np.asarray(metrics_lib.ssim(x, t))}


def _writer(out: Path, names, truth, pinv, records: dict[int, dict]):
    """The per-batch callback: writes each new image's PNG, then its record."""

    def on_batch(res: pipeline.BatchResult) -> None:
        x = np.where(np.isfinite(res.x), res.x, 0.0)
        restored_u8 = imageio.to_uint8(x)
        if truth is not None:
            r = _scores(restored_u8, truth[res.indices])
            p = _scores(imageio.to_uint8(pinv[res.indices]), truth[res.indices])
        for k, i in enumerate(res.indices.tolist()):
            if i in records:
                continue  # finished in an earlier run: keep its files untouched
            name = names[i]
            imageio.atomic_write_bytes(out / "restored" / f"{name}.png",
                                       imageio.png_bytes(restored_u8[k]))  # fmt: skip
            status = SolveStatus(int(res.status[k]))
            rec: dict[str, Any] = {"name": name, "index": i, "status": status.name.lower(),
                                   "failed_step": int(res.failed_step[k])}  # fmt: skip
            if truth is not None:
                for which, s in (("restored", r), ("pinv", p)):
                    rec[which] = {m: _finite_or_none(s[m][k]) for m in ("psnr", "ssim")}
            imageio.atomic_write_json(out / "records" / f"{name}.json", rec)
            records[i] = rec

    return on_batch


def _summary(
    task: str, algo: str, records: list[dict], names: list[str], iterations: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"task": task, "algo": algo, "n_images": len(names),
                           "iterations": int(iterations)}  # fmt: skip
    for which in ("restored", "pinv"):
        out[which] = {}
        for m in ("psnr", "ssim"):
            vals = [r[which][m] for r in records]
            finite = [v for v in vals if v is not None]
            out[which][m] = {"mean": float(np.mean(finite)) if finite else None,
                             "per_image": vals}  # fmt: skip
    out["images"] = names
    out["failed"] = [r["name"] for r in records if r.get("status", "success") != "success"]
    return out


def _digit_accuracy(out: Path, names, pinv, image_shape) -> dict[str, Any]:
    """With the demo digits on a 32x32 grey model: the embedded classifier's accuracy
    (restored and pseudo-inverse read as the true digit) as ``{"accuracy": {"restored": {mean,
    per_image}, "pinv": {...}}}``; else ``{}`` (no labels or another image shape)."""
    from reddiff_jax.sample_quality import digit_judge

    judge = digit_judge(image_shape)
    with np.load(default_heldout_path(), allow_pickle=False) as data:
        if judge is None or "labels" not in data:
            return {}
        labels = np.asarray(data["labels"][: len(names)], np.int32)
    restored = np.stack([np.asarray(Image.open(out / "restored" / f"{n}.png")) for n in names])
    images = {"restored": restored.reshape(len(names), *image_shape),
              "pinv": imageio.to_uint8(pinv)}  # fmt: skip
    acc = {}
    for which, x in images.items():
        hit = judge(x, labels)
        acc[which] = {"mean": float(hit.mean()), "per_image": hit.tolist()}
    return {"accuracy": acc}


def _write_grid(out: Path, names, truth, y_arr, pinv, algo, rows, image_shape) -> Path:
    shown = [np.asarray(Image.open(out / "restored" / f"{n}.png")) for n in names[:rows]]
    shown = np.stack([s[..., None] if s.ndim == 2 else s for s in shown])
    columns: list[tuple[str, np.ndarray]] = []
    if truth is not None:
        columns.append(("truth", truth[:rows]))
    meas = np.stack([measurement_display(y_arr[i], image_shape) for i in range(rows)])
    columns += [("measured", imageio.to_uint8(meas)), ("pinv", imageio.to_uint8(pinv[:rows])),
                (algo, shown)]  # fmt: skip
    path = out / "grid.png"
    imageio.atomic_write_bytes(path, grid_png(columns, rows=rows, image_shape=image_shape))
    return path


def _check_options(algo: str, sigma_y: Any, batch: Any, grid_rows: Any) -> None:
    registry.get(algo)
    if not isinstance(sigma_y, int | float) or not np.isfinite(sigma_y) or sigma_y < 0:
        raise ValueError(f"sigma_y: expected a finite float >= 0, got {sigma_y!r}")
    for name, v in (("batch", batch), ("grid_rows", grid_rows)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _check_samples(samples: Any, config: Any, multi: bool) -> None:
    if samples is None:
        return
    if not isinstance(samples, int | np.integer) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples: expected a positive int, got {samples!r}")
    if multi:
        raise ValueError("samples: posterior sampling runs in one process; drop --distributed")
    if float(getattr(config, "sigma_x0", 1.0)) == 0.0:
        raise ValueError(
            "samples: RED-Diff's samples need the x_0 jitter; pass --param sigma_x0=0.1 (> 0)"
        )


def restore(
    key: jax.Array,
    *,
    inputs: Sequence[str | os.PathLike] = (),
    out: str | os.PathLike,
    task: str = "inpaint:box",
    algo: str = "reddiff",
    sigma_y: float = 0.0,
    steps: int | None = None,
    model: Any = None,
    demo: bool = False,
    n: int | None = None,
    y: str | os.PathLike | None = None,
    batch: int = 8,
    devices: int | str = "all",
    params: dict[str, Any] | None = None,
    grid_rows: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    samples: int | None = None,
) -> RestoreOutputs:
    """Restores images and writes the PNGs, a comparison grid and metrics into ``out``.

    Main arguments:
      key: PRNG key; the operator (random masks), the measurement noise (image i:
        ``fold_in(key_y, i)``) and image i's solver draws (``fold_in(key_solve, i)``) derive
        from it.
      inputs: image files or folders (the size must be the model's). With ``y``, optional
        ground truth.
      out: output folder (created).
      task: operator spec, e.g. ``"inpaint:box"``, ``"sr:4"``, ``"blur:gaussian"``
        (``reddiff_jax.operators.make_from_spec``).
      algo: an algorithm name of :data:`reddiff_jax.solvers.registry.ALGORITHMS`.
      sigma_y: measurement noise, ``y = A(x) + 2 sigma_y n`` (official convention).
      steps: solver steps (default :data:`DEFAULT_STEPS`).
      model: a ``ScoreModel``, a checkpoint path or embedded name, or None for the default.

    Other arguments:
      demo: use the first ``n`` held-out digits of the embedded prior as inputs.
      n: with ``demo``, how many digits (default 8); otherwise the first ``n`` inputs.
      y: measured y instead of a simulated one (see :func:`load_measurements`).
      batch: images per solver call (over all devices; rounded up to a multiple of them).
        Neither ``batch`` nor ``devices`` changes a result: image i draws from
        ``fold_in(key_solve, i)`` alone.
      devices: ``"all"`` (every device of every process) or N local devices; the batch is
        sharded over them. With several processes (``jax.distributed.initialize`` first, as
        ``reddiff-jax restore --distributed`` does), every process runs this with the same
        arguments and a shared ``out``: process p restores and writes its block of the images
        (``sharding.process_span``); process 0 writes run.json, grid.png and metrics.json.
      params: solver settings overriding the defaults (e.g. ``{"lam": 0.5}``). The defaults
        are the algorithm's task defaults, overridden by the settings tuned for the model when
        its checkpoint folder holds a ``tuned.json`` (:mod:`reddiff_jax.tuned_defaults`; the
        embedded prior does: RED-Diff tuned per task on the validation digits).
      grid_rows: images shown in grid.png (at most).
      overwrite: reuse an ``out`` written with other settings (stale outputs are removed).
      progress: a tqdm bar over the solver steps of all batches.
      samples: also draw S posterior samples per image (vmapped; RED-Diff needs
        ``params={"sigma_x0": ...} > 0``) and write their mean, the samples and a per-pixel
        std map into ``out/posterior/`` (:func:`reddiff_jax.posterior.write_posterior`).

    Returns:
      :class:`RestoreOutputs` (``failed`` lists images whose solve diverged).
    """
    _check_options(algo, sigma_y, batch, grid_rows)
    sharding.data_mesh(devices)  # a bad `devices` fails here, before anything is written
    multi = jax.process_count() > 1
    model, model_name = resolve_model(model)
    cfg = model.config
    image_shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
    tuned = tuned_defaults.for_model(model_name, algo, task)  # the checkpoint's tuned.json
    config = algo_config(algo, task, steps=steps, sigma_y=sigma_y,
                         overrides={**tuned, **(params or {})})  # fmt: skip
    config = per_image(config, params=params)
    _check_samples(samples, config, multi)
    k_op, k_y, k_solve = (jax.random.fold_in(key, i) for i in range(3))
    op = operators.make_from_spec(task, image_shape, key=k_op)
    reason = registry.applicable(algo, op)
    if reason is not None:
        raise ValueError(f"algo: {algo} cannot solve task {task!r}: {reason}")
    names, truth, y_arr = _gather(inputs, demo=demo, n=n, y=y, op=op, image_shape=image_shape,
                                  key=k_y, sigma_y=sigma_y)  # fmt: skip
    out = pipeline.prepare_out(out, subdirs=("restored", "records"))
    settings = {"task": task, "algo": algo, "sigma_y": float(sigma_y),
                "config": pipeline.config_record(config), "tuned_defaults": tuned or None,
                "iterations": int(config.num_iterations), "model": model_name,
                "key": pipeline.key_data(key),
                "y": None if y is None else str(Path(y).resolve()), "images": names,
                "samples": samples}  # fmt: skip
    records = _claim_out(out, settings, names, overwrite)
    sharding.barrier("restore: out claimed")  # every process: after process 0 wrote run.json
    own = sharding.process_span(len(names)) if multi else range(len(names))
    todo = [i for i in own if i not in records]
    skipped = len(own) - len(todo)
    pinv = np.asarray(pipeline.pseudo_inverse(op, y_arr))
    mesh = sharding.data_mesh(devices, at_most=min(batch, max(len(todo), 1)))
    mesh = mesh if mesh.size > 1 else None
    pipeline.solve_batches(config, model.eps, op, y_arr, k_solve, batch=batch, todo=todo,
                           on_batch=_writer(out, names, truth, pinv, records),
                           progress=progress, desc=f"{algo} {task}", mesh=mesh)  # fmt: skip
    if multi:  # the other processes' records, once all are written
        sharding.barrier("restore: all solved")
        records = _finished(out, names)
        if len(records) < len(names):
            raise RuntimeError(f"out: {len(names) - len(records)} records are missing in {out}")
    lead = jax.process_index() == 0
    rows = min(int(grid_rows), len(names))
    grid = out / "grid.png"
    if lead:
        grid = _write_grid(out, names, truth, y_arr, pinv, algo, rows, image_shape)
    ordered = [records[i] for i in range(len(names))]
    summary, metrics_path = None, None
    if truth is not None:
        summary = _summary(task, algo, ordered, names, config.num_iterations)
        if demo:  # every process: loading the classifier is a collective with several
            summary.update(_digit_accuracy(out, names, pinv, image_shape))
        metrics_path = out / "metrics.json"
        if lead:
            imageio.atomic_write_json(metrics_path, summary)
    if samples:
        post = posterior.posterior(config, model.eps, op, y_arr, jax.random.fold_in(k_solve, 2**20),
                                   samples=samples, chunk=batch * samples)  # fmt: skip
        posterior.write_posterior(out, names, post)
    sharding.barrier("restore: done")  # no process returns before grid and metrics exist
    failed = [r["name"] for r in ordered if r.get("status", "success") != "success"]
    return RestoreOutputs(out=out, names=names, grid=grid, metrics_path=metrics_path,
                          restored=[out / "restored" / f"{n}.png" for n in names],
                          metrics=summary, solved=len(todo), skipped=skipped, failed=failed,
                          iterations=config.num_iterations)  # fmt: skip
