"""DDIM sampling (Song et al. 2021) as in the official RED-diff code, and the baselines' skeleton.

Images are NHWC float32, [B, H, W, C], in [-1, 1]. The timestep grid, the schedule and the update
follow ``reddiff_official.md`` sections 0 and 4 (``algos/ddim.py``)::

    x0 = (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t)
    x_s = sqrt(a_s) x0 + c1 z + c2 eps,   c1 = eta sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t)),
                                          c2 = sqrt(1 - a_s - c1^2)

with t running DESCENDING over ``diffusion.timesteps(num_steps)`` and s the next t
(ᾱ_{-1} = 1, so the last step returns x0). The whole loop is one ``jax.lax.scan`` under ``jit``.

This module also holds what the other baselines (DPS, ΠGDM, DDRM, DiffPIR) share: the result
type :class:`SamplerResult`, the noise handling and the jitted scan driver.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import diffusion
from reddiff_jax.solvers import common

__all__ = ["Config", "DDIMConfig", "SamplerResult", "num_iterations", "sample", "solve"]

EpsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# ------------------------------------------------------------------------------------------------
# Shared pieces of the baselines.


@flax.struct.dataclass
class SamplerResult:
    """What a baseline sampler returns (a pytree; vmap/jit friendly).

    Attributes:
      x0_pred: [B, H, W, C] the final image: the state after the last step (s = -1, ᾱ_{-1} = 1),
        i.e. the first element of the official ``sample()``'s first list.
      xs: [K, B, H, W, C] the state after every step (``xs[k]`` is x_s of step k, so
        ``xs[-1] == x0_pred``), or None unless ``trajectory=True``.
      x0s: [K, B, H, W, C] the network's x̂0 at every step, or None unless ``trajectory=True``.
      info: dict of per-step diagnostics, each [K, B] (solver specific, e.g. DPS's
        ``residual_norm``); may be empty.
    """

    x0_pred: jnp.ndarray
    xs: jnp.ndarray | None = None
    x0s: jnp.ndarray | None = None
    info: dict = dataclasses.field(default_factory=dict)


def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < lo or (hi and v > hi):
        span = f"{lo} .. {hi}" if hi else f">= {lo}"
        raise ValueError(f"{name}: expected an int in {span}, got {v!r}")


def _check_float(name: str, v: Any, lo: float | None = None, hi: float | None = None) -> None:
    ok = isinstance(v, int | float | np.floating | np.integer) and not isinstance(v, bool)
    if ok:
        ok = np.isfinite(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        bounds = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ValueError(f"{name}: expected a finite float{bounds}, got {v!r}")


def _check_schedule(config: Any) -> None:
    """Validates the fields every baseline config has (num_steps, schedule, num_timesteps)."""
    _check_int("num_timesteps", config.num_timesteps, 1)
    _check_int("num_steps", config.num_steps, 1, config.num_timesteps)
    if config.schedule not in diffusion.SCHEDULES:
        raise ValueError(
            f"schedule: expected one of {diffusion.SCHEDULES}, got {config.schedule!r}"
        )


def _grid(config: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t [K] int32, ᾱ_t [K] float32, ᾱ_s [K] float32) in the order the loop visits them."""
    return _grid_cached(config.schedule, config.num_timesteps, config.num_steps)


@functools.lru_cache(maxsize=64)
def _grid_cached(schedule: str, num_timesteps: int, num_steps: int):
    # Host-side numpy (also while tracing): ᾱ padded with ᾱ_{-1} = 1, as diffusion.alpha_bar.
    with jax.ensure_compile_time_eval():
        ac = np.asarray(diffusion.alphas_cumprod(schedule, num_timesteps))
    ac = np.concatenate([[1.0], ac])
    ac = ac.astype(np.float32)
    ts = diffusion.timesteps(num_steps, num_timesteps)
    ss = diffusion.prev_timesteps(num_steps, num_timesteps)
    return ts, ac[ts + 1], ac[ss + 1]


def num_iterations(config: Any) -> int:
    """K, the number of loop iterations (``len(range(0, T, T // num_steps))``; = num_steps when
    num_steps divides T). The leading axis of ``noise["z"]`` and of the trajectories."""
    return len(diffusion.timesteps(config.num_steps, config.num_timesteps))


def _check_eps_fn(eps_fn: Any) -> None:
    if not callable(eps_fn):
        raise TypeError(
            f"eps_fn: expected a callable eps_fn(x_t [B,H,W,C], t [B] int32) -> eps [B,H,W,C], "
            f"got {type(eps_fn).__name__}"
        )


