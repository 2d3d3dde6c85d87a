"""Diffusion Posterior Sampling (Chung et al. 2023), as the official RED-diff repo runs it.

Images are NHWC float32 [B, H, W, C] in [-1, 1]; ``y`` is batched [B, *y_shape] and the operator
acts on one image (vmapped). Per step (``algos/dps.py`` with ``original=True``; reference
``reddiff_official.md`` section 4)::

    eps = eps_fn(x_t, t);  x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    g   = d/dx_t sum_b ||y_b - A(x0_b(x_t))||^2            # through the network (jax.grad)
    x_s = sqrt(a_s) x0 + c1 z + c2 eps - (zeta / ||y_b - A x0_b||) g     # norm per sample

Init: ``x_T = sqrt(a_T) A_dagger(y) + sqrt(1 - a_T) n``. The backward pass through the network
costs about two forward passes and keeps the forward's activations. ``remat=True`` wraps the
network in ``jax.checkpoint``: nothing is stored between the forward and the backward pass and the
forward is recomputed there. At whole-network granularity this does not lower the peak (the
recomputation keeps the same activations; ``benchmarks/bench_dps_vs_reddiff.py`` measures equal
temporary memory); it only pays off together with per-block checkpointing inside the network.
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

__all__ = ["ALGORITHM", "DPSConfig", "dps", "dps_update"]

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSConfig(SolverConfig):
    """DPS hyper-parameters (defaults: the official ``_configs/algo/dps.yaml``).

    Attributes:
      num_steps: N (default 50: ``_configs/exp/default.yaml``; the paper batch runs use 1000).
      zeta: step size ζ >= 0 (official ``grad_term_weight``; default 0.1; per task see
        :data:`ALGORITHM` ``.task_defaults``).
      eta: DDIM stochasticity >= 0 (default 0.0; the batch scripts use 1.0).
      remat: ``jax.checkpoint`` the network (its forward is recomputed in the backward pass;
        same result up to float rounding; see the module docstring about memory).
      schedule, num_timesteps: the diffusion schedule (official: ``"linear"``, 1000).
    """

    HYPER = ("zeta", "eta")
    BOUNDS = {"zeta": (0.0, None), "eta": (0.0, None)}

    num_steps: int = 50
    zeta: float = 0.1
    eta: float = 0.0
    remat: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.remat, bool):
            raise TypeError(f"remat: expected a bool, got {self.remat!r}")

    def build(self, eps_fn: Callable, op: Any, *, alphas_cumprod: Array) -> Solver:
        return dps(eps_fn, op, config=self, alphas_cumprod=alphas_cumprod)


def _batch_sq(v: jnp.ndarray) -> jnp.ndarray:
    """Per-sample sum of squares [B] of a batched array."""
    return jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1)


def dps_update(x0, eps, grad, residual_norm, a_t, a_s, z, *, zeta, eta):
    """The DPS step from the network's (x̂0, eps) and the gradient (pure; batched [B, H, W, C]).

    ``residual_norm`` [B] is ||y_b - A x̂0_b||; a zero norm (exact fit, zero gradient) gives no
    correction instead of 0/0.
    """
    safe = jnp.where(residual_norm > 0, residual_norm, 1.0)
    coeff = jnp.where(residual_norm > 0, zeta / safe, 0.0)
    x_s = diffusion.ddim_step(x0, eps, a_t, a_s, eta=eta, z=z)
    return x_s - coeff.reshape(-1, *([1] * (x0.ndim - 1))) * grad


def dps(eps_fn: Callable, op: Any, *, config: DPSConfig, alphas_cumprod: Array) -> Solver:
    """The DPS :class:`Solver`; ``eps_fn`` is differentiated (one VJP per step)."""
    require(op, "A_dagger", "DPS", "its init is sqrt(a_T) A_dagger(y) + sqrt(1 - a_T) n")
    A = jax.vmap(op.A)

    def update(state: SamplerState, inp: StepInput, z: Array):
        def guidance(net, x, y):  # per image: a chunk's gradient is its rows of the batch's
            net = jax.checkpoint(net) if config.remat else net

            def loss(x):
                x0, eps = predict(net, x, inp.t, inp.a_t)
                r = y - A(x0)
                return jnp.sum(r**2), (x0, eps, r)

            return jax.grad(loss, has_aux=True)(x)

        grad, (x0, eps, r) = map_chunks(eps_fn, guidance, state.x, state.y)
        norm = jnp.sqrt(_batch_sq(r))
        h = state.hyper
        x_s = dps_update(x0, eps, grad, norm, inp.a_t, inp.a_s, z, zeta=h["zeta"], eta=h["eta"])
        return x_s, x0, {"residual_norm": norm}

    return pinv_sampler(op, config, alphas_cumprod, update)


ALGORITHM = Algorithm(
    name="dps",
    title="DPS",
    config=DPSConfig,
    needs=("A_dagger",),
    backprop=True,
    # ζ per task from the official scripts (sample_test.sh; reference section 4). The config
    # default 0.1 is the official yaml's; deblur_gauss also sets eta = 1.0.
    task_defaults={
        "*": {"eta": 0.0},
        "inpaint": {"zeta": 0.5},
        "sr": {"zeta": 1.0},
        "blur": {"zeta": 2.0, "eta": 1.0},
        "hdr": {"zeta": 0.1},
        "phase_retrieval": {"zeta": 0.4},
        "deblur_nl": {"zeta": 0.05},
    },
    shown=("zeta", "eta"),
    advice="lower the step size (zeta)",
)
