"""Gradient tuning: learn λ, lr or a per-timestep weight schedule on a validation loss.

``tune(key, task="sr:4", learn=("lam", "lr"), ...)`` differentiates a validation loss (the mean
squared error of the restorations of validation digits, :mod:`reddiff_jax.splits`, optionally
plus ``ssim_weight * (1 - SSIM)``) through the whole solve, ``jax.grad`` through the driver's
``lax.scan``, and takes optax Adam steps on the settings:

* ``"lam"``, ``"lr"`` (or any traced scalar setting of the algorithm, ``config.HYPER``), each
  parametrised as ``softplus(raw)`` so it stays positive;
* ``"schedule"`` (RED-Diff): K per-step multipliers of w_t, ``step_weights = softplus(raw)``
  [K], started at ones (the official weighting).

The solve runs with ``remat=True`` (``jax.checkpoint`` on the scan body: the backward pass keeps
one solver state per step and recomputes the network inside each step, instead of storing every
step's network activations) and, for RED-Diff, ``differentiable=True`` (the network's output is
not under ``stop_gradient`` for the outer derivative, so the gradient is exact; every forward
value is the official one). Each image is solved as a batch of one (``solve_many``); iteration
``it`` uses validation images ``batch * it ..`` (cycling) with fresh solver keys, so the loss is
a stochastic estimate of the expected validation error.

The learned setting is written to a JSON file (``save_tuned``) that
``reddiff-jax restore --tuned FILE`` and ``reddiff-jax eval --tuned FILE`` read
(:func:`load_tuned`: it gives the ``num_steps`` and the ``params`` to pass as overrides).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reddiff_jax import imageio, operators, pipeline, splits
from reddiff_jax import restore as restore_lib
from reddiff_jax.model import resolve_model
from reddiff_jax.solvers import RedDiffConfig, registry, solve_many

__all__ = [
    "FORMAT",
    "SCHEDULE",
    "apply_settings",
    "init_raw",
    "load_tuned",
    "save_tuned",
    "settings_of",
    "tune",
    "validation_loss",
]

FORMAT = "reddiff-jax/tuned"
SCHEDULE = "schedule"  # the name of the per-timestep weight schedule in ``learn``


def _softplus_inv(v: Any) -> Any:
    v = jnp.asarray(v)
    return v + jnp.log(-jnp.expm1(-v))  # log(exp(v) - 1), stable for large v


def init_raw(config: Any, learn: Sequence[str]) -> dict[str, jax.Array]:
    """The unconstrained parameters whose softplus is the config's current values."""
    raw = {}
    for name in learn:
        if name == SCHEDULE:
            w = config.step_weights
            w = np.ones(config.num_iterations) if w is None or isinstance(w, str) else w
            raw[name] = _softplus_inv(jnp.asarray(w, jnp.float32))
        else:
            v = float(getattr(config, name))
            if not v > 0:
                raise ValueError(f"learn: {name} starts at {v}; a learned value must start > 0")
            raw[name] = _softplus_inv(jnp.asarray(v, jnp.float32))
    return raw


def settings_of(raw: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """softplus of every raw parameter (positive settings; ``schedule`` -> ``step_weights``)."""
    return {("step_weights" if k == SCHEDULE else k): jax.nn.softplus(v) for k, v in raw.items()}


def apply_settings(config: Any, settings: Mapping[str, Any]) -> Any:
    """``config`` with ``settings`` (traced values allowed) replacing its fields."""
    return dataclasses.replace(config, **dict(settings))


def _ssim(x: jax.Array, ref: jax.Array) -> jax.Array:
    import dm_pix

    return dm_pix.ssim((x + 1.0) / 2.0, (ref + 1.0) / 2.0)


def validation_loss(
    config: Any,
    eps_fn: Any,
    op: Any,
    ys: jax.Array,
    keys: jax.Array,
    x_true: jax.Array,
    *,
    ssim_weight: float = 0.0,
    remat: bool = True,
) -> jax.Array:
    """Mean squared error (over images and pixels, in [-1, 1] units, not clipped) of the solve
    of ``ys`` [M, *y_shape] (image m with ``keys[m]``, a batch of one each) against ``x_true``
    [M, H, W, C], plus ``ssim_weight * (1 - mean SSIM)``; differentiable in ``config``'s traced
    values. A diverged solve gives a non-finite loss."""
    sol = solve_many(config, eps_fn, op, ys, keys, op_axis=None, throw=False, remat=remat)
    x = sol.x
    loss = jnp.mean(jnp.square(x - jnp.asarray(x_true, x.dtype)))
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - jnp.mean(_ssim(x, jnp.asarray(x_true, x.dtype))))
    return loss


