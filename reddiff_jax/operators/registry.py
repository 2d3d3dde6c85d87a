"""Operator registry: ``make(name, image_shape, **params)`` and the CLI task strings.

Names and parameters (defaults in brackets; ``key`` is a jax PRNG key, needed where marked *):

* ``inpaint``: ``mask`` ["box"] one of
  ``"box"`` (``size`` [H//2, W//2] int or (h, w), ``position`` [centred] top-left (row, col)),
  ``"random"`` * (``fraction`` [0.5] of pixels KEPT),
  ``"freeform"`` * (``hole_fraction`` [(0.2, 0.3)] number or range of the MISSING fraction),
  or a 0/1 array [H, W] / [H, W, 1] / [H, W, C] (1 = observed).
* ``sr``: ``factor`` [4], ``method`` ["avgpool"] (official sr<r>) or "bicubic".
* ``blur``: ``kind`` ["gaussian"] one of ``"gaussian"`` (``size`` [9], ``sigma`` [2.0]),
  ``"uniform"`` (``size`` [9]), ``"motion"`` * (``size`` [9], ``intensity`` [0.5]) or
  ``"custom"`` (``kernel``: 1-D separable taps or a 2-D array); ``mode`` ["reflect"] boundary
  (scipy.ndimage names: reflect, mirror, wrap, nearest, constant).
* ``colorize`` (C = 3): ``weights`` [(0.3333, 0.3334, 0.3333)].
* ``denoise``: no parameters.
* ``cs`` *: ``ratio`` [0.25] = m / n.
* ``phase_retrieval``: ``oversample`` [2.0], ``pad`` [int(oversample / 8 * H) per side].
* ``hdr``: ``scale`` [2.0].
* ``quantize``: ``bits`` [4], ``rounding`` ["exact"] ("ste", "smooth").
* ``jpeg`` (C = 1 or 3): ``quality`` [20], ``rounding`` ["smooth"] ("exact", "ste").

Task strings (:func:`make_from_spec`, for the CLI): ``name[:arg[:arg...]]`` where each arg is
positional (in the order below) or ``param=value``; values parse as int, float, ``true``/``false``,
comma-separated tuples (``size=8,12``) or strings. Positional order:

* ``inpaint:<mask>:...``: ``inpaint:box[:size]``, ``inpaint:random[:fraction]``,
  ``inpaint:freeform[:hole_fraction]``;
* ``sr[:factor[:method]]``: ``sr:4``, ``sr:4:bicubic``;
* ``blur:<kind>:...``: ``blur:gaussian[:size[:sigma]]``, ``blur:uniform[:size]``,
  ``blur:motion[:size[:intensity]]``; e.g. ``blur:gaussian:9:2.0:mode=constant``;
* ``cs[:ratio]``, ``phase_retrieval[:oversample]`` (``phase_retrieval:pad=8``), ``hdr[:scale]``,
  ``quantize[:bits]``, ``jpeg[:quality]``, ``colorize``, ``denoise``.

Official RED-Diff task names are accepted too: ``sr<r>``, ``bicubic<r>``, ``in2_box``,
``in2_20ff`` (free-form 20-30%), ``deblur_gauss`` (5 taps, sigma 25, zero boundary; the correct
blur, not DDRM's bug), ``deblur_uni`` (9 taps, zero boundary), ``color``, ``jpeg<q>``,
``quant<n>``, ``hdr``, ``phase_retrieval``, ``deno``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import jax

from reddiff_jax.operators.base import Operator, _asarray, check_image_shape
from reddiff_jax.operators.blur import (
    Blur,
    SeparableBlur,
    gaussian_kernel,
    motion_kernel,
    uniform_kernel,
)
from reddiff_jax.operators.colorize import OFFICIAL_WEIGHTS, Colorization
from reddiff_jax.operators.cs import CompressedSensing
from reddiff_jax.operators.denoise import Denoising
from reddiff_jax.operators.hdr import HDR
from reddiff_jax.operators.inpainting import Inpainting, box_mask, freeform_mask, random_mask
from reddiff_jax.operators.jpeg import JPEG
from reddiff_jax.operators.phase_retrieval import PhaseRetrieval
from reddiff_jax.operators.quantize import Quantization
from reddiff_jax.operators.superres import AvgPoolSR, BicubicSR

__all__ = ["NAMES", "make", "make_from_spec", "parse_spec", "valid_params"]

_UNSET: Any = object()


def _need_key(key, name: str, what: str) -> jax.Array:
    if key is None:
        raise ValueError(f"key: {name} with {what} is random and needs key=jax.random.key(...)")
    return key


def _reject(name: str, kind_name: str, kind: str, **given) -> None:
    bad = sorted(k for k, v in given.items() if v is not _UNSET)
    if bad:
        raise ValueError(f"{bad[0]}: not a parameter of {name} with {kind_name}={kind!r}")


def _or(v, default):
    return default if v is _UNSET else v


def _inpaint(
    image_shape,
    *,
    mask="box",
    size=_UNSET,
    position=_UNSET,
    fraction=_UNSET,
    hole_fraction=_UNSET,
    key=None,
) -> Inpainting:
    if isinstance(mask, str):
        if mask == "box":
            _reject("inpaint", "mask", mask, fraction=fraction, hole_fraction=hole_fraction)
            m = box_mask(image_shape, size=_or(size, None), position=_or(position, None))
        elif mask == "random":
            _reject(
                "inpaint", "mask", mask, size=size, position=position, hole_fraction=hole_fraction
            )
            key = _need_key(key, "inpaint", "mask='random'")
            m = random_mask(key, image_shape, fraction=_or(fraction, 0.5))
        elif mask == "freeform":
            _reject("inpaint", "mask", mask, size=size, position=position, fraction=fraction)
            key = _need_key(key, "inpaint", "mask='freeform'")
            m = freeform_mask(key, image_shape, hole_fraction=_or(hole_fraction, (0.2, 0.3)))
        else:
            raise ValueError(
                f"mask: expected 'box', 'random', 'freeform' or an array, got {mask!r}"
            )
    else:
        _reject(
            "inpaint", "mask", "<array>", size=size, position=position, fraction=fraction,
            hole_fraction=hole_fraction,
        )  # fmt: skip
        m = mask
    return Inpainting.create(image_shape, mask=m)


def _sr(image_shape, *, factor=4, method="avgpool") -> Operator:
    if method == "avgpool":
        return AvgPoolSR.create(image_shape, factor=factor)
    if method == "bicubic":
        return BicubicSR.create(image_shape, factor=factor)
    raise ValueError(f"method: expected 'avgpool' or 'bicubic', got {method!r}")


def _blur(
    image_shape,
    *,
    kind="gaussian",
    size=_UNSET,
    sigma=_UNSET,
    intensity=_UNSET,
    kernel=_UNSET,
    mode="reflect",
    key=None,
) -> Operator:
    if kind == "gaussian":
        _reject("blur", "kind", kind, intensity=intensity, kernel=kernel)
        k = gaussian_kernel(_or(size, 9), sigma=_or(sigma, 2.0))
        return SeparableBlur.create(image_shape, kernel_h=k, mode=mode)
    if kind == "uniform":
        _reject("blur", "kind", kind, sigma=sigma, intensity=intensity, kernel=kernel)
        return SeparableBlur.create(image_shape, kernel_h=uniform_kernel(_or(size, 9)), mode=mode)
    if kind == "motion":
        _reject("blur", "kind", kind, sigma=sigma, kernel=kernel)
        key = _need_key(key, "blur", "kind='motion'")
        k = motion_kernel(key, size=_or(size, 9), intensity=_or(intensity, 0.5))
        return Blur.create(image_shape, kernel=k, mode=mode)
    if kind == "custom":
        _reject("blur", "kind", kind, size=size, sigma=sigma, intensity=intensity)
        if kernel is _UNSET:
            raise ValueError(
                "kernel: blur with kind='custom' needs kernel= (1-D taps or 2-D array)"
            )
        k = _asarray(kernel)
        if k.ndim == 1:
            return SeparableBlur.create(image_shape, kernel_h=k, mode=mode)
        return Blur.create(image_shape, kernel=k, mode=mode)
    raise ValueError(f"kind: expected 'gaussian', 'uniform', 'motion' or 'custom', got {kind!r}")


def _colorize(image_shape, *, weights=OFFICIAL_WEIGHTS) -> Colorization:
    return Colorization.create(image_shape, weights=weights)


def _denoise(image_shape) -> Denoising:
    return Denoising.create(image_shape)


def _cs(image_shape, *, ratio=0.25, key=None) -> CompressedSensing:
    return CompressedSensing.create(_need_key(key, "cs", "any ratio"), image_shape, ratio=ratio)


def _phase_retrieval(image_shape, *, oversample=2.0, pad=None) -> PhaseRetrieval:
    return PhaseRetrieval.create(image_shape, oversample=oversample, pad=pad)


def _hdr(image_shape, *, scale=2.0) -> HDR:
    return HDR.create(image_shape, scale=scale)


def _quantize(image_shape, *, bits=4, rounding="exact") -> Quantization:
    return Quantization.create(image_shape, bits=bits, rounding=rounding)


def _jpeg(image_shape, *, quality=20, rounding="smooth") -> JPEG:
    return JPEG.create(image_shape, quality=quality, rounding=rounding)


_BUILDERS: dict[str, Callable[..., Operator]] = {
    "inpaint": _inpaint,
    "sr": _sr,
    "blur": _blur,
    "colorize": _colorize,
    "denoise": _denoise,
    "cs": _cs,
    "phase_retrieval": _phase_retrieval,
    "hdr": _hdr,
    "quantize": _quantize,
    "jpeg": _jpeg,
}
NAMES: tuple[str, ...] = tuple(_BUILDERS)

# Positional arguments of task strings; a dict means "the first positional selects a kind".
_POSITIONAL: dict[str, tuple] = {
    "inpaint": (
        "mask",
        {"box": ("size",), "random": ("fraction",), "freeform": ("hole_fraction",)},
    ),
    "sr": ("factor", "method"),
    "blur": (
        "kind",
        {"gaussian": ("size", "sigma"), "uniform": ("size",), "motion": ("size", "intensity")},
    ),
    "colorize": (),
    "denoise": (),
    "cs": ("ratio",),
    "phase_retrieval": ("oversample",),
    "hdr": ("scale",),
    "quantize": ("bits",),
    "jpeg": ("quality",),
}

_ALIASES: tuple[tuple[str, Callable[[re.Match], tuple[str, dict]]], ...] = (
    (r"sr(\d+)", lambda m: ("sr", {"factor": int(m[1])})),
    (r"bicubic(\d+)", lambda m: ("sr", {"factor": int(m[1]), "method": "bicubic"})),
    (r"in2_box", lambda m: ("inpaint", {"mask": "box"})),
    (r"in2_20ff", lambda m: ("inpaint", {"mask": "freeform", "hole_fraction": (0.2, 0.3)})),
    (
        r"deblur_gauss",
        lambda m: ("blur", {"kind": "gaussian", "size": 5, "sigma": 25.0, "mode": "constant"}),
    ),
    (r"deblur_uni", lambda m: ("blur", {"kind": "uniform", "size": 9, "mode": "constant"})),
    (r"color", lambda m: ("colorize", {})),
    (r"jpeg(\d+)", lambda m: ("jpeg", {"quality": int(m[1])})),
    (r"quant(\d+)", lambda m: ("quantize", {"bits": int(m[1])})),
    (r"deno", lambda m: ("denoise", {})),
)


def valid_params(name: str) -> tuple[str, ...]:
    """The keyword parameters ``make(name, ...)`` accepts."""
    if name not in _BUILDERS:
        raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    sig = inspect.signature(_BUILDERS[name])
    return tuple(p for p in sig.parameters if p != "image_shape")


def make(name: str, image_shape, **params) -> Operator:
    """Build the operator ``name`` for images of ``image_shape`` (H, W, C).

    See the module docstring for the names and their parameters. Random operators need
    ``key=``. Raises ValueError for an unknown name or parameter (listing the valid ones).
    """
    if name not in _BUILDERS:
        raise ValueError(f"name: expected one of {NAMES}, got {name!r}")
    valid = valid_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"{unknown[0]}: not a parameter of operator {name!r}; valid parameters: "
            f"{valid if valid else '(none)'}"
        )
    return _BUILDERS[name](check_image_shape(image_shape), **params)


def _parse_value(text: str):
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if "," in t:
        return tuple(_parse_value(p) for p in t.split(",") if p.strip())
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_spec(spec: str) -> tuple[str, dict]:
    """Parse a task string into ``(name, params)`` (see the module docstring for the syntax)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec: expected a task string such as 'sr:4', got {spec!r}")
    spec = spec.strip()
    for pattern, build in _ALIASES:
        m = re.fullmatch(pattern, spec)
        if m:
            return build(m)
    name, *tokens = spec.split(":")
    if name not in _POSITIONAL:
        raise ValueError(
            f"spec: unknown operator {name!r} in {spec!r}; expected one of {NAMES} (or an official "
            "task name: sr4, bicubic4, in2_box, in2_20ff, deblur_gauss, deblur_uni, color, jpeg20, "
            "quant4, hdr, phase_retrieval, deno)"
        )
    params: dict[str, Any] = {}
    positional = []
    for tok in tokens:
        if "=" in tok:
            k, v = tok.split("=", 1)
            if k.strip() in params:
                raise ValueError(f"spec: parameter {k.strip()!r} given twice in {spec!r}")
            params[k.strip()] = _parse_value(v)
        else:
            positional.append(_parse_value(tok))
    order = _POSITIONAL[name]
    if order and isinstance(order[-1], dict):
        kind_name, table = order
        if positional:
            params[kind_name] = positional.pop(0)
        kind = params.get(kind_name, "box" if name == "inpaint" else "gaussian")
        order = table.get(kind, ())
    if len(positional) > len(order):
        raise ValueError(
            f"spec: too many positional arguments in {spec!r}; {name} takes {order} positionally "
            "(use param=value for the others)"
        )
    for k, v in zip(order, positional, strict=False):
        if k in params:
            raise ValueError(f"spec: parameter {k!r} given twice in {spec!r}")
        params[k] = v
    return name, params


def make_from_spec(spec: str, image_shape, *, key: jax.Array | None = None) -> Operator:
    """Build an operator from a task string, e.g. ``"sr:4"``, ``"inpaint:random:0.5"``.

    ``key`` is passed to the operators that are random (and ignored by the others).
    """
    name, params = parse_spec(spec)
    if "key" in valid_params(name):
        params["key"] = key
    return make(name, image_shape, **params)
