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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from reddiff_jax import diffusion
from reddiff_jax.solvers._microbatch import map_chunks
from reddiff_jax.solvers.base import (
    Algorithm,
    Solver,
    SolverConfig,
    StepInput,
    predict,
)
from reddiff_jax.solvers.common import require
from reddiff_jax.solvers.ddim import SamplerState, pinv_sampler

__all__ = ["ALGORITHM", "PGDMConfig", "pgdm", "pgdm_update"]

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class PGDMConfig(SolverConfig):
    """ΠGDM hyper-parameters (defaults: the official ``_configs/algo/pgdm.yaml``).

    Attributes:
      num_steps: N (default 50: ``_configs/exp/default.yaml``; the official scripts use 100).
      w: guidance weight >= 0 (official ``grad_term_weight``, default 1.0).
      eta: DDIM stochasticity >= 0 (default 0.0; the official scripts use 1.0).
      awd: the official ``awd`` flag (default True, as every official script).
      project: range-space replacement of x0 and of the gradient (see the module docstring);
        default False (the official code does it for inpainting ``in2`` tasks only).
      schedule, num_timesteps: the diffusion schedule (official: ``"linear"``, 1000).
    """

    HYPER = ("w", "eta")
    BOUNDS = {"w": (0.0, None), "eta": (0.0, None)}

    num_steps: int = 50
    w: float = 1.0
    eta: float = 0.0
    awd: bool = True
    project: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("awd", "project"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")

    def build(self, eps_fn: Callable, op: Any, *, alphas_cumprod: Array) -> Solver:
        return pgdm(eps_fn, op, config=self, alphas_cumprod=alphas_cumprod)


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


def pgdm(eps_fn: Callable, op: Any, *, config: PGDMConfig, alphas_cumprod: Array) -> Solver:
    """The ΠGDM :class:`Solver`: one VJP through ``eps_fn`` per step."""
    require(op, "A_dagger", "PGDM", "the guidance uses the pseudo-inverse residual A⁺y - A⁺A x0")
    A = jax.vmap(op.A)
    A_dag = jax.vmap(op.A_dagger)

    def update(state: SamplerState, inp: StepInput, z: Array):
        x = state.x
        y_dag = A_dag(state.y).astype(jnp.float32)

        def guidance(net, x, y_dag):  # per image, so it may run chunk by chunk
            x0, vjp_fn, eps = jax.vjp(lambda v: predict(net, v, inp.t, inp.a_t), x, has_aux=True)
            residual = y_dag - A_dag(A(x0))
            (grad,) = vjp_fn(residual.astype(x0.dtype))
            return x0, eps, residual, grad

        x0, eps, residual, grad = map_chunks(eps_fn, guidance, x, y_dag)
        if config.project:
            x0 = x0 - A_dag(A(x0)) + y_dag
            grad = grad - A_dag(A(grad))
        h = state.hyper
        x_s = pgdm_update(x0, eps, grad, inp.a_t, inp.a_s, z, w=h["w"], eta=h["eta"],
                          awd=config.awd, x_t=x)  # fmt: skip
        norm = jnp.sqrt(jnp.sum(residual.reshape(x.shape[0], -1) ** 2, axis=1))
        return x_s, x0, {"residual_norm": norm}

    return pinv_sampler(op, config, alphas_cumprod, update)


ALGORITHM = Algorithm(
    name="pgdm",
    title="ΠGDM",
    config=PGDMConfig,
    needs=("A_dagger",),
    backprop=True,
    # Official scripts: w 1, eta 1.0; inpainting replaces the observed pixels (project).
    task_defaults={"*": {"w": 1.0, "eta": 1.0}, "inpaint": {"project": True}},
    shown=("w", "eta"),
    advice="lower the guidance weight (w)",
)
