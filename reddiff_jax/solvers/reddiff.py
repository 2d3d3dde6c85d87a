r"""RED-Diff: variational posterior sampling with a diffusion prior (Mardani et al., ICLR 2024).

A faithful port of the official ``algos/reddiff.py`` (NVlabs/RED-diff @ 66482f2), written as a
pure init/step pair in optax's manner and a ``lax.scan`` driver.

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
``range(0, T, T // num_steps)``. The returned ``x0_pred`` is the LAST step's ``x_0``, computed
before the final update (what upstream returns); ``mu`` is after the final update.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from reddiff_jax import diffusion
from reddiff_jax.solvers.common import (
    SolveStatus,
    check_measurement,
    image_shape_of,
    is_concrete,
    merge_static,
    split_static,
)

__all__ = [
    "INITS",
    "REDUCTIONS",
    "WEIGHTINGS",
    "NonFiniteError",
    "RedDiffConfig",
    "RedDiffResult",
    "RedDiffSolver",
    "RedDiffState",
    "StepInfo",
    "StepNoise",
    "default_optimizer",
    "reddiff",
    "snr_weight",
    "solve",
    "solve_many",
    "step_noise",
]

Array = jax.Array

WEIGHTINGS = ("linear", "sqrt", "square", "log", "trunc_linear", "power2over3", "const")
REDUCTIONS = ("batch_mean", "image_mean", "sum")
INITS = ("pinv", "zeros")
_ARRAY_INIT = "<array>"  # placeholder for an array init in the static (hashable) config


class NonFiniteError(FloatingPointError):
    """Raised by :func:`solve` (``throw=True``) when mu or the loss becomes nan/inf."""


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


def default_optimizer(lr: float | Array = 0.1) -> optax.GradientTransformation:
    """The official optimiser, torch ``Adam(lr, betas=(0.9, 0.99), eps=1e-8)``, no weight decay.

    Wrapped in ``optax.inject_hyperparams`` so the learning rate lives in the state
    (``state.hyperparams["learning_rate"]``) and a sweep over it vmaps without retracing.
    """
    return optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=0.9, b2=0.99, eps=1e-8)


def _is_real_scalar(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float | np.integer | np.floating):
        return True
    return hasattr(v, "shape") and tuple(v.shape) == () and hasattr(v, "dtype")


@dataclasses.dataclass(frozen=True)
class RedDiffConfig:
    """Settings of a RED-Diff solve (defaults: the official ``_configs/algo/reddiff.yaml``).

    Attributes:
      num_steps: N in 1..num_timesteps; the grid is ``range(0, T, T // N)`` visited descending
        (its length, ``len(config.timesteps())``, is the number of iterations K).
      lr: Adam learning rate (ignored when ``optimizer`` is given without an injected
        ``learning_rate`` hyperparameter).
      lam: λ (upstream ``grad_term_weight``).
      obs_weight: v_t, the weight of the data term.
      weighting: f in w_t = λ f(σ_t/α_t): one of :data:`WEIGHTINGS`.
      sigma_x0: std of the jitter x_0 = μ + sigma_x0 ε_0 (a fresh ε_0 per step when > 0).
      reduction: one of :data:`REDUCTIONS` (see the module docstring).
      init: ``"pinv"`` (μ₀ = op.A_dagger(y), official), ``"zeros"``, or an array
        broadcastable to [B, H, W, C].
      optimizer: any ``optax.GradientTransformation`` (default :func:`default_optimizer`).
        A new transformation object per call means a new compilation: build it once.
      schedule, num_timesteps: the ᾱ schedule (:func:`reddiff_jax.diffusion.alphas_cumprod`).

    ``lr``, ``lam``, ``obs_weight`` and ``sigma_x0`` are traced values in the compiled solve, so
    changing them does not recompile (only ``sigma_x0 > 0`` versus ``== 0`` does).
    """

    num_steps: int = 100
    lr: float = 0.1
    lam: float = 0.25
    obs_weight: float = 1.0
    weighting: str = "linear"
    sigma_x0: float = 0.0
    reduction: str = "batch_mean"
    init: Any = "pinv"
    optimizer: optax.GradientTransformation | None = None
    schedule: str = "linear"
    num_timesteps: int = 1000

    def __post_init__(self):
        for name in ("num_steps", "num_timesteps"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.num_steps > self.num_timesteps:
            raise ValueError(
                f"num_steps: expected 1..num_timesteps={self.num_timesteps}, got {self.num_steps}"
            )
        for name in ("lr", "lam", "obs_weight", "sigma_x0"):
            v = getattr(self, name)
            if not _is_real_scalar(v):
                raise TypeError(f"{name}: expected a real scalar, got {v!r}")
            if is_concrete(v) and not math.isfinite(float(v)):
                raise ValueError(f"{name}: expected a finite value, got {v!r}")
        if is_concrete(self.sigma_x0) and float(self.sigma_x0) < 0:
            raise ValueError(f"sigma_x0: expected >= 0, got {self.sigma_x0!r}")
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

    def timesteps(self) -> np.ndarray:
        """int32 [K] timesteps in the order visited (descending, ending at 0)."""
        return diffusion.timesteps(int(self.num_steps), int(self.num_timesteps))

    @property
    def uses_x0_noise(self) -> bool:
        """Whether a step draws ε_0 (``sigma_x0 > 0``; must be known at trace time)."""
        if not is_concrete(self.sigma_x0):
            raise TypeError("sigma_x0: must be a concrete value in RedDiffConfig (it is traced)")
        return float(self.sigma_x0) > 0

    def make_optimizer(self) -> optax.GradientTransformation:
        return self.optimizer if self.optimizer is not None else default_optimizer(self.lr)

    def _static_key(self) -> RedDiffConfig:
        """The config with its traced numbers zeroed: what the compiled solve depends on."""
        init = _ARRAY_INIT if not isinstance(self.init, str) else self.init
        return dataclasses.replace(
            self,
            lr=0.0,
            lam=0.0,
            obs_weight=0.0,
            sigma_x0=1.0 if self.uses_x0_noise else 0.0,
            init=init,
        )


class RedDiffState(NamedTuple):
    """State of the RED-Diff iteration (a pytree; vmap over any leaf)."""

    mu: Array  # [B, H, W, C] float32, the variational mean μ
    opt_state: Any  # optax state of μ
    y: Array  # [B, *y_shape] float32, the measurement
    lam: Array  # [] float32, λ
    obs_weight: Array  # [] float32, v_t
    sigma_x0: Array  # [] float32
    count: Array  # [] int32, steps taken


class StepNoise(NamedTuple):
    """The random draws of one step."""

    xt: Array  # [B, H, W, C], ε of x_t
    x0: Array | None = None  # [B, H, W, C], ε_0 of the x_0 jitter (only when sigma_x0 > 0)


class StepInfo(NamedTuple):
    """Per-step diagnostics returned by ``step`` (image-sized fields are dropped by ``solve``)."""

    loss: Array  # [] the objective minimised at this step, w_t*reg + v_t*obs (reduced)
    loss_noise: Array  # [B] per-image regulariser term mean(sg(ε̂-ε)·x_0) (sum for "sum")
    loss_obs: Array  # [B] per-image data term mean((y - A x_0)²)/2 (sum for "sum")
    w_t: Array  # [] weight of the regulariser
    v_t: Array  # [] weight of the data term
    x0_pred: Array  # [B, H, W, C] x_0 of this step (before the update)
    eps: Array  # [B, H, W, C] network output ε̂(x_t, t)
    grad_reg: Array  # [B, H, W, C] ∇_μ of w_t * regulariser
    grad_obs: Array  # [B, H, W, C] ∇_μ of v_t * data term
    finite: Array  # [] bool: μ after the update and the loss are finite


class RedDiffSolver(NamedTuple):
    """Pure init/step pair returned by :func:`reddiff`."""

    init: Callable[..., RedDiffState]
    step: Callable[[RedDiffState, Any, Any], tuple[RedDiffState, StepInfo]]


def step_noise(key: Array, step: Any, shape: tuple[int, ...], *, x0: bool = False) -> StepNoise:
    """The draws of step ``step`` (0-based execution index) from ``key``.

    Scheme: ``k_xt, k_x0 = split(fold_in(key, step))``; ``xt ~ N(0, I)`` from ``k_xt`` and, when
    ``x0`` is True, ``x0 ~ N(0, I)`` from ``k_x0``. So the ε of x_t does not depend on whether
    the x_0 jitter is used, and the same key always gives the same draws.
    """
    k_xt, k_x0 = jax.random.split(jax.random.fold_in(key, step))
    n_xt = jax.random.normal(k_xt, shape, jnp.float32)
    n_x0 = jax.random.normal(k_x0, shape, jnp.float32) if x0 else None
    return StepNoise(n_xt, n_x0)


def _as_step_noise(noise: Any, uses_x0: bool, name: str = "noise") -> StepNoise:
    if isinstance(noise, StepNoise):
        out = noise
    elif isinstance(noise, dict):
        unknown = set(noise) - {"xt", "x0"}
        if unknown or "xt" not in noise:
            raise ValueError(
                f"{name}: expected a dict with key 'xt' (and 'x0' when sigma_x0 > 0), got "
                f"keys {sorted(noise)}"
            )
        out = StepNoise(noise["xt"], noise.get("x0"))
    elif hasattr(noise, "shape"):
        out = StepNoise(noise, None)
    else:
        raise TypeError(
            f"{name}: expected an array, a dict {{'xt', 'x0'}} or a StepNoise, got "
            f"{type(noise).__name__}"
        )
    if uses_x0 and out.x0 is None:
        raise ValueError(
            f"{name}: sigma_x0 > 0 needs the x_0 draws too: pass {{'xt': ..., 'x0': ...}}"
        )
    xt = jnp.asarray(out.xt, jnp.float32)
    x0 = jnp.asarray(out.x0, jnp.float32) if uses_x0 else None
    return StepNoise(xt, x0)


def _schedule(config: RedDiffConfig, alphas_cumprod: Any) -> Array:
    if alphas_cumprod is None:
        return diffusion.alphas_cumprod(config.schedule, int(config.num_timesteps))
    ac = jnp.asarray(alphas_cumprod, jnp.float32)
    if ac.shape != (config.num_timesteps,):
        raise ValueError(
            f"alphas_cumprod: expected shape ({config.num_timesteps},) "
            f"(config.num_timesteps), got {tuple(ac.shape)}"
        )
    return ac


def reddiff(
    eps_fn: Callable[[Array, Array], Array],
    op: Any,
    *,
    config: RedDiffConfig | None = None,
    alphas_cumprod: Array | None = None,
) -> RedDiffSolver:
    """Build the RED-Diff init/step pair (optax style: pure functions, state in a pytree).

    Args:
      eps_fn: ``eps_fn(x_t [B, H, W, C], t [B] int32) -> ε̂ [B, H, W, C]``; evaluated once per
        step under ``stop_gradient`` (never differentiated).
      op: operator acting on one image ``[H, W, C]`` (``op.A``; ``op.A_dagger`` for the pinv
        init), applied to a batch with ``jax.vmap``.
      config: :class:`RedDiffConfig` (default settings when None). ``lr``/``lam``/... of the
        config are the defaults of ``init``; the state carries the values actually used.
      alphas_cumprod: ᾱ [T] float32 (default: ``config.schedule``).

    Returns:
      ``RedDiffSolver(init, step)``:

      * ``init(y, *, mu0=None, lam=None, lr=None, obs_weight=None, sigma_x0=None)`` ->
        :class:`RedDiffState`; ``y [B, *y_shape]``; μ₀ from ``mu0`` or ``config.init``.
      * ``step(state, t, noise) -> (state, StepInfo)``; ``t`` a scalar int timestep; ``noise``
        a :class:`StepNoise`, an array ``[B, H, W, C]`` (ε of x_t) or a dict ``{"xt", "x0"}``.
    """
    config = RedDiffConfig() if config is None else config
    if not isinstance(config, RedDiffConfig):
        raise TypeError(f"config: expected a RedDiffConfig, got {type(config).__name__}")
    ac = _schedule(config, alphas_cumprod)
    optimizer = config.make_optimizer()
    uses_x0 = config.uses_x0_noise
    image_shape = image_shape_of(op)
    apply_a = jax.vmap(op.A)

    def per_image(v: Array) -> Array:  # [B, ...] -> [B]
        axes = tuple(range(1, v.ndim))
        if config.reduction == "sum":
            return jnp.sum(v, axis=axes)
        return jnp.mean(v, axis=axes)

    def combine(per: Array) -> Array:  # [B] -> []
        return jnp.mean(per) if config.reduction == "batch_mean" else jnp.sum(per)

    def init(y, *, mu0=None, lam=None, lr=None, obs_weight=None, sigma_x0=None) -> RedDiffState:
        y = jnp.asarray(y, jnp.float32)
        batch = y.shape[0]
        x_shape = (batch, *image_shape)
        if mu0 is None:
            mu0 = config.init
        if isinstance(mu0, str):
            if mu0 == "pinv":
                mu = jax.vmap(op.A_dagger)(y)
            elif mu0 == "zeros":
                mu = jnp.zeros(x_shape, jnp.float32)
            else:
                raise ValueError(f"mu0: expected 'pinv', 'zeros' or an array, got {mu0!r}")
        else:
            mu = jnp.broadcast_to(jnp.asarray(mu0, jnp.float32), x_shape)
        mu = jnp.asarray(mu, jnp.float32)
        if mu.shape != x_shape:
            raise ValueError(f"mu0: expected an initial mean of shape {x_shape}, got {mu.shape}")
        opt_state = optimizer.init(mu)
        if lr is not None:
            hyper = getattr(opt_state, "hyperparams", None)
            if not isinstance(hyper, dict) or "learning_rate" not in hyper:
                raise ValueError(
                    "lr: the optimizer has no injected 'learning_rate' hyperparameter; wrap it in "
                    "optax.inject_hyperparams or leave lr=None"
                )
            lr = jnp.asarray(lr, hyper["learning_rate"].dtype)
            opt_state = opt_state._replace(hyperparams={**hyper, "learning_rate": lr})

        def scalar(v, default):
            return jnp.asarray(default if v is None else v, jnp.float32)

        return RedDiffState(
            mu=mu,
            opt_state=opt_state,
            y=y,
            lam=scalar(lam, config.lam),
            obs_weight=scalar(obs_weight, config.obs_weight),
            sigma_x0=scalar(sigma_x0, config.sigma_x0),
            count=jnp.zeros((), jnp.int32),
        )

    def step(state: RedDiffState, t: Any, noise: Any) -> tuple[RedDiffState, StepInfo]:
        noise = _as_step_noise(noise, uses_x0)
        mu = state.mu
        if noise.xt.shape != mu.shape:
            raise ValueError(f"noise: expected xt of shape {mu.shape}, got {noise.xt.shape}")
        if uses_x0 and noise.x0.shape != mu.shape:
            raise ValueError(f"noise: expected x0 of shape {mu.shape}, got {noise.x0.shape}")
        t = jnp.asarray(t, jnp.int32)
        if t.shape != ():
            raise ValueError(f"t: expected a scalar timestep, got shape {t.shape}")
        a = diffusion.alpha_bar(ac, t)
        sqrt_a = jnp.sqrt(a)
        sqrt_1ma = jnp.sqrt(1.0 - a)

        def to_x0(m: Array) -> Array:
            return m + state.sigma_x0 * noise.x0 if uses_x0 else m

        x0_pred = to_x0(mu)
        x_t = sqrt_a * x0_pred + sqrt_1ma * noise.xt
        t_batch = jnp.full((mu.shape[0],), t, jnp.int32)
        eps = eps_fn(jax.lax.stop_gradient(x_t), t_batch)
        if eps.shape != mu.shape:
            raise ValueError(
                f"eps_fn: expected an output of shape {mu.shape} (that of x_t), got {eps.shape}"
            )
        eps = jax.lax.stop_gradient(jnp.asarray(eps, jnp.float32))
        w_t = state.lam * snr_weight(config.weighting, sqrt_1ma / sqrt_a)
        v_t = state.obs_weight
        direction = jax.lax.stop_gradient(eps - noise.xt)

        def reg_term(m):
            per = per_image(direction * to_x0(m))
            return w_t * combine(per), per

        def obs_term(m):
            resid = state.y - apply_a(to_x0(m))
            per = per_image(jnp.square(resid)) / 2
            return v_t * combine(per), per

        (reg, reg_per), g_reg = jax.value_and_grad(reg_term, has_aux=True)(mu)
        (obs, obs_per), g_obs = jax.value_and_grad(obs_term, has_aux=True)(mu)
        loss = reg + obs
        updates, opt_state = optimizer.update(g_reg + g_obs, state.opt_state, mu)
        mu_new = optax.apply_updates(mu, updates)
        finite = jnp.all(jnp.isfinite(mu_new)) & jnp.isfinite(loss)
        new_state = state._replace(mu=mu_new, opt_state=opt_state, count=state.count + 1)
        info = StepInfo(
            loss=loss,
            loss_noise=reg_per,
            loss_obs=obs_per,
            w_t=w_t,
            v_t=v_t,
            x0_pred=x0_pred,
            eps=eps,
            grad_reg=g_reg,
            grad_obs=g_obs,
            finite=finite,
        )
        return new_state, info

    return RedDiffSolver(init, step)


# ------------------------------------------------------------------------------------------------
# solve: one lax.scan under jit


@flax.struct.dataclass
class RedDiffResult:
    """Output of :func:`solve` (a pytree; :func:`solve_many` adds a leading [M] axis)."""

    x0_pred: Array  # [B, H, W, C] last step's x_0, before the final update (official output)
    mu: Array  # [B, H, W, C] μ after the final update
    ts: Array  # [K] int32 timesteps visited
    loss: Array  # [K] objective per step
    loss_noise: Array  # [K, B] per-image regulariser term
    loss_obs: Array  # [K, B] per-image data term
    w_t: Array  # [K]
    v_t: Array  # [K]
    status: Array  # [] int32, a SolveStatus value
    nonfinite_step: Array  # [] int32, first step with a non-finite μ or loss, -1 if none
    mu_trajectory: Array | None = None  # [K, B, H, W, C] μ after each step (trajectory=True)

    @property
    def ok(self) -> Array:
        """True where the solve stayed finite."""
        return self.status == SolveStatus.SUCCESS


class _Statics(NamedTuple):
    eps: Any
    op: Any
    config: RedDiffConfig
    trajectory: bool


class _Carry(NamedTuple):
    state: RedDiffState
    x0_pred: Array  # [B, H, W, C]
    nonfinite_step: Array  # [] int32


def _build(statics: _Statics, dyn: dict) -> RedDiffSolver:
    eps_fn = merge_static(statics.eps, dyn["eps"])
    op = merge_static(statics.op, dyn["op"])
    return reddiff(eps_fn, op, config=statics.config, alphas_cumprod=dyn["alphas"])


def _init_core(statics: _Statics, dyn: dict, y: Array, hyper: dict, mu0: Any) -> _Carry:
    solver = _build(statics, dyn)
    state = solver.init(y, mu0=mu0, **hyper)
    return _Carry(state, jnp.zeros_like(state.mu), jnp.full((), -1, jnp.int32))


def _scan_core(statics, dyn, key, carry: _Carry, ks, ts, noise):
    solver = _build(statics, dyn)
    uses_x0 = statics.config.uses_x0_noise

    def body(c: _Carry, xs):
        k, t, nz = xs
        if nz is None:
            nz = step_noise(key, k, c.state.mu.shape, x0=uses_x0)
        state, info = solver.step(c.state, t, nz)
        bad = jnp.where((c.nonfinite_step < 0) & ~info.finite, k, c.nonfinite_step)
        out = {
            "loss": info.loss,
            "loss_noise": info.loss_noise,
            "loss_obs": info.loss_obs,
            "w_t": info.w_t,
            "v_t": info.v_t,
        }
        if statics.trajectory:
            out["mu_trajectory"] = state.mu
        return _Carry(state, info.x0_pred, bad.astype(jnp.int32)), out

    return jax.lax.scan(body, carry, (ks, ts, noise))


def _assemble(carry: _Carry, outs: dict, ts: Array) -> RedDiffResult:
    bad = carry.nonfinite_step
    status = jnp.where(bad < 0, SolveStatus.SUCCESS, SolveStatus.NONFINITE).astype(jnp.int32)
    return RedDiffResult(
        x0_pred=carry.x0_pred,
        mu=carry.state.mu,
        ts=jnp.asarray(ts, jnp.int32),
        status=status,
        nonfinite_step=bad,
        **outs,
    )


def _solve_core(statics, dyn, key, y, hyper, mu0, ts, noise) -> RedDiffResult:
    carry = _init_core(statics, dyn, y, hyper, mu0)
    ks = jnp.arange(ts.shape[0], dtype=jnp.int32)
    carry, outs = _scan_core(statics, dyn, key, carry, ks, ts, noise)
    return _assemble(carry, outs, ts)


_init_jit = jax.jit(_init_core, static_argnums=0)
_scan_jit = jax.jit(_scan_core, static_argnums=0)


def _stack_noise(noise: Any, num: int, x_shape: tuple, uses_x0: bool, name: str) -> Any:
    """Validate replayed noise [K, *x_shape] (or a dict of such) -> StepNoise of stacks."""
    if noise is None:
        return None
    out = _as_step_noise(noise, uses_x0, name)
    want = (num, *x_shape)
    for field, v in (("xt", out.xt), ("x0", out.x0)):
        if v is not None and tuple(v.shape) != want:
            raise ValueError(
                f"{name}: expected {field} of shape [num_steps, *x_shape] = {want}, got "
                f"{tuple(v.shape)}"
            )
        if v is not None and is_concrete(v) and not bool(jnp.all(jnp.isfinite(v))):
            raise ValueError(f"{name}: expected finite values in {field}")
    return out


def _hyper(config: RedDiffConfig) -> dict:
    return {
        "lam": jnp.asarray(config.lam, jnp.float32),
        "lr": jnp.asarray(config.lr, jnp.float32) if config.optimizer is None else None,
        "obs_weight": jnp.asarray(config.obs_weight, jnp.float32),
        "sigma_x0": jnp.asarray(config.sigma_x0, jnp.float32),
    }


def _check_key(key: Any, noise: Any, name: str = "key") -> Array:
    if key is None:
        if noise is None:
            raise ValueError(f"{name}: a PRNG key is required unless noise is given, got None")
        return jax.random.key(0)  # unused: every draw is replayed
    if not hasattr(key, "dtype"):
        raise TypeError(f"{name}: expected a jax PRNG key (jax.random.key(seed)), got {key!r}")
    return key


def _raise_nonfinite(step: int, ts: np.ndarray, where: str = "") -> None:
    raise NonFiniteError(
        f"RED-Diff{where}: non-finite mu or loss at step {step} (t = {int(ts[step])}). Lower the "
        f"learning rate (lr) or the regularisation weight (lam), or check the measurement y and "
        f"the eps_fn; pass throw=False to get the result with status/nonfinite_step instead."
    )


def _progress_chunks(num: int, progress: bool | int) -> list[tuple[int, int]]:
    if progress is False or progress is None:
        return [(0, num)]
    if progress is True:
        size = max(1, math.ceil(num / 20))
    elif isinstance(progress, int) and progress >= 1:
        size = int(progress)
    else:
        raise ValueError(f"progress: expected a bool or a chunk size >= 1, got {progress!r}")
    return [(s, min(s + size, num)) for s in range(0, num, size)]


def solve(
    eps_fn: Callable[[Array, Array], Array],
    op: Any,
    y: Array,
    config: RedDiffConfig,
    key: Array | None,
    *,
    noise: Any = None,
    alphas_cumprod: Array | None = None,
    trajectory: bool = False,
    progress: bool | int = False,
    throw: bool = True,
) -> RedDiffResult:
    """Run RED-Diff on a batch of measurements: one ``lax.scan`` under ``jit``.

    Main arguments:
      eps_fn: ``eps_fn(x_t [B, H, W, C], t [B] int32) -> ε̂ [B, H, W, C]`` (e.g. ``model.eps``
        or an analytic score). Bound methods and ``functools.partial`` of pytrees keep their
        arrays as traced arguments; the compiled solve is cached per (eps_fn structure,
        operator structure, shapes, config statics), so repeated calls do not recompile.
      op: operator on one image [H, W, C] (shared by the batch).
      y: measurements [B, *y_shape] float32 (``y_shape`` = shape of ``op.A`` of one image).
      config: :class:`RedDiffConfig`.
      key: PRNG key; step k draws from ``fold_in(key, k)`` (see :func:`step_noise`). May be None
        when ``noise`` replays every draw.

    Other arguments:
      noise: replaces the random draws: an array [K, B, H, W, C] (ε of x_t per step), or a dict
        ``{"xt": ..., "x0": ...}`` of such arrays (``x0`` required when sigma_x0 > 0).
      alphas_cumprod: ᾱ [T] (default ``diffusion.alphas_cumprod(config.schedule, T)``).
      trajectory: also return μ after every step (``mu_trajectory`` [K, B, H, W, C]).
      progress: True (or a chunk size) runs the scan in chunks with a tqdm bar between them;
        the result is identical to ``progress=False``.
      throw: raise :class:`NonFiniteError` naming the step when μ or the loss becomes non-finite;
        with False the result carries ``status``/``nonfinite_step`` instead. Under an outer
        ``jit``/``vmap`` use ``throw=False`` and inspect the status (host values are needed to
        raise).

    Returns:
      :class:`RedDiffResult`.

    Example::

        model = reddiff_jax.model.load_pretrained("checkpoints/ffhq256")
        op = reddiff_jax.operators.make("sr", (256, 256, 3), factor=4)
        y = jax.vmap(op.A)(x)                                   # x: [B, 256, 256, 3] in [-1, 1]
        res = solve(model.eps, op, y, RedDiffConfig(num_steps=100, lr=0.25), jax.random.key(0))
        restored = res.x0_pred                                  # [B, 256, 256, 3]
    """
    if not isinstance(config, RedDiffConfig):
        raise TypeError(f"config: expected a RedDiffConfig, got {type(config).__name__}")
    y = check_measurement(op, y)
    x_shape = (y.shape[0], *image_shape_of(op))
    ts = config.timesteps()
    num = len(ts)
    uses_x0 = config.uses_x0_noise
    noise = _stack_noise(noise, num, x_shape, uses_x0, "noise")
    key = _check_key(key, noise)
    ac = _schedule(config, alphas_cumprod)
    mu0 = None if isinstance(config.init, str) else jnp.asarray(config.init, jnp.float32)
    eps_static, eps_dyn = split_static(eps_fn)
    op_static, op_dyn = split_static(op)
    statics = _Statics(eps_static, op_static, config._static_key(), bool(trajectory))
    dyn = {"eps": eps_dyn, "op": op_dyn, "alphas": ac}
    hyper = _hyper(config)

    chunks = _progress_chunks(num, progress)
    carry = _init_jit(statics, dyn, y, hyper, mu0)
    bar = None
    if len(chunks) > 1 or progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, desc="RED-Diff", unit="step")
    pieces = []
    ks_all = np.arange(num, dtype=np.int32)
    for start, stop in chunks:
        nz = None if noise is None else StepNoise(*(_slice(v, start, stop) for v in noise))
        carry, outs = _scan_jit(statics, dyn, key, carry, ks_all[start:stop], ts[start:stop], nz)
        pieces.append(outs)
        if bar is not None:
            jax.block_until_ready(carry)
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    if len(pieces) == 1:
        outs = pieces[0]
    else:
        outs = jax.tree_util.tree_map(lambda *v: jnp.concatenate(v, axis=0), *pieces)
    result = _assemble(carry, outs, ts)
    if throw:
        _check_result(result, ts)
    return result


def _slice(v: Array | None, start: int, stop: int) -> Array | None:
    return None if v is None else v[start:stop]


def _check_result(result: RedDiffResult, ts: np.ndarray) -> None:
    if is_concrete(result.nonfinite_step):
        bad = np.asarray(result.nonfinite_step)
        if bad.ndim == 0:
            if int(bad) >= 0:
                _raise_nonfinite(int(bad), ts)
            return
        failed = np.flatnonzero(bad >= 0)
        if failed.size:
            m = int(failed[0])
            _raise_nonfinite(
                int(bad[m]),
                ts,
                f" (measurement {m}; {failed.size} of {bad.size} failed: {failed.tolist()})",
            )
        return

    def callback(bad):
        bad = np.asarray(bad).reshape(-1)
        failed = np.flatnonzero(bad >= 0)
        if failed.size:
            _raise_nonfinite(int(bad[failed[0]]), ts)

    jax.debug.callback(callback, result.nonfinite_step)


# ------------------------------------------------------------------------------------------------
# many measurements, one call


def _solve_many_core(statics, op_axis, dyn, keys, ys, hyper, hyper_axes, mu0, mu0_axis, ts, noise):
    def one(op_dyn, key, y, hyper_m, mu0_m, noise_m):
        d = {**dyn, "op": op_dyn}
        res = _solve_core(statics, d, key, y[None], hyper_m, mu0_m, ts, noise_m)
        # Drop the batch axis of size one of each per-image field.
        return res.replace(
            x0_pred=res.x0_pred[0],
            mu=res.mu[0],
            loss_noise=res.loss_noise[:, 0],
            loss_obs=res.loss_obs[:, 0],
            mu_trajectory=None if res.mu_trajectory is None else res.mu_trajectory[:, 0],
        )

    noise_axis = None if noise is None else 0
    in_axes = (op_axis, 0, 0, hyper_axes.as_dict(), mu0_axis, noise_axis)
    return jax.vmap(one, in_axes=in_axes)(dyn["op"], keys, ys, hyper, mu0, noise)


_solve_many_jit = jax.jit(_solve_many_core, static_argnums=(0, 1, 6, 8))


def _per_measurement(value: Any, default: Any, num: int, name: str) -> tuple[Array | None, Any]:
    """-> (array, axis): a scalar shared by all (axis None) or a vector [M] (axis 0)."""
    if value is None:
        if default is None:
            return None, None
        value = default
    arr = jnp.asarray(value, jnp.float32)
    if arr.ndim == 0:
        return arr, None
    if arr.shape != (num,):
        raise ValueError(f"{name}: expected a scalar or an array [M] = [{num}], got {arr.shape}")
    return arr, 0


def solve_many(
    eps_fn: Callable[[Array, Array], Array],
    ops: Any,
    ys: Array,
    config: RedDiffConfig,
    keys: Array | None,
    *,
    lam: Any = None,
    lr: Any = None,
    op_axis: int | None = 0,
    noise: Any = None,
    alphas_cumprod: Array | None = None,
    trajectory: bool = False,
    throw: bool = True,
) -> RedDiffResult:
    """Many independent measurements in one compiled call (``vmap`` of :func:`solve`).

    Measurement m is solved as ``solve(eps_fn, op_m, ys[m][None], config_m, keys[m])`` (a batch
    of one, so the reduction does not couple measurements), all M at once.

    Args:
      eps_fn: as in :func:`solve`.
      ops: one operator shared by all (``op_axis=None``) or operators stacked along a leading
        axis of every array leaf (``op_axis=0``; e.g. ``jax.tree.map(lambda *l: jnp.stack(l),
        *ops_list)``), so each measurement may have its own mask, kernel, ...
      ys: measurements [M, *y_shape].
      config: :class:`RedDiffConfig`; an array ``init`` may be [H, W, C] (shared) or [M, H, W, C].
      keys: M keys (``jax.random.split(key, M)``), or one key which is split into M; None only
        with ``noise``. Several keys on repeated copies of one y give several posterior draws.
      lam, lr: None (config value), a scalar, or [M] per measurement (a sweep).
      noise: replayed draws [M, K, H, W, C] (or a dict of such, as in :func:`solve`).
      trajectory, throw: as in :func:`solve` (the error names the failing measurements).

    Returns:
      :class:`RedDiffResult` whose fields have a leading [M] axis and no batch axis:
      ``x0_pred``/``mu`` [M, H, W, C], ``loss``/``loss_noise``/``loss_obs``/``w_t``/``v_t``
      [M, K], ``ts`` [M, K], ``status``/``nonfinite_step`` [M].
    """
    if not isinstance(config, RedDiffConfig):
        raise TypeError(f"config: expected a RedDiffConfig, got {type(config).__name__}")
    if op_axis not in (0, None):
        raise ValueError(f"op_axis: expected 0 (stacked operators) or None (shared), got {op_axis}")
    one_op = ops if op_axis is None else jax.tree_util.tree_map(lambda v: v[0], ops)
    ys = check_measurement(one_op, ys, name="ys")
    num = ys.shape[0]
    if op_axis == 0:
        arrays = [v for v in jax.tree_util.tree_leaves(ops) if hasattr(v, "shape")]
        sizes = {int(v.shape[0]) if v.ndim else 0 for v in arrays}
        if sizes and sizes != {num}:
            raise ValueError(
                f"ops: expected a leading axis of size M = {num} (that of ys) on every array "
                f"leaf with op_axis=0, got sizes {sorted(sizes)}"
            )
    image_shape = image_shape_of(one_op)
    ts = config.timesteps()
    uses_x0 = config.uses_x0_noise
    if noise is not None:
        nz = _as_step_noise(noise, uses_x0, "noise")
        want = (num, len(ts), *image_shape)
        for field, v in (("xt", nz.xt), ("x0", nz.x0)):
            if v is not None and tuple(v.shape) != want:
                raise ValueError(
                    f"noise: expected {field} of shape [M, num_steps, H, W, C] = {want}, got "
                    f"{tuple(v.shape)}"
                )
        # per measurement: [K, 1, H, W, C]
        noise = jax.tree_util.tree_map(lambda v: v[:, :, None], nz)
    if keys is None:
        keys = _check_key(None, noise, "keys")
    if not hasattr(keys, "dtype"):
        raise TypeError(f"keys: expected jax PRNG keys, got {keys!r}")
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    single = keys.ndim == (0 if typed else 1)
    if single:
        keys = jax.random.split(keys, num)
    elif keys.shape[0] != num:
        raise ValueError(f"keys: expected {num} keys (one per measurement), got {keys.shape}")

    ac = _schedule(config, alphas_cumprod)
    base = _hyper(config)
    lam_a, lam_ax = _per_measurement(lam, base["lam"], num, "lam")
    if lr is not None and config.optimizer is not None:
        probe = config.optimizer.init(jnp.zeros(()))
        if "learning_rate" not in getattr(probe, "hyperparams", {}):
            raise ValueError(
                "lr: the optimizer has no injected 'learning_rate' hyperparameter; wrap it in "
                "optax.inject_hyperparams or leave lr=None"
            )
    lr_a, lr_ax = _per_measurement(lr, base["lr"], num, "lr")
    hyper = {
        "lam": lam_a,
        "lr": lr_a,
        "obs_weight": base["obs_weight"],
        "sigma_x0": base["sigma_x0"],
    }
    hyper_axes = {"lam": lam_ax, "lr": lr_ax, "obs_weight": None, "sigma_x0": None}
    mu0, mu0_axis = None, None
    if not isinstance(config.init, str):
        mu0 = jnp.asarray(config.init, jnp.float32)
        if mu0.shape == (num, *image_shape):
            mu0, mu0_axis = mu0[:, None], 0
        elif mu0.shape != tuple(image_shape):
            raise ValueError(
                f"config.init: expected an array [H, W, C] = {image_shape} or [M, H, W, C], got "
                f"{mu0.shape}"
            )
    eps_static, eps_dyn = split_static(eps_fn)
    op_static, op_dyn = split_static(ops)
    if op_axis == 0:
        # the structure of one operator (leaves keep their leading axis in op_dyn)
        op_static = split_static(one_op)[0]
    statics = _Statics(eps_static, op_static, config._static_key(), bool(trajectory))
    dyn = {"eps": eps_dyn, "op": op_dyn, "alphas": ac}
    hyper_axes_key = tuple(sorted(hyper_axes.items()))
    result = _solve_many_jit(
        statics,
        op_axis,
        dyn,
        keys,
        ys,
        hyper,
        _HashableDict(hyper_axes_key),
        mu0,
        mu0_axis,
        jnp.asarray(ts),
        noise,
    )
    if throw:
        _check_result(result, ts)
    return result


class _HashableDict(tuple):
    """Static dict of vmap axes (a sorted tuple of items that vmaps as a dict)."""

    def as_dict(self) -> dict:
        return dict(self)
