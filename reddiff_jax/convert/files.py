"""Checkpoint files -> reddiff-jax checkpoint directories."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax.numpy as jnp

from reddiff_jax.convert.adm import convert_state_dict
from reddiff_jax.convert.torch_reader import read_state_dict
from reddiff_jax.model import ScoreModel, save_pretrained
from reddiff_jax.unet import UNetConfig

__all__ = ["CONVERTER_VERSION", "convert_file", "sha256_file"]

CONVERTER_VERSION = "1.0"


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: UNetConfig,
    *,
    force: bool = False,
) -> ScoreModel:
    """Converts a guided-diffusion state dict file to a reddiff-jax checkpoint directory.

    Args:
      src: a zip-format `.pt`/`.pth` (read without torch, no code executed) or `.safetensors`.
      dst: the checkpoint directory to write (see `reddiff_jax.model.save_pretrained`).
      config: the `UNetConfig` the checkpoint was trained with.
      force: replace an existing checkpoint at `dst`.

    Returns:
      The converted `ScoreModel` (params on the default device).

    Raises:
      FileNotFoundError: `src` does not exist.
      FileExistsError: `dst` exists and `force` is False (checked before any work).
      ValueError: unreadable/unsafe file, or keys/shapes that do not match `config`.
    """
    if not isinstance(config, UNetConfig):
        raise TypeError(f"config: expected a UNetConfig, got {type(config).__name__}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"src: checkpoint file not found: {src}")
    if dst.exists() and not force:
        raise FileExistsError(f"dst: {dst} already exists; pass force=True (--force) to replace it")
    params = convert_state_dict(read_state_dict(src), config)
    model = ScoreModel(config=config, params={k: _to_jax(v) for k, v in params.items()})
    metadata = {
        "source_file": src.name,
        "source_sha256": sha256_file(src),
        "converter": "reddiff_jax.convert (guided-diffusion UNetModel)",
        "converter_version": CONVERTER_VERSION,
    }
    save_pretrained(model, dst, metadata=metadata, force=force)
    return model


def _to_jax(tree):
    if isinstance(tree, dict):
        return {k: _to_jax(v) for k, v in tree.items()}
    return jnp.asarray(tree)
