"""A small CNN digit classifier (32x32 grayscale, 10 classes) and its on-disk checkpoint.

It scores restorations and samples (:mod:`reddiff_jax.sample_quality`): its penultimate
activations are the features of the Fréchet distance and KID, and its labels tell whether a
restored digit is still the digit it was. One is trained on the prior's 9,000 training digits and
ships in ``checkpoints/mnist32_classifier/`` (:func:`load_embedded_classifier`).

Inputs are NHWC float [N, 32, 32, 1] in [-1, 1] (``data.to_float`` of uint8 digits; the background
is -1). The network, one stage per entry of ``ClassifierConfig.channels``::

    stage c: conv3x3(c) - relu - conv3x3(c) - relu - maxpool 2x2     (32 -> 16 -> 8 -> 4 pixels)
    flatten - dense(hidden) - relu  = features [N, hidden]
    dropout (training only) - dense(num_classes) = logits [N, num_classes]

All functions are pure: ``params`` is the Flax params tree (no state besides it), and anything
random takes a ``jax.random`` key.

A checkpoint is a directory: ``reddiff_classifier.json`` (format tag, the config, free-form
``info``) and ``params/`` (orbax), restored against ``jax.eval_shape`` of ``init``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from reddiff_jax import assets
from reddiff_jax.data import to_float
from reddiff_jax.model import _leaf_paths, _quiet_closed_loop, _unquiet
from reddiff_jax.model import _read_record as _read_json_record

__all__ = [
    "Classifier",
    "ClassifierConfig",
    "embed_digits",
    "features",
    "init",
    "load_classifier",
    "load_embedded_classifier",
    "logits",
    "param_count",
    "predict_proba",
    "save_classifier",
    "train_classifier",
]

FORMAT = "reddiff-jax/classifier"
FORMAT_VERSION = 1
_META_FILE = "reddiff_classifier.json"
_PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Architecture and training settings of the digit classifier (hashable: a jit static)."""

    image_size: int = 32  # H = W of the inputs; a multiple of 2 ** len(channels)
    channels: tuple[int, ...] = (16, 32, 32)  # width of each conv stage (two convs, one pool)
    hidden: int = 128  # width of the penultimate layer: the feature dimension D
    num_classes: int = 10
    dropout: float = 0.25  # on the features, training only
    # training (train_classifier)
    epochs: int = 10
    batch_size: int = 32  # the last partial minibatch of an epoch is dropped
    learning_rate: float = 2e-3  # Adam, cosine decay to 0 over all steps
    # augmentation (uniform, per image): shift in px per axis, rotation in degrees, scale - 1
    max_shift: float = 2.0
    max_rotation: float = 10.0
    max_scale: float = 0.1

    def __post_init__(self):
        if not self.channels or self.image_size % 2 ** len(self.channels):
            raise ValueError(
                f"channels: {len(self.channels)} stages need image_size divisible by "
                f"{2 ** len(self.channels)}, got image_size {self.image_size}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {self.dropout}")
        for name in ("hidden", "num_classes", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); `from_dict` inverts it."""
        d = dataclasses.asdict(self)
        return {**d, "channels": list(d["channels"])}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
        """The config of a `to_dict` record; unknown keys are a TypeError."""
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


class Classifier(NamedTuple):
    """A classifier's params with its config and the ``info`` recorded beside them."""

    params: Any
    config: ClassifierConfig
    info: dict[str, Any]