def _check_noise(noise: Any, *, init_shape: tuple, z_shape: tuple, K: int) -> dict | None:
    """Validates a user noise dict {"init": init_shape, "z": [K, *z_shape]}; float32 copies."""
    if noise is None:
        return None
    if not isinstance(noise, dict) or set(noise) != {"init", "z"}:
        got = sorted(noise) if isinstance(noise, dict) else type(noise).__name__
        raise ValueError(f'noise: expected None or a dict with keys "init" and "z", got {got}')
    want = {"init": tuple(init_shape), "z": (K, *z_shape)}
    out = {}
    for name, shape in want.items():
        v = noise[name]
        if not hasattr(v, "shape") or tuple(v.shape) != shape:
            got = tuple(v.shape) if hasattr(v, "shape") else type(v).__name__
            raise ValueError(f'noise["{name}"]: expected shape {shape}, got {got}')
        out[name] = jnp.asarray(v, jnp.float32)
    return out


def _check_key(key: Any) -> None:
    if not isinstance(key, jax.Array) or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,)
    ):
        raise TypeError(
            f"key: expected a jax PRNG key (jax.random.key(0) or PRNGKey(0)), got {key!r:.80}"
        )


def _init_noise(key: jax.Array, noise: dict | None, shape: tuple) -> jnp.ndarray:
    if noise is not None:
        return noise["init"]
    return jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)


def _scan(
    step_fn: Callable,
    x_init: jnp.ndarray,
    config: Any,
    key: jax.Array,
    noise: dict | None,
    *,
    trajectory: bool,
) -> SamplerResult:
    """The baselines' loop: one ``lax.scan`` over the (descending) timestep grid.

    ``step_fn(x_t, t [B] int32, a_t, a_s, z) -> (x_s, x0, info dict of [B] arrays)``; ``z`` is the
    step's N(0, 1) draw of ``x_init``'s shape: ``noise["z"][k]`` when given, otherwise
    ``normal(fold_in(fold_in(key, 1), k))`` drawn inside the step (no [K, ...] buffer).
    """
    ts, a_t, a_s = _grid(config)
    B = x_init.shape[0]
    key_z = jax.random.fold_in(key, 1)
    zs = None if noise is None else noise["z"]
    xs_in = (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(a_t), jnp.asarray(a_s), zs)

    def body(x, inp):
        k, t, at, as_, z = inp
        if z is None:
            z = jax.random.normal(jax.random.fold_in(key_z, k), x.shape, jnp.float32)
        x_next, x0, info = step_fn(x, jnp.full((B,), t, jnp.int32), at, as_, z)
        out = (info, x_next, x0) if trajectory else (info, None, None)
        return x_next, out

    x_final, (info, xs, x0s) = jax.lax.scan(body, x_init, xs_in)
    return SamplerResult(x0_pred=x_final, xs=xs, x0s=x0s, info=info)


