"""DDPM epsilon-prediction training of an ADM UNet, with EMA, resumable checkpoints and export.

The loss is the "simple" DDPM objective on images x0 [B, H, W, C] in [-1, 1]: t ~ U{0..T-1},
eps ~ N(0, I), x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps, loss = mean((eps_θ(x_t, t) - eps)²).
With `learn_sigma` only the eps channels are trained (the variance channels get no gradient).

Optimiser: global-norm gradient clipping, then AdamW with a linear warm-up to a constant learning
rate. The EMA of the weights uses decay min(ema_decay, (1 + s) / (10 + s)) at step s.

Everything random is a pure function of (key, step): the batch of step s (`data.batch_indices`),
and the timesteps and noise (`fold_in(key, s)`), so a run resumed from a checkpoint reaches the
same state as an uninterrupted one. Training checkpoints (params, EMA, optimiser state, step,
loss trace) live in `workdir` (orbax CheckpointManager); `export` writes only the EMA params
with `model.save_pretrained`, a model card and a grid of DDIM samples.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from reddiff_jax import data as data_lib
from reddiff_jax import diffusion, imageio, sharding
from reddiff_jax.model import init_params
from reddiff_jax.unet import UNet, UNetConfig

__all__ = [
    "MODEL_PRESETS",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "diffusion_loss",
    "export",
    "get_model_config",
    "init_state",
    "make_optimizer",
    "make_train_step",
    "sample",
    "sample_grid",
    "train",
]

# Model configs for training; UNet presets (reddiff_jax.unet.PRESETS) are accepted as well.
MODEL_PRESETS: dict[str, UNetConfig] = {
    # The embedded MNIST prior: 32x32 grayscale, widths 32/32/64, attention at 8x8 (~0.9M params).
    "tiny-mnist": UNetConfig(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 1, 2),
        attention_resolutions=(8,),
        learn_sigma=False,
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=False,
        in_channels=1,
    ),
    # For tests: a one-level 16x16 grayscale UNet (fast on CPU).
    "test-16": UNetConfig(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1,),
        attention_resolutions=(),
        learn_sigma=False,
        num_head_channels=32,
        use_scale_shift_norm=True,
        in_channels=1,
    ),
}

_META_ITEM = "meta"
_STATE_ITEM = "state"
_LOSS_TRACE = 500  # losses kept in the checkpoint metadata (for the model card's final loss)


def get_model_config(name_or_file: str | Path) -> UNetConfig:
    """A UNetConfig from a preset name (`MODEL_PRESETS` or `unet.PRESETS`) or a JSON file."""
    from reddiff_jax.unet import PRESETS

    name = str(name_or_file)
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"config: {path} does not exist")
        try:
            return UNetConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"config: {path} is not a UNetConfig JSON file: {err}") from err
    raise ValueError(
        f"config: expected a preset name {sorted(MODEL_PRESETS) + sorted(PRESETS)} "
        f"or a .json file, got {name!r}"
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (everything but the model and the data).

    Attributes:
      steps: total number of optimiser steps.
      batch_size: images per step.
      lr: peak learning rate (reached after `warmup_steps`, then constant).
      warmup_steps: linear warm-up length from 0.
      decay_steps: cosine decay of the learning rate to 0 over the last `decay_steps` of `steps`
        (0: none, the rate stays constant and a run may stop at any checkpoint).
      weight_decay: AdamW decoupled weight decay.
      grad_clip: maximum global gradient norm.
      ema_decay: EMA decay (warmed up as min(decay, (1 + s) / (10 + s))).
      schedule, num_timesteps: the diffusion schedule (`diffusion.alphas_cumprod`).
      checkpoint_every: save a training checkpoint every this many steps (and at the end).
      keep_checkpoints: how many training checkpoints to keep.
    """

    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    decay_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    schedule: str = "linear"
    num_timesteps: int = 1000
    checkpoint_every: int = 250
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "num_timesteps",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an int >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.decay_steps, int) or self.decay_steps < 0:
            raise ValueError(f"decay_steps: expected an int >= 0, got {self.decay_steps!r}")
        if self.decay_steps and self.warmup_steps + self.decay_steps > self.steps:
            raise ValueError(
                f"decay_steps: warmup_steps + decay_steps ({self.warmup_steps} + "
                f"{self.decay_steps}) exceeds steps ({self.steps})"
            )
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay!r}")
        if self.schedule not in diffusion.SCHEDULES:
            raise ValueError(
                f"schedule: expected one of {diffusion.SCHEDULES}, got {self.schedule!r}"
            )


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree)."""

    step: jax.Array  # [] int32, number of optimiser steps taken
    params: Any
    ema_params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns: the final state, the losses of the steps run in this call, and the
    wall time of all runs that built the state (seconds, summed over resumptions)."""

    state: TrainState
    losses: np.ndarray  # [steps run in this call] float32
    loss_trace: list[float]  # the last losses, over all runs (at most 500)
    commands: list[dict[str, Any]]  # {"start_step", "command"} of each call that trained
    wall_time: float
    resumed_from: int  # the step this call started at (0 for a fresh run)
    init_from: dict[str, Any] | None = None  # the warm start's record (`train(warm_start_info=)`)


