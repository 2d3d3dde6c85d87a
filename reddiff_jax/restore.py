"""The main job: restore images from simulated (or measured) degradations with a diffusion prior.

``restore(key, inputs, *, task, algo, ...)`` reads clean images (files, folders, or the held-out
digits of the embedded prior with ``demo=True``), simulates the measurement
``y = A(x) + 2 sigma_y n`` (or reads a measured ``y``), runs a solver batched (one compilation,
reused for every batch: the last batch is padded), and writes into ``out``:

  restored/<name>.png   the restoration, uint8 (clipped to [-1, 1], then (x + 1) / 2 * 255, rounded)
  records/<name>.json   that image's metrics (written after its PNG; the pair marks it finished)
  grid.png              truth | measurement | pseudo-inverse | restoration, first ``grid_rows``
  metrics.json          per image and mean PSNR/SSIM of the restoration and of the pseudo-inverse
  run.json              the settings; a rerun with different settings into the same folder is
                        refused unless ``overwrite=True``

Every file is written to a hidden temporary file in the same folder and moved into place with
``os.replace``, so an interruption never leaves a partial file. A rerun skips the images whose PNG
and record exist (batches are fixed by input position and each batch draws from its own key, so
a resumed run gives what an uninterrupted one gives).

Images at the boundary are uint8 files or arrays in [0, 1]; the library works in float32 NHWC
[-1, 1]. Metrics are computed on the written uint8 images against the uint8 truth (the official
evaluation reads saved PNGs too).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from reddiff_jax import metrics as metrics_lib
from reddiff_jax import solvers
from reddiff_jax.assets import default_heldout_path, default_model_path
from reddiff_jax.solvers import registry

__all__ = [
    "ALGOS",
    "IMAGE_SUFFIXES",
    "RestoreOutputs",
    "algo_config",
    "algo_defaults",
    "applicable",
    "default_heldout_path",
    "default_model_path",
    "load_heldout",
    "load_images",
    "load_measurements",
    "measurement_display",
    "register",
    "restore",
    "solve_batches",
]

ALGOS = registry.conditional_names()
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")
DEFAULT_STEPS = 100


def algo_defaults(algo: str, task: str) -> dict[str, Any]:
    """The config values ``restore`` uses for ``algo`` on ``task`` (besides ``num_steps``)."""
    return registry.task_defaults(algo, task)


def algo_config(
    algo: str,
    task: str,
    *,
    steps: int | None = None,
    sigma_y: float = 0.0,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The solver config for ``algo`` on ``task`` (:func:`reddiff_jax.solvers.registry.config_for`
    with ``steps`` defaulting to :data:`DEFAULT_STEPS`)."""
    steps = DEFAULT_STEPS if steps is None else int(steps)
    return registry.config_for(algo, task, steps=steps, sigma_y=sigma_y, overrides=overrides)


def applicable(algo: str, op: Any) -> str | None:
    """None when ``algo`` can run with ``op``, else the reason it cannot (a sentence)."""
    return registry.applicable(algo, op)


def _solve(algo: str, eps_fn: Callable, op: Any, y: jax.Array, config: Any, key: jax.Array):
    try:
        result = solvers.solve(config, eps_fn, op, y, key)
    except solvers.SolveError as err:
        raise ValueError(f"{algo}: the solve diverged: {err}") from err
    return result.x


# ------------------------------------------------------------------------------------------------
# images and measurements at the boundary


def _to_model(u8: np.ndarray) -> jax.Array:
    """uint8 [..., H, W, C] -> float32 in [-1, 1]."""
    return jnp.asarray(np.asarray(u8, np.float32) / 127.5 - 1.0)


