"""Keep the convolutions of a rolled ``lax.scan`` body on XLA CPU's fast (Eigen) path.

Cause. XLA CPU runs a convolution with Eigen only when its dimension numbers are canonical
(input NHWC, kernel HWIO, output NHWC); any other convolution is emitted as a naive loop nest,
several times slower. The pass that fixes this (``cpu::ConvCanonicalization``, which wraps a
non-canonical convolution in transposes) visits only ``module->entry_computation()``, so a
convolution inside a ``while`` body (a rolled ``scan``/``fori_loop``) or a ``cond`` branch is never
canonicalized. JAX's transpose rule for ``conv_general_dilated`` expresses the input gradient as a
convolution with the kernel's I/O dimensions swapped (``dim_labels=b01f_01oi->b01f``), so every
``jax.grad`` through a convolution (DPS, ΠGDM) lands on the slow path once it sits in the loop
body. It is not a layout or loop-invariance problem: params carried instead of closed over,
``optimization_barrier``, ``stop_gradient`` or ``fori_loop`` leave the ``01oi`` convolutions in
place, and a forward-only ``HWOI`` convolution in a ``fori_loop`` is just as slow.

Fix. :func:`canonicalize_convs` re-traces a function and rewrites every non-canonical
``conv_general_dilated`` into explicit transposes around a canonical one (what
``ConvCanonicalization`` does in the entry computation), recursing into nested jaxprs (jit,
checkpoint, scan, while, cond). It is a pure relabelling: results are unchanged up to float
rounding. :func:`scan` is ``lax.scan`` with the body rewritten; :func:`conv_kernel_layouts` counts
the kernel layouts of a compiled program for regression tests.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.extend import core as jex

__all__ = ["canonicalize_convs", "conv_kernel_layouts", "scan"]

_CONV = jex.primitives.conv_general_dilated_p
# Primitives whose sub-jaxprs carry user-defined derivative rules: rebinding them from rewritten
# jaxprs would need their rule thunks too, so they are left as they are (their convolutions stay).
_KEEP = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"})


def _canonical_specs(n: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, n - 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, n - 1, *spatial),  # NHWC
        rhs_spec=(n - 1, n - 2, *range(n - 2)),  # HWIO
        out_spec=(0, n - 1, *spatial),  # NHWC
    )


def _transpose(x, perm: tuple[int, ...]):
    return x if perm == tuple(range(len(perm))) else lax.transpose(x, perm)


def _conv(lhs, rhs, *, dimension_numbers, **params):
    """``conv_general_dilated`` with canonical dimension numbers (transposes around it)."""
    dn = dimension_numbers
    canon = _canonical_specs(lhs.ndim)
    if dn is None or tuple(dn) == tuple(canon):
        return _CONV.bind(lhs, rhs, dimension_numbers=dn, **params)
    lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
    rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
    out_perm = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
    out = _CONV.bind(
        _transpose(lhs, lhs_perm), _transpose(rhs, rhs_perm), dimension_numbers=canon, **params
    )
    inverse = tuple(sorted(range(len(out_perm)), key=out_perm.__getitem__))
    return _transpose(out, inverse)


def _rewrite_jaxpr(jaxpr: Any) -> Any:
    """A rewritten copy of a (Closed)Jaxpr param, or the original when it cannot be re-traced."""
    closed = isinstance(jaxpr, jex.ClosedJaxpr)
    inner, consts = (jaxpr.jaxpr, jaxpr.consts) if closed else (jaxpr, ())
    if not closed and inner.constvars:
        return jaxpr
    avals = [v.aval for v in inner.invars]
    try:
        new = jax.make_jaxpr(lambda *a: _eval(inner, consts, a))(*avals)
    except Exception:  # noqa: BLE001 - exotic avals/effects: keep the original sub-program
        return jaxpr
    if closed:
        return new
    return jaxpr if new.consts else new.jaxpr


def _rewrite_param(v: Any) -> Any:
    if isinstance(v, jex.ClosedJaxpr | jex.Jaxpr):
        return _rewrite_jaxpr(v)
    if isinstance(v, tuple) and v and all(isinstance(b, jex.ClosedJaxpr | jex.Jaxpr) for b in v):
        return tuple(_rewrite_jaxpr(b) for b in v)
    return v


def _eval(jaxpr: Any, consts, args) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts, strict=True):
        env[v] = val
    for v, val in zip(jaxpr.invars, args, strict=True):
        env[v] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        prim = eqn.primitive
        if prim is _CONV:
            outs = [_conv(*invals, **eqn.params)]
        else:
            params = eqn.params
            if prim.name not in _KEEP:
                params = {k: _rewrite_param(v) for k, v in params.items()}
            bind_params = prim.get_bind_params(params)
            subfuns = ()
            if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
                subfuns, bind_params = bind_params
            ctx = getattr(getattr(eqn, "ctx", None), "manager", contextlib.nullcontext())
            with ctx:
                outs = prim.bind(*subfuns, *invals, **bind_params)
            if not prim.multiple_results:
                outs = [outs]
        for v, val in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jex.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def canonicalize_convs(fn: Callable) -> Callable:
    """``fn`` with every convolution given canonical (NHWC/HWIO/NHWC) dimension numbers.

    Same signature and results (up to float rounding) as ``fn``; arguments and results are
    pytrees of arrays. Meant for a loop body (:func:`scan`); in the entry computation XLA CPU
    already does the same rewrite. Convolutions inside ``custom_jvp``/``custom_vjp`` functions are
    left alone (their derivative rules are kept). ``vmap`` of the result stays canonical; a
    ``jax.grad`` taken *through* the wrapped loop derives new input-gradient convolutions after the
    rewrite, so those (in the backward loop) are not covered.
    """

    @functools.wraps(fn)
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


def scan(f: Callable, init: Any, xs: Any = None, length: int | None = None, **kwargs):
    """``jax.lax.scan(canonicalize_convs(f), init, xs, length, **kwargs)``: one rolled loop whose
    convolutions (forward and input-gradient alike) stay on XLA CPU's fast path."""
    return lax.scan(canonicalize_convs(f), init, xs, length, **kwargs)


_DIM_LABELS = re.compile(r"\bconvolution\(.*?dim_labels=[^_\s,]+_([^-\s,]+)->")


def conv_kernel_layouts(compiled_text: str) -> collections.Counter:
    """Kernel dimension labels of every convolution in an HLO text, e.g. ``{"01io": 108}``.

    ``compiled_text`` is ``jax.jit(f).lower(...).compile().as_text()``. On XLA CPU ``01io``
    (HWIO) is the canonical, Eigen-backed form; ``01oi`` marks an input-gradient convolution that
    was not canonicalized (the slow path).
    """
    return collections.Counter(m.group(1) for m in _DIM_LABELS.finditer(compiled_text))