class _CNN(nn.Module):
    config: ClassifierConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME")
        for s, c in enumerate(self.config.channels):
            x = nn.relu(conv(c, name=f"conv{s}_0")(x))
            x = nn.relu(conv(c, name=f"conv{s}_1")(x))
            n, h, w, _ = x.shape  # 2x2 max pool as a reshape: XLA:CPU's max_pool gradient
            x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))  # is much slower
        feats = nn.relu(nn.Dense(self.config.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
        h = nn.Dropout(self.config.dropout, deterministic=not train)(feats)
        return feats, nn.Dense(self.config.num_classes, name="head")(h)


def _dummy(config: ClassifierConfig) -> jax.Array:
    return jnp.zeros((1, config.image_size, config.image_size, 1), jnp.float32)


def _param_shapes(config: ClassifierConfig) -> Any:
    """The params tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (nothing is run)."""
    return jax.eval_shape(
        lambda k: _CNN(config).init(k, _dummy(config), train=False)["params"], jax.random.key(0)
    )


@functools.partial(jax.jit, static_argnums=1)
def _init(key: jax.Array, config: ClassifierConfig) -> Any:
    # One normal draw for all kernels instead of flax's per-layer initialisers: the same
    # distribution up to the truncation, and a program XLA:CPU compiles ~10x faster.
    leaves, tree = jax.tree.flatten(_param_shapes(config))
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    z = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        fan_in = math.prod(leaf.shape[:-1])  # kernels [kh, kw, in, out] or [in, out]
        block = z[start : start + size].reshape(leaf.shape) / math.sqrt(fan_in)
        out.append(block if leaf.ndim > 1 else jnp.zeros(leaf.shape, jnp.float32))
        start += size
    return jax.tree.unflatten(tree, out)


def init(key: jax.Array, config: ClassifierConfig) -> dict[str, Any]:
    """Fresh (random) params of the classifier described by ``config``: LeCun-normal kernels
    (std ``1 / sqrt(fan_in)``) and zero biases."""
    return _init(key, config)


def param_count(params: Any) -> int:
    """The number of scalars in a params tree."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def _check_x(x: Any, config: ClassifierConfig) -> jax.Array:
    s = config.image_size
    shape, dtype = tuple(getattr(x, "shape", ())), getattr(x, "dtype", None)
    if len(shape) != 4 or shape[1:] != (s, s, 1):
        raise ValueError(f"x: expected digits [N, {s}, {s}, 1] (NHWC), got shape {shape}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"x: expected float images in [-1, 1], got dtype {dtype} (map uint8 digits with "
            "reddiff_jax.data.to_float)"
        )
    return jnp.asarray(x, jnp.float32)


@functools.partial(jax.jit, static_argnums=2)
def _forward(params: Any, x: jax.Array, config: ClassifierConfig) -> tuple[jax.Array, jax.Array]:
    return _CNN(config).apply({"params": params}, x, train=False)


def logits(
    params: Any, x: jax.Array, *, config: ClassifierConfig = ClassifierConfig()
) -> jax.Array:
    """Class logits [N, num_classes] float32 of digits ``x`` [N, H, W, 1] float in [-1, 1]."""
    return _forward(params, _check_x(x, config), config)[1]


def features(
    params: Any, x: jax.Array, *, config: ClassifierConfig = ClassifierConfig()
) -> jax.Array:
    """Penultimate activations [N, hidden] float32 (after the ReLU, >= 0) of ``x`` [N, H, W, 1]
    float in [-1, 1]: the feature space of the Fréchet distance and KID."""
    return _forward(params, _check_x(x, config), config)[0]


def predict_proba(
    params: Any, x: jax.Array, *, config: ClassifierConfig = ClassifierConfig()
) -> jax.Array:
    """Class probabilities [N, num_classes] float32 (softmax of `logits`; rows sum to 1)."""
    return jax.nn.softmax(logits(params, x, config=config), axis=-1)


def _check_u8(images_u8: Any, config: ClassifierConfig) -> np.ndarray:
    images_u8 = np.asarray(images_u8)
    s = config.image_size
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1:] != (s, s, 1):
        raise ValueError(
            f"images_u8: expected uint8 digits [N, {s}, {s}, 1], got {images_u8.dtype} "
            f"{images_u8.shape}"
        )
    return images_u8


def embed_digits(
    classifier: Classifier, images_u8: np.ndarray, *, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Features and class probabilities of uint8 digits, one forward pass in fixed-size batches
    (the last one padded, so sets of every size share one compiled program).

    Args:
      classifier: e.g. `load_embedded_classifier()`.
      images_u8: uint8 digits [N, H, W, 1] in [0, 255] (the files' range).
      batch_size: images per forward pass.

    Returns:
      (features [N, hidden] float32, probabilities [N, num_classes] float32), numpy.
    """
    config = classifier.config
    images_u8 = _check_u8(images_u8, config)
    n = images_u8.shape[0]
    feats, probs = [], []
    for start in range(0, n, batch_size):
        chunk = images_u8[start : start + batch_size]
        pad = batch_size - len(chunk)
        x = to_float(np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0))))
        f, out = _forward(classifier.params, jnp.asarray(x), config)
        feats.append(np.asarray(f)[: len(chunk)])
        probs.append(np.asarray(jax.nn.softmax(out, axis=-1))[: len(chunk)])
    hidden, k = config.hidden, config.num_classes
    if not feats:
        return np.zeros((0, hidden), np.float32), np.zeros((0, k), np.float32)
    return np.concatenate(feats), np.concatenate(probs)


