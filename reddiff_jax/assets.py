"""The embedded priors and the digit classifier that ship inside the package (no download, works
offline).

The repository keeps them in the top-level ``checkpoints/`` folder; ``pyproject.toml`` maps that
folder to the package ``reddiff_jax.checkpoints``, so an editable install and an installed wheel
both resolve them here through :mod:`importlib.resources`.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = [
    "CLASSIFIER",
    "EMBEDDED",
    "default_heldout_path",
    "default_model_path",
    "embedded_classifier_path",
    "embedded_model_path",
]

EMBEDDED: tuple[str, ...] = ("mnist32",)
"""Names of the embedded priors, accepted by `reddiff_jax.load_pretrained`."""

CLASSIFIER = "mnist32_classifier"
"""Folder of the embedded digit classifier (`reddiff_jax.classifier.load_embedded_classifier`)."""

DEFAULT = "mnist32"
_PACKAGE = "reddiff_jax.checkpoints"
_HELDOUT = "heldout.npz"


def _checkpoints_root() -> Path:
    try:
        root = importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"the embedded checkpoints package {_PACKAGE} is not installed; reinstall "
            "reddiff-jax (`pip install .`, or `pip install -e .` in a source checkout)"
        ) from err
    if not isinstance(root, Path):  # e.g. a zipimport install: orbax needs real files
        raise FileNotFoundError(
            f"the embedded checkpoints ({root}) are not on the filesystem; install reddiff-jax "
            "unpacked (pip installs wheels unpacked)"
        )
    return root


def embedded_model_path(name: str) -> Path:
    """The checkpoint directory of the embedded prior `name` (one of `EMBEDDED`).

    Raises:
      ValueError: `name` is not an embedded prior (the message lists them).
      FileNotFoundError: the package was installed without its checkpoint files.
    """
    if name not in EMBEDDED:
        raise ValueError(
            f"name: {name!r} is not an embedded prior; the embedded priors are: "
            + ", ".join(EMBEDDED)
        )
    path = _checkpoints_root() / name
    if not (path / "reddiff_model.json").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(
            f"the embedded prior {name!r} is incomplete at {path} (expected reddiff_model.json "
            "and params/); reinstall reddiff-jax"
        )
    return path


def default_model_path() -> Path:
    """The checkpoint directory of the default embedded prior (``mnist32``)."""
    return embedded_model_path(DEFAULT)


def default_heldout_path() -> Path:
    """The held-out digits of the default prior: ``heldout.npz``, uint8 ``images`` [N, 32, 32, 1].

    Raises:
      FileNotFoundError: the file is missing from the installed package.
    """
    path = default_model_path() / _HELDOUT
    if not path.is_file():
        raise FileNotFoundError(
            f"the held-out digits of the embedded prior are missing ({path}); reinstall reddiff-jax"
        )
    return path


def embedded_classifier_path() -> Path:
    """The checkpoint directory of the embedded digit classifier (`CLASSIFIER`).

    Raises:
      FileNotFoundError: the package was installed without the classifier's files.
    """
    path = _checkpoints_root() / CLASSIFIER
    if not (path / "reddiff_classifier.json").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(
            f"the embedded digit classifier is incomplete at {path} (expected "
            "reddiff_classifier.json and params/); reinstall reddiff-jax, or in a source "
            "checkout run `python scripts/train_classifier.py`"
        )
    return path
