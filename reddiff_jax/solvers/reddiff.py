r"""RED-Diff: variational posterior sampling with a diffusion prior (Mardani et al., ICLR 2024).

A faithful port of the official ``algos/reddiff.py`` (NVlabs/RED-diff @ 66482f2), written as a
pure init/step pair in optax's manner; :func:`reddiff_jax.solvers.solve` drives it.

Layouts: images NHWC float32 in [-1, 1] (optimised iterates may leave that range);
``mu``/``x0_pred`` are ``[B, H, W, C]`` with ``(H, W, C) = op.image_shape``; the measurement
``y`` is ``[B, *y_shape]`` where ``y_shape`` is what ``op.A`` returns for ONE image; the operator
acts per image (``jax.vmap(op.A)``). ``eps_fn(x_t [B, H, W, C], t [B] int32) -> [B, H, W, C]``.

One step at timestep ``t`` (ᾱ = ᾱ_t, ε ~ N(0, I) fresh every step):

.. math::

   x_0 &= \mu + \sigma_{x_0} \varepsilon_0, \qquad
   x_t = \sqrt{\bar\alpha}\, x_0 + \sqrt{1-\bar\alpha}\, \varepsilon \\
   L(\mu) &= w_t \,\mathrm{mean}\big(\mathrm{sg}[\hat\varepsilon(x_t, t) - \varepsilon]
     \odot x_0\big) + v_t \,\mathrm{mean}\big((y - A(x_0))^2\big) / 2 \\
   w_t &= \lambda\, f\big(\sqrt{1-\bar\alpha}/\sqrt{\bar\alpha}\big), \quad
   v_t = \text{obs\_weight}, \quad \mu \leftarrow \mathrm{Adam}(\nabla_\mu L)

The network output is under ``stop_gradient`` (one evaluation per step, never differentiated).
``reduction="batch_mean"`` takes both means over ALL entries of the batch, as upstream (so every
gradient carries a 1/B factor and, through Adam's eps, a result depends slightly on B);
``"image_mean"`` takes them per image and sums over images (each image is solved independently of
its batch); ``"sum"`` sums everything. Timesteps are visited descending on the official grid
``range(0, T, T // num_steps)``. The solution (``Solution.x``) is the LAST step's ``x_0``,
computed before the final update (what upstream returns); ``state.mu`` is after that update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reddiff_jax.solvers.base import (
    Algorithm,
    Solver,
    SolverConfig,
    StepInput,
    StepOutput,
    hyper_dtype,
    schedule_of,
    split_step_draws,
)
from reddiff_jax.solvers.common import image_shape_of, is_concrete

__all__ = [
    "ALGORITHM",
    "INITS",
    "REDUCTIONS",
    "WEIGHTINGS",
    "RedDiffConfig",
    "RedDiffState",
    "default_optimizer",
    "reddiff",
    "snr_weight",
]

Array = jax.Array

WEIGHTINGS = ("linear", "sqrt", "square", "log", "trunc_linear", "power2over3", "const")
REDUCTIONS = ("batch_mean", "image_mean", "sum")
INITS = ("pinv", "zeros")
_ARRAY_INIT = "<array>"  # placeholder for an array init in the static (hashable) config


def snr_weight(weighting: str, snr_inv: Array) -> Array:
    """The official ``denoise_term_weight`` shapes f(1/snr), with ``snr_inv = σ_t/α_t``.

    linear: x | sqrt: √x | square: x² | log: log(1+x) | trunc_linear: min(x, 1) |
    power2over3: x^(2/3) | const: 1.
    """
    x = jnp.asarray(snr_inv)
    if weighting == "linear":
        return x
    if weighting == "sqrt":
        return jnp.sqrt(x)
    if weighting == "square":
        return jnp.square(x)
    if weighting == "log":
        return jnp.log(x + 1.0)
    if weighting == "trunc_linear":
        return jnp.minimum(x, 1.0)
    if weighting == "power2over3":
        return jnp.power(x, 2.0 / 3.0)
    if weighting == "const":
        return jnp.ones_like(x)
    raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")


def default_optimizer(*, lr: float | Array = 0.1) -> optax.GradientTransformation:
    """The official optimiser, torch ``Adam(lr, betas=(0.9, 0.99), eps=1e-8)``, no weight decay.

    Wrapped in ``optax.inject_hyperparams`` so the learning rate lives in the state
    (``state.hyperparams["learning_rate"]``) and a sweep over it vmaps without retracing.
    """
    return optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=0.9, b2=0.99, eps=1e-8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RedDiffConfig(SolverConfig):
    """Settings of RED-Diff (defaults: the official ``_configs/algo/reddiff.yaml``).

    Attributes:
      num_steps: N (default 100); see :class:`~reddiff_jax.solvers.base.SolverConfig`.
      lr: Adam learning rate (ignored when ``optimizer`` is given without an injected
        ``learning_rate`` hyperparameter).
      lam: λ (upstream ``grad_term_weight``), >= 0.
      obs_weight: v_t, the weight of the data term, >= 0.
      weighting: f in w_t = λ f(σ_t/α_t): one of :data:`WEIGHTINGS`.
      sigma_x0: std of the jitter x_0 = μ + sigma_x0 ε_0 (a fresh ε_0 per step when > 0).
      reduction: one of :data:`REDUCTIONS` (see the module docstring).
      init: ``"pinv"`` (μ₀ = op.A_dagger(y), official), ``"zeros"``, or an array
        broadcastable to [B, H, W, C].
      step_weights: None (official), or K positive multipliers of w_t, one per step in the
        order visited (``w_t = λ f(σ_t/α_t) step_weights[k]``): a per-timestep weight schedule,
        e.g. learned by :func:`reddiff_jax.tune.tune`. Traced, like ``init``'s array.
      differentiable: False (official) keeps the network's output under ``stop_gradient``.
        True lets the derivative of the solve's result with respect to its hyper-parameters
        (``jax.grad`` of a validation loss w.r.t. ``lam``, ``lr``, ``step_weights``) flow through
        the network's evaluations too, so it is the exact derivative; the forward computation
        (every value of the solve) is the same.
      optimizer: any ``optax.GradientTransformation`` (default :func:`default_optimizer`).
        A new transformation object per call means a new compilation: build it once.
      schedule, num_timesteps: the ᾱ schedule.

    ``lr``, ``lam``, ``obs_weight``, ``sigma_x0`` and an array ``init`` are traced in the
    compiled solve, so changing them does not recompile (only ``sigma_x0 > 0`` versus ``== 0``
    does).
    """

    HYPER = ("lr", "lam", "obs_weight", "sigma_x0")
    BOUNDS = {"lr": (0.0, None), "lam": (0.0, None), "obs_weight": (0.0, None),
              "sigma_x0": (0.0, None)}  # fmt: skip

    num_steps: int = 100
    lr: float = 0.1
    lam: float = 0.25
    obs_weight: float = 1.0
    weighting: str = "linear"
    sigma_x0: float = 0.0
    reduction: str = "batch_mean"
    init: Any = "pinv"
    optimizer: optax.GradientTransformation | None = None
    step_weights: Any = None
    differentiable: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_step_weights()
        if not isinstance(self.differentiable, bool):
            raise TypeError(f"differentiable: expected a bool, got {self.differentiable!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")
        if isinstance(self.init, str):
            if self.init not in INITS + (_ARRAY_INIT,):
                raise ValueError(
                    f"init: expected one of {INITS} or an array [B, H, W, C], got {self.init!r}"
                )
        elif not hasattr(self.init, "shape"):
            raise TypeError(
                f"init: expected one of {INITS} or an array [B, H, W, C], got "
                f"{type(self.init).__name__}"
            )
        if self.optimizer is not None and not isinstance(
            self.optimizer, optax.GradientTransformation
        ):
            raise TypeError(
                f"optimizer: expected an optax.GradientTransformation or None, got "
                f"{type(self.optimizer).__name__}"
            )

    def _check_step_weights(self) -> None:
        w = self.step_weights
        if w is None or (isinstance(w, str) and w == _ARRAY_INIT):
            return
        if isinstance(w, str):
            raise TypeError(f"step_weights: expected None or K = {self.num_iterations} floats")
        shape = tuple(getattr(w, "shape", (len(w),) if isinstance(w, list | tuple) else ()))
        if shape != (self.num_iterations,):
            raise ValueError(
                f"step_weights: expected {self.num_iterations} values (one per step of the "
                f"num_steps={self.num_steps} grid), got shape {shape}; solve with the num_steps "
                "the weights were made for"
            )
        if is_concrete(w):
            import numpy as np

            arr = np.asarray(w, np.float64)
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError("step_weights: expected finite values >= 0")

    @property
    def uses_x0_noise(self) -> bool:
        """Whether a step draws ε_0 (``sigma_x0 > 0``; must be known at trace time)."""
        if not is_concrete(self.sigma_x0):
            raise TypeError("sigma_x0: must be a concrete value in RedDiffConfig (it is traced)")
        return float(self.sigma_x0) > 0

    def admitting(self, hyper: Mapping[str, Any]) -> RedDiffConfig:
        """With per-measurement ``sigma_x0`` values > 0 and ``self.sigma_x0 == 0``, the config
        with the jitter switched on (a value of 0 then jitters by 0): whether a step draws ε_0
        is static, and a solve_many sweep over ``sigma_x0`` would otherwise ignore it. Traced
        values (under an outer ``jit``/``grad``) cannot switch it: there the config's own
        ``sigma_x0 > 0`` decides, as documented for :class:`RedDiffConfig`."""
        v = hyper.get("sigma_x0")
        if v is None or self.uses_x0_noise or not is_concrete(v):
            return self
        top = float(np.max(np.asarray(v)))
        return dataclasses.replace(self, sigma_x0=top) if top > 0 else self

    def make_optimizer(self) -> optax.GradientTransformation:
        return self.optimizer if self.optimizer is not None else default_optimizer(lr=self.lr)

    def hyperparams(self) -> dict[str, Array]:
        out = super().hyperparams()
        if self.optimizer is not None:
            del out["lr"]  # a custom optimizer carries its own learning rate
        if not isinstance(self.init, str):
            out["mu0"] = jnp.asarray(self.init, hyper_dtype(self.init))
        if self.step_weights is not None:
            out["step_weights"] = jnp.asarray(self.step_weights, hyper_dtype(self.step_weights))
        return out

    def static(self) -> RedDiffConfig:
        init = self.init if isinstance(self.init, str) else _ARRAY_INIT
        weights = None if self.step_weights is None else _ARRAY_INIT
        return dataclasses.replace(
            super().static(),
            sigma_x0=1.0 if self.uses_x0_noise else 0.0,
            init=init,
            step_weights=weights,
        )

    def build(self, eps_fn: Callable, op: Any, *, alphas_cumprod: Array) -> Solver:
        return reddiff(eps_fn, op, config=self, alphas_cumprod=alphas_cumprod)


class RedDiffState(NamedTuple):
    """State of the RED-Diff iteration (a pytree; vmap over any leaf)."""

    mu: Array  # [B, H, W, C] float32, the variational mean μ
    opt_state: Any  # optax state of μ
    y: Array  # [B, *y_shape] float32, the measurement
    lam: Array  # [] float32, λ
    obs_weight: Array  # [] float32, v_t
    sigma_x0: Array  # [] float32
    x0_pred: Array  # [B, H, W, C] the last step's x_0 (before its update): the output
    count: Array  # [] int32, steps taken
    step_weights: Array | None = None  # [K] multipliers of w_t (None: all ones)


def _initial_mean(op: Any, y: Array, mu0: Any, x_shape: tuple, dtype: Any) -> Array:
    if isinstance(mu0, str):
        if mu0 == "pinv":
            return jnp.asarray(jax.vmap(op.A_dagger)(y), dtype)
        return jnp.zeros(x_shape, dtype)
    mu0 = jnp.asarray(mu0, dtype)
    try:
        return jnp.broadcast_to(mu0, x_shape)
    except ValueError:
        raise ValueError(
            f"init: expected an initial mean broadcastable to {x_shape}, got {mu0.shape}"
        ) from None


def _weights(w: Any, dtype: Any) -> Array | None:
    return None if w is None else jnp.asarray(w, dtype)


def _set_lr(opt_state: Any, lr: Array) -> Any:
    hyper = getattr(opt_state, "hyperparams", None)
    if not isinstance(hyper, dict) or "learning_rate" not in hyper:
        raise ValueError(
            "lr: the optimizer has no injected 'learning_rate' hyperparameter; wrap it in "
            "optax.inject_hyperparams or leave lr unset"
        )
    lr = jnp.asarray(lr, hyper["learning_rate"].dtype)
    return opt_state._replace(hyperparams={**hyper, "learning_rate": lr})


def reddiff(
    eps_fn: Callable[[Array, Array], Array],
    op: Any,
    *,
    config: RedDiffConfig | None = None,
    alphas_cumprod: Array | None = None,
) -> Solver:
    """The RED-Diff :class:`~reddiff_jax.solvers.base.Solver` (pure init/step, optax style).

    Args:
      eps_fn: ``eps_fn(x_t [B, H, W, C], t [B] int32) -> ε̂ [B, H, W, C]``; evaluated once per
        step under ``stop_gradient`` (never differentiated).
      op: operator acting on one image ``[H, W, C]`` (``op.A``; ``op.A_dagger`` for the pinv
        init), applied to a batch with ``jax.vmap``.
      config: :class:`RedDiffConfig` (default settings when None).
      alphas_cumprod: ᾱ [T] float32 (default: ``config.schedule``).

    Returns:
      ``Solver`` with ``init(y, hyper=None, draws=None) -> RedDiffState`` (``hyper`` defaults to
      ``config.hyperparams()``; keys ``lr``, ``lam``, ``obs_weight``, ``sigma_x0``, ``mu0``) and
      ``step(state, inp, draws)`` with ``draws = {"xt": ε [B, H, W, C]}`` (plus ``"x0"`` when
      ``sigma_x0 > 0``); ``StepOutput.x`` is μ after the update, ``x0`` the step's x_0, and
      ``extras`` holds ``eps``, ``grad_reg`` and ``grad_obs``.
    """
    config = RedDiffConfig() if config is None else config
    if not isinstance(config, RedDiffConfig):
        raise TypeError(f"config: expected a RedDiffConfig, got {type(config).__name__}")
    schedule_of(config, alphas_cumprod)  # validates a given schedule
    optimizer = config.make_optimizer()
    uses_x0 = config.uses_x0_noise
    image_shape = image_shape_of(op)
    apply_a = jax.vmap(op.A)
    if config.init == "pinv" and not callable(getattr(op, "A_dagger", None)):
        raise TypeError(
            f"op: RED-Diff with init='pinv' needs an operator with `A_dagger`; "
            f"{type(op).__name__} has none (pass init='zeros' or an array)"
        )

    def per_image(v: Array) -> Array:  # [B, ...] -> [B]
        axes = tuple(range(1, v.ndim))
        if config.reduction == "sum":
            return jnp.sum(v, axis=axes)
        return jnp.mean(v, axis=axes)

    def combine(per: Array) -> Array:  # [B] -> []
        return jnp.mean(per) if config.reduction == "batch_mean" else jnp.sum(per)

    def init(y, hyper: Mapping[str, Array] | None = None, draws: Any = None) -> RedDiffState:
        del draws  # RED-Diff's start is deterministic
        hyper = config.hyperparams() if hyper is None else hyper
        # float32, or float64 when a hyper-parameter is (a float64 gradient check)
        dtype = jnp.result_type(jnp.float32, *(jnp.asarray(v).dtype for v in hyper.values()))
        y = jnp.asarray(y, dtype)
        x_shape = (y.shape[0], *image_shape)
        mu = _initial_mean(op, y, hyper.get("mu0", config.init), x_shape, dtype)
        opt_state = optimizer.init(mu)
        if "lr" in hyper:
            opt_state = _set_lr(opt_state, hyper["lr"])
        return RedDiffState(
            mu=mu,
            opt_state=opt_state,
            y=y,
            lam=jnp.asarray(hyper["lam"], dtype),
            obs_weight=jnp.asarray(hyper["obs_weight"], dtype),
            sigma_x0=jnp.asarray(hyper["sigma_x0"], dtype),
            x0_pred=jnp.zeros_like(mu),
            count=jnp.zeros((), jnp.int32),
            step_weights=_weights(hyper.get("step_weights"), dtype),
        )

    def step(state: RedDiffState, inp: StepInput, draws: Mapping[str, Array]):
        mu = state.mu
        n_xt = draws["xt"]
        if n_xt.shape != mu.shape:
            raise ValueError(f"noise: expected xt of shape {mu.shape}, got {n_xt.shape}")
        sqrt_a = jnp.sqrt(inp.a_t)
        sqrt_1ma = jnp.sqrt(1.0 - inp.a_t)

        def to_x0(m: Array) -> Array:
            return m + state.sigma_x0 * draws["x0"] if uses_x0 else m

        # The network's output is a constant of the step's objective (official); with
        # differentiable=True an outer derivative of the solve flows through it (same values).
        sg = (lambda v: v) if config.differentiable else jax.lax.stop_gradient
        x0_pred = to_x0(mu)
        x_t = sqrt_a * x0_pred + sqrt_1ma * n_xt
        t_batch = jnp.full((mu.shape[0],), inp.t, jnp.int32)
        eps = eps_fn(sg(x_t), t_batch)
        if eps.shape != mu.shape:
            raise ValueError(
                f"eps_fn: expected an output of shape {mu.shape} (that of x_t), got {eps.shape}"
            )
        eps = sg(jnp.asarray(eps, mu.dtype))
        w_t = state.lam * snr_weight(config.weighting, sqrt_1ma / sqrt_a)
        if state.step_weights is not None:
            w_t = w_t * state.step_weights[inp.k]
        v_t = state.obs_weight
        direction = sg(eps - n_xt)

        def reg_term(m):
            per = per_image(direction * to_x0(m))
            return w_t * combine(per), per

        def obs_term(m):
            resid = state.y - apply_a(to_x0(m))
            per = per_image(jnp.square(resid)) / 2
            return v_t * combine(per), per

        (reg, reg_per), g_reg = jax.value_and_grad(reg_term, has_aux=True)(mu)
        (obs, obs_per), g_obs = jax.value_and_grad(obs_term, has_aux=True)(mu)
        updates, opt_state = optimizer.update(g_reg + g_obs, state.opt_state, mu)
        mu_new = optax.apply_updates(mu, updates)
        new_state = state._replace(
            mu=mu_new, opt_state=opt_state, x0_pred=x0_pred, count=state.count + 1
        )
        stats = {"loss": reg + obs, "loss_noise": reg_per, "loss_obs": obs_per, "w_t": w_t,
                 "v_t": v_t}  # fmt: skip
        extras = {"eps": eps, "grad_reg": g_reg, "grad_obs": g_obs}
        return new_state, StepOutput(x=mu_new, x0=x0_pred, stats=stats, extras=extras)

    names = ("xt", "x0") if uses_x0 else ("xt",)
    return Solver(
        init=init,
        step=step,
        output=lambda state: state.x0_pred,
        step_draws=names,
        draw_step=split_step_draws(names),
    )


ALGORITHM = Algorithm(
    name="reddiff",
    title="RED-Diff",
    config=RedDiffConfig,
    needs=("A_dagger",),
    backprop=False,
    # Official sample_test.sh: lr 0.5, λ 0.25 for in2, deblur_gauss, hdr, phase_retrieval;
    # sr4 runs with the yaml's lr 0.1 (reference reddiff_official.md, sections 2 and 4).
    task_defaults={"*": {"lr": 0.5, "lam": 0.25}, "sr": {"lr": 0.1}},
    shown=("lr", "lam"),
    advice="lower the learning rate (lr) or the regularisation weight (lam)",
)
