"""DDRM, denoising diffusion restoration models (Kawar et al. 2022), on the operator's SVD.

Images are NHWC float32 [B, H, W, C] in [-1, 1]; ``y`` is batched [B, *y_shape]. The operator
must expose the SVD capability ``op.svd`` (see ``contracts.md``): ``A(x) = U(s * Vt(x))`` with
``Vt(x [H,W,C]) -> [n]``, ``V([n]) -> [H,W,C]``, ``Ut(y) -> [n]`` (zeros past the rank), ``U``,
and ``singulars`` [n] (zeros where unobserved), n = H*W*C.

The sampler is the official RED-diff one (``algos/ddrm.py``; reference section 4), written in the
scaled variables x̄ = x_t / sqrt(a_t), σ_t = sqrt(1 - a_t)/sqrt(a_t) and the spectral
coordinates (Vᵀ·) with ȳ = Uᵀy / s and the noise level σ_y' = 2 sigma_y (the measurement is
``A x + 2 sigma_y n``). Per step, for each spectral component i (z ~ N(0, 1)):

* s_i = 0 (unobserved):   x̄_s = x̂0 + sqrt(1 - η²) σ_s Vᵀeps + η σ_s z
* s_i σ_s < σ_y':         x̄_s = x̂0 + sqrt(1 - η²) σ_s (Uᵀy - s x̂0)/σ_y' + η σ_s z
* s_i σ_s > σ_y':         x̄_s = η_b ȳ + (1 - η_b) x̂0 + sqrt(σ_s² - η_b² σ_y'²/s²) z

(a tie s_i σ_s = σ_y' falls to the first line, as upstream), then x_s = sqrt(a_s) V x̄_s. The
init follows the official code: components with s σ_T > σ_y' start at
(ȳ + sqrt(σ_T² - σ_y'²/s²) n)/σ_T, the others at n, and x_T = V(.) (upstream omits the factor
sqrt(1 - a_T) ≈ 1 of the exact p(x_T | y); kept as upstream). Deviation: a component with a
zero singular value is always "unobserved" (Kawar et al.); upstream's ``in2`` operator lists
those zeros among its singulars and so treats them as "less noisy than y" when sigma_y > 0.
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
    first_alpha,
    predict,
)
from reddiff_jax.solvers.ddim import SamplerState, sampler

__all__ = ["ALGORITHM", "DDRMConfig", "ddrm", "get_svd", "singular_values"]

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDRMConfig(SolverConfig):
    """DDRM hyper-parameters (defaults: the official ``_configs/algo/ddrm.yaml``).

    Attributes:
      num_steps: N (default 20: the DDRM paper's 20 steps; the official batch scripts use 1000).
      eta: η in [0, 1], noise of the unobserved / less-noisy components (default 0.85; scripts
        use 1.0).
      eta_b: η_b, weight of the measurement on the noisier-than-y components (default 1.0).
      sigma_y: the measurement's noise level in the official convention ``y = A x + 2 sigma_y n``
        (internally σ_y' = 2 sigma_y, as upstream); must match the data (default 0.0).
      schedule, num_timesteps: the diffusion schedule (official: ``"linear"``, 1000).
    """

    HYPER = ("eta", "eta_b", "sigma_y")
    BOUNDS = {"eta": (0.0, 1.0), "sigma_y": (0.0, None)}

    num_steps: int = 20
    eta: float = 0.85
    eta_b: float = 1.0
    sigma_y: float = 0.0

    def build(self, eps_fn: Callable, op: Any, *, alphas_cumprod: Array) -> Solver:
        return ddrm(eps_fn, op, config=self, alphas_cumprod=alphas_cumprod)


def get_svd(op: Any, *, solver: str = "DDRM") -> Any:
    """``op.svd`` or a TypeError saying the solver needs an operator with an SVD."""
    svd = getattr(op, "svd", None)
    missing = [m for m in ("Vt", "V", "Ut", "U", "singulars") if not hasattr(svd, m)]
    if svd is None or missing:
        what = "svd is None" if svd is None else f"its svd lacks {missing}"
        raise TypeError(
            f"op: {solver} needs an operator with the SVD capability `op.svd` (Vt, V, Ut, U, "
            f"singulars; e.g. inpaint, sr, colorize, blur, denoise), got {type(op).__name__} "
            f"whose {what}"
        )
    return svd


def singular_values(svd: Any) -> jnp.ndarray:
    """``svd.singulars`` [n] (an array attribute or a method), as float32."""
    s = svd.singulars() if callable(svd.singulars) else svd.singulars
    return jnp.asarray(s, jnp.float32).reshape(-1)


def ddrm(eps_fn: Callable, op: Any, *, config: DDRMConfig, alphas_cumprod: Array) -> Solver:
    """The DDRM :class:`Solver` on ``op.svd`` (no gradient through the network).

    The ``"init"`` and ``"z"`` draws are spectral-domain noise (flattened to [B, n]).
    """
    svd = get_svd(op)
    s = singular_values(svd)  # [n]
    Vt, V, Ut = jax.vmap(svd.Vt), jax.vmap(svd.V), jax.vmap(svd.Ut)
    n = s.shape[0]
    obs = s > 0
    s_safe = jnp.where(obs, s, 1.0)
    a_T = first_alpha(config, alphas_cumprod)

    def spectral_y(y):
        Ut_y = Ut(y).astype(jnp.float32)  # [B, n]
        return Ut_y, jnp.where(obs, Ut_y / s_safe, 0.0)  # Uᵀy, Σ⁺Uᵀy

    def init(y, hyper, draws):
        B = y.shape[0]
        _, y_bar = spectral_y(y)
        sig_y = 2.0 * hyper["sigma_y"]
        sig_T = jnp.sqrt(1.0 - a_T) / jnp.sqrt(a_T)
        large = obs & (s * sig_T > sig_y)
        inv = jnp.where(large, sig_y / s_safe, 0.0)
        n0 = draws["init"].reshape(B, n)
        remaining = jnp.sqrt(jnp.maximum(sig_T**2 - inv**2, 0.0))
        return V((jnp.where(large, y_bar, 0.0) + remaining * n0) / sig_T)

    def update(state: SamplerState, inp: StepInput, z: Array):
        x, h = state.x, state.hyper
        B = x.shape[0]
        Ut_y, y_bar = spectral_y(state.y)
        sig_y, eta, eta_b = 2.0 * h["sigma_y"], h["eta"], h["eta_b"]
        x0, eps = predict(eps_fn, x, inp.t, inp.a_t)
        a_s = inp.a_s
        sig_s = jnp.sqrt(1.0 - a_s) / jnp.sqrt(a_s)
        z = z.reshape(B, n)
        Vt_x0 = Vt(x0)
        std = sig_s * eta
        sig_tilde = jnp.sqrt(jnp.maximum(sig_s**2 - std**2, 0.0))  # 0 at eta = 1, not -ulp
        missing = Vt_x0 + sig_tilde * Vt(eps) + std * z
        safe_sig_y = jnp.where(sig_y > 0, sig_y, 1.0)
        after = Vt_x0 + sig_tilde * (Ut_y - s * Vt_x0) / safe_sig_y + std * z
        diff_b = jnp.sqrt(jnp.maximum(sig_s**2 - (sig_y / s_safe) ** 2 * eta_b**2, 0.0))
        before = y_bar * eta_b + (1.0 - eta_b) * Vt_x0 + diff_b * z
        is_before = obs & (s * sig_s > sig_y)
        is_after = obs & (s * sig_s < sig_y)
        nxt = jnp.where(is_before, before, jnp.where(is_after, after, missing))
        return jnp.sqrt(a_s) * V(nxt), x0, {}

    return sampler(init, update)


ALGORITHM = Algorithm(
    name="ddrm",
    title="DDRM",
    config=DDRMConfig,
    needs=("svd",),
    task_defaults={"*": {"eta": 0.85, "eta_b": 1.0}},
    shown=("eta", "eta_b"),
    advice="check sigma_y against the measurement's noise",
)
