"""reddiff-jax: RED-Diff image restoration with diffusion priors, in JAX.

Images are NHWC float32 in [-1, 1] inside the library; files at the boundary are
uint8 or [0, 1]. PyTorch layouts (NCHW) appear only in the checkpoint converter.

Modules: `unet` (ADM UNet), `model` (ScoreModel, checkpoints), `convert` (PyTorch
checkpoints), `diffusion` (schedule), `operators` (measurement operators), `solvers`
(RED-Diff and the DDIM / DPS / PGDM / DDRM / DiffPIR baselines), `metrics`.
"""

from reddiff_jax import diffusion, operators, solvers
from reddiff_jax.model import (
    ScoreModel,
    load_pretrained,
    read_metadata,
    save_pretrained,
)
from reddiff_jax.solvers import RedDiffConfig, RedDiffResult
from reddiff_jax.unet import PRESETS, UNet, UNetConfig, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "RedDiffConfig",
    "RedDiffResult",
    "ScoreModel",
    "UNet",
    "UNetConfig",
    "diffusion",
    "get_preset",
    "load_pretrained",
    "operators",
    "read_metadata",
    "save_pretrained",
    "solvers",
]