def _augment(key: jax.Array, x: jax.Array, config: ClassifierConfig) -> jax.Array:
    """Each image of ``x`` [B, H, W, 1] under its own random affine map: rotation by up to
    ``max_rotation`` degrees, scaling by up to ``1 +- max_scale`` and a shift by up to
    ``max_shift`` px per axis (all uniform), resampled bilinearly; pixels from outside the image
    are background (-1)."""
    b, h, w, _ = x.shape
    u = jax.random.uniform(key, (b, 4), minval=-1.0)  # one draw: a smaller program to compile
    angle = jnp.deg2rad(config.max_rotation) * u[:, 0]
    scale = 1.0 + config.max_scale * u[:, 1]
    shift = config.max_shift * u[:, 2:]
    rows, cols = jnp.meshgrid(
        jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing="ij"
    )

    def warp(img, a, s, t):  # output pixel p reads the input at R(-a) p / s + centre - t
        cos, sin = jnp.cos(a) / s, jnp.sin(a) / s
        src_r = cos * rows - sin * cols + (h - 1) / 2 - t[0]
        src_c = sin * rows + cos * cols + (w - 1) / 2 - t[1]
        out = jax.scipy.ndimage.map_coordinates(img[..., 0], [src_r, src_c], order=1, cval=-1.0)
        return out[..., None]

    return jax.vmap(warp)(x, angle, scale, shift)


def _optimizer(config: ClassifierConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(config.learning_rate, total_steps))


