"""DiffPIR, denoising diffusion models for plug-and-play image restoration (Zhu et al. 2023).

Images are NHWC float32 [B, H, W, C] in [-1, 1]; ``y`` is batched [B, *y_shape] and the operator
acts on one image (vmapped). Per step (the paper's Algorithm 1, with the official
``yuanzhi-zhu/DiffPIR`` choices; t runs over the same grid as the other solvers)::

    x0   = (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t)
    rho  = lam * max(sigma_y, 1e-3)^2 / ((1 - a_t)/a_t)
    x̂0  = argmin_v ||y - A v||^2 + rho ||v - x0||^2                     # data proximal step
    ê    = (x_t - sqrt(a_t) x̂0) / sqrt(1 - a_t)
    x_s  = sqrt(a_s) x̂0 + sqrt(1 - a_s) (sqrt(1 - zeta) ê + sqrt(zeta) z)

The proximal step is closed form in the SVD basis when the operator has one (``op.svd``):
``Vᵀx̂0 = (s Uᵀy + rho Vᵀx0) / (s² + rho)``; otherwise (nonlinear operators, linear ones without
an SVD) it takes ``prox_steps`` gradient steps of size ``prox_lr / (2 (1 + rho))`` from x0
(exact step 1/L for ||A|| <= 1). ``sigma_y`` is the official noise level (``y = A x +
2 sigma_y n``); the floor 1e-3 is upstream's ``max(0.001, noise_level_img)``.
Init: ``x_T = sqrt(a_T) A_dagger(y) + sqrt(1 - a_T) n``. Differences from upstream: the proximal
step is applied at the last step too, and the result is that step's x̂0 (upstream returns the
state fed to the last step); the DDIM ``eta`` of upstream (default 0) is not offered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from reddiff_jax.solvers.base import (
    Algorithm,
    Solver,
    SolverConfig,
    StepInput,
    predict,
)
from reddiff_jax.solvers.common import require
from reddiff_jax.solvers.ddim import SamplerState, pinv_sampler
from reddiff_jax.solvers.ddrm import get_svd, singular_values

__all__ = ["ALGORITHM", "PROX_MODES", "DiffPIRConfig", "diffpir", "prox"]

Array = jax.Array

PROX_MODES = ("auto", "svd", "gradient")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffPIRConfig(SolverConfig):
    """DiffPIR hyper-parameters (defaults: official ``configs/sisr.yaml`` / ``deblur.yaml``).

    Attributes:
      num_steps: N (default 100).
      lam: λ >= 0, weight of the prior's proximal term (default 1.0).
      zeta: ζ in [0, 1], share of fresh noise in the update (default 0.1; 1.0 for inpainting).
      sigma_y: measurement noise level, ``y = A x + 2 sigma_y n`` (default 0.0; floored at 1e-3
        inside rho, as upstream).
      prox: ``"auto"`` (closed form when ``op.svd`` exists, gradient steps otherwise), ``"svd"``
        or ``"gradient"``.
      prox_steps: gradient steps of the proximal problem when no closed form is used (default 5).
      prox_lr: their step >= 0, relative to ``1 / (2 (1 + rho))`` (default 1.0).
      schedule, num_timesteps: the diffusion schedule (``"linear"``, 1000).
    """

    HYPER = ("lam", "zeta", "sigma_y", "prox_lr")
    BOUNDS = {"lam": (0.0, None), "zeta": (0.0, 1.0), "sigma_y": (0.0, None),
              "prox_lr": (0.0, None)}  # fmt: skip

    num_steps: int = 100
    lam: float = 1.0
    zeta: float = 0.1
    sigma_y: float = 0.0
    prox: str = "auto"
    prox_steps: int = 5
    prox_lr: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prox not in PROX_MODES:
            raise ValueError(f"prox: expected one of {PROX_MODES}, got {self.prox!r}")
        if (
            not isinstance(self.prox_steps, int)
            or isinstance(self.prox_steps, bool)
            or (self.prox_steps < 1)
        ):
            raise ValueError(f"prox_steps: expected an int >= 1, got {self.prox_steps!r}")

    def build(self, eps_fn: Callable, op: Any, *, alphas_cumprod: Array) -> Solver:
        return diffpir(eps_fn, op, config=self, alphas_cumprod=alphas_cumprod)


def _prox_svd(op: Any, y: jnp.ndarray, x0: jnp.ndarray, rho) -> jnp.ndarray:
    svd = op.svd
    s = singular_values(svd)
    v = jax.vmap(svd.Vt)(x0)
    u = jax.vmap(svd.Ut)(y).astype(v.dtype)
    den = s**2 + rho
    safe = jnp.where(den > 0, den, 1.0)
    out = jnp.where(s > 0, (s * u + rho * v) / safe, v)
    return jax.vmap(svd.V)(out)


def _prox_gradient(op: Any, y, x0, rho, *, steps: int, lr: float) -> jnp.ndarray:
    A = jax.vmap(op.A)

    def f(v):
        return jnp.sum((A(v) - y) ** 2) + rho * jnp.sum((v - x0) ** 2)

    step = lr / (2.0 * (1.0 + rho))
    return jax.lax.fori_loop(0, steps, lambda _, v: v - step * jax.grad(f)(v), x0)


def prox(
    op: Any, y: jnp.ndarray, x0: jnp.ndarray, rho, *, mode: str = "auto", steps=5, lr=1.0
) -> jnp.ndarray:
    """argmin_v ||y_b - A v_b||² + rho ||v_b - x0_b||² per image of a batch.

    Args:
      op: operator on one image; ``op.svd`` gives the closed form.
      y: [B, *y_shape]; x0: [B, H, W, C]; rho: scalar >= 0 (> 0 where s = 0 components exist
        is not needed: they keep x0).
      mode: ``"auto"`` / ``"svd"`` (closed form) / ``"gradient"`` (``steps`` steps of size
        ``lr / (2 (1 + rho))`` from x0).

    Returns:
      [B, H, W, C].
    """
    use_svd = mode == "svd" or (mode == "auto" and getattr(op, "svd", None) is not None)
    if use_svd:
        get_svd(op, solver="DiffPIR (prox='svd')")
        return _prox_svd(op, y, x0, rho)
    return _prox_gradient(op, y, x0, rho, steps=steps, lr=lr)


def diffpir(eps_fn: Callable, op: Any, *, config: DiffPIRConfig, alphas_cumprod: Array) -> Solver:
    """The DiffPIR :class:`Solver` (no gradient through the network; one call per step)."""
    require(op, "A_dagger", "DiffPIR", "its init is sqrt(a_T) A_dagger(y) + sqrt(1 - a_T) n")
    if config.prox == "svd":
        get_svd(op, solver="DiffPIR (prox='svd')")

    def update(state: SamplerState, inp: StepInput, z: Array):
        x, h, a_t = state.x, state.hyper, inp.a_t
        x0, _ = predict(eps_fn, x, inp.t, a_t)
        rho = h["lam"] * jnp.maximum(h["sigma_y"], 1e-3) ** 2 * a_t / (1.0 - a_t)
        x0 = prox(op, state.y, x0, rho, mode=config.prox, steps=config.prox_steps,
                  lr=h["prox_lr"])  # fmt: skip
        e = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
        mix = jnp.sqrt(1.0 - h["zeta"]) * e + jnp.sqrt(h["zeta"]) * z
        return jnp.sqrt(inp.a_s) * x0 + jnp.sqrt(1.0 - inp.a_s) * mix, x0, {}

    return pinv_sampler(op, config, alphas_cumprod, update)


ALGORITHM = Algorithm(
    name="diffpir",
    title="DiffPIR",
    config=DiffPIRConfig,
    needs=("A_dagger",),
    # Official settings (yuanzhi-zhu/DiffPIR configs/*.yaml): inpainting λ 1, ζ 1 (20 steps,
    # noiseless); super-resolution and deblurring λ 1, ζ 0.1 (100 steps, sigma_y = 0.05).
    task_defaults={
        "inpaint": {"lam": 1.0, "zeta": 1.0},
        "sr": {"lam": 1.0, "zeta": 0.1},
        "blur": {"lam": 1.0, "zeta": 0.1},
    },
    shown=("lam", "zeta"),
    advice="raise lam or lower zeta",
)
