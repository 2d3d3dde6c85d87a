"""The solver protocol every algorithm follows, in optax's manner.

An algorithm is two things:

* a frozen config, a subclass of :class:`SolverConfig`. Its structural settings (step count,
  schedule, flags) are static; its numeric hyper-parameters (``HYPER``: λ, lr, ζ, η, ...) become
  float32 arrays in the state, so a sweep over them vmaps and never recompiles;
* a factory ``make(eps_fn, op, config, alphas_cumprod) -> Solver``: pure ``init``/``step``
  functions over a small NamedTuple state, plus the names and the generators of the random draws.

:func:`reddiff_jax.solvers.solve` is the one driver: it owns the ``lax.scan`` over the timestep
grid, the noise (fresh or replayed), trajectories, progress and the divergence check.

Layouts: images are NHWC float32 ``[B, H, W, C]`` in [-1, 1] (iterates may leave that range);
the operator acts on ONE image ``[H, W, C]`` and is vmapped; ``y`` is ``[B, *y_shape]``;
``eps_fn(x_t [B, H, W, C], t [B] int32) -> eps [B, H, W, C]``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import diffusion
from reddiff_jax.solvers.common import is_concrete

__all__ = [
    "Algorithm",
    "SolveError",
    "SolveStatus",
    "Solver",
    "SolverConfig",
    "StepInput",
    "StepOutput",
    "first_alpha",
    "hyper_dtype",
    "padded_alphas",
    "pinv_start",
    "predict",
    "sampler_init_draws",
    "sampler_step_draws",
    "schedule_of",
    "split_step_draws",
    "step_inputs",
]

Array = jax.Array


class SolveStatus(enum.IntEnum):
    """Outcome of a solve per image; ``int(status)`` is what a :class:`Solution` stores."""

    SUCCESS = 0
    NONFINITE = 1
    DIVERGED = 2

    @property
    def message(self) -> str:
        return {
            SolveStatus.SUCCESS: "success",
            SolveStatus.NONFINITE: "a non-finite value (nan/inf) appeared in the iterate",
            SolveStatus.DIVERGED: "the iterate left the bound |x| <= max_abs (it diverged)",
        }[self]


class SolveError(FloatingPointError):
    """Raised by ``solve(..., throw=True)`` when an image becomes non-finite or diverges."""


class StepInput(NamedTuple):
    """Where a step stands on the timestep grid (all scalars)."""

    k: Array  # [] int32, 0-based index of the step
    t: Array  # [] int32, the timestep (descending grid)
    a_t: Array  # [] float32, ᾱ_t
    a_s: Array  # [] float32, ᾱ_s of the next timestep s (ᾱ_{-1} = 1 after the last step)


class StepOutput(NamedTuple):
    """What a step reports besides its new state."""

    x: Array  # [B, H, W, C] the iterate after the step (checked for divergence)
    x0: Array  # [B, H, W, C] the step's clean-image estimate x̂0
    stats: dict  # per-step diagnostics, [] or [B] arrays (stacked by solve)
    extras: dict = {}  # image-sized intermediates (eps, gradients); solve drops them


def _no_draws(key: Array, shape: tuple[int, ...]) -> dict:
    del key, shape
    return {}


class Solver(NamedTuple):
    """The pure functions of one algorithm, built by its factory.

    * ``init(y, hyper, draws) -> state``: ``y [B, *y_shape]`` (None for unconditional sampling),
      ``hyper`` the float32 hyper-parameters (``SolverConfig.hyperparams()``), ``draws`` a dict
      of the init's N(0, 1) draws ``[B, H, W, C]`` named in ``init_draws``.
    * ``step(state, inp, draws) -> (state, StepOutput)``: one step at :class:`StepInput` ``inp``;
      ``draws`` holds this step's draws named in ``step_draws``.
    * ``output(state) -> [B, H, W, C]``: the restored image.
    * ``draw_init(key, x_shape)`` / ``draw_step(key, k, x_shape)``: the fresh draws.
    """

    init: Callable[[Any, Mapping[str, Array], Mapping[str, Array]], Any]
    step: Callable[[Any, StepInput, Mapping[str, Array]], tuple[Any, StepOutput]]
    output: Callable[[Any], Array]
    init_draws: tuple[str, ...] = ()
    step_draws: tuple[str, ...] = ()
    draw_init: Callable[[Array, tuple[int, ...]], dict] = _no_draws
    draw_step: Callable[[Array, Array, tuple[int, ...]], dict] | None = None


# ------------------------------------------------------------------------------------------------
# The two noise schemes in use (kept so results stay what they were for the same key).


def sampler_init_draws(key: Array, shape: tuple[int, ...]) -> dict:
    """The diffusion samplers' start: ``{"init": normal(fold_in(key, 0), shape)}``."""
    return {"init": jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)}


