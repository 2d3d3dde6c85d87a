"""The one driver of every algorithm: ``solve`` (a batch), ``solve_many`` (vmapped) and ``sample``.

A solve is ``Solver.init`` then one ``lax.scan`` of ``Solver.step`` over the descending timestep
grid, under ``jit``; it returns a :class:`Solution`. The compiled program is cached per
(algorithm, static settings, eps_fn and operator structure, shapes): hyper-parameters, network
weights, operator arrays, ``y`` and the key are traced arguments, so new values never recompile.

Per image and step the driver checks the iterate: a non-finite value or ``|x| > max_abs`` marks
that image (``status``, ``failed_step``); ``throw=True`` then raises :class:`SolveError` naming
the images and the step, ``throw=False`` returns the status (which survives ``vmap``).

Randomness: ``key`` is one key (the batch's draws come from it, as upstream) or one key per
image (image i's draws come from ``key[i]`` alone, drawn as a batch of one), so with a reduction
that couples no two images a result does not depend on the batch it is solved in.

Scale-out: ``mesh=`` (a :class:`jax.sharding.Mesh` with a ``"data"`` axis) shards the batch axis
(``solve_many``: the measurement axis, a sweep's grid axis and stacked operators) over the
devices; parameters and shared operator leaves are replicated, and the solve is still one
compiled program. A batch that the data axis does not divide is padded with copies of its last
entry and the padding is dropped from the result (RED-Diff's ``batch_mean`` still averages over
the real images only). See :mod:`reddiff_jax.sharding`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import sharding as sharding_lib
from reddiff_jax.solvers import _microbatch, _scan_convs, registry
from reddiff_jax.solvers.base import (
    SolveError,
    SolverConfig,
    SolveStatus,
    StepInput,
    padded_alphas,
    schedule_of,
)
from reddiff_jax.solvers.common import (
    check_key,
    check_measurement,
    image_shape_of,
    is_concrete,
    merge_static,
    split_static,
)

__all__ = ["MAX_ABS", "Solution", "sample", "solve", "solve_many"]

Array = jax.Array
MAX_ABS = 1e3  # images live in [-1, 1]; an iterate beyond this has diverged


@flax.struct.dataclass
class Solution:
    """What a solve returns (a pytree; :func:`solve_many` adds a leading [M] axis, no batch axis).

    Attributes:
      x: [B, H, W, C] the restored image (RED-Diff: the last step's x0 before its update, as
        the official code returns; the samplers: the state after the last step).
      state: the algorithm's final state (e.g. ``RedDiffState.mu``).
      info: per-step diagnostics stacked over the K steps, each [K] or [K, B].
      ts: [K] int32 timesteps visited.
      status: [B] int32 :class:`SolveStatus` per image.
      failed_step: [B] int32 first step at which the image failed, -1 if none.
      trajectory: with ``trajectory=True``, ``{"x": [K, B, H, W, C] iterate after each step,
        "x0": [K, B, H, W, C] the step's x̂0}``; else None.
    """

    x: Array
    state: Any
    info: dict
    ts: Array
    status: Array
    failed_step: Array
    trajectory: dict | None = None

    @property
    def ok(self) -> Array:
        """True where the image's solve stayed finite and bounded."""
        return self.status == SolveStatus.SUCCESS


class _Statics(NamedTuple):
    config: SolverConfig  # hyper-parameters zeroed
    eps: Any
    op: Any
    x_shape: tuple[int, ...]  # [B, H, W, C]; B includes the padding
    trajectory: bool
    remat: bool = False  # jax.checkpoint each step (memory of a backward pass: one state a step)
    per_image_keys: bool = False  # key is [B]: image i draws from key[i] alone
    batch: int = 0  # the real batch (< x_shape[0] when padded); 0: x_shape[0]
    mesh: Any = None  # a Mesh: batch-leading arrays are constrained to P("data")
    key_impl: str | None = None  # the key arrives as raw data of this PRNG impl (across hosts)
    unmean: bool = False  # RED-Diff batch_mean solved as image_mean with weights / batch
    micro: int = 0  # eps_fn as a lax.map over chunks of this many images per device (0: off)


class _Carry(NamedTuple):
    state: Any
    failed_step: Array  # [B] int32
    reason: Array  # [B] int32 SolveStatus of the first failure


def _build(statics: _Statics, dyn: dict):
    eps_fn = merge_static(statics.eps, dyn["eps"])
    if statics.micro:
        eps_fn = _microbatch.Microbatched(eps_fn, statics.micro, _data_devices(statics),
                                          statics.mesh)  # fmt: skip
    op = None if statics.op is None else merge_static(statics.op, dyn["op"])
    return statics.config.build(eps_fn, op, alphas_cumprod=dyn["alphas"])


def _data_devices(statics: _Statics) -> int:
    """The number of shards of the batch (1 without a mesh)."""
    return 1 if statics.mesh is None else sharding_lib.data_size(statics.mesh)


def _real_batch(statics: _Statics) -> int:
    return statics.batch or statics.x_shape[0]


def _constrain(statics: _Statics, tree: Any, *, axis: int = 0) -> Any:
    """Pins the batch axis of every batch-sized leaf of ``tree`` to the mesh's data axis."""
    if statics.mesh is None:
        return tree
    size = statics.x_shape[0]
    spec = sharding_lib.batch_sharding(statics.mesh, axis=axis)

    def pin(v):
        if hasattr(v, "ndim") and v.ndim > axis and v.shape[axis] == size:
            return jax.lax.with_sharding_constraint(v, spec)
        return v

    return jax.tree_util.tree_map(pin, tree)


def _wrap_key(statics: _Statics, key):
    return key if statics.key_impl is None else jax.random.wrap_key_data(key, impl=statics.key_impl)


def _pad_draws(statics: _Statics, draws: dict) -> dict:
    size = statics.x_shape[0]
    return {n: sharding_lib.pad_rows(v, size) for n, v in draws.items()}


def _draw(statics: _Statics, key, draw_one: Callable[[Any, tuple], dict]) -> dict:
    """The draws of one init/step: from one key for the batch, or per image from its own key."""
    if statics.per_image_keys:
        one = (1, *statics.x_shape[1:])
        draws = jax.vmap(lambda k: draw_one(k, one))(key)
        return {n: v.reshape(statics.x_shape) for n, v in draws.items()}
    if statics.batch and not jax.config.jax_threefry_partitionable:
        # a non-partitionable threefry stream depends on the whole shape: draw the real batch
        real = (statics.batch, *statics.x_shape[1:])
        return _pad_draws(statics, draw_one(key, real))
    return draw_one(key, statics.x_shape)  # partitionable: rows are a prefix-stable stream


def _init_core(statics: _Statics, dyn: dict, y, hyper, key, noise) -> _Carry:
    solver = _build(statics, dyn)
    key = _wrap_key(statics, key)
    draws = _draw(statics, key, solver.draw_init) if noise is None else noise
    state = _constrain(statics, solver.init(y, hyper, draws))
    batch = statics.x_shape[0]
    return _Carry(state, jnp.full((batch,), -1, jnp.int32), jnp.zeros((batch,), jnp.int32))


def _image_status(out, max_abs: Array) -> Array:
    """[B] SolveStatus of the iterate ``out.x`` and the step's per-image stats."""
    x = out.x
    axes = tuple(range(1, x.ndim))
    finite = jnp.all(jnp.isfinite(x), axis=axes)
    for v in out.stats.values():
        if v.shape == x.shape[:1]:
            finite = finite & jnp.isfinite(v)
    big = jnp.max(jnp.abs(jnp.where(jnp.isfinite(x), x, 0.0)), axis=axes) > max_abs
    return jnp.where(~finite, SolveStatus.NONFINITE, jnp.where(big, SolveStatus.DIVERGED, 0))


def _chunk_core(statics: _Statics, dyn: dict, key, carry: _Carry, ks, ts, ss, noise):
    solver = _build(statics, dyn)
    pad = padded_alphas(dyn["alphas"])
    key = _wrap_key(statics, key)

    def body(c: _Carry, xs):
        k, t, s, nz = xs
        if nz is None:
            draws = _draw(statics, key, lambda kk, shape: solver.draw_step(kk, k, shape))
        else:
            draws = nz
        draws = _constrain(statics, draws)
        state, out = solver.step(c.state, StepInput(k, t, pad[t + 1], pad[s + 1]), draws)
        code = _image_status(out, dyn["max_abs"]).astype(jnp.int32)
        new = (c.failed_step < 0) & (code != SolveStatus.SUCCESS)
        failed = jnp.where(new, k, c.failed_step)
        reason = jnp.where(new, code, c.reason)
        rec = {"info": out.stats}
        if statics.trajectory:
            rec["trajectory"] = {"x": out.x, "x0": out.x0}
        return _constrain(statics, _Carry(state, failed, reason)), _constrain(statics, rec)

    # The one scan of the code base; its body's convolutions are made canonical, so XLA CPU runs
    # the input-gradient convolutions of DPS / PGDM on its fast path (see _scan_convs).
    if statics.remat:
        body = jax.checkpoint(body)
    return _scan_convs.scan(body, carry, (ks, ts, ss, noise))


def _real_loss(statics: _Statics, dyn: dict, info: dict, state: Any) -> tuple[dict, Any]:
    """RED-Diff over a padded batch: its batch loss over the real images only (its one stat
    that aggregates images); with ``unmean`` (see _exclude_padding) its batch_mean weights
    ``w_t``, ``v_t`` and the state's ``lam``, ``obs_weight`` as given."""
    from reddiff_jax.solvers.reddiff import RedDiffConfig

    if not statics.batch or not isinstance(statics.config, RedDiffConfig):
        return info, state
    real = statics.batch
    w_t, v_t = info["w_t"], info["v_t"]
    if statics.unmean:
        given = dyn["given"]
        w_t, v_t = w_t * real, jnp.broadcast_to(given["obs_weight"], v_t.shape)
        state = state._replace(lam=given["lam"], obs_weight=given["obs_weight"])
    combine = jnp.mean if statics.unmean else jnp.sum  # batch_mean / image_mean and sum
    noise = combine(info["loss_noise"][:, :real], axis=1)
    obs = combine(info["loss_obs"][:, :real], axis=1)
    return {**info, "w_t": w_t, "v_t": v_t, "loss": w_t * noise + v_t * obs}, state


def _finish_core(statics: _Statics, dyn: dict, carry: _Carry, recs: dict, ts) -> Solution:
    solver = _build(statics, dyn)
    failed = carry.failed_step
    info, state = _real_loss(statics, dyn, recs["info"], carry.state)
    sol = Solution(
        x=solver.output(carry.state),
        state=state,
        info=info,
        ts=jnp.asarray(ts, jnp.int32),
        status=jnp.where(failed < 0, SolveStatus.SUCCESS, carry.reason).astype(jnp.int32),
        failed_step=failed,
        trajectory=recs.get("trajectory"),
    )
    return _unpad(statics, sol)


def _unpad(statics: _Statics, sol: Solution) -> Solution:
    """Drops the padding images: every leaf with the padded batch on axis 0 (x, state, status),
    and axis 1 of the per-step records ([K, B] info, [K, B, ...] trajectory)."""
    size, real = statics.x_shape[0], _real_batch(statics)
    if real == size:
        return sol

    def cut(axis):
        def f(v):
            if hasattr(v, "ndim") and v.ndim > axis and v.shape[axis] == size:
                return jax.lax.slice_in_dim(v, 0, real, axis=axis)
            return v

        return f

    lead = jax.tree_util.tree_map(cut(0), (sol.x, sol.state, sol.status, sol.failed_step))
    per_step = jax.tree_util.tree_map(cut(1), (sol.info, sol.trajectory))
    return sol.replace(x=lead[0], state=lead[1], status=lead[2], failed_step=lead[3],
                       info=per_step[0], trajectory=per_step[1])  # fmt: skip


def _solve_core(statics, dyn, y, hyper, key, noise, ts, ss) -> Solution:
    init_noise, step_noise = (None, None) if noise is None else noise
    carry = _init_core(statics, dyn, y, hyper, key, init_noise)
    ks = jnp.arange(ts.shape[0], dtype=jnp.int32)
    carry, recs = _chunk_core(statics, dyn, key, carry, ks, ts, ss, step_noise)
    return _finish_core(statics, dyn, carry, recs, ts)


_init_jit = jax.jit(_init_core, static_argnums=0)
_chunk_jit = jax.jit(_chunk_core, static_argnums=0)
_finish_jit = jax.jit(_finish_core, static_argnums=0)


# ------------------------------------------------------------------------------------------------
# argument handling


def _check_config(config: Any) -> SolverConfig:
    if not isinstance(config, SolverConfig):
        names = ", ".join(a.config.__name__ for a in registry.ALGORITHMS.values())
        raise TypeError(f"config: expected an algorithm config ({names}), got {config!r:.80}")
    return config


def _check_eps_fn(eps_fn: Any) -> None:
    if not callable(eps_fn):
        raise TypeError(
            f"eps_fn: expected a callable eps_fn(x_t [B,H,W,C], t [B] int32) -> eps [B,H,W,C], "
            f"got {type(eps_fn).__name__}"
        )


def _grid(config: SolverConfig) -> tuple[np.ndarray, np.ndarray]:
    ts = config.timesteps()
    return ts, np.concatenate([ts[1:], [-1]]).astype(np.int32)


def _check_noise(noise: Any, solver, x_shape: tuple, num: int, *, lead: tuple = ()) -> Any:
    """A replayed-noise dict -> (init draws, step draws), float32; None stays None.

    Expected: every name of ``solver.init_draws`` with shape ``[*lead, *x_shape]`` and every
    name of ``solver.step_draws`` with shape ``[*lead, K, *x_shape]``.
    """
    if noise is None:
        return None
    want = {n: (*lead, *x_shape) for n in solver.init_draws}
    want.update({n: (*lead, num, *x_shape) for n in solver.step_draws})
    if not isinstance(noise, Mapping) or set(noise) != set(want):
        got = sorted(noise) if isinstance(noise, Mapping) else type(noise).__name__
        raise ValueError(f"noise: expected a dict with keys {sorted(want)}, got {got}")
    out = {}
    for name, shape in want.items():
        v = noise[name]
        if not hasattr(v, "shape") or tuple(v.shape) != shape:
            got = tuple(v.shape) if hasattr(v, "shape") else type(v).__name__
            raise ValueError(f'noise["{name}"]: expected shape {shape}, got {got}')
        if is_concrete(v) and not bool(np.all(np.isfinite(np.asarray(v)))):
            raise ValueError(f'noise["{name}"]: expected finite values')
        out[name] = jnp.asarray(v, jnp.float32)
    return {n: out[n] for n in solver.init_draws}, {n: out[n] for n in solver.step_draws}


def _progress_chunks(num: int, progress: Any) -> list[tuple[int, int]]:
    if progress is False or progress is None:
        return [(0, num)]
    if progress is True or hasattr(progress, "update"):
        size = max(1, math.ceil(num / 20))
    elif isinstance(progress, int) and progress >= 1:
        size = int(progress)
    else:
        raise ValueError(
            f"progress: expected a bool, a chunk size >= 1 or a bar with update(n), got "
            f"{progress!r}"
        )
    return [(s, min(s + size, num)) for s in range(0, num, size)]


def _prepare(config, eps_fn, op, y, key, noise, alphas_cumprod, max_abs, x_shape):
    """Checks and the static/dynamic split shared by solve and sample."""
    ac = schedule_of(config, alphas_cumprod)
    solver = config.build(eps_fn, op, alphas_cumprod=ac)  # capability errors surface here
    noise = _check_noise(noise, solver, x_shape, config.num_iterations)
    key, per_image = _check_keys(key, x_shape[0], optional=noise is not None)
    eps_static, eps_dyn = split_static(eps_fn)
    op_static, op_dyn = (None, None) if op is None else split_static(op)
    dyn = {"eps": eps_dyn, "op": op_dyn, "alphas": ac, "max_abs": _max_abs(max_abs)}
    return eps_static, op_static, dyn, noise, key, per_image


def _check_keys(key: Any, batch: int, *, optional: bool) -> tuple[Array, bool]:
    """-> (key, per_image): one PRNG key, or ``batch`` keys (typed [B] or raw uint32 [B, 2])."""
    if key is not None and hasattr(key, "shape") and hasattr(key, "dtype"):
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        raw = key.dtype == np.uint32 and key.ndim == 2 and key.shape[-1] == 2
        if (typed and key.ndim == 1) or raw:
            if key.shape[0] != batch:
                raise ValueError(
                    f"key: expected one key, or {batch} keys (one per image of the batch), got "
                    f"{key.shape[0]} keys"
                )
            return (key if isinstance(key, jax.Array) else jnp.asarray(key)), True
    try:
        return check_key(key, optional=optional), False
    except TypeError as err:
        raise TypeError(f"{err}, or {batch} keys (one per image: shape [{batch}])") from None


def _check_y(op: Any, y: Any, *, name: str = "y") -> Array:
    """``check_measurement``, also for a global array spanning processes (checked on device)."""
    if isinstance(y, jax.Array) and is_concrete(y) and not y.is_fully_addressable:
        check_measurement(op, np.broadcast_to(np.zeros((), y.dtype), y.shape), name=name)
        if not bool(_all_finite(y)):
            raise ValueError(f"{name}: expected finite values, got non-finite entries")
        return y if y.dtype == jnp.float32 else _as_f32(y)
    return check_measurement(op, y, name=name)


_all_finite = jax.jit(lambda v: jnp.all(jnp.isfinite(v)))
_as_f32 = jax.jit(lambda v: v.astype(jnp.float32))


def _raw_key(key: Array) -> tuple[Array, str | None]:
    """A key (or keys) as raw uint32 data, which crosses processes, and its PRNG impl."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), str(jax.random.key_impl(key))
    return key, None


def _shard_solve(statics: _Statics, config, mesh, dyn, y, hyper, key, noise):
    """Pads the batch to a multiple of the data axis and places every input on ``mesh``."""
    real = statics.x_shape[0]
    size = sharding_lib.padded_size(real, mesh)
    bat, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
    unmean = False
    if size != real:
        given = hyper
        config, hyper, unmean = _exclude_padding(config, hyper, real)
        if unmean:
            dyn = {**dyn, "given": {n: given[n] for n in ("lam", "obs_weight")}}
    key, impl = _raw_key(key)
    pad = functools.partial(sharding_lib.pad_rows, size=size)
    if statics.per_image_keys:
        key = sharding_lib.put(pad(key), bat)
    else:
        key = sharding_lib.put(key, rep)
    if y is not None:
        y = sharding_lib.put(pad(y), bat)
    if noise is not None:
        init, step = noise
        init = {n: sharding_lib.put(pad(v), bat) for n, v in init.items()}
        step_bat = sharding_lib.batch_sharding(mesh, axis=1)
        step = {n: sharding_lib.put(pad(v, axis=1), step_bat) for n, v in step.items()}
        noise = (init, step)
    put_rep = functools.partial(sharding_lib.put, sharding=rep)
    dyn = jax.tree_util.tree_map(put_rep, dyn)
    hyper = jax.tree_util.tree_map(put_rep, hyper)
    statics = statics._replace(config=config.static(), x_shape=(size, *statics.x_shape[1:]),
                               batch=real if size != real else 0, mesh=mesh, key_impl=impl,
                               unmean=unmean)  # fmt: skip
    return statics, dyn, y, hyper, key, noise


def _exclude_padding(config: SolverConfig, hyper: dict, batch: int):
    """RED-Diff's ``batch_mean`` couples the images through 1/B. Over a padded batch it is solved
    as ``image_mean`` with ``lam`` and ``obs_weight`` divided by the real B (the same gradients;
    the padding images get their own, unused ones); its stats are restored in ``_finish_core``.
    """
    from reddiff_jax.solvers.reddiff import RedDiffConfig

    if getattr(config, "reduction", None) != "batch_mean":
        return config, hyper, False
    if not isinstance(config, RedDiffConfig):
        raise NotImplementedError(
            f"mesh: {type(config).__name__} with reduction='batch_mean' over a padded batch; "
            f"pass a batch that the mesh's data axis divides"
        )
    scaled = {**hyper, "lam": hyper["lam"] / batch, "obs_weight": hyper["obs_weight"] / batch}
    return dataclasses.replace(config, reduction="image_mean"), scaled, True


def _micro_rows(config: SolverConfig, mesh: Any, size: int, micro_batch: int | None) -> int:
    """Images (or measurements) per device per chunk for ``size`` rows over ``mesh``; 0: off.
    None picks by backend and algorithm (``_microbatch.auto_rows``); an int is validated."""
    devices = 1 if mesh is None else sharding_lib.data_size(mesh)
    if micro_batch is None:
        backend = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
        return _microbatch.auto_rows(size, devices, backend, registry.lookup(config).backprop)
    return _microbatch.check_rows(micro_batch, size, devices)


def _with_micro(statics: _Statics, micro_batch: int | None) -> _Statics:
    """Sets how many images per device each network call runs at once (see _microbatch)."""
    rows = _micro_rows(statics.config, statics.mesh, statics.x_shape[0], micro_batch)
    return statics._replace(micro=rows)


def _max_abs(max_abs: float | None) -> Array:
    if max_abs is None:
        return jnp.asarray(jnp.inf, jnp.float32)
    if not isinstance(max_abs, int | float) or not max_abs > 0:
        raise ValueError(f"max_abs: expected a positive float or None, got {max_abs!r}")
    return jnp.asarray(max_abs, jnp.float32)


def _run(statics, dyn, y, hyper, key, noise, progress) -> Solution:
    ts, ss = _grid(statics.config)
    chunks = _progress_chunks(len(ts), progress)
    if len(chunks) == 1 and not progress:
        # init, the one scan of every step, finish: dispatched back to back, no host sync
        carry = _init_jit(statics, dyn, y, hyper, key, None if noise is None else noise[0])
        ks = np.arange(len(ts), dtype=np.int32)
        step_noise = None if noise is None else noise[1]
        carry, recs = _chunk_jit(statics, dyn, key, carry, ks, ts, ss, step_noise)
        return _finish_jit(statics, dyn, carry, recs, ts)
    bar, own = progress, False
    if not hasattr(progress, "update"):
        from tqdm.auto import tqdm

        title = registry.lookup(statics.config).title
        bar, own = tqdm(total=len(ts), desc=title, unit="step"), True
    carry = _init_jit(statics, dyn, y, hyper, key, None if noise is None else noise[0])
    pieces = []
    try:
        for start, stop in chunks:
            nz = None if noise is None else {n: v[start:stop] for n, v in noise[1].items()}
            ks = np.arange(start, stop, dtype=np.int32)
            carry, recs = _chunk_jit(
                statics, dyn, key, carry, ks, ts[start:stop], ss[start:stop], nz
            )
            pieces.append(recs)
            jax.block_until_ready(carry)
            bar.update(stop - start)
    finally:
        if own:
            bar.close()
    recs = jax.tree_util.tree_map(lambda *v: jnp.concatenate(v, axis=0), *pieces)
    return _finish_jit(statics, dyn, carry, recs, ts)


def _host(x: Any) -> np.ndarray:
    """A concrete array as numpy, gathered from every process when it spans several."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _raise_failures(config: SolverConfig, status: Any, failed: Any, what: str) -> None:
    status, failed = _host(status).reshape(-1), _host(failed).reshape(-1)
    bad = np.flatnonzero(status != SolveStatus.SUCCESS)
    if not bad.size:
        return
    algo = registry.lookup(config)
    i = int(bad[0])
    ts = config.timesteps()
    step = int(failed[i])
    raise SolveError(
        f"{algo.title}: {what} {i} ({bad.size} of {status.size} failed: {bad.tolist()[:20]}): "
        f"{SolveStatus(int(status[i])).message} at step {step} (t = {int(ts[step])}); "
        f"{algo.advice}, or check the measurement y and the eps_fn. Pass throw=False to get "
        f"the result with its per-image status instead."
    )


def _check_solution(config: SolverConfig, sol: Solution, what: str) -> None:
    if is_concrete(sol.status):
        _raise_failures(config, sol.status, sol.failed_step, what)
        return

    def callback(status, failed):
        _raise_failures(config, status, failed, what)

    jax.debug.callback(callback, sol.status, sol.failed_step)


# ------------------------------------------------------------------------------------------------
# public entry points


def solve(
    config: SolverConfig,
    eps_fn: Callable[[Array, Array], Array],
    op: Any,
    y: Array,
    key: Array | None,
    *,
    noise: Mapping[str, Array] | None = None,
    alphas_cumprod: Array | None = None,
    trajectory: bool = False,
    progress: Any = False,
    throw: bool = True,
    max_abs: float | None = MAX_ABS,
    remat: bool = False,
    mesh: Any = None,
    micro_batch: int | None = None,
) -> Solution:
    """Solves the inverse problem ``y = A(x) + noise`` for a batch with the algorithm ``config``.

    Main arguments:
      config: an algorithm config (:class:`RedDiffConfig`, :class:`DPSConfig`, ...).
      eps_fn: ``eps_fn(x_t [B, H, W, C], t [B] int32) -> eps [B, H, W, C]`` (e.g.
        ``model.eps``). A bound method or ``functools.partial`` of pytrees keeps its arrays as
        traced arguments (never baked into the program as constants).
      op: operator on one image [H, W, C] (``op.A``; ``A_dagger`` / ``svd`` as the algorithm
        needs), shared by the batch.
      y: measurements [B, *y_shape] float32 (``y_shape`` = shape of ``op.A`` of one image).
      key: PRNG key of every random draw (one for the batch); or B keys, one per image (typed
        [B], or raw uint32 [B, 2]): image i's draws come from ``key[i]`` alone, as in a batch of
        one, so with a reduction that couples no images (RED-Diff ``image_mean``; every
        baseline) image i's result does not depend on its batch. None only when ``noise``
        replays every draw.

    Other arguments:
      noise: replays the draws: a dict with the algorithm's init draws [B, H, W, C] (samplers:
        ``"init"``) and step draws [K, B, H, W, C] (samplers: ``"z"``; RED-Diff: ``"xt"``, and
        ``"x0"`` when ``sigma_x0 > 0``).
      alphas_cumprod: ᾱ [T] (default: the config's schedule).
      trajectory: also return the iterate and x̂0 after every step (memory K x the batch).
      progress: True (or a chunk size in steps, or a tqdm-like bar with ``update(n)``) runs the
        scan in chunks and reports after each; the result is identical to ``progress=False``.
      throw: raise :class:`SolveError` naming the images and step when an image becomes
        non-finite or leaves ``|x| <= max_abs``; False returns them in ``status`` instead (use
        False under an outer ``jit``/``vmap``).
      max_abs: the divergence bound (None: only non-finite values fail).
      remat: ``jax.checkpoint`` every step, so differentiating through the whole solve (e.g.
        ``jax.grad`` of a loss w.r.t. a traced ``lam``) stores one state per step instead of
        the network's activations; the result is unchanged.
      mesh: a :class:`jax.sharding.Mesh` with a ``"data"`` axis: the batch is sharded over it
        (padded to a multiple of its size; the padding is dropped from the result and never
        enters RED-Diff's ``batch_mean``), everything else is replicated. ``y`` may be a
        global array spanning processes (``reddiff_jax.sharding.global_batch``).
      micro_batch: images per device per network call: the batch's ``eps_fn`` calls run as a
        ``lax.map`` over strided chunks (it must act per image, as the ADM UNet does). None
        (default): 4 on a CPU mesh of two or more devices when every device holds 8 or more
        images in multiples of 4 (faster there: activations stay in cache); for DPS and ΠGDM,
        else 2 when every device holds 4 or more in multiples of 2; else off (one CPU device
        ran the whole batch faster); 0: off; an int:
        that many (a divisor of each device's share of the padded batch). DPS and ΠGDM take
        each chunk's VJP inside the map, which bounds their memory to one chunk's activations.
        Results are unchanged up to float rounding.

    Returns:
      A :class:`Solution`; ``solution.x`` [B, H, W, C] is the restored batch.
    """
    config = _check_config(config)
    _check_eps_fn(eps_fn)
    mesh = None if mesh is None else sharding_lib.check_mesh(mesh)
    y = _check_y(op, y)
    x_shape = (y.shape[0], *image_shape_of(op))
    eps_s, op_s, dyn, noise, key, per_image = _prepare(
        config, eps_fn, op, y, key, noise, alphas_cumprod, max_abs, x_shape
    )
    statics = _Statics(config.static(), eps_s, op_s, x_shape, bool(trajectory), bool(remat),
                       per_image_keys=per_image)  # fmt: skip
    hyper = config.hyperparams()
    if mesh is not None:
        statics, dyn, y, hyper, key, noise = _shard_solve(
            statics, config, mesh, dyn, y, hyper, key, noise
        )
    statics = _with_micro(statics, micro_batch)
    sol = _run(statics, dyn, y, hyper, key, noise, progress)
    if throw:
        _check_solution(config, sol, "image")
    return sol


def sample(
    config: SolverConfig,
    eps_fn: Callable[[Array, Array], Array],
    shape: tuple[int, int, int, int],
    key: Array | None,
    *,
    noise: Mapping[str, Array] | None = None,
    alphas_cumprod: Array | None = None,
    trajectory: bool = False,
    progress: Any = False,
    throw: bool = True,
    max_abs: float | None = MAX_ABS,
    mesh: Any = None,
    micro_batch: int | None = None,
) -> Solution:
    """Draws ``B`` images from the prior with an unconditional algorithm (:class:`DDIMConfig`).

    ``shape`` is (B, H, W, C); the other arguments (``key``: one, or B keys; ``micro_batch``)
    are those of :func:`solve`.
    """
    config = _check_config(config)
    if registry.lookup(config).conditional:
        raise TypeError(f"config: {type(config).__name__} needs a measurement; use solve()")
    _check_eps_fn(eps_fn)
    shape = tuple(shape)
    if len(shape) != 4 or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
        raise ValueError(f"shape: expected (B, H, W, C) positive ints, got {shape!r}")
    x_shape = tuple(int(s) for s in shape)
    mesh = None if mesh is None else sharding_lib.check_mesh(mesh)
    eps_s, _, dyn, noise, key, per_image = _prepare(
        config, eps_fn, None, None, key, noise, alphas_cumprod, max_abs, x_shape
    )
    statics = _Statics(config.static(), eps_s, None, x_shape, bool(trajectory),
                       per_image_keys=per_image)  # fmt: skip
    hyper = config.hyperparams()
    if mesh is not None:
        statics, dyn, _, hyper, key, noise = _shard_solve(
            statics, config, mesh, dyn, None, hyper, key, noise
        )
    statics = _with_micro(statics, micro_batch)
    sol = _run(statics, dyn, None, hyper, key, noise, progress)
    if throw:
        _check_solution(config, sol, "sample")
    return sol


def _per_measurement(hyper: Mapping[str, Any] | None, config: SolverConfig, num: int):
    """-> (hyper dict, vmap axes dict): config values, overridden by scalars or [M] arrays."""
    values = config.hyperparams()
    axes = {n: None for n in values}
    for name, v in (hyper or {}).items():
        if name not in values:
            raise ValueError(
                f"hyper: {type(config).__name__} has no hyper-parameter {name!r}; "
                f"expected one of {sorted(values)}"
            )
        arr, base = jnp.asarray(v, jnp.float32), values[name].shape
        if arr.shape == base:
            values[name] = arr
        elif arr.shape == (num, *base):
            values[name], axes[name] = arr, 0
        else:
            raise ValueError(
                f"hyper[{name!r}]: expected shape {base} (shared) or {(num, *base)} (one per "
                f"measurement), got {arr.shape}"
            )
    return values, axes


def _many_core(statics, op_axis, dyn, ys, keys, hyper, hyper_axes, noise, ts, ss, real, micro):
    def one(op_dyn, y, key, h, nz):
        if nz is not None:  # one measurement's draws -> a batch of one
            nz = (
                {n: v[None] for n, v in nz[0].items()},
                {n: v[:, None] for n, v in nz[1].items()},
            )
        sol = _solve_core(statics, {**dyn, "op": op_dyn}, y[None], h, key, nz, ts, ss)
        info = {n: v[:, 0] if v.ndim == 2 else v for n, v in sol.info.items()}
        traj = sol.trajectory
        traj = None if traj is None else {n: v[:, 0] for n, v in traj.items()}
        return sol.replace(
            x=sol.x[0],
            info=info,
            status=sol.status[0],
            failed_step=sol.failed_step[0],
            trajectory=traj,
        )

    noise_axis = None if noise is None else 0
    axes = (op_axis, 0, 0, dict(hyper_axes), noise_axis)
    solve_all = jax.vmap(one, in_axes=axes)
    if not micro:
        sol = solve_all(dyn["op"], ys, keys, hyper, noise)
    else:  # whole solves of rows * devices measurements at a time (see _microbatch)
        per_m = {n for n, axis in hyper_axes if axis == 0}
        mapped = {"ys": ys, "keys": keys, "noise": noise,
                  "op": dyn["op"] if op_axis == 0 else None,
                  "hyper": {n: v for n, v in hyper.items() if n in per_m}}  # fmt: skip
        leaves, tree = jax.tree_util.tree_flatten(mapped)

        def chunk(_, *chunk_leaves):
            m = jax.tree_util.tree_unflatten(tree, chunk_leaves)
            op = dyn["op"] if op_axis is None else m["op"]
            return solve_all(op, m["ys"], m["keys"], {**hyper, **m["hyper"]}, m["noise"])

        sol = _microbatch.Microbatched(None, *micro).map(chunk, *leaves)
    if real and real < ys.shape[0]:  # drop the padding measurements (every leaf leads with M)
        sol = jax.tree_util.tree_map(lambda v: v[:real], sol)
    return sol


_many_jit = jax.jit(_many_core, static_argnums=(0, 1, 6, 10, 11))


def _shard_many(mesh, op_axis, dyn, ys, keys, hyper, hyper_axes, noise):
    """Pads the M axis to a multiple of the data axis and places the inputs on ``mesh``: ys,
    keys, stacked operators, [M] hyper-parameters and noise sharded over it; the rest
    replicated."""
    size = sharding_lib.padded_size(ys.shape[0], mesh)
    bat, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)

    def shard(v):
        return sharding_lib.put(sharding_lib.pad_rows(v, size), bat)

    def put_rep(v):
        return sharding_lib.put(v, rep)

    keys, impl = _raw_key(keys)
    dyn = {n: jax.tree_util.tree_map(shard if n == "op" and op_axis == 0 else put_rep, v)
           for n, v in dyn.items()}  # fmt: skip
    hyper = {n: shard(v) if hyper_axes[n] == 0 else put_rep(v) for n, v in hyper.items()}
    noise = None if noise is None else jax.tree_util.tree_map(shard, noise)
    return dyn, shard(ys), shard(keys), hyper, noise, impl