def _to_uint8(x: Any) -> np.ndarray:
    """[-1, 1] float -> uint8, clipped and rounded (what torchvision's save_image does)."""
    x = np.asarray(x, np.float32)
    return np.round(np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


def _fit_channels(arr: np.ndarray, channels: int, what: str) -> np.ndarray:
    """[..., H, W, c] uint8 -> [..., H, W, channels] (gray <-> RGB by repeat / luma)."""
    c = arr.shape[-1]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    if c in (3, 4) and channels == 1:
        rgb = arr[..., :3].astype(np.float32)
        luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.round(luma)[..., None].astype(np.uint8)
    raise ValueError(f"{what}: cannot convert {c} channels to the model's {channels}")


def _check_size(arr: np.ndarray, image_shape: tuple[int, int, int], what: str) -> None:
    h, w, _ = image_shape
    if tuple(arr.shape[-3:-1]) != (h, w):
        raise ValueError(
            f"{what}: image size {arr.shape[-3]}x{arr.shape[-2]} does not match the model's "
            f"{h}x{w}; resize or crop the input to {h}x{w} first (no resizing is done here)"
        )


def _expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders as their image files (sorted, not recursive)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"inputs: folder {p} holds no image files ({IMAGE_SUFFIXES})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"inputs: no such file or folder: {p}")
    return paths


def _unique_names(stems: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        s = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s) or "image"
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.append(s if n == 0 else f"{s}_{n}")
    return out


def load_images(
    inputs: Iterable[str | os.PathLike], *, image_shape: tuple[int, int, int]
) -> tuple[list[str], np.ndarray]:
    """Reads image files and folders of images.

    Args:
      inputs: file or folder paths (folders: their image files, sorted).
      image_shape: (H, W, C) of the model; grayscale/RGB are converted to C, sizes must match.

    Returns:
      (names [N], uint8 images [N, H, W, C]); names are the file stems, made unique.

    Raises:
      FileNotFoundError: a missing path. ValueError: an unreadable image or a wrong size.
    """
    paths = _expand_inputs(inputs)
    if not paths:
        raise ValueError("inputs: expected at least one image file or folder, got none")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                mode = "L" if image_shape[2] == 1 else "RGB"
                arr = np.asarray(im.convert(mode), np.uint8)
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"inputs: cannot read {p} as an image: {err}") from err
        arr = arr[..., None] if arr.ndim == 2 else arr
        _check_size(arr, image_shape, f"inputs: {p}")
        images.append(arr)
    return _unique_names([p.stem for p in paths]), np.stack(images)


def load_heldout(
    n: int, *, image_shape: tuple[int, int, int], path: str | os.PathLike | None = None
) -> tuple[list[str], np.ndarray]:
    """The first ``n`` held-out digits (names ``heldout_0000``, ...) as uint8 [n, H, W, C]."""
    path = Path(path) if path is not None else default_heldout_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"demo: the held-out digits {path} are missing (they ship with a source checkout of "
            "reddiff-jax); pass image files or folders instead"
        )
    with np.load(path) as data:
        images = np.asarray(data["images"])
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 1 <= n <= len(images):
        raise ValueError(f"n: expected an int in 1 .. {len(images)}, got {n!r}")
    images = images[:n]
    images = images[..., None] if images.ndim == 3 else images
    _check_size(images, image_shape, "demo")
    images = _fit_channels(images.astype(np.uint8), image_shape[2], "demo")
    return [f"heldout_{i:04d}" for i in range(n)], images


