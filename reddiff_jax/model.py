"""A score network with its weights (`ScoreModel`) and its on-disk checkpoint format.

A checkpoint is a directory:

  <path>/reddiff_model.json   format tag, the `UNetConfig` (`to_dict`) and free-form metadata
                              (for converted checkpoints: source file name, its sha256, the
                              converter version)
  <path>/params/              the Flax `params` tree, written by orbax (`StandardCheckpointer`)

`load_pretrained` restores the params against `jax.eval_shape` of `UNet(config).init`, so the
structure and every shape are checked before any array is read.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import struct

from reddiff_jax import assets
from reddiff_jax.unet import UNet, UNetConfig

__all__ = [
    "ScoreModel",
    "init_params",
    "load_pretrained",
    "param_shapes",
    "read_metadata",
    "resolve_model",
    "save_pretrained",
]

FORMAT = "reddiff-jax/score-model"
FORMAT_VERSION = 1
_CONFIG_FILE = "reddiff_model.json"
_PARAMS_DIR = "params"


@functools.lru_cache(maxsize=32)
def _unet(config: UNetConfig) -> UNet:
    return UNet(config)


def _init(config: UNetConfig, key: jax.Array) -> Any:
    s = config.image_size
    x = jnp.zeros((1, s, s, config.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32) if config.class_cond else None
    return _unet(config).init(key, x, t, y)["params"]


_init_jit = jax.jit(_init, static_argnums=0)
# XLA CPU spends most of an init's compile optimising its ~90 threefry kernels (28 s at the
# default level vs 11 s at level 0 for the `tiny` preset); the program runs once, so on a CPU it
# is compiled unoptimised. Its values differ from the optimised program's in ~1% of the weights,
# by at most 6e-8; the same key still gives the same params.
_init_jit_cpu = jax.jit(
    _init, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0}
)


def init_params(key: jax.Array, config: UNetConfig) -> dict[str, Any]:
    """Fresh (random) params of `UNet(config)` from `key`: the one place a UNet is initialised
    (training, tests and benchmarks); jitted once per config."""
    init = _init_jit_cpu if jax.default_backend() == "cpu" else _init_jit
    return init(config, key)


@functools.lru_cache(maxsize=32)
def _param_shapes(config: UNetConfig) -> Any:
    return jax.eval_shape(functools.partial(_init, config), jax.random.key(0))


def param_shapes(config: UNetConfig) -> dict[str, Any]:
    """The params tree of `UNet(config)` as `jax.ShapeDtypeStruct` leaves (nothing allocated)."""
    return jax.tree.map(lambda a: a, _param_shapes(config))  # fresh containers per call


@struct.dataclass
class ScoreModel:
    """An ADM UNet with its weights; a pytree (params are leaves, config is static).

    `jax.jit(ScoreModel.apply)(model, x, t)` keeps the params as arguments (rather than
    constants baked into the compiled program, as `jax.jit(model.apply)` would).
    """

    config: UNetConfig = struct.field(pytree_node=False)
    params: Any

    def apply(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """Raw network output.

        Args:
          x: [N, H, W, in_channels] float images (NHWC).
          t: [N] int or float timesteps (raw, 0..T-1).
          y: [N] int labels for class-conditional models, else None.

        Returns:
          [N, H, W, out_channels], float32 (float64 for a ``dtype="float64"`` config): eps in
          the first `in_channels` channels, then the variance interpolation values when
          `config.learn_sigma`.
        """
        self._check_input(x)
        return _unet(self.config).apply({"params": self.params}, x, t, y)

    def _check_input(self, x: Any) -> None:
        """ValueError unless ``x`` is [N, image_size, image_size, in_channels] (static shapes,
        so under ``jit`` this fails at trace time, before anything runs)."""
        s, c = self.config.image_size, self.config.in_channels
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 4 or shape[1:] != (s, s, c):
            raise ValueError(
                f"x: this model expects images [N, {s}, {s}, {c}] (NHWC, its image_size "
                f"{s} and in_channels {c}), got shape {shape}; an operator or sampler built for "
                "another image size or channel count does not fit this model"
            )

    def eps(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """Noise prediction [N, H, W, in_channels] (the first channels of `apply`, its dtype)."""
        return self.apply(x, t, y)[..., : self.config.in_channels]


def _check_dir_for_replacement(path: Path) -> None:
    if path.is_dir() and any(path.iterdir()) and not (path / _CONFIG_FILE).is_file():
        raise FileExistsError(
            f"path: {path} exists and is not a reddiff-jax checkpoint; refusing to replace it "
            "even with force=True (remove it yourself or choose another path)"
        )
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"path: {path} exists and is not a directory")


def save_pretrained(
    model: ScoreModel,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Writes `model` (config, metadata and params) as a checkpoint directory.

    The directory is written under a temporary name beside `path` and renamed into place, so
    an interrupted save leaves any existing checkpoint intact.

    Args:
      model: the model to save.
      path: the checkpoint directory to create.
      metadata: JSON-serialisable information recorded with the config.
      force: replace an existing checkpoint at `path` (never a non-checkpoint directory).

    Returns:
      The absolute path written.

    Raises:
      FileExistsError: `path` exists and `force` is False (or it is not a checkpoint).
    """
    if not isinstance(model, ScoreModel):
        raise TypeError(f"model: expected a ScoreModel, got {type(model).__name__}")
    path = Path(path).absolute()
    if path.exists():
        if not force:
            raise FileExistsError(f"path: {path} already exists; pass force=True to replace it")
        _check_dir_for_replacement(path)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "metadata": dict(metadata or {}),
    }
    text = json.dumps(record, indent=2, sort_keys=True)  # fails early if not serialisable
    params = jax.tree.map(np.asarray, model.params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / _PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        (tmp / _CONFIG_FILE).write_text(text + "\n")
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _read_record(path: Path, file_name: str, fmt: str, version: int, kind: str) -> dict[str, Any]:
    """The JSON record ``path / file_name`` of a checkpoint directory of format ``fmt``.

    ``kind`` names the checkpoint in the messages ("" for a score model, "classifier ").
    """
    if not path.is_dir():
        raise FileNotFoundError(f"path: no {kind}checkpoint directory at {path}")
    record_file = path / file_name
    if not record_file.is_file():
        what = kind or "reddiff-jax "
        raise ValueError(f"path: {path} is not a {what}checkpoint (no {file_name})")
    try:
        record = json.loads(record_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"path: corrupt {kind}checkpoint, {record_file} is not valid JSON: {err}"
        ) from None
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise ValueError(f"path: {record_file} is not a {fmt} record")
    if record.get("format_version") != version:
        raise ValueError(
            f"path: {kind}checkpoint format version {record.get('format_version')!r} is not "
            f"supported (this reddiff-jax reads version {version})"
        )
    return record


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint's record: {"format", "format_version", "config", "metadata"}.

    Raises:
      FileNotFoundError: no checkpoint directory at `path`.
      ValueError: the directory is not a readable reddiff-jax checkpoint.
    """
    return _read_record(Path(path), _CONFIG_FILE, FORMAT, FORMAT_VERSION, "")


def _leaf_paths(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in flat}


def _resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """An existing path wins, then an embedded prior's name; anything else is a clear error."""
    path = Path(path_or_name)
    if path.exists():
        return path.absolute()
    if isinstance(path_or_name, str) and path_or_name in assets.EMBEDDED:
        return assets.embedded_model_path(path_or_name)
    raise FileNotFoundError(
        f"path: no checkpoint directory at {path}, and {str(path_or_name)!r} is not the name "
        f"of an embedded prior (embedded: {', '.join(assets.EMBEDDED)})"
    )


class _QuietClosedLoop:
    """A ``sys.unraisablehook`` that drops one known, harmless message and passes on the rest.

    When orbax's restore fails part-way (a truncated data file), its ``asyncio.gather`` raises
    and orbax closes its private event loop while other tensorstore reads are still in flight;
    each of those later calls ``loop.call_soon_threadsafe`` from a tensorstore thread and its
    ``RuntimeError: Event loop is closed`` reaches the unraisable hook, one traceback per read,
    printed after (or in the middle of) the real error. Nothing is lost by dropping them: the
    reads belong to a restore that already failed and was reported.
    """

    def __init__(self, previous: Any):
        self.previous = previous

    @staticmethod
    def is_noise(unraisable: Any) -> bool:
        if unraisable.exc_type is not RuntimeError:
            return False
        if str(unraisable.exc_value) != "Event loop is closed":
            return False
        tb, names = unraisable.exc_traceback, set()
        while tb is not None:
            names.add(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        return "call_soon_threadsafe" in names

    def __call__(self, unraisable: Any) -> None:
        if not self.is_noise(unraisable):
            self.previous(unraisable)


def _quiet_closed_loop() -> _QuietClosedLoop | None:
    """Installs `_QuietClosedLoop` (unless it is already) and returns what it installed.

    Called before the orbax reads; `_unquiet` removes it after a fully successful load. After a
    failure it stays: the late callbacks may arrive any time after, even after orbax reported
    success with missing metadata."""
    if isinstance(sys.unraisablehook, _QuietClosedLoop):
        return None
    hook = _QuietClosedLoop(sys.unraisablehook)
    sys.unraisablehook = hook
    return hook


def _unquiet(hook: _QuietClosedLoop | None) -> None:
    if hook is not None and sys.unraisablehook is hook:
        sys.unraisablehook = hook.previous


def load_pretrained(path_or_name: str | os.PathLike) -> ScoreModel:
    """Loads a checkpoint written by `save_pretrained` (or `reddiff-jax convert`).

    Args:
      path_or_name: a checkpoint directory, or the name of an embedded prior
        (`reddiff_jax.assets.EMBEDDED`, e.g. ``"mnist32"``). An existing path wins over a name.

    Returns:
      A `ScoreModel` whose params are float32 jax arrays on the default device.

    Raises:
      FileNotFoundError: no checkpoint directory at the path, and not an embedded name (the
        message lists the embedded names).
      ValueError: a corrupt checkpoint, or params whose structure or shapes differ from what
        the recorded config implies (the message lists them).
    """
    path = _resolve_checkpoint(path_or_name)
    record = read_metadata(path)
    try:
        config = UNetConfig.from_dict(record["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"path: corrupt checkpoint, bad config in {path / _CONFIG_FILE}: {err}"
        ) from err
    target = param_shapes(config)
    params_dir = path / _PARAMS_DIR
    if not params_dir.is_dir():
        raise ValueError(f"path: corrupt checkpoint, {params_dir} is missing")
    quiet = _quiet_closed_loop()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            item = checkpointer.metadata(params_dir).item_metadata
    except Exception as err:  # orbax/tensorstore raise many types for unreadable data
        raise ValueError(
            f"path: corrupt checkpoint, cannot read {params_dir}: {type(err).__name__}: {err}"
        ) from None
    if item is None or getattr(item, "tree", None) is None:
        raise ValueError(
            f"path: corrupt checkpoint, the params metadata in {params_dir} (_METADATA) is "
            "missing or unreadable"
        )
    stored = item.tree
    expected, found = _leaf_paths(target), _leaf_paths(stored)
    diffs = sorted(f"{k}: missing from the checkpoint" for k in expected.keys() - found)
    diffs += sorted(f"{k}: not a parameter of this config" for k in found.keys() - expected)
    diffs += sorted(
        f"{k}: stored {found[k]}, expected {expected[k]}"
        for k in expected.keys() & found.keys()
        if found[k] != expected[k]
    )
    if diffs:
        raise ValueError(
            f"path: params in {params_dir} do not match the recorded config:\n  "
            + "\n  ".join(diffs[:25])
        )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_dir, target)
    except Exception as err:  # e.g. a truncated data file: OUT_OF_RANGE from tensorstore
        raise ValueError(
            f"path: corrupt checkpoint {path}, cannot read its params from {params_dir}: "
            f"{type(err).__name__}: {err}"
        ) from None
    _unquiet(quiet)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.float32), params)
    return ScoreModel(config=config, params=params)


def resolve_model(model: ScoreModel | str | os.PathLike | None) -> tuple[ScoreModel, str]:
    """``(model, name)`` for a ``ScoreModel``, a checkpoint path or embedded name, or None (the
    default embedded prior); ``name`` is the resolved path (``"<in-memory model>"`` for a
    ``ScoreModel``), as the jobs record it."""
    from reddiff_jax.assets import default_model_path

    if model is None or isinstance(model, str | os.PathLike):
        path = model if model is not None else default_model_path()
        loaded = load_pretrained(path)
        return loaded, str(Path(path).resolve()) if Path(path).exists() else str(path)
    if not isinstance(model, ScoreModel):
        raise TypeError(f"model: expected a ScoreModel, a path or None, got {type(model)}")
    return model, "<in-memory model>"
