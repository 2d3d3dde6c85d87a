"""reddiff-jax: RED-Diff image restoration with diffusion priors, in JAX.

Images are NHWC float32 in [-1, 1] inside the library; files at the boundary are
uint8 or [0, 1]. PyTorch layouts (NCHW) appear only in the checkpoint converter.
"""

from reddiff_jax.model import (
    ScoreModel,
    load_pretrained,
    read_metadata,
    save_pretrained,
)
from reddiff_jax.unet import PRESETS, UNet, UNetConfig, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ScoreModel",
    "UNet",
    "UNetConfig",
    "get_preset",
    "load_pretrained",
    "read_metadata",
    "save_pretrained",
]