def sampler_step_draws(key: Array, k: Array, shape: tuple[int, ...]) -> dict:
    """The diffusion samplers' step k: ``{"z": normal(fold_in(fold_in(key, 1), k), shape)}``."""
    key_z = jax.random.fold_in(jax.random.fold_in(key, 1), k)
    return {"z": jax.random.normal(key_z, shape, jnp.float32)}


def split_step_draws(names: tuple[str, ...]) -> Callable[[Array, Array, tuple], dict]:
    """Step k draws ``names[i]`` from ``split(fold_in(key, k))[i]`` (RED-Diff: ``xt``, ``x0``).

    Two keys are always split, so the first draw does not depend on whether a second is used.
    """

    def draw(key: Array, k: Array, shape: tuple[int, ...]) -> dict:
        keys = jax.random.split(jax.random.fold_in(key, k), max(2, len(names)))
        return {n: jax.random.normal(keys[i], shape, jnp.float32) for i, n in enumerate(names)}

    return draw


# ------------------------------------------------------------------------------------------------
# Configs


def hyper_dtype(v: Any) -> Any:
    """float32, or ``v``'s own floating dtype when it is wider and ``jax_enable_x64`` is on.

    Solvers carry their state in this dtype, so a float64 hyper-parameter (a finite-difference
    check of a tuning gradient) runs the whole solve in float64; float32 results are unchanged.
    """
    dt = getattr(v, "dtype", None)
    if (dt is not None and jax.config.jax_enable_x64 and jnp.issubdtype(dt, jnp.floating)
            and jnp.finfo(dt).bits > 32):  # fmt: skip
        return dt
    return jnp.float32


def _is_real_scalar(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float | np.integer | np.floating):
        return True
    return hasattr(v, "shape") and tuple(v.shape) == () and hasattr(v, "dtype")