def _x0_eps(eps_fn: EpsFn, x: jnp.ndarray, t: jnp.ndarray, a_t) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x̂0, eps) of the network at x_t (official ``ClassifierGuidanceModel`` wrapper)."""
    eps = eps_fn(x, t)
    if eps.shape != x.shape:
        raise ValueError(
            f"eps_fn: expected an output of shape {x.shape} (that of x_t), got {eps.shape}"
        )
    eps = eps.astype(x.dtype)
    return diffusion.x0_from_eps(x, eps, a_t), eps


def _prepare(eps_fn: Any, op: Any, y: Any, key: Any) -> tuple[tuple, jnp.ndarray]:
    """Shared argument checks of the measurement-conditioned baselines; returns (image shape, y)."""
    _check_eps_fn(eps_fn)
    _check_key(key)
    y = common.check_measurement(op, y)
    return (y.shape[0], *common.image_shape_of(op)), y


def _pinv_init(op: Any, y: jnp.ndarray, key: jax.Array, noise: dict | None, config: Any):
    """``x_T = sqrt(a_T) A_dagger(y) + sqrt(1 - a_T) n`` (official DPS / ΠGDM ``initialize``)."""
    _, a_t, _ = _grid(config)
    x_dag = jax.vmap(op.A_dagger)(y).astype(jnp.float32)
    n = _init_noise(key, noise, x_dag.shape)
    return jnp.sqrt(a_t[0]) * x_dag + jnp.sqrt(1.0 - a_t[0]) * n


def _jit_solver(impl: Callable) -> Callable:
    """jit of ``impl(eps_fn, op, y, key, noise, config, trajectory)`` with the callable and the
    operator split into a static part and traced arrays (cached per structure and config)."""

    def run(eps_static, eps_dyn, op_static, op_dyn, y, key, noise, config, trajectory):
        eps_fn = common.merge_static(eps_static, eps_dyn)
        op = common.merge_static(op_static, op_dyn)
        return impl(eps_fn, op, y, key, noise, config, trajectory)

    return jax.jit(run, static_argnames=("eps_static", "op_static", "config", "trajectory"))


def _solve_conditional(
    jitted: Callable,
    config_type: type,
    eps_fn: Any,
    op: Any,
    y: Any,
    config: Any,
    key: Any,
    noise: Any,
    trajectory: Any,
) -> SamplerResult:
    """Shared front end: checks, noise validation, static/dynamic split, then the jitted run."""
    if not isinstance(config, config_type):
        raise TypeError(f"config: expected a {config_type.__name__}, got {type(config).__name__}")
    shape, y = _prepare(eps_fn, op, y, key)
    noise = _check_noise(noise, init_shape=shape, z_shape=shape, K=num_iterations(config))
    eps_static, eps_dyn = common.split_static(eps_fn)
    op_static, op_dyn = common.split_static(op)
    return jitted(eps_static, eps_dyn, op_static, op_dyn, y, key, noise, config, bool(trajectory))


def _need(op: Any, method: str, solver: str, why: str) -> None:
    """TypeError unless ``op.<method>`` exists and works on one measurement (``A_dagger``) or
    one image; probed abstractly with ``jax.eval_shape`` (nothing runs)."""
    y_shape = common.measurement_shape(op)  # TypeError when op has no `A` / `image_shape`
    fn = getattr(op, method, None)
    if fn is not None and callable(fn):
        arg_shape = y_shape if method == "A_dagger" else common.image_shape_of(op)
        try:
            jax.eval_shape(fn, jax.ShapeDtypeStruct(arg_shape, jnp.float32))
            return
        except NotImplementedError as err:
            detail = f" ({err})"
    else:
        detail = ""
    raise TypeError(
        f"op: {solver} needs an operator with `{method}` ({why}); "
        f"{type(op).__name__} has none{detail}"
    )


# ------------------------------------------------------------------------------------------------
# DDIM.


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """Unconditional DDIM sampling.

    Attributes:
      num_steps: N, grid ``range(0, T, T // N)`` visited descending (default 50: the official
        ``_configs/exp/default.yaml``).
      eta: DDIM stochasticity, 0 = deterministic ODE-like sampler, 1 = DDPM-like (default 0.5:
        the official ``_configs/algo/ddim.yaml``).
      schedule: ``"linear"`` (official, betas 1e-4..0.02) or ``"cosine"``.
      num_timesteps: T (default 1000).
    """

    num_steps: int = 50
    eta: float = 0.5
    schedule: str = "linear"
    num_timesteps: int = 1000

    def __post_init__(self):
        _check_schedule(self)
        _check_float("eta", self.eta, 0.0)


Config = DDIMConfig


def _ddim_impl(eps_static, eps_dyn, shape, key, noise, config, trajectory):
    eps_fn = common.merge_static(eps_static, eps_dyn)
    x_init = _init_noise(key, noise, shape)

    def step(x, t, a_t, a_s, z):
        x0, eps = _x0_eps(eps_fn, x, t, a_t)
        return diffusion.ddim_step(x0, eps, a_t, a_s, eta=config.eta, z=z), x0, {}

    return _scan(step, x_init, config, key, noise, trajectory=trajectory)


_ddim_jit = jax.jit(_ddim_impl, static_argnames=("eps_static", "shape", "config", "trajectory"))


def sample(
    eps_fn: EpsFn,
    shape: tuple[int, int, int, int],
    config: DDIMConfig,
    key: jax.Array,
    *,
    noise: dict | None = None,
    trajectory: bool = False,
) -> SamplerResult:
    """Draws ``B`` images from the prior with DDIM.

    Args:
      eps_fn: ``eps_fn(x_t [B,H,W,C], t [B] int32) -> eps [B,H,W,C]`` (e.g. ``model.eps``).
      shape: (B, H, W, C) of the samples.
      config: a :class:`DDIMConfig`.
      key: PRNG key (x_T and the per-step z are drawn from it unless ``noise`` is given).
      noise: optional ``{"init": [B,H,W,C] x_T, "z": [K,B,H,W,C]}`` replacing the draws
        (K = :func:`num_iterations`).
      trajectory: also return the per-step states and x̂0 (memory K x the batch).

    Returns:
      :class:`SamplerResult`; ``x0_pred`` [B,H,W,C] are the samples.
    """
    _check_eps_fn(eps_fn)
    _check_key(key)
    if not isinstance(config, DDIMConfig):
        raise TypeError(f"config: expected a DDIMConfig, got {type(config).__name__}")
    if len(tuple(shape)) != 4 or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
        raise ValueError(f"shape: expected (B, H, W, C) positive ints, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    noise = _check_noise(noise, init_shape=shape, z_shape=shape, K=num_iterations(config))
    eps_static, eps_dyn = common.split_static(eps_fn)
    return _ddim_jit(eps_static, eps_dyn, shape, key, noise, config, bool(trajectory))


def solve(
    eps_fn: EpsFn,
    op: Any,
    y: Any,
    config: DDIMConfig,
    key: jax.Array,
    *,
    noise: dict | None = None,
    trajectory: bool = False,
) -> SamplerResult:
    """DDIM with the baselines' signature: unconditional, ``y`` only sets the batch size.

    ``op`` (for its ``image_shape``) and ``y`` [B, *y_shape] are checked like the other solvers'
    but the measurement is not used. See :func:`sample` for the arguments and the result.
    """
    shape, _ = _prepare(eps_fn, op, y, key)
    return sample(eps_fn, shape, config, key, noise=noise, trajectory=trajectory)