def _split_keys(keys: Any, num: int, optional: bool) -> Array:
    if keys is None:
        check_key(None, optional=optional, name="keys")
        return jax.random.split(jax.random.key(0), num)  # unused: every draw is replayed
    if not hasattr(keys, "dtype"):
        raise TypeError(f"keys: expected jax PRNG keys, got {keys!r:.80}")
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if keys.ndim == (0 if typed else 1):
        return jax.random.split(check_key(keys, name="keys"), num)
    if keys.shape[0] != num:
        raise ValueError(f"keys: expected {num} keys (one per measurement), got {keys.shape}")
    return keys


def solve_many(
    config: SolverConfig,
    eps_fn: Callable[[Array, Array], Array],
    ops: Any,
    ys: Array,
    keys: Array | None,
    *,
    hyper: Mapping[str, Any] | None = None,
    op_axis: int | None = 0,
    noise: Mapping[str, Array] | None = None,
    alphas_cumprod: Array | None = None,
    trajectory: bool = False,
    throw: bool = True,
    max_abs: float | None = MAX_ABS,
    remat: bool = False,
    mesh: Any = None,
    micro_batch: int | None = None,
) -> Solution:
    """Many independent measurements in one compiled call (``vmap`` of :func:`solve`).

    Measurement m is solved as ``solve(config_m, eps_fn, op_m, ys[m][None], keys[m])``: a batch
    of one, so no reduction couples two measurements.

    Args:
      config, eps_fn, alphas_cumprod, trajectory, throw, max_abs, remat: as in :func:`solve`.
      ops: one operator shared by all (``op_axis=None``) or operators stacked along a leading
        axis of every array leaf (``op_axis=0``), so each measurement may have its own mask.
      ys: measurements [M, *y_shape].
      keys: M keys, or one key split into M; None only with ``noise``.
      hyper: hyper-parameter name -> a scalar or an [M] array (a sweep: ``{"lam": lams}``);
        the others keep the config's values. Never recompiles for new values.
      noise: replayed draws per measurement: init draws [M, H, W, C], step draws
        [M, K, H, W, C].
      mesh: a :class:`jax.sharding.Mesh` with a ``"data"`` axis: the M axis (ys, keys, stacked
        operators, [M] hyper-parameters, noise) is sharded over it, padded to a multiple of
        its size (the padding is dropped from the result); the rest is replicated.
      micro_batch: measurements per device solved at once: the M solves run as a ``lax.map``
        over chunks of ``micro_batch`` per device (the same result up to float rounding, less
        memory, faster on a multi-device CPU mesh); None: chosen as in :func:`solve` (4 on a
        CPU mesh of two or more devices when each holds at least 8 measurements that 4
        divides, 2 for DPS and ΠGDM at 4 or 6, else off); 0: off.

    Returns:
      A :class:`Solution` with a leading [M] axis and no batch axis: ``x`` [M, H, W, C],
      ``info`` entries [M, K], ``status``/``failed_step`` [M]; ``state`` keeps a batch of one.
    """
    config = _check_config(config)
    _check_eps_fn(eps_fn)
    mesh = None if mesh is None else sharding_lib.check_mesh(mesh)
    if op_axis not in (0, None):
        raise ValueError(f"op_axis: expected 0 (stacked operators) or None (shared), got {op_axis}")
    one_op = ops if op_axis is None else jax.tree_util.tree_map(lambda v: v[0], ops)
    ys = _check_y(one_op, ys, name="ys")
    num = ys.shape[0]
    if op_axis == 0:
        sizes = {int(v.shape[0]) if v.ndim else 0 for v in jax.tree_util.tree_leaves(ops)
                 if hasattr(v, "shape")}  # fmt: skip
        if sizes and sizes != {num}:
            raise ValueError(
                f"ops: expected a leading axis of size M = {num} (that of ys) on every array "
                f"leaf with op_axis=0, got sizes {sorted(sizes)}"
            )
    image_shape = image_shape_of(one_op)
    values, axes = _per_measurement(hyper, config, num)
    config = config.admitting(values)  # e.g. RED-Diff's jitter draw for a sigma_x0 sweep
    ac = schedule_of(config, alphas_cumprod)
    solver = config.build(eps_fn, one_op, alphas_cumprod=ac)
    noise = _check_noise(noise, solver, image_shape, config.num_iterations, lead=(num,))
    keys = _split_keys(keys, num, optional=noise is not None)
    eps_static, eps_dyn = split_static(eps_fn)
    op_static = split_static(one_op)[0]
    op_dyn = split_static(ops)[1]
    dyn = {"eps": eps_dyn, "op": op_dyn, "alphas": ac, "max_abs": _max_abs(max_abs)}
    impl = None
    if mesh is not None:
        dyn, ys, keys, values, noise, impl = _shard_many(
            mesh, op_axis, dyn, ys, keys, values, axes, noise
        )
    statics = _Statics(config.static(), eps_static, op_static, (1, *image_shape),
                       bool(trajectory), bool(remat), key_impl=impl)  # fmt: skip
    ts, ss = _grid(config)
    axes_key = tuple(sorted(axes.items()))
    real = num if ys.shape[0] != num else 0
    rows = _micro_rows(config, mesh, ys.shape[0], micro_batch)  # chunks as in Microbatched
    micro = (rows, 1 if mesh is None else sharding_lib.data_size(mesh), mesh) if rows else ()
    sol = _many_jit(statics, op_axis, dyn, ys, keys, values, axes_key, noise, ts, ss, real, micro)
    if throw:
        _check_solution(config, sol, "measurement")
    return sol
