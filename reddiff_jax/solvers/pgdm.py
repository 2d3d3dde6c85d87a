"""ΠGDM, pseudo-inverse guided diffusion (Song et al. 2023), as the official RED-diff repo runs it.

Images are NHWC float32 [B, H, W, C] in [-1, 1]; ``y`` is batched [B, *y_shape] and the operator
acts on one image (vmapped). Per step (``algos/pgdm.py``; reference ``reddiff_official.md``
section 4)::

    eps = eps_fn(x_t, t);  x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    g   = d/dx_t sum( stop_gradient(A⁺y - A⁺A x0) * x0 )      # a VJP through the network
    x_s = sqrt(a_s) x0 + c1 z + c2 eps + sqrt(a_s) sqrt(a_t) w g   (awd = True)

Init: ``x_T = sqrt(a_T) A⁺(y) + sqrt(1 - a_T) n``. With ``awd=False`` the coefficient is
``(sqrt(a_s) - c2 sqrt(a_t)/sqrt(1 - a_t)) sqrt(a_t) w`` and eps is recomputed from x0.
``project=True`` replaces the row-space part of x0 by A⁺y and drops the row-space part of g
(``x0 <- x0 - A⁺A x0 + A⁺y``, ``g <- g - A⁺A g``): for inpainting that is exactly what the
official code does for its ``in2`` tasks (``x0*(1-mask) + y*mask``, ``g*(1-mask)``).
The official ``hdr`` contrast term (``1500 std(x0)``) is not reproduced.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from reddiff_jax import diffusion
from reddiff_jax.solvers.ddim import (
    SamplerResult,
    _check_float,
    _check_schedule,
    _jit_solver,
    _need,
    _pinv_init,
    _scan,
    _solve_conditional,
    _x0_eps,
)

__all__ = ["Config", "PGDMConfig", "pgdm_update", "solve"]


@dataclasses.dataclass(frozen=True)
class PGDMConfig:
    """ΠGDM hyper-parameters (defaults: the official ``_configs/algo/pgdm.yaml``).

    Attributes:
      num_steps: N, grid ``range(0, T, T // N)`` visited descending (default 50:
        ``_configs/exp/default.yaml``; the official scripts use 100).
      w: guidance weight (official ``grad_term_weight``, default 1.0).
      eta: DDIM stochasticity (default 0.0; the official scripts use 1.0).
      awd: the official ``awd`` flag (default True, as every official script).
      project: range-space replacement of x0 and of the gradient (see the module docstring);
        default False (the official code does it for inpainting ``in2`` tasks only).
      schedule, num_timesteps: the diffusion schedule (official: ``"linear"``, 1000).
    """

    num_steps: int = 50
    w: float = 1.0
    eta: float = 0.0
    awd: bool = True
    project: bool = False
    schedule: str = "linear"
    num_timesteps: int = 1000

    def __post_init__(self):
        _check_schedule(self)
        _check_float("w", self.w)
        _check_float("eta", self.eta, 0.0)
        for name in ("awd", "project"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")


Config = PGDMConfig


def pgdm_update(x0, eps, grad, a_t, a_s, z, *, w, eta, awd=True, x_t=None):
    """The ΠGDM step from the network's (x̂0, eps) and the VJP ``grad`` (pure, batched).

    ``x_t`` is needed only when ``awd`` is False (eps is then recomputed from x0).
    """
    c1, c2 = diffusion.ddim_coefficients(a_t, a_s, eta=eta)
    coeff = jnp.sqrt(a_s)
    if not awd:
        coeff = coeff - c2 * jnp.sqrt(a_t) / jnp.sqrt(1.0 - a_t)
        eps = diffusion.eps_from_x0(x_t, x0, a_t)
    coeff = coeff * jnp.sqrt(a_t) * w
    return diffusion.ddim_step(x0, eps, a_t, a_s, eta=eta, z=z) + coeff * grad


def _pgdm(eps_fn, op, y, key, noise, config, trajectory):
    A = jax.vmap(op.A)
    A_dag = jax.vmap(op.A_dagger)
    y_dag = A_dag(y).astype(jnp.float32)
    x_init = _pinv_init(op, y, key, noise, config)

    def step(x, t, a_t, a_s, z):
        x0, vjp_fn, eps = jax.vjp(lambda v: _x0_eps(eps_fn, v, t, a_t), x, has_aux=True)
        residual = y_dag - A_dag(A(x0))
        (grad,) = vjp_fn(residual.astype(x0.dtype))
        if config.project:
            x0 = x0 - A_dag(A(x0)) + y_dag
            grad = grad - A_dag(A(grad))
        x_s = pgdm_update(
            x0, eps, grad, a_t, a_s, z, w=config.w, eta=config.eta, awd=config.awd, x_t=x
        )
        norm = jnp.sqrt(jnp.sum(residual.reshape(x.shape[0], -1) ** 2, axis=1))
        return x_s, x0, {"residual_norm": norm}

    return _scan(step, x_init, config, key, noise, trajectory=trajectory)


_pgdm_jit = _jit_solver(_pgdm)


def solve(
    eps_fn: Any,
    op: Any,
    y: Any,
    config: PGDMConfig,
    key: jax.Array,
    *,
    noise: dict | None = None,
    trajectory: bool = False,
) -> SamplerResult:
    """Posterior sampling with ΠGDM.

    Args:
      eps_fn: ``eps_fn(x_t [B,H,W,C], t [B] int32) -> eps [B,H,W,C]``; one VJP per step.
      op: operator on one image [H, W, C] with ``A`` and a pseudo-inverse ``A_dagger``.
      y: measurements [B, *y_shape].
      config: a :class:`PGDMConfig`.
      key: PRNG key (init noise and per-step z unless ``noise`` is given).
      noise: optional ``{"init": [B,H,W,C], "z": [K,B,H,W,C]}`` replacing the draws
        (K = ``ddim.num_iterations(config)``).
      trajectory: also return per-step states ``xs`` and predictions ``x0s``.

    Returns:
      :class:`~reddiff_jax.solvers.ddim.SamplerResult`: ``x0_pred`` [B,H,W,C] is the final
      sample; ``info["residual_norm"]`` [K, B] is ||A⁺y - A⁺A x̂0|| per step.
    """
    _need(op, "A_dagger", "PGDM", "the guidance uses the pseudo-inverse residual A⁺y - A⁺A x0")
    return _solve_conditional(_pgdm_jit, PGDMConfig, eps_fn, op, y, config, key, noise, trajectory)
