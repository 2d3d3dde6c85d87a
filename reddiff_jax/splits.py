"""The validation / test split of the held-out digits of the embedded prior (defined once).

Of the 1,000 held-out digits (``checkpoints/mnist32/heldout.npz``, never seen in training):

* ``"validation"``: the first 200 (indices 0 .. 199). Sweeps (:mod:`reddiff_jax.sweep`) and
  gradient tuning (:mod:`reddiff_jax.tune`) choose settings on these;
* ``"test"``: the other 800 (indices 200 .. 999). The evaluation table reports on these, so a
  setting chosen on the validation split is never scored on the digits that chose it.

Images are uint8 [n, H, W, C]; names are ``heldout_<index>`` with the index in the file, so a
test digit keeps its name whichever split API reads it.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["SPLITS", "indices", "labels", "load"]

SPLITS: dict[str, range] = {"validation": range(0, 200), "test": range(200, 1000)}


def indices(split: str, n: int | None = None) -> np.ndarray:
    """The first ``n`` (default all) indices of ``split`` into the held-out file."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {tuple(SPLITS)}, got {split!r}")
    idx = np.asarray(SPLITS[split], np.int64)
    if n is None:
        return idx
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 1 <= n <= len(idx):
        raise ValueError(f"n: expected an int in 1 .. {len(idx)} (the {split} split), got {n!r}")
    return idx[: int(n)]


def load(
    split: str,
    n: int | None = None,
    *,
    image_shape: tuple[int, int, int],
    path: str | os.PathLike | None = None,
) -> tuple[list[str], np.ndarray]:
    """(names, uint8 [n, H, W, C]) of the first ``n`` digits of ``split``."""
    from reddiff_jax.restore import load_heldout

    idx = indices(split, n)
    names, images = load_heldout(int(idx[-1]) + 1, image_shape=image_shape, path=path)
    return [names[i] for i in idx], images[idx]


def labels(
    split: str, n: int | None = None, *, path: str | os.PathLike | None = None
) -> np.ndarray:
    """The digit classes (int32 [n]) of the first ``n`` digits of ``split``, in ``load`` order."""
    from reddiff_jax.assets import default_heldout_path

    idx = indices(split, n)
    path = default_heldout_path() if path is None else path
    with np.load(path, allow_pickle=False) as data:
        if "labels" not in data:
            raise ValueError(f"labels: {path} holds no 'labels' array (found {list(data)})")
        values = np.asarray(data["labels"])
    if values.ndim != 1 or len(values) <= int(idx[-1]):
        raise ValueError(f"labels: {path} holds {values.shape} labels, need {int(idx[-1]) + 1}")
    return values[idx].astype(np.int32)
