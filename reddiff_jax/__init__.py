"""reddiff-jax: RED-Diff image restoration with diffusion priors, in JAX.

Images are NHWC float32 in [-1, 1] inside the library; files at the boundary are
uint8 or [0, 1]. PyTorch layouts (NCHW) appear only in the checkpoint converter.

The flat API: a score model (``load_pretrained``, ``ScoreModel``, ``UNet``), operators
(``operators.make_from_spec``), and one driver for every algorithm::

    solution = reddiff_jax.solve(reddiff_jax.RedDiffConfig(), model.eps, op, y, key)

Subpackages: ``operators``, ``solvers``, ``convert``; modules: ``diffusion``, ``metrics``.
"""

from reddiff_jax import diffusion, operators, solvers
from reddiff_jax.model import ScoreModel, load_pretrained, read_metadata, save_pretrained
from reddiff_jax.solvers import (
    ALGORITHMS,
    DDIMConfig,
    DDRMConfig,
    DiffPIRConfig,
    DPSConfig,
    PGDMConfig,
    RedDiffConfig,
    Solution,
    SolveError,
    SolverConfig,
    SolveStatus,
    sample,
    solve,
    solve_many,
)
from reddiff_jax.unet import PRESETS, UNet, UNetConfig, get_preset

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "PRESETS",
    "DDIMConfig",
    "DDRMConfig",
    "DPSConfig",
    "DiffPIRConfig",
    "PGDMConfig",
    "RedDiffConfig",
    "ScoreModel",
    "Solution",
    "SolveError",
    "SolveStatus",
    "SolverConfig",
    "UNet",
    "UNetConfig",
    "diffusion",
    "get_preset",
    "load_pretrained",
    "operators",
    "read_metadata",
    "sample",
    "save_pretrained",
    "solve",
    "solve_many",
    "solvers",
]
