"""Posterior solvers for inverse problems with a diffusion prior.

Every algorithm is a frozen config plus a pure init/step pair (:mod:`~reddiff_jax.solvers.base`);
one driver runs them all::

    solution = solve(config, eps_fn, op, y, key)      # one batch, one lax.scan under jit
    many = solve_many(config, eps_fn, ops, ys, keys)  # vmapped over measurements / settings
    samples = sample(DDIMConfig(), eps_fn, shape, key)

``eps_fn(x_t [B, H, W, C], t [B] int32) -> eps [B, H, W, C]``; ``op`` acts on ONE image
``[H, W, C]``; ``y`` is batched ``[B, *y_shape]``. The modules ``reddiff``, ``ddim``, ``dps``,
``pgdm``, ``ddrm`` and ``diffpir`` hold each algorithm's mathematics, config and factory;
:mod:`~reddiff_jax.solvers.registry` lists them with their per-task defaults.
"""

from reddiff_jax.solvers import base, ddim, ddrm, diffpir, dps, pgdm, reddiff, registry
from reddiff_jax.solvers.base import (
    Algorithm,
    SolveError,
    Solver,
    SolverConfig,
    SolveStatus,
    StepInput,
    StepOutput,
    step_inputs,
)
from reddiff_jax.solvers.ddim import DDIMConfig, SamplerState
from reddiff_jax.solvers.ddrm import DDRMConfig
from reddiff_jax.solvers.diffpir import DiffPIRConfig
from reddiff_jax.solvers.dps import DPSConfig
from reddiff_jax.solvers.driver import MAX_ABS, Solution, sample, solve, solve_many
from reddiff_jax.solvers.pgdm import PGDMConfig
from reddiff_jax.solvers.reddiff import RedDiffConfig, RedDiffState, default_optimizer, snr_weight
from reddiff_jax.solvers.registry import ALGORITHMS

__all__ = [
    "ALGORITHMS",
    "MAX_ABS",
    "Algorithm",
    "DDIMConfig",
    "DDRMConfig",
    "DPSConfig",
    "DiffPIRConfig",
    "PGDMConfig",
    "RedDiffConfig",
    "RedDiffState",
    "SamplerState",
    "Solution",
    "SolveError",
    "SolveStatus",
    "Solver",
    "SolverConfig",
    "StepInput",
    "StepOutput",
    "base",
    "ddim",
    "ddrm",
    "default_optimizer",
    "diffpir",
    "dps",
    "pgdm",
    "reddiff",
    "registry",
    "sample",
    "snr_weight",
    "solve",
    "solve_many",
    "step_inputs",
]
