"""Pieces shared by the solvers: status codes, measurement checks and jit-cache helpers.

Images are NHWC float32 in [-1, 1]. An operator ``op`` acts on ONE image ``x [H, W, C]``
(``op.image_shape``) and a batch is handled by ``jax.vmap``; measurements ``y`` are batched
``[B, *y_shape]`` where ``y_shape`` is the shape ``op.A`` returns for one image.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_key",
    "check_measurement",
    "image_shape_of",
    "is_concrete",
    "measurement_shape",
    "merge_static",
    "require",
    "split_static",
]


def is_concrete(*xs: Any) -> bool:
    """True when no leaf of ``xs`` is a tracer (values can be inspected on the host)."""
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(xs))


def image_shape_of(op: Any) -> tuple[int, ...]:
    """``op.image_shape`` as a tuple of ints ([H, W, C]), or a TypeError naming ``op``."""
    shape = getattr(op, "image_shape", None)
    if shape is None:
        raise TypeError(
            f"op: expected an operator with an `image_shape` attribute (H, W, C) and an `A` "
            f"method, got {type(op).__name__}"
        )
    return tuple(int(s) for s in shape)


def measurement_shape(op: Any) -> tuple[int, ...]:
    """Shape of ``op.A(x)`` for one image ``x [H, W, C]`` (traced abstractly, nothing runs)."""
    if not callable(getattr(op, "A", None)):
        raise TypeError(f"op: expected an operator with an `A` method, got {type(op).__name__}")
    x = jax.ShapeDtypeStruct(image_shape_of(op), jnp.float32)
    return tuple(jax.eval_shape(op.A, x).shape)


def check_measurement(op: Any, y: Any, *, name: str = "y") -> jnp.ndarray:
    """Validate a batched measurement ``y [B, *y_shape]`` for ``op``; returns it as float32.

    Raises ValueError (wrong shape, non-finite values when ``y`` is concrete) or TypeError
    (non-floating dtype), naming ``name``.
    """
    y_shape = measurement_shape(op)
    if not hasattr(y, "shape") or not hasattr(y, "dtype"):
        raise TypeError(f"{name}: expected an array [B, *{y_shape}], got {type(y).__name__}")
    if not (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer)):
        raise TypeError(f"{name}: expected a real floating array, got dtype {y.dtype}")
    if y.ndim != len(y_shape) + 1 or tuple(y.shape[1:]) != y_shape:
        hint = " (add a leading batch axis: y[None])" if tuple(y.shape) == y_shape else ""
        raise ValueError(
            f"{name}: expected shape [B, *{y_shape}] (the operator's output for one image "
            f"{image_shape_of(op)} plus a batch axis), got {tuple(y.shape)}{hint}"
        )
    if y.shape[0] < 1:
        raise ValueError(f"{name}: expected a batch of at least one measurement, got {y.shape}")
    if is_concrete(y):
        finite = np.isfinite(np.asarray(y))
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise ValueError(
                f"{name}: expected finite values, got {int((~finite).sum())} non-finite "
                f"entries (first at index {tuple(int(i) for i in bad)})"
            )
    return jnp.asarray(y, jnp.float32)


def check_key(key: Any, *, optional: bool = False, name: str = "key") -> jax.Array:
    """A PRNG key (typed ``jax.random.key(seed)`` or raw uint32 [2]), or a TypeError naming it.

    ``optional``: None is allowed (every draw is replayed) and a dummy key is returned.
    """
    if key is None:
        if optional:
            return jax.random.key(0)
        raise ValueError(f"{name}: a PRNG key is required unless noise replays every draw")
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = (
        isinstance(key, jax.Array | np.ndarray)
        and key.dtype == np.uint32
        and tuple(key.shape) == (2,)
    )
    if (typed and key.shape == ()) or raw:
        return jnp.asarray(key) if raw else key
    what = f"{type(key).__name__}"
    if hasattr(key, "shape"):
        what += f" of shape {tuple(key.shape)} and dtype {key.dtype}"
    raise TypeError(
        f"{name}: expected one jax PRNG key (jax.random.key(seed), or a legacy uint32[2] "
        f"PRNGKey), got {what}"
    )


def require(op: Any, method: str, solver: str, why: str) -> None:
    """TypeError unless ``op.<method>`` exists and works on one measurement (``A_dagger``) or
    one image; probed abstractly with ``jax.eval_shape`` (nothing runs)."""
    y_shape = measurement_shape(op)  # TypeError when op has no `A` / `image_shape`
    fn = getattr(op, method, None)
    detail = ""
    if fn is not None and callable(fn):
        arg_shape = y_shape if method == "A_dagger" else image_shape_of(op)
        try:
            jax.eval_shape(fn, jax.ShapeDtypeStruct(arg_shape, jnp.float32))
            return
        except NotImplementedError as err:
            detail = f" ({err})"
    raise TypeError(
        f"op: {solver} needs an operator with `{method}` ({why}); "
        f"{type(op).__name__} has none{detail}"
    )


# ------------------------------------------------------------------------------------------------
# jit caching: split a callable / operator into a hashable static part and an array part, so one
# module-level jitted function serves every call with the same structure (no re-jit per call) and
# large parameters (a UNet's) are arguments, never constants baked into the executable.


class _Static:
    """Hashable wrapper of a non-array leaf (falls back to identity for unhashable values)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        try:
            return hash((type(self.value), self.value))
        except TypeError:
            return id(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static):
            return False
        if self.value is other.value:
            return True
        try:
            hash(self.value)
            hash(other.value)
        except TypeError:
            return False
        try:
            return type(self.value) is type(other.value) and bool(self.value == other.value)
        except Exception:  # noqa: BLE001 - exotic __eq__; treat as different
            return False


