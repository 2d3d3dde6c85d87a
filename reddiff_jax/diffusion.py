"""VP diffusion schedule, timestep grid and the DDIM update of the official RED-Diff code.

Conventions (reference ``reddiff_official.md`` section 0):

* ``alphas_cumprod[t]`` is ᾱ_t = Π_{i=0..t} (1 - β_i) for integer ``t`` in ``0 .. T-1``.
* ``alpha_bar(alphas_cumprod, -1) == 1`` (upstream stores ``cumprod(cat([0], 1 - betas))`` and reads
  ``alphas[t + 1]``).
* Timesteps are visited DESCENDING: ``timesteps(20)`` is ``950, 900, ..., 50, 0`` and the matching
  ``prev_timesteps(20)`` is ``900, 850, ..., 0, -1``.

Everything here is a pure function; the schedule is a plain float32 array (a pytree leaf).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

__all__ = [
    "SCHEDULES",
    "alpha_bar",
    "alphas_cumprod",
    "ddim_coefficients",
    "ddim_step",
    "eps_from_x0",
    "prev_timesteps",
    "timesteps",
    "x0_from_eps",
]

SCHEDULES = ("linear", "cosine")


def _betas(schedule: str, num_timesteps: int) -> np.ndarray:
    """float64 betas [T] of the named schedule."""
    if schedule == "linear":
        # guided-diffusion `get_named_beta_schedule("linear")` at T = 1000, scaled for other T.
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        # Improved DDPM (Nichol & Dhariwal 2021), s = 0.008, betas clipped at 0.999.
        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        t = np.arange(num_timesteps, dtype=np.float64)
        ab = np.array([f(v / num_timesteps) for v in t])
        ab_next = np.array([f((v + 1) / num_timesteps) for v in t])
        return np.minimum(1.0 - ab_next / ab, 0.999)
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")


def alphas_cumprod(schedule: str = "linear", num_timesteps: int = 1000) -> jnp.ndarray:
    """ᾱ_t for t = 0 .. T-1, exactly as the official code computes it.

    Upstream (``models/diffusion.py``) builds the betas in float64, casts them to float32, forms
    ``1 - betas`` in float32 and takes ``torch.cumprod`` (on CPU torch accumulates float32
    products in float64 and rounds each partial product to float32). That is reproduced bit for
    bit here, so the values equal the fixtures' ``alpha_t``. A pure float64 cumprod differs by
    <= ~3e-7 relative.

    Args:
      schedule: ``"linear"`` (betas linspace(1e-4, 0.02) for T = 1000, scaled by 1000/T
        otherwise, as guided-diffusion) or ``"cosine"`` (improved-DDPM cosine schedule).
      num_timesteps: T >= 1.

    Returns:
      float32 array [T] of ᾱ_t, strictly decreasing in (0, 1).
    """
    if not isinstance(num_timesteps, int | np.integer) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")
    betas32 = _betas(schedule, int(num_timesteps)).astype(np.float32)
    one_minus = (np.float32(1.0) - betas32).astype(np.float32)
    out = np.cumprod(one_minus.astype(np.float64)).astype(np.float32)
    return jnp.asarray(out)


def alpha_bar(alphas_cumprod: jnp.ndarray, t) -> jnp.ndarray:
    """Gather ᾱ_t for integer timesteps with the convention ᾱ_{-1} = 1.

    Args:
      alphas_cumprod: [T] array from :func:`alphas_cumprod`.
      t: integer array of any shape with values in ``-1 .. T-1`` (jit-safe; values are not checked
        under tracing, out-of-range indices are clamped by JAX's gather).

    Returns:
      array of ``t``'s shape and ``alphas_cumprod``'s dtype.
    """
    alphas_cumprod = jnp.asarray(alphas_cumprod)
    if alphas_cumprod.ndim != 1:
        raise ValueError(
            f"alphas_cumprod: expected a 1-D array [T], got shape {alphas_cumprod.shape}"
        )
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t: expected an integer array, got dtype {t.dtype}")
    padded = jnp.concatenate([jnp.ones((1,), alphas_cumprod.dtype), alphas_cumprod])
    return padded[t + 1]


def _check_steps(num_steps: int, num_timesteps: int) -> None:
    for name, v in (("num_steps", num_steps), ("num_timesteps", num_timesteps)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if num_steps > num_timesteps:
        raise ValueError(
            f"num_steps: expected at most num_timesteps={num_timesteps}, got {num_steps}"
        )


def timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """The official timestep grid, in the order the samplers visit it (descending).

    ``ts = range(0, T, T // num_steps)`` (``utils/functions.py::get_timesteps``), reversed.
    E.g. ``timesteps(20)`` -> ``[950, 900, ..., 50, 0]``. When ``num_steps`` does not divide T the
    official grid has ``len(range(0, T, T // num_steps))`` entries (e.g. 31 for 30 steps), and so
    does this one; use ``len(timesteps(...))`` as the number of iterations.

    Returns:
      int32 numpy array [K], descending, last entry 0.
    """
    _check_steps(num_steps, num_timesteps)
    skip = num_timesteps // num_steps
    return np.arange(0, num_timesteps, skip, dtype=np.int32)[::-1].copy()


def prev_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """The ``s`` paired with each ``t`` of :func:`timesteps` (``ss = [-1] + ts[:-1]``, reversed).

    E.g. ``prev_timesteps(20)`` -> ``[900, 850, ..., 0, -1]``; use with :func:`alpha_bar`
    (ᾱ_{-1} = 1).

    Returns:
      int32 numpy array [K], same length as ``timesteps(num_steps, num_timesteps)``.
    """
    ts = timesteps(num_steps, num_timesteps)
    return np.concatenate([ts[1:], np.array([-1], np.int32)]).astype(np.int32)


def x0_from_eps(x_t: jnp.ndarray, eps: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
    """x̂0 = (x_t - sqrt(1 - a) eps) / sqrt(a), with ``a = ᾱ_t`` broadcastable to ``x_t``."""
    return (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)


def eps_from_x0(x_t: jnp.ndarray, x0: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
    """eps = (x_t - sqrt(a) x0) / sqrt(1 - a), with ``a = ᾱ_t`` broadcastable to ``x_t`` (a < 1)."""
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)


def ddim_coefficients(a_t, a_s, *, eta) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(c1, c2) of the official DDIM update (``algos/ddim.py``).

    ``c1 = eta * sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t))``, ``c2 = sqrt(1 - a_s - c1²)``. The
    argument of the second root is clamped at 0 (it is only negative through rounding), so
    ``a_s = 1`` (s = -1) gives ``c1 = c2 = 0`` exactly.
    """
    a_t = jnp.asarray(a_t)
    a_s = jnp.asarray(a_s)
    c1 = eta * jnp.sqrt(jnp.maximum((1.0 - a_t / a_s) * (1.0 - a_s) / (1.0 - a_t), 0.0))
    c2 = jnp.sqrt(jnp.maximum(1.0 - a_s - c1**2, 0.0))
    return c1, c2


def ddim_step(
    x0: jnp.ndarray,
    eps: jnp.ndarray,
    a_t,
    a_s,
    *,
    eta=0.0,
    z: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """One DDIM update x_t -> x_s from the predictions (x̂0, eps).

    ``x_s = sqrt(a_s) x0 + c1 z + c2 eps`` with (c1, c2) from :func:`ddim_coefficients`.

    Args:
      x0: predicted clean image, e.g. [B, H, W, C].
      eps: predicted noise, same shape.
      a_t, a_s: ᾱ_t and ᾱ_s (s < t, ᾱ_{-1} = 1), scalars or broadcastable to ``x0``.
      eta: stochasticity (0 = deterministic DDIM, 1 = DDPM-like).
      z: N(0, 1) noise of ``x0``'s shape; may be None only when ``eta`` is the constant 0.

    Returns:
      x_s, same shape as ``x0``.
    """
    c1, c2 = ddim_coefficients(a_t, a_s, eta=eta)
    out = jnp.sqrt(a_s) * x0 + c2 * eps
    if z is None:
        if not (isinstance(eta, int | float) and eta == 0):
            raise ValueError("z: noise is required when eta is not the constant 0, got None")
        return out
    if z.shape != x0.shape:
        raise ValueError(f"z: expected shape {x0.shape} (that of x0), got {z.shape}")
    return out + c1 * z
