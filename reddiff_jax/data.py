"""Training images: loading from an `.npz`/`.npy` array or a folder of image files, and batching.

Images on disk and as loaded are uint8 [N, H, W, C] (NHWC, C = 1 grayscale or 3 RGB); the model
sees float32 in [-1, 1] (`to_float`). Batches are drawn by a pure function of (key, step): epoch e
is the permutation `jax.random.permutation(fold_in(key, e), N)`, and step s takes the positions
s * B .. s * B + B - 1 of the concatenated epochs, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from reddiff_jax import imageio

__all__ = ["batch_indices", "batches", "load_images", "to_float"]


def _as_nhwc_uint8(array: np.ndarray, source: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(
            f"{source}: expected images [N, H, W] or [N, H, W, C] with C in (1, 3), "
            f"got shape {array.shape}"
        )
    if array.shape[0] == 0:
        raise ValueError(f"{source}: expected at least one image, got an empty array")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(
                f"{source}: expected uint8 images in [0, 255], got dtype {array.dtype} "
                "(convert float images with np.round(x * 255).astype(np.uint8))"
            )
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{source}: expected integer values in [0, 255], got [{lo}, {hi}]")
        array = array.astype(np.uint8)
    return array


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            name = "images" if "images" in names else names[0] if len(names) == 1 else None
            array = None if name is None else archive[name]
    except (OSError, EOFError, ValueError) as err:  # not a zip / .npy, or pickled objects
        raise ValueError(f"data: cannot read {path} as a numpy array file: {err}") from err
    if array is None:
        raise ValueError(
            f"data: {path} holds arrays {names}; expected one named 'images' or a single array"
        )
    return array


def _load_folder(path: Path) -> np.ndarray:
    """Every image file of ``path`` (sorted), decoded by :mod:`reddiff_jax.imageio` (8/16-bit,
    float, palette, EXIF); the first image decides grey or RGB and the others are converted to it
    with a printed notice."""
    try:
        files = imageio.list_images([path])
    except ValueError as err:
        raise ValueError(f"data: {err}") from err
    images: list[np.ndarray] = []
    channels = None
    for file in files:
        try:
            x = imageio.read_image(file)
        except ValueError as err:
            raise ValueError(f"data: cannot read image {file}: {err}") from err
        channels = channels or (1 if x.shape[-1] in (1, 2) else 3)
        x = imageio.fit_channels(x, channels, name=str(file))
        if images and x.shape[:2] != images[0].shape[:2]:
            raise ValueError(
                f"data: all images must have the same size; {files[0].name} is "
                f"{images[0].shape[:2]} but {file.name} is {x.shape[:2]}"
            )
        images.append(np.round(x * 255.0).astype(np.uint8))
    return np.stack(images)


def load_images(path: str | Path) -> np.ndarray:
    """Loads training images from an `.npz`/`.npy` file or a folder of image files.

    An `.npz` must hold an array named `images` (or exactly one array). A folder is read in sorted
    file-name order (:func:`reddiff_jax.imageio.read_image`); the first image decides grayscale
    (C = 1) or RGB (C = 3).

    Returns:
      uint8 array [N, H, W, C], read-only (training never mutates its data).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: {path} does not exist")
    if path.is_dir():
        array = _load_folder(path)
    elif path.suffix in (".npz", ".npy"):
        array = _load_array(path)
    else:
        raise ValueError(f"data: expected an .npz/.npy file or a folder of images, got {path}")
    array = np.array(_as_nhwc_uint8(array, f"data ({path})"))
    array.flags.writeable = False
    return array


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1); a new array."""
    return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def _indices(step: int, n: int, batch_size: int, perm: Callable[[int], np.ndarray]) -> np.ndarray:
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = perm(int(epoch))[offsets[sel]]
    return out


def _permutation(key: jax.Array, epoch: int, n: int) -> np.ndarray:
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))


def batch_indices(key: jax.Array, step: int, *, num_examples: int, batch_size: int) -> np.ndarray:
    """Indices [batch_size] (int64) of the examples in batch number `step` (0-based).

    Pure in (key, step): epoch e is the permutation `jax.random.permutation(fold_in(key, e), N)`,
    and the batches tile the concatenated epochs without gaps or repeats within an epoch.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(
            f"num_examples and batch_size must be positive, got {num_examples}, {batch_size}"
        )
    return _indices(step, num_examples, batch_size, lambda e: _permutation(key, e, num_examples))


def batches(
    key: jax.Array, images: np.ndarray, batch_size: int, *, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Endless float32 batches [batch_size, H, W, C] in [-1, 1], from batch number `start_step` on.

    Batch s holds `images[batch_indices(key, s, ...)]`; `images` is only read.
    """
    n = images.shape[0]
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
    cache: dict[int, np.ndarray] = {}

    def perm(epoch: int) -> np.ndarray:
        if epoch not in cache:
            for old in [e for e in cache if e < epoch - 1]:  # keep memory bounded
                del cache[old]
            cache[epoch] = _permutation(key, epoch, n)
        return cache[epoch]

    step = start_step
    while True:
        yield to_float(images[_indices(step, n, batch_size, perm)])
        step += 1