def _canonical_callable(fn: Any) -> Any:
    """Bound methods become ``partial(func, self)`` so ``self`` (e.g. a model) is a pytree."""
    if isinstance(fn, types.MethodType):
        return functools.partial(fn.__func__, fn.__self__)
    if isinstance(fn, functools.partial):
        inner = _canonical_callable(fn.func)
        if isinstance(inner, functools.partial):
            return functools.partial(
                inner.func, *inner.args, *fn.args, **{**inner.keywords, **fn.keywords}
            )
        return functools.partial(inner, *fn.args, **fn.keywords)
    return fn


def _is_array(v: Any) -> bool:
    return isinstance(v, jax.Array | np.ndarray | np.generic)


def _split_tree(tree: Any) -> tuple[Any, tuple]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic = tuple(v if _is_array(v) else None for v in leaves)
    static_leaves = tuple(None if _is_array(v) else _Static(v) for v in leaves)
    return (treedef, static_leaves), dynamic


def _merge_tree(static: Any, dynamic: tuple) -> Any:
    treedef, static_leaves = static
    leaves = [d if s is None else s.value for s, d in zip(static_leaves, dynamic, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def split_static(obj: Any) -> tuple[Any, Any]:
    """Split ``obj`` (a pytree, a bound method of one, a partial, a plain function) in two.

    Returns ``(static, dynamic)``: ``static`` is hashable (tree structure, functions, Python
    scalars) and ``dynamic`` is a pytree of arrays, so ``merge_static(static, dynamic)``
    rebuilds ``obj``. Pass ``static`` as a static argument and ``dynamic`` as a traced one: a
    ``model.eps`` bound method or ``functools.partial(model.eps)`` keeps the model's parameters
    dynamic, so they are not baked into the compiled executable as constants.
    """
    obj = _canonical_callable(obj)
    if isinstance(obj, functools.partial):
        func_static, func_dynamic = split_static(obj.func)
        args_static, args_dynamic = _split_tree((obj.args, obj.keywords))
        return ("partial", func_static, args_static), (func_dynamic, args_dynamic)
    tree_static, tree_dynamic = _split_tree(obj)
    return ("tree", tree_static), tree_dynamic


def merge_static(static: Any, dynamic: Any) -> Any:
    """Inverse of :func:`split_static`."""
    if static[0] == "partial":
        func = merge_static(static[1], dynamic[0])
        args, keywords = _merge_tree(static[2], dynamic[1])
        return functools.partial(func, *args, **keywords)
    return _merge_tree(static[1], dynamic)