def learning_rate(config: TrainConfig) -> optax.Schedule:
    """Step -> learning rate: linear warm-up from 0 over `warmup_steps`, constant `lr`, then (with
    `decay_steps`) a cosine decay to 0 that ends at step `steps`."""
    parts, bounds = [], []
    if config.warmup_steps:
        parts.append(optax.linear_schedule(0.0, config.lr, config.warmup_steps))
        bounds.append(config.warmup_steps)
    parts.append(optax.constant_schedule(config.lr))
    if config.decay_steps:
        bounds.append(config.steps - config.decay_steps)
        parts.append(optax.cosine_decay_schedule(config.lr, config.decay_steps))
    return optax.join_schedules(parts, bounds) if bounds else parts[0]


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the `learning_rate` schedule."""
    schedule = learning_rate(config)
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )


def init_state(key: jax.Array, model_config: UNetConfig, train_config: TrainConfig) -> TrainState:
    """Fresh parameters (UNet init from `key`), their EMA copy and the optimiser state."""
    params = init_params(key, model_config)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=make_optimizer(train_config).init(params),
    )


def diffusion_loss(
    params: Any,
    key: jax.Array,
    x0: jax.Array,
    *,
    model_config: UNetConfig,
    alphas_cumprod: jax.Array,
) -> jax.Array:
    """DDPM simple loss (scalar float32) of a batch x0 [B, H, W, C] in [-1, 1]."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, alphas_cumprod.shape[0], dtype=jnp.int32)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    a = alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
    out = UNet(model_config).apply({"params": params}, x_t, t)
    return jnp.mean(jnp.square(out[..., : model_config.in_channels] - eps))


def make_train_step(
    model_config: UNetConfig, train_config: TrainConfig
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
    """`step(state, x0 [B,H,W,C], key) -> (state, loss)`, jitted once; `state` is donated.

    `key` is the run's key: the step draws from `fold_in(key, state.step)`. Calls with settings
    that differ only in steps/checkpointing share one compiled step.
    """
    return _make_train_step(model_config, _step_settings(train_config))


def _step_settings(train_config: TrainConfig) -> TrainConfig:
    """`train_config` with the settings that do not change a training step at their defaults:
    checkpointing always, and `steps` unless a learning-rate decay ends there."""
    defaults = TrainConfig()
    return dataclasses.replace(
        train_config,
        steps=train_config.steps if train_config.decay_steps else defaults.steps,
        checkpoint_every=defaults.checkpoint_every,
        keep_checkpoints=defaults.keep_checkpoints,
    )


@functools.lru_cache(maxsize=8)
def _make_train_step(
    model_config: UNetConfig, train_config: TrainConfig
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
    if model_config.class_cond:
        raise ValueError("model_config: class-conditional training is not supported")
    optimizer = make_optimizer(train_config)
    ac = diffusion.alphas_cumprod(train_config.schedule, train_config.num_timesteps)
    loss_fn = jax.value_and_grad(diffusion_loss)

    def step(state: TrainState, x0: jax.Array, key: jax.Array) -> tuple[TrainState, jax.Array]:
        loss, grads = loss_fn(
            state.params,
            jax.random.fold_in(key, state.step),
            x0,
            model_config=model_config,
            alphas_cumprod=ac,
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        s = state.step.astype(jnp.float32)
        decay = jnp.minimum(train_config.ema_decay, (1.0 + s) / (10.0 + s))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        return TrainState(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
        ), loss

    return jax.jit(step, donate_argnums=0)


# ------------------------------------------------------------------------------------------------
# Checkpoints.


def _manager(workdir: Path, train_config: TrainConfig) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        workdir.absolute() / "checkpoints",
        item_names=(_STATE_ITEM, _META_ITEM),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=train_config.keep_checkpoints, create=True, enable_async_checkpointing=False
        ),
    )


def _save(mngr: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    step = int(state.step)
    if step in mngr.all_steps():
        return
    tree = flax.serialization.to_state_dict(jax.tree.map(np.asarray, state))
    mngr.save(
        step,
        args=ocp.args.Composite(
            **{_STATE_ITEM: ocp.args.StandardSave(tree), _META_ITEM: ocp.args.JsonSave(meta)}
        ),
    )
    mngr.wait_until_finished()


def _restore(mngr: ocp.CheckpointManager, template: TrainState) -> tuple[TrainState, dict] | None:
    step = mngr.latest_step()
    if step is None:
        return None
    target = flax.serialization.to_state_dict(jax.tree.map(np.asarray, template))
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            **{_STATE_ITEM: ocp.args.StandardRestore(target), _META_ITEM: ocp.args.JsonRestore()}
        ),
    )
    state = flax.serialization.from_state_dict(template, restored[_STATE_ITEM])
    return jax.tree.map(jnp.asarray, state), dict(restored[_META_ITEM])