def load_measurements(
    path: str | os.PathLike, *, y_shape: tuple[int, ...]
) -> tuple[list[str], np.ndarray]:
    """Reads measured ``y`` for an operator whose measurement of one image has ``y_shape``.

    ``.npy``: float [N, *y_shape] or [*y_shape] in the library's units (images in [-1, 1]);
    ``.npz``: its array ``y`` the same way; an image file or a folder of them: uint8 images mapped
    to [-1, 1] (for image-shaped measurements, e.g. a low-resolution image for ``sr``).

    Raises:
      ValueError: wrong shape, non-finite values, or an unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"y: no such file or folder: {path}")
    if path.suffix in (".npy", ".npz"):
        try:
            if path.suffix == ".npy":
                y = np.load(path, allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as data:
                    if "y" not in data:
                        raise ValueError(f"expected an array named 'y', found {list(data)}")
                    y = data["y"]
        except (OSError, ValueError) as err:
            raise ValueError(f"y: cannot read {path}: {err}") from err
        if not np.issubdtype(y.dtype, np.floating):
            raise ValueError(f"y: expected float measurements, got dtype {y.dtype} in {path}")
        y = y[None] if tuple(y.shape) == tuple(y_shape) else y
        names = [f"{path.stem}_{i:04d}" for i in range(len(y))] if y.ndim else []
    else:
        names, u8 = load_images([path], image_shape=(*y_shape[:2], y_shape[-1]))
        y = np.asarray(_to_model(u8))
    if y.ndim != len(y_shape) + 1 or tuple(y.shape[1:]) != tuple(y_shape):
        raise ValueError(
            f"y: expected measurements of shape [N, *{tuple(y_shape)}] (or one of "
            f"{tuple(y_shape)}) for this task, got {tuple(y.shape)} from {path}"
        )
    if not np.all(np.isfinite(y)):
        raise ValueError(f"y: expected finite values, {path} holds {int((~np.isfinite(y)).sum())}")
    return names, y.astype(np.float32)


def measurement_display(y: Any, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A viewable [H, W, C] image in [-1, 1] for one measurement ``y``.

    Image-shaped ``y`` (inpainting, blur, HDR) is shown as is; a low-resolution ``y`` (SR) is
    upsampled by pixel repetition; any other [P, Q, C] array (phase retrieval's Fourier
    magnitude) is shown as log(1 + |y|), min-max scaled and resized; anything else as grey.
    """
    y = np.asarray(y, np.float32)
    h, w, c = image_shape
    if y.shape == (h, w, c):
        return np.clip(y, -1.0, 1.0)
    if y.ndim == 3 and y.shape[2] == c and h % y.shape[0] == 0 and w % y.shape[1] == 0:
        ry, rx = h // y.shape[0], w // y.shape[1]
        return np.clip(np.repeat(np.repeat(y, ry, 0), rx, 1), -1.0, 1.0)
    if y.ndim == 3 and y.shape[2] == c:
        mag = np.log1p(np.abs(y))
        mag = (mag - mag.min()) / max(float(mag.max() - mag.min()), 1e-12)
        resized = jax.image.resize(jnp.asarray(mag), (h, w, c), "linear")
        return np.clip(np.asarray(resized) * 2.0 - 1.0, -1.0, 1.0)
    return np.zeros((h, w, c), np.float32)


# ------------------------------------------------------------------------------------------------
# files: atomic writes


def _atomic_write_bytes(path: Path, data: bytes) -> bool:
    """Writes ``data`` to ``path`` through a temporary file + os.replace; False if unchanged."""
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return True


def _png_bytes(u8: np.ndarray) -> bytes:
    arr = u8[..., 0] if u8.shape[-1] == 1 else u8
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _prepare_out(out: str | os.PathLike) -> Path:
    """Creates ``out`` (and its subfolders) and checks it is writable; ValueError otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("restored", "records"):
            (out / sub).mkdir(exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"out: cannot write to the output folder {out}: {err}") from err
    return out


# ------------------------------------------------------------------------------------------------
# the grid


def _grid_png(
    columns: Sequence[tuple[str, np.ndarray]], *, rows: int, image_shape: tuple[int, int, int]
) -> bytes:
    """A labelled grid: one column per (title, uint8 [N, H, W, C]), ``rows`` rows."""
    h, w, _ = image_shape
    scale = max(1, 96 // max(h, w))
    pad, header = 4, 14
    th, tw = h * scale, w * scale
    width = len(columns) * (tw + pad) + pad
    height = header + rows * (th + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, (title, tiles) in enumerate(columns):
        x0 = pad + j * (tw + pad)
        draw.text((x0, 1), title, fill=(0, 0, 0))
        for i in range(rows):
            tile = tiles[i]
            tile = np.repeat(tile, 3, axis=-1) if tile.shape[-1] == 1 else tile[..., :3]
            im = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            canvas.paste(im, (x0, header + pad + i * (th + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# batched solving (shared with reddiff_jax.evaluate)


@functools.partial(jax.jit, static_argnames=("sigma_y",))
def _measure_batch(op: Any, x: jax.Array, keys: jax.Array, *, sigma_y: float) -> jax.Array:
    from reddiff_jax import operators

    return jax.vmap(lambda xi, ki: operators.measure(op, xi, ki, sigma_y))(x, keys)


@jax.jit
def _pinv_batch(op: Any, y: jax.Array) -> jax.Array:
    return jax.vmap(op.A_dagger)(y)


def simulate(op: Any, x: jax.Array, key: jax.Array, *, sigma_y: float) -> jax.Array:
    """Measurements [N, *y_shape] of images x [N, H, W, C]; image i draws from fold_in(key, i)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x.shape[0]))
    return _measure_batch(op, x, keys, sigma_y=float(sigma_y))


