"""Posterior solvers for inverse problems with a diffusion prior.

Convention shared by all solvers: ``solve(eps_fn, op, y, config, key, *, noise=None, ...)`` with
``eps_fn(x_t [B, H, W, C], t [B] int32) -> eps [B, H, W, C]``, ``op`` acting on one image
``[H, W, C]`` and ``y`` batched ``[B, *y_shape]``; one ``lax.scan`` under ``jit``.
"""

from reddiff_jax.solvers import ddim, ddrm, diffpir, dps, pgdm
from reddiff_jax.solvers.common import SolveStatus
from reddiff_jax.solvers.ddim import DDIMConfig, SamplerResult
from reddiff_jax.solvers.ddrm import DDRMConfig
from reddiff_jax.solvers.diffpir import DiffPIRConfig
from reddiff_jax.solvers.dps import DPSConfig
from reddiff_jax.solvers.pgdm import PGDMConfig
from reddiff_jax.solvers.reddiff import (
    NonFiniteError,
    RedDiffConfig,
    RedDiffResult,
    RedDiffSolver,
    RedDiffState,
    StepInfo,
    StepNoise,
    default_optimizer,
    reddiff,
    snr_weight,
    solve,
    solve_many,
    step_noise,
)

__all__ = [
    "DDIMConfig",
    "DDRMConfig",
    "DPSConfig",
    "DiffPIRConfig",
    "NonFiniteError",
    "PGDMConfig",
    "RedDiffConfig",
    "RedDiffResult",
    "RedDiffSolver",
    "RedDiffState",
    "SamplerResult",
    "SolveStatus",
    "StepInfo",
    "StepNoise",
    "ddim",
    "ddrm",
    "default_optimizer",
    "diffpir",
    "dps",
    "pgdm",
    "reddiff",
    "snr_weight",
    "solve",
    "solve_many",
    "step_noise",
]