def _check_learn(config: Any, learn: Sequence[str]) -> tuple[str, ...]:
    learn = tuple(learn)
    if not learn:
        raise ValueError("learn: expected at least one of 'lam', 'lr', 'schedule', ...")
    scalars = [n for n in config.HYPER if n != "sigma_x0"]
    for name in learn:
        if name == SCHEDULE:
            if not isinstance(config, RedDiffConfig):
                raise ValueError("learn: a per-timestep schedule is a RED-Diff setting")
        elif name not in scalars:
            raise ValueError(f"learn: expected names among {[*scalars, SCHEDULE]}, got {name!r}")
    if len(set(learn)) != len(learn):
        raise ValueError(f"learn: repeated names in {learn}")
    return learn


def _as_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in settings.items():
        arr = np.asarray(v, np.float64)
        out[k] = [float(a) for a in arr] if arr.ndim else float(arr)
    return out


def save_tuned(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Writes a tuned-setting record (what :func:`tune` returns) as JSON, atomically."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    imageio.atomic_write_json(path, {"format": FORMAT, **record})
    return path


def load_tuned(
    path: str | os.PathLike, *, algo: str | None = None, task: str | None = None
) -> dict[str, Any]:
    """Reads a file written by :func:`tune`: ``{"algo", "task", "num_steps", "params"}``.

    ``params`` are overrides for ``restore(params=...)`` / ``evaluate(params={algo: ...})``
    (``step_weights`` as a list); ``num_steps`` is the grid they were learned on (a schedule only
    fits that grid). ``algo``/``task``: when given, a file for another algorithm is refused and
    another task gives a printed note (the settings may still be useful).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"tuned: no such file: {path}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"tuned: cannot read {path}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"tuned: {path} is not a file written by `reddiff-jax tune`")
    if algo is not None and data["algo"] != algo:
        raise ValueError(f"tuned: {path} holds settings of {data['algo']}, not of {algo}")
    if task is not None and data["task"] != task:
        print(f"note: {path} was tuned on task {data['task']!r}, used here for {task!r}")
    return {k: data[k] for k in ("algo", "task", "num_steps", "params")}


def tune(
    key: jax.Array,
    *,
    task: str = "sr:4",
    algo: str = "reddiff",
    learn: Sequence[str] = ("lam", "lr"),
    n: int = 32,
    steps: int | None = None,
    iters: int = 50,
    batch: int = 8,
    learning_rate: float = 0.05,
    ssim_weight: float = 0.0,
    sigma_y: float = 0.0,
    model: Any = None,
    params: Mapping[str, Any] | None = None,
    remat: bool = True,
    through_network: bool = True,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Learns ``learn`` by Adam on the validation loss; returns (and saves to ``out``) a record.

    Args:
      key: PRNG key (operator ``fold_in(key, 0)``, measurement noise ``fold_in(key, 1)`` and
        solver draws ``fold_in(key, 2)``, as ``restore``).
      task, algo, steps, sigma_y, model: as in ``restore`` (``steps`` default 100).
      learn: setting names (``"lam"``, ``"lr"``, ...) and/or ``"schedule"`` (RED-Diff's
        per-step weights).
      n: validation digits used (at most 200); ``batch`` of them per iteration.
      iters: Adam iterations; ``learning_rate``: Adam's step on the softplus-raw parameters.
      ssim_weight: adds ``ssim_weight * (1 - SSIM)`` to the MSE.
      params: the starting (and fixed) settings, overriding the task defaults.
      remat: ``jax.checkpoint`` on the solver step (memory: one state per step).
      through_network: RED-Diff: the exact gradient, through the network's evaluations too
        (``differentiable=True``). False keeps them under ``stop_gradient`` (the gradient then
        ignores how the network's output moves with μ: cheaper to compile and run, approximate).
      out: a JSON file to write the learned setting into (read by ``load_tuned``).

    Returns:
      ``{"algo", "task", "num_steps", "params": learned values (JSON), "learn", "start",
      "history": [{"iter", "loss"}...], "seconds", "settings"}``.
    """
    registry.get(algo)
    model, model_name = resolve_model(model)
    cfg = model.config
    image_shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
    config = restore_lib.algo_config(algo, task, steps=steps, sigma_y=sigma_y,
                                     overrides=dict(params or {}))  # fmt: skip
    learn = _check_learn(config, learn)
    if isinstance(config, RedDiffConfig):
        config = dataclasses.replace(config, differentiable=bool(through_network))
    for name, v in (("iters", iters), ("batch", batch)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    k_op, k_y, k_solve = (jax.random.fold_in(key, i) for i in range(3))
    op = operators.make_from_spec(task, image_shape, key=k_op)
    reason = registry.applicable(algo, op)
    if reason is not None:
        raise ValueError(f"algo: {algo} cannot solve task {task!r}: {reason}")
    names, truth = splits.load("validation", n, image_shape=image_shape)
    x_all = imageio.from_uint8(truth)
    y_all = np.asarray(pipeline.simulate(op, x_all, k_y, sigma_y=sigma_y))
    batch = min(int(batch), len(names))

    raw = init_raw(config, learn)
    start_values = _as_json(settings_of(raw))
    opt = optax.adam(learning_rate)
    opt_state = opt.init(raw)

    def loss_fn(raw, model, ys, keys, xs):
        cfg_t = apply_settings(config, settings_of(raw))
        return validation_loss(cfg_t, model.eps, op, ys, keys, xs, ssim_weight=ssim_weight,
                               remat=remat)  # fmt: skip

    value_and_grad = jax.value_and_grad(loss_fn)

    def update(raw, opt_state, model, ys, keys, xs):
        # Not under an outer jit: the driver checks concrete measurements; its compiled solve
        # (and the compiled backward pass) is cached, so nothing recompiles per iteration.
        loss, grads = value_and_grad(raw, model, ys, keys, xs)
        finite = bool(jnp.isfinite(loss)) and all(
            bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)
        )
        if not finite:  # a diverged solve leaves the parameters where they were
            return raw, opt_state, loss
        updates, opt_state = opt.update(grads, opt_state, raw)
        return optax.apply_updates(raw, updates), opt_state, loss

    from tqdm.auto import tqdm

    history = []
    t0 = time.perf_counter()
    for it in tqdm(range(int(iters)), desc=f"tune {algo} {task}", disable=not progress):
        idx = (np.arange(batch) + it * batch) % len(names)
        k_it = jax.random.fold_in(k_solve, it)
        keys = jax.vmap(lambda i, k=k_it: jax.random.fold_in(k, i))(jnp.asarray(idx))
        raw, opt_state, loss = update(raw, opt_state, model, jnp.asarray(y_all[idx]), keys,
                                      jnp.asarray(x_all[idx]))  # fmt: skip
        history.append({"iter": it, "loss": _finite_or_none(loss)})
    seconds = time.perf_counter() - t0
    learned = _as_json(settings_of(raw))
    fixed = {k: getattr(config, k) for k in config.HYPER if k not in learned}
    record = {
        "algo": algo,
        "task": task,
        "num_steps": int(config.num_steps),
        "params": learned,
        "learn": list(learn),
        "start": start_values,
        "fixed": {k: float(v) for k, v in fixed.items()},
        "history": history,
        "seconds": seconds,
        "settings": {
            "n": len(names),
            "batch": batch,
            "iters": int(iters),
            "learning_rate": float(learning_rate),
            "ssim_weight": float(ssim_weight),
            "sigma_y": float(sigma_y),
            "split": "validation",
            "model": model_name,
            "key": pipeline.key_data(key),
            "remat": bool(remat),
            "through_network": bool(through_network),
        },
    }
    if out is not None:
        save_tuned(out, record)
    return record


def _finite_or_none(v: Any) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None