def _comparable(train_config: TrainConfig) -> dict[str, Any]:
    """What a resume must keep: the settings of a training step (the others may change)."""
    return dataclasses.asdict(_step_settings(train_config))


# ------------------------------------------------------------------------------------------------
# The training loop.


def train(
    key: jax.Array,
    images: np.ndarray,
    model_config: UNetConfig,
    train_config: TrainConfig,
    *,
    workdir: str | Path,
    progress: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    warm_start: Any = None,
    warm_start_info: dict[str, Any] | None = None,
    mesh: Any = None,
) -> TrainResult:
    """Trains (or resumes training) to `train_config.steps` steps.

    Args:
      key: the run's PRNG key (init, batches, timesteps and noise all derive from it).
      images: uint8 [N, H, W, C] training images (H = W = image_size, C = in_channels); only read.
      model_config: the UNet to train (`in_channels` grayscale 1 or RGB 3; unconditional).
      train_config: optimisation settings.
      workdir: training checkpoints; if it holds one, training resumes from its latest step
        (the model config and the settings other than steps/checkpointing must match).
      progress: show a tqdm bar (loss and rate).
      stop_after: stop after this many steps in this call (a checkpoint is saved), e.g. to
        simulate an interruption; 0 only restores the latest checkpoint (which must exist).
      log: receives a line at each checkpoint (e.g. `print`).
      command: the command line of this call, recorded in the checkpoint metadata.
      warm_start: a warm start for a new run (ignored when `workdir` holds a checkpoint): these
        parameters (e.g. an exported model's EMA weights; the tree of `model_config`) start both
        the weights and their EMA; the optimiser starts fresh.
      warm_start_info: what `warm_start` is (JSON-serialisable, e.g. path and steps), recorded in
        the metadata and the model card.
      mesh: a ``("data",)`` mesh (:func:`reddiff_jax.sharding.data_mesh`) whose size divides
        the batch: data parallel training, each batch sharded over it and the state replicated
        (the same steps, up to float rounding of the batch mean).

    Returns:
      A `TrainResult`.

    Raises:
      ValueError: images of the wrong shape/dtype, a workdir from a different run, or a
        non-finite loss (the last good checkpoint is kept).
      FileNotFoundError: `stop_after=0` and `workdir` holds no checkpoint.
    """
    images = _check_images(images, model_config)
    workdir = Path(workdir)
    k_init, k_data, k_step = jax.random.split(key, 3)
    template = init_state(k_init, model_config, train_config)
    if warm_start is not None:
        template = _warm_start(template, warm_start, train_config)
    meta = {
        "model_config": model_config.to_dict(),
        "train_config": dataclasses.asdict(train_config),
        "num_examples": int(images.shape[0]),
        "wall_time": 0.0,
        "loss_trace": [],
        "commands": [],
        "init_from": warm_start_info if warm_start is not None else None,
    }
    if mesh is not None and train_config.batch_size % sharding.data_size(mesh):
        raise ValueError(
            f"mesh: {sharding.data_size(mesh)} devices do not divide the batch "
            f"{train_config.batch_size}"
        )
    mngr = _manager(workdir, train_config)
    try:
        state = _resume(mngr, template, meta, workdir, train_config, export_only=stop_after == 0)
        if command is not None and stop_after != 0:
            meta["commands"].append({"start_step": int(state.step), "command": command})
        start = int(state.step)
        end = (
            train_config.steps
            if stop_after is None
            else min(train_config.steps, start + stop_after)
        )
        batches = data_lib.batches(k_data, images, train_config.batch_size, start_step=start)
        if mesh is not None:
            state = jax.device_put(state, sharding.replicated(mesh))
            batches = (jax.device_put(b, sharding.batch_sharding(mesh)) for b in batches)
        state, losses = _run_steps(
            state,
            batches,
            k_step,
            range(start, end),
            make_train_step(model_config, train_config),
            train_config,
            _Checkpointer(mngr, meta, train_config.steps, log),
            progress=progress,
            workdir=workdir,
        )
    finally:
        mngr.close()
    return TrainResult(
        state=state,
        losses=np.asarray(losses, np.float32),
        loss_trace=list(meta["loss_trace"]),
        commands=list(meta["commands"]),
        wall_time=float(meta["wall_time"]),
        resumed_from=start,
        init_from=meta["init_from"],
    )