def solve_batches(
    algo: str,
    eps_fn: Callable,
    op: Any,
    y: np.ndarray,
    config: Any,
    key: jax.Array,
    *,
    batch: int,
    todo: Sequence[int] | None = None,
    on_batch: Callable[[np.ndarray, np.ndarray], None] | None = None,
    progress: bool = True,
    desc: str = "restore",
) -> dict[int, float]:
    """Solves the measurements ``y`` [N, *y_shape] in fixed batches of ``batch``.

    Batch j holds images ``j*batch .. (j+1)*batch - 1`` and uses ``fold_in(key, j)``; the last one
    is padded (by repeating its last measurement) so every call has the same shape and the
    compiled solve is reused. Batches with no index in ``todo`` are skipped.

    Args:
      on_batch: called as ``on_batch(indices [b], x0_pred [b, H, W, C] float32)`` per batch.

    Returns:
      {batch index: wall seconds of its solve (including compilation for the first)}.
    """
    import time

    from tqdm.auto import tqdm

    n = len(y)
    if not isinstance(batch, int | np.integer) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    todo_set = set(range(n)) if todo is None else set(int(i) for i in todo)
    batches = [
        np.arange(s, min(s + batch, n))
        for s in range(0, n, batch)
        if todo_set & set(range(s, min(s + batch, n)))
    ]
    seconds: dict[int, float] = {}
    total = sum(len(b) for b in batches)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for idx in batches:
            j = int(idx[0]) // batch
            yb = np.asarray(y[idx])
            if len(idx) < batch:
                yb = np.concatenate([yb, np.repeat(yb[-1:], batch - len(idx), axis=0)])
            start = time.perf_counter()
            x0 = _solve(algo, eps_fn, op, jnp.asarray(yb), config, jax.random.fold_in(key, j))
            x0 = np.asarray(jax.block_until_ready(x0))[: len(idx)]
            seconds[j] = time.perf_counter() - start
            if not np.all(np.isfinite(x0)):
                raise ValueError(
                    f"{algo}: the restoration of batch {j} is not finite; lower the step size "
                    "(--lr for reddiff, --zeta for dps) or check the measurement"
                )
            if on_batch is not None:
                on_batch(idx, x0)
            bar.update(len(idx))
    return seconds


# ------------------------------------------------------------------------------------------------
# restore