@functools.partial(jax.jit, static_argnums=(6, 7), donate_argnums=(0, 1))
def _train_step(params, opt_state, images_u8, labels, idx, key, config, total_steps):
    """One Adam step on the minibatch ``images_u8[idx]`` (gathered on the device); returns
    (params, opt_state, loss). A jitted step per minibatch: XLA:CPU runs these convolutions
    many times slower inside a ``lax.scan`` body than as a top-level program."""
    k_aug, k_drop = jax.random.split(key)
    x = _augment(k_aug, images_u8[idx].astype(jnp.float32) / 127.5 - 1.0, config)

    def loss_fn(p):
        out = _CNN(config).apply({"params": p}, x, train=True, rngs={"dropout": k_drop})[1]
        return optax.softmax_cross_entropy_with_integer_labels(out, labels[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _optimizer(config, total_steps).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _check_digits(images_u8: Any, labels: Any, config: ClassifierConfig) -> None:
    images_u8, labels = _check_u8(images_u8, config), np.asarray(labels)
    if labels.shape != images_u8.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels: expected int labels [{images_u8.shape[0]}], got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(
            f"labels: expected values in 0 .. {config.num_classes - 1}, got "
            f"{labels.min()} .. {labels.max()}"
        )


def train_classifier(
    key: jax.Array,
    images_u8: np.ndarray,
    labels: np.ndarray,
    config: ClassifierConfig,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Trains a classifier with Adam on uint8 digits, with random affine augmentation.

    Epoch e visits a permutation of the digits drawn from ``fold_in(key, e)`` in minibatches of
    ``config.batch_size`` (the remainder is dropped); each minibatch gets its own augmentation
    and dropout keys (each image its own shift, rotation and scale; see ``ClassifierConfig``).
    The digits stay on the device; each step is one jitted call dispatched asynchronously (the
    host waits once per epoch, for ``on_epoch``). The same key, data and config give the same
    params.

    Args:
      key: a ``jax.random`` key (init, order, augmentation and dropout are all drawn from it).
      images_u8: uint8 digits [N, H, W, 1], N >= ``config.batch_size``.
      labels: int labels [N] in 0 .. num_classes - 1.
      config: architecture and training settings.
      on_epoch: called after each epoch with (epoch, mean training loss of that epoch).

    Returns:
      The trained params tree.
    """
    _check_digits(images_u8, labels, config)
    n = int(np.shape(images_u8)[0])
    steps = n // config.batch_size
    if steps == 0:
        raise ValueError(f"images_u8: {n} digits are fewer than one batch ({config.batch_size})")
    k_init, k_data = jax.random.split(key)
    params = init(k_init, config)
    total = steps * config.epochs
    opt_state = _optimizer(config, total).init(params)
    images = jnp.asarray(images_u8)
    labels = jnp.asarray(labels, jnp.int32)
    for epoch in range(config.epochs):
        k_order, k_steps = jax.random.split(jax.random.fold_in(k_data, epoch))
        order = jax.random.permutation(k_order, n)[: steps * config.batch_size]
        batches = order.reshape(steps, config.batch_size)
        keys = jax.random.split(k_steps, steps)
        losses = []
        for i in range(steps):
            params, opt_state, loss = _train_step(
                params, opt_state, images, labels, batches[i], keys[i], config, total
            )
            losses.append(loss)
        if on_epoch is not None:
            on_epoch(epoch, float(jnp.mean(jnp.stack(losses))))
    return params


def _mismatches(params: Any, config: ClassifierConfig, what: str) -> list[str]:
    """Up to 10 lines naming the leaves whose shapes differ from those ``config`` implies
    (None for a missing leaf); empty when the trees match."""
    want, got = _leaf_paths(_param_shapes(config)), _leaf_paths(params)
    keys = sorted(k for k in want.keys() | got.keys() if got.get(k) != want.get(k))
    return [f"{k}: shape {got.get(k)} {what}, {want.get(k)} expected" for k in keys[:10]]


def _as_float32(a: Any) -> np.ndarray:
    return np.asarray(a, np.float32)


def save_classifier(
    path: str | os.PathLike,
    params: Any,
    config: ClassifierConfig,
    info: Mapping[str, Any] | None,
    *,
    force: bool = False,
) -> Path:
    """Writes params, config and ``info`` as a checkpoint directory (atomically, via a
    temporary sibling that is renamed into place).

    Args:
      path: the directory to create.
      params: a params tree of ``config`` (checked against ``init``'s shapes; stored as
        float32).
      config: the classifier's config.
      info: JSON-serialisable facts to keep beside the params (training, accuracy, ...), or
        None.
      force: replace an existing classifier checkpoint (never another kind of directory).

    Returns:
      The absolute path written.

    Raises:
      FileExistsError: ``path`` exists and ``force`` is False, or it is not a classifier
        checkpoint.
      ValueError: ``params`` do not have the structure and shapes ``config`` implies.
    """
    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"path: {path} already exists; pass force=True to replace it")
    if path.exists() and not (path / _META_FILE).is_file():
        raise FileExistsError(
            f"path: {path} exists and is not a classifier checkpoint (no {_META_FILE}); "
            "refusing to replace it"
        )
    if diffs := _mismatches(params, config, "given"):
        raise ValueError("params: they do not match the config:\n  " + "\n  ".join(diffs))
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "info": dict(info or {}),
    }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"  # fails early if not serialisable
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / _PARAMS_DIR, jax.tree.map(_as_float32, params))
            checkpointer.wait_until_finished()
        (tmp / _META_FILE).write_text(text)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_record(path: Path) -> dict[str, Any]:
    return _read_json_record(path, _META_FILE, FORMAT, FORMAT_VERSION, "classifier ")


def load_classifier(path: str | os.PathLike) -> Classifier:
    """Loads a checkpoint written by `save_classifier`.

    Returns:
      A `Classifier` with float32 params, its config and the recorded ``info``.

    Raises:
      FileNotFoundError: no directory at ``path``.
      ValueError: not a classifier checkpoint, or a corrupt one (bad JSON or config, missing
        or unreadable params, params that do not match the config); the message says which.
    """
    path = Path(path).absolute()
    record = _read_record(path)
    try:
        config = ClassifierConfig.from_dict(record["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"path: corrupt classifier checkpoint, bad config in {path / _META_FILE}: {err}"
        ) from None
    params_dir = path / _PARAMS_DIR
    if not (params_dir / "_METADATA").is_file():
        raise ValueError(f"path: corrupt classifier checkpoint, {params_dir}/_METADATA is missing")
    quiet = _quiet_closed_loop()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_dir, _param_shapes(config))
    except Exception as err:  # orbax / tensorstore raise many types for unreadable data
        raise ValueError(
            f"path: corrupt classifier checkpoint, cannot read its params from {params_dir}: "
            f"{type(err).__name__}: {err}"
        ) from None
    _unquiet(quiet)
    if diffs := _mismatches(params, config, "stored"):  # orbax restores stored shapes as is
        raise ValueError(
            f"path: corrupt classifier checkpoint, its params in {params_dir} do not match its "
            "config:\n  " + "\n  ".join(diffs)
        )
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    return Classifier(params=params, config=config, info=dict(record.get("info", {})))


@functools.lru_cache(maxsize=1)
def _embedded() -> Classifier:
    return load_classifier(assets.embedded_classifier_path())


def load_embedded_classifier() -> Classifier:
    """The classifier that ships in the package (``checkpoints/mnist32_classifier``), loaded
    once per process."""
    return _embedded()