def _check_images(images: np.ndarray, model_config: UNetConfig) -> np.ndarray:
    images = np.asarray(images)
    n = model_config.image_size
    expected = (n, n, model_config.in_channels)
    if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8:
        raise ValueError(
            f"images: expected uint8 [N, {n}, {n}, {model_config.in_channels}] for this model "
            f"config, got {images.dtype} {images.shape}"
        )
    return images


def _resume(
    mngr: ocp.CheckpointManager,
    template: TrainState,
    meta: dict[str, Any],
    workdir: Path,
    train_config: TrainConfig,
    *,
    export_only: bool,
) -> TrainState:
    """The latest checkpoint's state (its wall time, losses and commands go into `meta`), or
    `template` when there is none; refuses a workdir of another run."""
    restored = _restore(mngr, template)
    if restored is None and export_only:
        raise FileNotFoundError(f"workdir: no training checkpoint in {workdir} to export")
    if restored is None:
        return template
    state, old = restored
    if old["model_config"] != meta["model_config"]:
        raise ValueError(
            f"workdir: {workdir} holds a run of another model config "
            f"({old['model_config']}); use a new --workdir"
        )
    old_train = TrainConfig(**old["train_config"])
    if _comparable(old_train) != _comparable(train_config):
        raise ValueError(
            f"workdir: {workdir} holds a run with other settings {_comparable(old_train)}; "
            f"got {_comparable(train_config)}; use a new --workdir"
        )
    meta["wall_time"] = float(old["wall_time"])
    meta["loss_trace"] = list(old["loss_trace"])
    meta["commands"] = list(old.get("commands", []))
    meta["init_from"] = old.get("init_from")
    return state


def _warm_start(template: TrainState, params: Any, train_config: TrainConfig) -> TrainState:
    """`template` with `params` as the weights and their EMA (a fresh optimiser state)."""
    want = jax.tree.map(lambda v: (v.shape, v.dtype), template.params)
    got = jax.tree.map(lambda v: (jnp.shape(v), jnp.asarray(v).dtype), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(
            "warm_start: the parameters do not match the model config's parameter "
            "tree (other widths, levels or channels?)"
        )
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(
        step=template.step,
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=make_optimizer(train_config).init(params),
    )


class _Checkpointer:
    """Saves `state` with `meta` (wall time and loss trace brought up to date) once per step."""

    def __init__(
        self,
        mngr: ocp.CheckpointManager,
        meta: dict[str, Any],
        total_steps: int,
        log: Callable[[str], None] | None,
    ) -> None:
        self.mngr, self.meta, self.total_steps, self.log = mngr, meta, total_steps, log
        self.clock = time.perf_counter()

    def __call__(self, state: TrainState) -> None:
        meta = self.meta
        now = time.perf_counter()
        meta["wall_time"] += now - self.clock
        self.clock = now
        meta["loss_trace"] = meta["loss_trace"][-_LOSS_TRACE:]
        if int(state.step) in self.mngr.all_steps():
            return
        _save(self.mngr, state, meta)
        if self.log is not None:
            recent = float(np.mean(meta["loss_trace"][-100:] or [np.nan]))
            self.log(
                f"step {int(state.step)}/{self.total_steps}  loss(last 100) {recent:.4f}  "
                f"wall {meta['wall_time']:.0f}s"
            )


def _run_steps(
    state: TrainState,
    batches: Any,
    key: jax.Array,
    steps: range,
    step_fn: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]],
    train_config: TrainConfig,
    checkpoint: _Checkpointer,
    *,
    progress: bool,
    workdir: Path,
) -> tuple[TrainState, list[float]]:
    """Runs `steps`, checkpointing every `checkpoint_every` steps, at the end and on Ctrl-C."""
    losses: list[float] = []
    meta = checkpoint.meta
    bar = _progress(progress, steps.start, train_config.steps)
    try:
        for s in steps:
            state, loss = step_fn(state, next(batches), key)  # donates the old state
            loss = float(loss)
            if not np.isfinite(loss):
                raise ValueError(
                    f"training loss became non-finite ({loss}) at step {s}; lower the "
                    f"learning rate (lr={train_config.lr}) or check the data; the last "
                    f"checkpoint in {workdir} is kept"
                )
            losses.append(loss)
            meta["loss_trace"].append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
            if (s + 1) % train_config.checkpoint_every == 0:
                checkpoint(state)
    except KeyboardInterrupt:
        if not any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
            checkpoint(state)  # the state after the last finished step
        raise
    finally:
        bar.close()
    checkpoint(state)
    return state, losses


