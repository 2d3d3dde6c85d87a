"""DDIM sampling (Song et al. 2021) as in the official RED-diff code, and the samplers' state.

Images are NHWC float32, [B, H, W, C], in [-1, 1]. The timestep grid, the schedule and the update
follow ``reddiff_official.md`` sections 0 and 4 (``algos/ddim.py``)::

    x0 = (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t)
    x_s = sqrt(a_s) x0 + c1 z + c2 eps,   c1 = eta sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t)),
                                          c2 = sqrt(1 - a_s - c1^2)

with t running DESCENDING over the grid and s the next t (ᾱ_{-1} = 1, so the last step returns
x0). ``reddiff_jax.solvers.sample(DDIMConfig(), eps_fn, shape, key)`` draws from the prior.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from reddiff_jax import diffusion
from reddiff_jax.solvers.base import (
    Algorithm,
    Solver,
    SolverConfig,
    StepInput,
    StepOutput,
    first_alpha,
    pinv_start,
    predict,
    sampler_init_draws,
    sampler_step_draws,
)

__all__ = ["ALGORITHM", "DDIMConfig", "SamplerState", "ddim", "pinv_sampler", "sampler"]

Array = jax.Array


class SamplerState(NamedTuple):
    """State of the diffusion samplers (DDIM, DPS, ΠGDM, DDRM, DiffPIR)."""

    x: Array  # [B, H, W, C] x_t, the current noisy iterate (x_s after a step)
    y: Any  # [B, *y_shape] the measurement (None for unconditional sampling)
    hyper: dict  # name -> [] float32 hyper-parameter


def sampler(
    init: Callable[[Any, Mapping[str, Array], Mapping[str, Array]], Array],
    update: Callable[[SamplerState, StepInput, Array], tuple[Array, Array, dict]],
) -> Solver:
    """A sampler's :class:`Solver` from its start ``init(y, hyper, draws) -> x_T`` and its update
    ``update(state, inp, z) -> (x_s, x̂0, stats)``; the draws are ``"init"`` and ``"z"``."""

    def init_fn(y, hyper, draws):
        return SamplerState(x=init(y, hyper, draws), y=y, hyper=dict(hyper))

    def step(state: SamplerState, inp: StepInput, draws: Mapping[str, Array]):
        x_s, x0, stats = update(state, inp, draws["z"])
        return state._replace(x=x_s), StepOutput(x=x_s, x0=x0, stats=stats)

    return Solver(
        init=init_fn,
        step=step,
        output=lambda state: state.x,
        init_draws=("init",),
        step_draws=("z",),
        draw_init=sampler_init_draws,
        draw_step=sampler_step_draws,
    )


def pinv_sampler(
    op: Any,
    config: SolverConfig,
    alphas_cumprod: Array,
    update: Callable[[SamplerState, StepInput, Array], tuple[Array, Array, dict]],
) -> Solver:
    """A sampler started at ``x_T = sqrt(a_T) A_dagger(y) + sqrt(1 - a_T) n`` (the official DPS
    / ΠGDM ``initialize``; DiffPIR too), ``a_T`` the grid's first ᾱ."""
    a_T = first_alpha(config, alphas_cumprod)

    def init(y, hyper, draws):
        del hyper
        return pinv_start(op, y, draws["init"], a_T)

    return sampler(init, update)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDIMConfig(SolverConfig):
    """Unconditional DDIM sampling.

    Attributes:
      num_steps: N (default 50: the official ``_configs/exp/default.yaml``).
      eta: DDIM stochasticity, 0 = deterministic ODE-like sampler, 1 = DDPM-like (default 0.5:
        the official ``_configs/algo/ddim.yaml``).
      schedule, num_timesteps: see :class:`~reddiff_jax.solvers.base.SolverConfig`.
    """

    HYPER = ("eta",)
    BOUNDS = {"eta": (0.0, None)}

    num_steps: int = 50
    eta: float = 0.5

    def build(self, eps_fn: Callable, op: Any, *, alphas_cumprod: Array) -> Solver:
        del op  # unconditional
        return ddim(eps_fn)


def ddim(eps_fn: Callable[[Array, Array], Array]) -> Solver:
    """The DDIM :class:`Solver`: x_T is the ``"init"`` draw; one network call per step."""

    def init(y, hyper, draws):
        del y, hyper
        return draws["init"]

    def update(state: SamplerState, inp: StepInput, z: Array):
        x0, eps = predict(eps_fn, state.x, inp.t, inp.a_t)
        x_s = diffusion.ddim_step(x0, eps, inp.a_t, inp.a_s, eta=state.hyper["eta"], z=z)
        return x_s, x0, {}

    return sampler(init, update)


ALGORITHM = Algorithm(
    name="ddim",
    title="DDIM",
    config=DDIMConfig,
    conditional=False,
    shown=("eta",),
    advice="check the eps_fn",
)