@dataclasses.dataclass(frozen=True)
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
    """

    out: Path
    names: list[str]
    restored: list[Path]
    grid: Path
    metrics_path: Path | None
    metrics: dict | None
    solved: int
    skipped: int


def _key_data(key: jax.Array) -> list[int]:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(v) for v in np.asarray(key).reshape(-1)]


def _config_record(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name == "optimizer" and v is None:
            continue
        out[f.name] = v if isinstance(v, bool | int | float | str | type(None)) else repr(v)
    return out


def _record_finished(out: Path, name: str) -> dict | None:
    png, rec = out / "restored" / f"{name}.png", out / "records" / f"{name}.json"
    if not (png.is_file() and rec.is_file()):
        return None
    try:
        record = json.loads(rec.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("name") == name else None


def _image_metrics(x_u8: np.ndarray, truth_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, t = _to_model(x_u8), _to_model(truth_u8)
    return np.asarray(metrics_lib.psnr(x, t)), np.asarray(metrics_lib.ssim(x, t))


def _summary(records: list[dict], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for which in ("restored", "pinv"):
        out[which] = {}
        for m in ("psnr", "ssim"):
            vals = [r[which][m] for r in records]
            finite = [v for v in vals if v is not None]
            mean = float(np.mean(finite)) if finite else None
            out[which][m] = {"mean": mean, "per_image": vals}
    out["images"] = names
    return out


def restore(
    key: jax.Array,
    inputs: Sequence[str | os.PathLike] = (),
    *,
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
    params: dict[str, Any] | None = None,
    grid_rows: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> RestoreOutputs:
    """Restores images and writes the PNGs, a comparison grid and metrics into ``out``.

    Main arguments:
      key: PRNG key; the operator (random masks), the measurement noise (image i:
        ``fold_in(key_y, i)``) and each batch's solver draws derive from it.
      inputs: image files or folders (uint8 or [0, 1] files; grayscale/RGB converted to the
        model's channels; the size must be the model's). With ``y``, optional ground truth.
      out: output folder (created).
      task: operator spec, e.g. ``"inpaint:box"``, ``"sr:4"``, ``"blur:gaussian"``,
        ``"phase_retrieval"``, ``"hdr"`` (``reddiff_jax.operators.make_from_spec``).
      algo: one of :data:`ALGOS`.
      sigma_y: measurement noise, ``y = A(x) + 2 sigma_y n`` (official convention).
      steps: solver steps (default :data:`DEFAULT_STEPS`).
      model: a ``ScoreModel``, a checkpoint path, or None for the embedded prior.

    Other arguments:
      demo: use the first ``n`` held-out digits of the embedded prior as inputs.
      n: with ``demo``, how many digits (default 8); otherwise the first ``n`` inputs.
      y: measured y instead of a simulated one (see :func:`load_measurements`).
      batch: images per solver call.
      params: solver settings overriding :func:`algo_defaults` (e.g. ``{"lam": 0.5}``).
      grid_rows: images shown in grid.png (at most).
      overwrite: allow reusing an ``out`` written with other settings (its files are replaced).
      progress: show a tqdm bar per batch.

    Returns:
      :class:`RestoreOutputs`.

    Raises:
      ValueError: unknown task/algo/setting, unreadable or wrongly sized images, non-finite or
        wrongly shaped ``y``, an unwritable ``out``. FileNotFoundError: missing inputs/model.
      FileExistsError: ``out`` holds the outputs of a run with other settings.
    """
    from reddiff_jax import operators
    from reddiff_jax.model import ScoreModel, load_pretrained
    from reddiff_jax.solvers.common import measurement_shape

    registry.get(algo)
    if not isinstance(sigma_y, int | float) or not np.isfinite(sigma_y) or sigma_y < 0:
        raise ValueError(f"sigma_y: expected a finite float >= 0, got {sigma_y!r}")
    model_path = None
    if model is None or isinstance(model, str | os.PathLike):
        model_path = Path(model) if model is not None else default_model_path()
        model = load_pretrained(model_path)
    elif not isinstance(model, ScoreModel):
        raise TypeError(f"model: expected a ScoreModel, a path or None, got {type(model)}")
    cfg = model.config
    image_shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
    config = algo_config(algo, task, steps=steps, sigma_y=sigma_y, overrides=params)
    k_op, k_y, k_solve = (jax.random.fold_in(key, i) for i in range(3))
    op = operators.make_from_spec(task, image_shape, key=k_op)
    reason = applicable(algo, op)
    if reason is not None:
        raise ValueError(f"algo: {algo} cannot solve task {task!r}: {reason}")
    y_shape = measurement_shape(op)

    truth: np.ndarray | None = None
    names: list[str] = []
    if demo:
        if inputs:
            raise ValueError("inputs: pass either image files/folders or demo=True, not both")
        names, truth = load_heldout(8 if n is None else n, image_shape=image_shape)
    elif inputs:
        names, truth = load_images(inputs, image_shape=image_shape)
        if n is not None:
            names, truth = names[:n], truth[:n]
    if y is not None:
        y_names, y_arr = load_measurements(y, y_shape=y_shape)
        if n is not None and truth is None:
            y_names, y_arr = y_names[:n], y_arr[:n]
        if truth is not None and len(truth) != len(y_arr):
            raise ValueError(
                f"y: {len(y_arr)} measurements but {len(truth)} ground-truth images were given"
            )
        names = names or y_names
    elif truth is None:
        raise ValueError("inputs: expected image files/folders, demo=True, or a measured y")
    else:
        y_arr = np.asarray(simulate(op, _to_model(truth), k_y, sigma_y=sigma_y))
        if not np.all(np.isfinite(y_arr)):
            raise ValueError("y: the simulated measurement is not finite")

    out = _prepare_out(out)
    settings = {
        "task": task,
        "algo": algo,
        "sigma_y": float(sigma_y),
        "config": _config_record(config),
        "model": str(model_path.resolve()) if model_path is not None else "<in-memory model>",
        "key": _key_data(key),
        "batch": int(batch),
        "y": str(Path(y).resolve()) if y is not None else None,
        "images": names,
    }
    run_file = out / "run.json"
    if run_file.is_file() and not overwrite:
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != settings:
            diff = sorted(
                k
                for k in set(settings) | set(previous or {})
                if (previous or {}).get(k) != settings.get(k)
            )
            raise FileExistsError(
                f"out: {out} holds the outputs of a run with other settings (differences: "
                f"{diff}); choose another --out or pass --overwrite"
            )
    _atomic_write_bytes(run_file, _json_bytes(settings))

    records: dict[int, dict] = {}
    if not overwrite:
        for i, name in enumerate(names):
            rec = _record_finished(out, name)
            if rec is not None:
                records[i] = rec
    todo = [i for i in range(len(names)) if i not in records]
    pinv = np.asarray(_pinv_batch(op, jnp.asarray(y_arr)))

    def on_batch(idx: np.ndarray, x0: np.ndarray) -> None:
        restored_u8 = _to_uint8(x0)
        pinv_u8 = _to_uint8(pinv[idx])
        if truth is not None:
            r_psnr, r_ssim = _image_metrics(restored_u8, truth[idx])
            p_psnr, p_ssim = _image_metrics(pinv_u8, truth[idx])
        for k, i in enumerate(idx):
            if int(i) in records:
                continue  # finished in an earlier run: keep its files untouched
            name = names[i]
            _atomic_write_bytes(out / "restored" / f"{name}.png", _png_bytes(restored_u8[k]))
            rec: dict[str, Any] = {"name": name, "index": int(i)}
            if truth is not None:
                rec["restored"] = {
                    "psnr": _finite_or_none(r_psnr[k]),
                    "ssim": _finite_or_none(r_ssim[k]),
                }
                rec["pinv"] = {
                    "psnr": _finite_or_none(p_psnr[k]),
                    "ssim": _finite_or_none(p_ssim[k]),
                }
            _atomic_write_bytes(out / "records" / f"{name}.json", _json_bytes(rec))
            records[int(i)] = rec

    solve_batches(
        algo,
        model.eps,
        op,
        y_arr,
        config,
        k_solve,
        batch=batch,
        todo=todo,
        on_batch=on_batch,
        progress=progress,
        desc=f"{algo} {task}",
    )

    rows = min(int(grid_rows), len(names))
    restored_paths = [out / "restored" / f"{name}.png" for name in names]
    shown = [np.asarray(Image.open(p)) for p in restored_paths[:rows]]
    shown = np.stack([s[..., None] if s.ndim == 2 else s for s in shown])
    columns: list[tuple[str, np.ndarray]] = []
    if truth is not None:
        columns.append(("truth", truth[:rows]))
    meas = np.stack([measurement_display(y_arr[i], image_shape) for i in range(rows)])
    columns += [("measured", _to_uint8(meas)), ("pinv", _to_uint8(pinv[:rows])), (algo, shown)]
    grid_path = out / "grid.png"
    _atomic_write_bytes(grid_path, _grid_png(columns, rows=rows, image_shape=image_shape))

    summary = None
    metrics_path = None
    if truth is not None:
        ordered = [records[i] for i in range(len(names))]
        summary = {"task": task, "algo": algo, "n_images": len(names), **_summary(ordered, names)}
        metrics_path = out / "metrics.json"
        _atomic_write_bytes(metrics_path, _json_bytes(summary))
    return RestoreOutputs(
        out=out,
        names=names,
        restored=restored_paths,
        grid=grid_path,
        metrics_path=metrics_path,
        metrics=summary,
        solved=len(todo),
        skipped=len(names) - len(todo),
    )


# ------------------------------------------------------------------------------------------------
# command line


def _parse_params(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def _add_solver_arguments(parser: argparse.ArgumentParser) -> None:
    """The solver options shared by ``restore`` and ``eval``."""
    parser.add_argument(
        "--steps", type=int, default=None, help=f"solver steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--sigma-y", type=float, default=0.0, help="noise: y = A(x) + 2 sigma_y n")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: mnist32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch", type=int, default=8, help="images per solver call (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run(args: argparse.Namespace) -> int:
    params = _parse_params(args.param or [])
    for name in ("lam", "lr", "zeta", "eta"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    result = restore(
        jax.random.key(args.seed),
        args.inputs,
        out=args.out,
        task=args.task,
        algo=args.algo,
        sigma_y=args.sigma_y,
        steps=args.steps,
        model=args.model,
        demo=args.demo,
        n=args.n,
        y=args.y,
        batch=args.batch,
        params=params,
        grid_rows=args.grid_rows,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"restored {result.solved} image(s), kept {result.skipped} finished; "
        f"outputs in {result.out}"
    )
    if result.metrics is not None:
        for which in ("pinv", "restored"):
            m = result.metrics[which]
            print(
                f"  {which:>8}: PSNR {m['psnr']['mean']:.2f} dB  SSIM {m['ssim']['mean']:.4f} "
                f"(mean of {result.metrics['n_images']})"
            )
    print(f"  grid: {result.grid}")
    return 0


def _defaults_text() -> str:
    lines = [f"solver defaults ({DEFAULT_STEPS} steps; official settings, see the module doc):"]
    for name in ALGOS:
        table = registry.get(name).task_defaults
        parts = [", ".join(f"{k} {v}" for k, v in table.get("*", {}).items()) or "config defaults"]
        parts += [f"{task}: " + ", ".join(f"{k} {v}" for k, v in kv.items())
                  for task, kv in table.items() if task != "*"]  # fmt: skip
        lines.append(f"  {name}: " + "; ".join(parts))
    lines.append("example: reddiff-jax restore --demo --n 8 --task sr:4 --out outputs/demo_sr4")
    return "\n".join(lines)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``reddiff-jax restore`` to the CLI's subparsers (sets ``func``)."""
    p = subparsers.add_parser(
        "restore",
        help="restore images (files, a folder, or --demo digits) with a diffusion prior",
        description=(
            "Simulates a measurement of each input image (or reads --y), restores it with the "
            "chosen solver and writes restored/*.png, grid.png and metrics.json into --out. "
            "A rerun into the same --out skips finished images."
        ),
        epilog=_defaults_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", help="image files or folders (size of the model)")
    p.add_argument("--demo", action="store_true", help="use the held-out digits of mnist32")
    p.add_argument("--n", type=int, default=None, help="number of images (demo default 8)")
    p.add_argument("--task", default="inpaint:box", help="operator spec (default inpaint:box)")
    p.add_argument("--algo", default="reddiff", choices=ALGOS, help="solver (default reddiff)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--y", default=None, help="measured y (.npy/.npz, or image files)")
    p.add_argument("--lam", type=float, default=None, help="reddiff lambda (default per task)")
    p.add_argument("--lr", type=float, default=None, help="reddiff Adam lr (default per task)")
    p.add_argument("--zeta", type=float, default=None, help="dps/diffpir step zeta")
    p.add_argument("--eta", type=float, default=None, help="dps/pgdm/ddrm eta")
    p.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="any solver setting (repeatable)"
    )
    p.add_argument("--grid-rows", type=int, default=8, help="images shown in grid.png")
    p.add_argument("--overwrite", action="store_true", help="reuse an --out of another run")
    _add_solver_arguments(p)
    p.set_defaults(func=_run)
    return p