class _NoBar:
    def update(self, n: int) -> None:
        del n

    def set_postfix(self, **kwargs: Any) -> None:
        del kwargs

    def close(self) -> None:
        pass


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", desc="train", mininterval=2.0)


# ------------------------------------------------------------------------------------------------
# Export: EMA params, model card, sample grid.


def _clipped_eps(model: Any, alphas_cumprod: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """eps consistent with the model's x̂0 clipped to [-1, 1] (guided-diffusion's clip_denoised)."""
    eps = model.eps(x_t, t)
    a = alphas_cumprod[t][:, None, None, None]
    x0 = jnp.clip(diffusion.x0_from_eps(x_t, eps, a), -1.0, 1.0)
    return diffusion.eps_from_x0(x_t, x0, a)


def sample(
    key: jax.Array,
    model: Any,
    *,
    num: int = 64,
    num_steps: int = 50,
    eta: float = 0.0,
    schedule: str = "linear",
    num_timesteps: int = 1000,
    clip_denoised: bool = True,
    mesh: Any = None,
) -> np.ndarray:
    """Unconditional DDIM samples of a `ScoreModel`: float32 [num, H, W, C] in [-1, 1].

    `eta`: 0 (default) is the deterministic sampler; 1 adds DDPM's ancestral noise at each step.

    With `clip_denoised` each step's x̂0 is clipped to [-1, 1] and eps recomputed from it (as
    guided-diffusion samples by default). The last DDIM step goes to alpha = 1, so the final
    iterate is that step's x̂0. `mesh`: a ``("data",)`` mesh the samples are sharded over (the
    same samples).
    """
    from reddiff_jax import solvers

    cfg = model.config
    shape = (num, cfg.image_size, cfg.image_size, cfg.in_channels)
    config = solvers.DDIMConfig(
        num_steps=num_steps, eta=eta, schedule=schedule, num_timesteps=num_timesteps
    )
    ac = diffusion.alphas_cumprod(schedule, num_timesteps)
    eps_fn = functools.partial(_clipped_eps, model, ac) if clip_denoised else model.eps
    return np.asarray(solvers.sample(config, eps_fn, shape, key, throw=False, mesh=mesh).x)


def sample_grid(key: jax.Array, model: Any, **kwargs: Any) -> np.ndarray:
    """:func:`sample` (same keyword arguments) tiled into one uint8 grid image
    [rows * H, cols * W, C] with cols = ceil(sqrt(num))."""
    return _tile(sample(key, model, **kwargs))


def _tile(x: np.ndarray) -> np.ndarray:
    """float [B, H, W, C] in [-1, 1] -> uint8 grid [rows * H, cols * W, C]."""
    b, h, w, c = x.shape
    cols = int(np.ceil(np.sqrt(b)))
    rows = -(-b // cols)
    pixels = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(b):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = pixels[i]
    return grid


def export(
    key: jax.Array,
    result: TrainResult,
    model_config: UNetConfig,
    train_config: TrainConfig,
    out: str | Path,
    *,
    info: dict[str, Any] | None = None,
    num_samples: int = 64,
    sample_steps: int = 50,
    card_extra: str = "",
) -> Path:
    """Writes the EMA params with `save_pretrained` into `out`, plus README.md and samples.png.

    Files in `out` that are not part of the export (e.g. `heldout.npz`) are left in place.
    `info` (JSON-serialisable: command, data, seed, ...) is recorded in the checkpoint metadata
    and the model card.
    """
    from reddiff_jax.model import ScoreModel, save_pretrained

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: {out} exists and is not a directory")
    final_loss = float(np.mean(result.loss_trace[-100:])) if result.loss_trace else float("nan")
    metadata = {
        "trained_with": "reddiff-jax train",
        "steps": int(result.state.step),
        "final_loss_last100_mean": final_loss,
        "wall_time_s": round(result.wall_time, 1),
        "train_config": dataclasses.asdict(train_config),
        "params": int(sum(p.size for p in jax.tree.leaves(result.state.ema_params))),
        "training_commands": result.commands,
        "init_from": result.init_from,
        **(info or {}),
    }
    model = ScoreModel(config=model_config, params=result.state.ema_params)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    try:
        save_pretrained(model, tmp, metadata=metadata)
        for entry in tmp.iterdir():  # replace only the exported entries
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            entry.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    grid = sample_grid(
        key,
        model,
        num=num_samples,
        num_steps=sample_steps,
        schedule=train_config.schedule,
        num_timesteps=train_config.num_timesteps,
    )
    imageio.save_png(out / "samples.png", grid, scale=2)
    (out / "README.md").write_text(_model_card(metadata, model_config, sample_steps, card_extra))
    return out


def _warm_start_lines(init: dict[str, Any] | None) -> list[str]:
    if not init:
        return []
    return [
        f"- warm start: the EMA weights of `{init.get('path', '?')}` "
        f"({init.get('steps', '?')} steps, {init.get('wall_time_s', 0) / 60:.1f} min); the "
        "steps, wall time and loss below are this run's"
    ]


def _model_card(meta: dict[str, Any], cfg: UNetConfig, sample_steps: int, extra: str) -> str:
    tc = meta["train_config"]
    if tc.get("decay_steps"):
        stopping = f"the learning rate decays to 0 over the last {tc['decay_steps']} of them"
        decay = f", cosine decay to 0 over the last {tc['decay_steps']}"
    else:
        stopping = (
            "the learning rate is constant after warm-up, so a run may be stopped at any "
            "checkpoint and exported"
        )
        decay = ""
    lines = [
        f"# {meta.get('name', 'reddiff-jax score model')}",
        "",
        "An unconditional ADM UNet (epsilon prediction, linear DDPM schedule, T = "
        f"{tc['num_timesteps']}) trained with `reddiff-jax train`; load it with "
        "`reddiff_jax.model.load_pretrained(path)`.",
        "",
        "## Training",
        "",
        "- training command(s) (start step: command):",
        *[f"  - {c['start_step']}: `{c['command']}`" for c in meta["training_commands"]],
        f"- export command: `{meta.get('export_command', '?')}`",
        *_warm_start_lines(meta.get("init_from")),
        f"- data: {meta.get('data', '?')} ({meta.get('num_examples', '?')} images)",
        f"- steps: {meta['steps']} (of at most {tc['steps']}; {stopping})",
        f"- batch {tc['batch_size']}; AdamW lr {tc['lr']} (linear warm-up {tc['warmup_steps']} "
        f"steps, then constant{decay}), weight decay "
        f"{tc['weight_decay']}, grad clip {tc['grad_clip']}, EMA {tc['ema_decay']}",
        f"- wall time: {meta['wall_time_s'] / 60:.1f} min ({meta.get('hardware', 'CPU')})",
        f"- final loss (mean of the last 100 steps): {meta['final_loss_last100_mean']:.4f}",
        f"- parameters: {meta['params']:,} (EMA weights only are stored)",
        f"- seed: {meta.get('seed', '?')}",
        "",
        "## Model",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=2),
        "```",
        "",
        f"`samples.png`: unconditional DDIM samples ({sample_steps} steps, eta = 0, x̂0 clipped to "
        "[-1, 1] at each step) of the EMA weights.",
        "",
    ]
    return "\n".join(lines) + ("\n" + extra.strip() + "\n" if extra.strip() else "")
