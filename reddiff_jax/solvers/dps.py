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

__all__ = ["ZETA_BY_TASK", "Config", "DPSConfig", "dps_update", "solve"]

# Step sizes zeta the official scripts use per task (``sample_test.sh``; reference section 4).
# The config default (0.1) is the official yaml's, whose comment says "0.1 for in2_20ff, 1.0 for
# sr4"; the scripts then used the values below. deblur_gauss also sets eta = 1.0.
ZETA_BY_TASK = {
    "inpaint": 0.5,
    "sr": 1.0,
    "blur": 2.0,
    "hdr": 0.1,
    "phase_retrieval": 0.4,
    "deblur_nl": 0.05,
}


@dataclasses.dataclass(frozen=True)
class DPSConfig:
    """DPS hyper-parameters (defaults: the official ``_configs/algo/dps.yaml``).

    Attributes:
      num_steps: N, grid ``range(0, T, T // N)`` visited descending (default 50:
        ``_configs/exp/default.yaml``; the paper batch runs use 1000).
      zeta: step size ζ (official ``grad_term_weight``; default 0.1, see :data:`ZETA_BY_TASK`).
      eta: DDIM stochasticity (default 0.0; the batch scripts use 1.0).
      remat: ``jax.checkpoint`` the network (its forward is recomputed in the backward pass;
        same result up to float rounding; see the module docstring about memory).
      schedule, num_timesteps: the diffusion schedule (official: ``"linear"``, 1000).
    """

    num_steps: int = 50
    zeta: float = 0.1
    eta: float = 0.0
    remat: bool = False
    schedule: str = "linear"
    num_timesteps: int = 1000

    def __post_init__(self):
        _check_schedule(self)
        _check_float("zeta", self.zeta)
        _check_float("eta", self.eta, 0.0)
        if not isinstance(self.remat, bool):
            raise TypeError(f"remat: expected a bool, got {self.remat!r}")


Config = DPSConfig


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


def _dps(eps_fn, op, y, key, noise, config, trajectory):
    net = jax.checkpoint(eps_fn) if config.remat else eps_fn
    A = jax.vmap(op.A)
    x_init = _pinv_init(op, y, key, noise, config)

    def step(x, t, a_t, a_s, z):
        def loss(x):
            x0, eps = _x0_eps(net, x, t, a_t)
            r = y - A(x0)
            return jnp.sum(r**2), (x0, eps, r)

        grad, (x0, eps, r) = jax.grad(loss, has_aux=True)(x)
        norm = jnp.sqrt(_batch_sq(r))
        x_s = dps_update(x0, eps, grad, norm, a_t, a_s, z, zeta=config.zeta, eta=config.eta)
        return x_s, x0, {"residual_norm": norm}

    return _scan(step, x_init, config, key, noise, trajectory=trajectory)


_dps_jit = _jit_solver(_dps)


def solve(
    eps_fn: Any,
    op: Any,
    y: Any,
    config: DPSConfig,
    key: jax.Array,
    *,
    noise: dict | None = None,
    trajectory: bool = False,
) -> SamplerResult:
    """Posterior sampling with DPS.

    Args:
      eps_fn: ``eps_fn(x_t [B,H,W,C], t [B] int32) -> eps [B,H,W,C]``; it is differentiated.
      op: operator on one image [H, W, C] with ``A`` and ``A_dagger`` (the init), linear or not.
      y: measurements [B, *y_shape] (``y_shape`` = the shape of ``op.A`` of one image).
      config: a :class:`DPSConfig`.
      key: PRNG key (init noise and per-step z unless ``noise`` is given).
      noise: optional ``{"init": [B,H,W,C], "z": [K,B,H,W,C]}`` replacing the draws
        (K = ``ddim.num_iterations(config)``).
      trajectory: also return per-step states ``xs`` and predictions ``x0s``.

    Returns:
      :class:`~reddiff_jax.solvers.ddim.SamplerResult`: ``x0_pred`` [B,H,W,C] is the final
      sample; ``info["residual_norm"]`` [K, B] is ||y_b - A x̂0_b|| at each step.
    """
    _need(op, "A_dagger", "DPS", "its init is sqrt(a_T) A_dagger(y) + sqrt(1 - a_T) n")
    return _solve_conditional(_dps_jit, DPSConfig, eps_fn, op, y, config, key, noise, trajectory)