def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < lo or (hi and v > hi):
        span = f"{lo} .. {hi}" if hi else f">= {lo}"
        raise ValueError(f"{name}: expected an int in {span}, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolverConfig:
    """Settings shared by every algorithm; subclasses add their own.

    Attributes:
      num_steps: N in 1..num_timesteps; the official grid ``range(0, T, T // N)`` is visited
        descending. Its length K (:attr:`num_iterations`) is N when N divides T.
      schedule: ``"linear"`` (official, betas 1e-4..0.02) or ``"cosine"``.
      num_timesteps: T (default 1000).

    Class attributes of a subclass: ``HYPER`` names its numeric hyper-parameters (traced, so a
    new value does not recompile) and ``BOUNDS`` maps some of them to ``(low, high)``.
    """

    HYPER: ClassVar[tuple[str, ...]] = ()
    BOUNDS: ClassVar[Mapping[str, tuple[float | None, float | None]]] = {}

    num_steps: int = 50
    schedule: str = "linear"
    num_timesteps: int = 1000

    def __post_init__(self) -> None:
        _check_int("num_timesteps", self.num_timesteps, 1)
        _check_int("num_steps", self.num_steps, 1, self.num_timesteps)
        if self.schedule not in diffusion.SCHEDULES:
            raise ValueError(
                f"schedule: expected one of {diffusion.SCHEDULES}, got {self.schedule!r}"
            )
        for name in self.HYPER:
            self._check_hyper(name, getattr(self, name))

    def _check_hyper(self, name: str, v: Any) -> None:
        if not _is_real_scalar(v):
            raise TypeError(f"{name}: expected a real scalar, got {v!r}")
        if not is_concrete(v):
            return  # traced (e.g. differentiated): checked by the caller's data
        v = float(v)
        lo, hi = self.BOUNDS.get(name, (None, None))
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            span = "" if lo is None and hi is None else f" in [{lo}, {hi}]".replace("None", "inf")
            raise ValueError(f"{name}: expected a finite value{span}, got {v!r}")

    def timesteps(self) -> np.ndarray:
        """int32 [K] timesteps in the order visited (descending, ending at 0)."""
        return diffusion.timesteps(int(self.num_steps), int(self.num_timesteps))

    @property
    def num_iterations(self) -> int:
        """K, the number of steps a solve takes (``len(range(0, T, T // num_steps))``)."""
        return len(self.timesteps())

    def hyperparams(self) -> dict[str, Array]:
        """The numeric hyper-parameters as float32 scalars (what ``Solver.init`` receives).

        A float64 jax value (under ``jax_enable_x64``, e.g. a float64 tracer of a gradient
        check) keeps its dtype; everything else is float32 as before."""
        return {n: jnp.asarray(getattr(self, n), hyper_dtype(getattr(self, n))) for n in self.HYPER}

    def admitting(self, hyper: Mapping[str, Any]) -> SolverConfig:
        """The config whose static switches admit per-measurement values ``hyper`` (name ->
        array, :func:`solve_many`'s ``hyper=``); by default itself."""
        del hyper
        return self

    def static(self) -> SolverConfig:
        """The config with its hyper-parameters zeroed: what a compiled solve depends on."""
        return dataclasses.replace(self, **{n: 0.0 for n in self.HYPER})

    def build(self, eps_fn: Callable, op: Any, *, alphas_cumprod: Array) -> Solver:
        """The algorithm's :class:`Solver` for ``eps_fn`` and ``op`` (subclasses implement)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build()")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm:
    """What the library knows about one algorithm (one entry of the registry).

    Attributes:
      name: the CLI name (``"reddiff"``).
      title: the display name (``"RED-Diff"``).
      config: its :class:`SolverConfig` subclass.
      needs: operator capabilities it requires: ``"A_dagger"`` (a pseudo-inverse) or ``"svd"``.
      backprop: whether each step differentiates through the network (a VJP per step).
      conditional: False for unconditional sampling (DDIM), which ignores the measurement.
      task_defaults: task (``"*"`` for every task; an operator name, ``"sr"``; or a name with
        its first argument, ``"inpaint:random"``) -> settings used by the main job; a more
        specific entry overrides a general one (:func:`registry.task_defaults`).
      shown: the settings an evaluation table shows.
      advice: what to change when a solve diverges.
    """

    name: str
    title: str
    config: type[SolverConfig]
    needs: tuple[str, ...] = ()
    backprop: bool = False
    conditional: bool = True
    task_defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    shown: tuple[str, ...] = ()
    advice: str = "lower the step size"


# ------------------------------------------------------------------------------------------------
# Helpers shared by the algorithms


def predict(eps_fn: Callable, x: Array, t: Array, a_t: Array) -> tuple[Array, Array]:
    """``(x̂0, eps)`` of the network at ``x_t [B, H, W, C]``, scalar ``t`` (the official
    ``ClassifierGuidanceModel``: ``x̂0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``)."""
    eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    if eps.shape != x.shape:
        raise ValueError(
            f"eps_fn: expected an output of shape {x.shape} (that of x_t), got {eps.shape}"
        )
    eps = eps.astype(x.dtype)
    return diffusion.x0_from_eps(x, eps, a_t), eps


def padded_alphas(alphas_cumprod: Array) -> Array:
    """ᾱ [T + 1] with ᾱ_{-1} = 1 in front, so ``padded[t + 1]`` is ᾱ_t for t in -1..T-1."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    return jnp.concatenate([jnp.ones((1,), ac.dtype), ac])


def step_inputs(config: SolverConfig, *, alphas_cumprod: Array | None = None) -> StepInput:
    """The :class:`StepInput` of every step, stacked [K], for driving ``step`` by hand."""
    ac = schedule_of(config, alphas_cumprod)
    ts = config.timesteps()
    ss = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    pad = padded_alphas(ac)
    return StepInput(
        jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), pad[ts + 1], pad[ss + 1]
    )


def schedule_of(config: SolverConfig, alphas_cumprod: Array | None) -> Array:
    """ᾱ [T] float32: ``alphas_cumprod`` checked against the config, or the config's schedule."""
    if alphas_cumprod is None:
        return diffusion.alphas_cumprod(config.schedule, int(config.num_timesteps))
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    if ac.shape != (config.num_timesteps,):
        raise ValueError(
            f"alphas_cumprod: expected shape ({config.num_timesteps},) "
            f"(config.num_timesteps), got {tuple(ac.shape)}"
        )
    return ac


def first_alpha(config: SolverConfig, alphas_cumprod: Array) -> Array:
    """ᾱ_T of the grid's first timestep (the samplers' start)."""
    return padded_alphas(alphas_cumprod)[int(config.timesteps()[0]) + 1]


def pinv_start(op: Any, y: Array, n: Array, a_T: Array) -> Array:
    """``x_T = sqrt(a_T) A_dagger(y) + sqrt(1 - a_T) n`` (official DPS / ΠGDM initialise)."""
    x_dag = jax.vmap(op.A_dagger)(y).astype(jnp.float32)
    return jnp.sqrt(a_T) * x_dag + jnp.sqrt(1.0 - a_T) * n
