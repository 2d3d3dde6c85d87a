"""Operator base classes, the SVD capability, and batching helpers.

An operator is a frozen pytree (``flax.struct.PyTreeNode``): arrays such as masks and kernels are
leaves, sizes and mode strings are static fields. It acts on ONE image ``x`` of shape
``image_shape = (H, W, C)`` in [-1, 1] and returns ``y`` in its natural shape (``op.y_shape``).
Batches: ``jax.vmap(op.A)(x)`` or :func:`batched`; per-image operators (own mask or kernel) by
vmapping over a stacked operator (:func:`stack`) together with the images.

Vocabulary (deepinv): ``A(x)`` (also ``op(x)``), ``A_dagger(y)`` (pseudo-inverse or the official
initialisation), and for linear operators ``A_adjoint(y)``. Every public method checks the static
shape, accepts any floating dtype and returns that dtype (half precision is computed in float32).

SVD capability (``op.svd``; None when unknown), used by DDRM-style solvers
---------------------------------------------------------------------------
Let ``n = H*W*C`` (size of x) and ``m = prod(op.y_shape)`` (size of y), ``m <= n``. The operator is
``A = U Σ Vᵀ`` with ``V`` an orthogonal n×n matrix, ``U`` an orthogonal m×m matrix and ``Σ`` m×n
diagonal. ``svd = op.svd`` exposes, for one image:

* ``svd.Vt(x[H, W, C]) -> [n]`` = Vᵀ vec(x); ``svd.V(v[n]) -> [H, W, C]`` its inverse.
* ``svd.Ut(y) -> [n]``: entries ``0..m-1`` are Uᵀ vec(y); entries ``m..n-1`` are 0.
* ``svd.U(c[n]) -> y`` (``op.y_shape``): U applied to ``c[:m]``; entries past m are ignored.
* ``svd.singulars -> [n]`` float32, >= 0: σ_i for i < m, 0 for i >= m. Zeros can also occur
  among the first m entries (unobserved components, e.g. inpainting holes).
* Hence ``A(x) = U(singulars * Vt(x))``, ``A_adjoint(y) = V(singulars * Ut(y))`` and the
  pseudo-inverse is ``V(where(singulars > 0, Ut(y) / singulars, 0))``.
* Components are NOT sorted by singular value. Their order is fixed per operator class (documented
  there); only the positions of zero singulars inside the first m entries may depend on the data
  (inpainting masks).
* ``Vt``/``V``/``Ut``/``U`` return the input's floating dtype. Batches: one shared operator,
  ``jax.vmap(op.svd.Vt)(xs)``; per-image operators (:func:`stack`),
  ``jax.vmap(lambda o, x: o.svd.Vt(x))(ops, xs)``. ``svd.singulars`` of a stacked operator needs
  the same vmap (``jax.vmap(lambda o: o.svd.singulars)(ops)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "SVD",
    "DiagonalOperator",
    "LinearOperator",
    "Operator",
    "SeparableOperator",
    "adjoint_gap",
    "adjointness_error",
    "batched",
    "check_image_shape",
    "compute_dtype",
    "stack",
]

HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype arithmetic runs in: float32 for half types, else the input's floating dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def check_image_shape(image_shape) -> tuple[int, int, int]:
    """Validate and normalise ``image_shape`` to a tuple ``(H, W, C)`` of positive ints."""
    try:
        shape = tuple(int(s) for s in image_shape)
        ok = len(shape) == 3 and all(s > 0 for s in shape)
        ok = ok and all(int(s) == s for s in image_shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"image_shape: expected (H, W, C) with positive ints, got {image_shape!r}")
    return shape


@functools.partial(jax.jit, static_argnames="method")
def _dispatch(op, z, method: str):
    """Run ``op.<method>(z)`` in the compute dtype and cast back to z's dtype, as ONE jitted call.

    Eager calls compile once per (operator class, static fields, shape, dtype) instead of op by
    op; inside a user's jit / vmap / grad this nests transparently.
    """
    return getattr(op, method)(z.astype(compute_dtype(z.dtype))).astype(z.dtype)


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def _asarray(v, dtype=None):
    """``jnp.asarray`` without an eager XLA compilation for host (numpy / Python) inputs."""
    if isinstance(v, jax.Array | jax.core.Tracer):
        return v if dtype is None or v.dtype == dtype else v.astype(dtype)
    return jax.device_put(np.asarray(v) if dtype is None else np.asarray(v, dtype))


def _all_finite(a) -> bool:
    """True if every value is finite; True for tracers (unknown values are not checked)."""
    return not _is_concrete(a) or bool(np.isfinite(np.asarray(a)).all())


def _as_float_array(v, name: str, expected_shape: tuple[int, ...], what: str):
    if not isinstance(v, jax.Array | jax.core.Tracer):
        v = np.asarray(v)  # stays on the host; the jitted call transfers it
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating array, got dtype {v.dtype}")
    if v.shape != tuple(expected_shape):
        raise ValueError(f"{name}: expected {what} of shape {tuple(expected_shape)}, got {v.shape}")
    return v


class Operator(struct.PyTreeNode):
    """Base of all measurement operators ``y = A(x)`` on one image ``x`` [H, W, C] in [-1, 1].

    Subclasses implement ``_A`` (and optionally ``_A_dagger``) on arrays already validated and cast
    to :func:`compute_dtype`; the public methods validate, cast and restore the input dtype.
    """

    image_shape: tuple[int, int, int] = struct.field(pytree_node=False)

    is_linear: ClassVar[bool] = False
    has_svd: ClassVar[bool] = False

    # ---- shapes and validation -------------------------------------------------------------
    @property
    def y_shape(self) -> tuple[int, ...]:
        """Shape of one measurement ``y`` (default: same as the image)."""
        return tuple(self.image_shape)

    def check_x(self, x) -> jnp.ndarray:
        """Return ``x`` as an array after checking it is ONE floating image of ``image_shape``."""
        return _as_float_array(x, "x", self.image_shape, "one image [H, W, C] (vmap for batches)")

    def check_y(self, y, *, finite: bool = True) -> jnp.ndarray:
        """Check ``y`` has ``y_shape``, a floating dtype and (if concrete) finite values."""
        y = _as_float_array(y, "y", self.y_shape, "one measurement (vmap for batches)")
        if finite and not _all_finite(y):
            raise ValueError("y: expected finite values, got NaN or inf")
        return y

    # ---- public API -------------------------------------------------------------------------
    def A(self, x) -> jnp.ndarray:
        """Forward model: ``x`` [H, W, C] -> ``y`` (``y_shape``), same dtype as ``x``."""
        x = self.check_x(x)
        return _dispatch(self, x, "_A")

    def __call__(self, x) -> jnp.ndarray:
        return self.A(x)

    def A_dagger(self, y) -> jnp.ndarray:
        """Pseudo-inverse / official initialisation: ``y`` -> [H, W, C], same dtype as ``y``."""
        y = self.check_y(y)
        return _dispatch(self, y, "_A_dagger")

    @property
    def svd(self) -> SVD | None:
        """The SVD capability (see module docstring), or None."""
        return SVD(op=self) if self.has_svd else None

    # ---- to implement -----------------------------------------------------------------------
    def _A(self, x: jnp.ndarray) -> jnp.ndarray:
        raise NotImplementedError

    def _A_dagger(self, y: jnp.ndarray) -> jnp.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no A_dagger")


class LinearOperator(Operator):
    """Linear operator; ``A_adjoint`` defaults to ``jax.linear_transpose`` of ``_A``."""

    is_linear: ClassVar[bool] = True

    def A_adjoint(self, y) -> jnp.ndarray:
        """Adjoint Aᵀ: ``y`` (``y_shape``) -> [H, W, C], same dtype as ``y``."""
        y = self.check_y(y, finite=False)
        return _dispatch(self, y, "_A_adjoint")

    def _A_adjoint(self, y: jnp.ndarray) -> jnp.ndarray:
        primal = jax.ShapeDtypeStruct(tuple(self.image_shape), y.dtype)
        (out,) = jax.linear_transpose(self._A, primal)(y)
        return out

    def _A_dagger(self, y: jnp.ndarray) -> jnp.ndarray:
        if self.has_svd:
            return _svd_pinv(self, y)
        raise NotImplementedError(f"{type(self).__name__} has no A_dagger")

    # SVD hooks (see module docstring); implemented by SVD-capable subclasses.
    def _svd_Vt(self, x):
        raise NotImplementedError

    def _svd_V(self, v):
        raise NotImplementedError

    def _svd_Ut(self, y):
        raise NotImplementedError

    def _svd_U(self, c):
        raise NotImplementedError

    def _svd_singulars(self) -> jnp.ndarray:
        raise NotImplementedError


class DiagonalOperator(LinearOperator):
    """y = d ⊙ x, elementwise and full size [H, W, C] (inpainting, denoising).

    Subclasses give the diagonal ``d`` [H, W, C] through ``_diagonal()``. Then ``A_adjoint = A``,
    ``A_dagger(y) = y / d`` where ``d != 0`` (0 elsewhere), and the SVD is U = V = identity in
    pixel order ([H, W, C] row-major) with ``singulars = d.ravel()``, so m = n.
    """

    has_svd: ClassVar[bool] = True

    def _diagonal(self) -> jnp.ndarray:
        raise NotImplementedError

    def _A(self, x):
        return x * self._diagonal().astype(x.dtype)

    def _A_adjoint(self, y):
        return y * self._diagonal().astype(y.dtype)

    def _A_dagger(self, y):
        d = self._diagonal().astype(y.dtype)
        nonzero = d != 0
        return jnp.where(nonzero, y / jnp.where(nonzero, d, 1), 0)

    def _svd_Vt(self, x):
        return x.ravel()

    def _svd_V(self, v):
        return v.reshape(self.image_shape)

    def _svd_Ut(self, y):
        return y.ravel()

    def _svd_U(self, c):
        return c.reshape(self.image_shape)

    def _svd_singulars(self):
        return self._diagonal().ravel().astype(jnp.float32)


def _svd_pinv(op: LinearOperator, y: jnp.ndarray, threshold: float = 0.0) -> jnp.ndarray:
    s = op._svd_singulars().astype(y.dtype)
    keep = s > threshold
    c = jnp.where(keep, op._svd_Ut(y) / jnp.where(keep, s, 1), 0)
    return op._svd_V(c)


@jax.jit
def _singulars(op) -> jnp.ndarray:
    return op._svd_singulars().astype(jnp.float32)


class SVD(struct.PyTreeNode):
    """SVD view of a linear operator; see the module docstring for the convention."""

    op: LinearOperator

    @property
    def n(self) -> int:
        """Size of x (H*W*C)."""
        return int(np.prod(self.op.image_shape))

    @property
    def m(self) -> int:
        """Size of y (number of possibly non-zero singular values)."""
        return int(np.prod(self.op.y_shape))

    def Vt(self, x) -> jnp.ndarray:
        """Vᵀ vec(x): [H, W, C] -> [n]."""
        x = self.op.check_x(x)
        return _dispatch(self.op, x, "_svd_Vt")

    def V(self, v) -> jnp.ndarray:
        """V v: [n] -> [H, W, C]."""
        v = _as_float_array(v, "v", (self.n,), "a spectral vector [n]")
        return _dispatch(self.op, v, "_svd_V")

    def Ut(self, y) -> jnp.ndarray:
        """Uᵀ vec(y) padded with zeros to [n]."""
        y = self.op.check_y(y, finite=False)
        return _dispatch(self.op, y, "_svd_Ut")

    def U(self, c) -> jnp.ndarray:
        """U c[:m]: [n] -> ``y_shape``."""
        c = _as_float_array(c, "c", (self.n,), "a spectral vector [n]")
        return _dispatch(self.op, c, "_svd_U")

    @property
    def singulars(self) -> jnp.ndarray:
        """[n] float32 singular values (zeros where unobserved and past m)."""
        return _singulars(self.op)


# ---------------------------------------------------------------------------------------------
# Separable linear operators: A(x)[i, j, c] = Σ_{h, w} Mh[i, h] x[h, w, c] Mw[j, w]
# ---------------------------------------------------------------------------------------------
def _np_axis_svd(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(np.asarray(mat, np.float64), full_matrices=True)
    return u, s, vt.T


class SeparableOperator(LinearOperator):
    """Linear operator acting separably on the two spatial axes, identically per channel.

    ``A(x) = Mh · x[:, :, c] · Mwᵀ`` with ``Mh`` [h, H] and ``Mw`` [w, W] (h <= H, w <= W) and
    ``y_shape = (h, w, C)``. Subclasses implement ``_matrices()``; ``_axis_svds()`` defaults to
    ``jnp.linalg.svd`` of them (static subclasses return cached numpy SVDs instead).

    SVD order: with per-axis SVDs ``Mh = Uh [diag(sh) 0] Vhᵀ`` (same for w), let
    ``Z = Vhᵀ x[:, :, c] Vw`` [H, W, C]. ``Vt(x)`` lists first ``Z[:h, :w, :]`` (row-major, the m
    observed components with singulars ``sh[i] * sw[j]``), then ``Z[h:, :, :]`` and
    ``Z[:h, w:, :]`` (row-major, singular 0).

    ``A_dagger`` is the SVD pseudo-inverse with singular values ``<= pinv_threshold`` dropped (a
    static field of the subclass, 0 if absent).
    """

    @property
    def y_shape(self) -> tuple[int, ...]:
        mh, mw = self._matrix_shapes()
        return (mh, mw, self.image_shape[2])

    def _matrix_shapes(self) -> tuple[int, int]:
        return tuple(self.image_shape[:2])

    def _matrices(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        raise NotImplementedError

    def _axis_svds(self, dtype=jnp.float32):
        out = []
        for mat in self._matrices():
            u, s, vt = jnp.linalg.svd(jnp.asarray(mat, dtype), full_matrices=True)
            out.append((u, s, vt.T))
        return tuple(out)

    def _A(self, x):
        mh, mw = (jnp.asarray(m, x.dtype) for m in self._matrices())
        return jnp.einsum("ih,hwc,jw->ijc", mh, x, mw, precision=HIGHEST)

    def _A_adjoint(self, y):
        mh, mw = (jnp.asarray(m, y.dtype) for m in self._matrices())
        return jnp.einsum("ih,ijc,jw->hwc", mh, y, mw, precision=HIGHEST)

    def _svd_parts(self, dtype):
        (uh, sh, vh), (uw, sw, vw) = self._axis_svds(dtype)
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        return cast(uh), cast(sh), cast(vh), cast(uw), cast(sw), cast(vw)

    def _svd_Vt(self, x):
        _, _, vh, _, _, vw = self._svd_parts(x.dtype)
        h, w, _ = self.y_shape
        z = jnp.einsum("hk,hwc,wl->klc", vh, x, vw, precision=HIGHEST)
        return jnp.concatenate([z[:h, :w].ravel(), z[h:].ravel(), z[:h, w:].ravel()])

    def _svd_V(self, v):
        _, _, vh, _, _, vw = self._svd_parts(v.dtype)
        big_h, big_w, ch = self.image_shape
        h, w, _ = self.y_shape
        n1, n2 = h * w * ch, (big_h - h) * big_w * ch
        top = jnp.concatenate(
            [v[:n1].reshape(h, w, ch), v[n1 + n2 :].reshape(h, big_w - w, ch)], axis=1
        )
        z = jnp.concatenate([top, v[n1 : n1 + n2].reshape(big_h - h, big_w, ch)], axis=0)
        return jnp.einsum("hk,klc,wl->hwc", vh, z, vw, precision=HIGHEST)

    def _svd_Ut(self, y):
        uh, _, _, uw, _, _ = self._svd_parts(y.dtype)
        c = jnp.einsum("ih,ijc,jw->hwc", uh, y, uw, precision=HIGHEST).ravel()
        n = int(np.prod(self.image_shape))
        return jnp.concatenate([c, jnp.zeros((n - c.size,), y.dtype)])

    def _svd_U(self, c):
        uh, _, _, uw, _, _ = self._svd_parts(c.dtype)
        m = int(np.prod(self.y_shape))
        return jnp.einsum("ih,hwc,jw->ijc", uh, c[:m].reshape(self.y_shape), uw, precision=HIGHEST)

    def _svd_singulars(self):
        _, sh, _, _, sw, _ = self._svd_parts(jnp.float32)
        s = jnp.broadcast_to((sh[:, None] * sw[None, :])[:, :, None], self.y_shape).ravel()
        n = int(np.prod(self.image_shape))
        return jnp.concatenate([s, jnp.zeros((n - s.size,), s.dtype)])

    def _A_dagger(self, y):
        uh, sh, vh, uw, sw, vw = self._svd_parts(y.dtype)
        h, w, _ = self.y_shape
        s = sh[:, None, None] * sw[None, :, None]
        keep = s > getattr(self, "pinv_threshold", 0.0)
        c = jnp.einsum("ih,ijc,jw->hwc", uh, y, uw, precision=HIGHEST)
        c = jnp.where(keep, c / jnp.where(keep, s, 1), 0)
        return jnp.einsum("hk,klc,wl->hwc", vh[:, :h], c, vw[:, :w], precision=HIGHEST)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def batched(op: Operator, method: str, *, per_image: bool = False) -> Callable:
    """Batch an operator method over a leading axis.

    Args:
      op: an operator; with ``per_image=True`` a stacked operator (see :func:`stack`) whose leaves
        carry a leading batch axis B.
      method: ``"A"``, ``"A_dagger"`` or ``"A_adjoint"``.
      per_image: vmap over the operator's leaves too (one mask / kernel per image).

    Returns:
      ``f(z [B, ...]) -> [B, ...]``.
    """
    if method not in ("A", "A_dagger", "A_adjoint"):
        raise ValueError(f"method: expected 'A', 'A_dagger' or 'A_adjoint', got {method!r}")
    if method == "A_adjoint" and not op.is_linear:
        raise ValueError(f"method: {type(op).__name__} is nonlinear and has no A_adjoint")
    if per_image:
        return lambda z: jax.vmap(lambda o, zi: getattr(o, method)(zi))(op, z)
    return lambda z: jax.vmap(getattr(op, method))(z)


def stack(ops: Sequence[Operator]) -> Operator:
    """Stack operators of one class and static configuration into a batched operator pytree."""
    ops = list(ops)
    if not ops:
        raise ValueError("ops: expected at least one operator, got an empty sequence")
    treedefs = {jax.tree_util.tree_structure(o) for o in ops}
    if len(treedefs) != 1:
        raise ValueError(
            "ops: expected operators of the same class and static fields (image_shape, modes)"
        )
    leaves = jax.tree_util.tree_leaves(ops)
    if all(_is_concrete(a) for a in leaves):  # stack on the host: no eager compilation
        return jax.tree_util.tree_map(
            lambda *a: _asarray(np.stack([np.asarray(v) for v in a])), *ops
        )
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ops)


def adjointness_error(op: LinearOperator, key: jax.Array, *, dtype=jnp.float32) -> jnp.ndarray:
    """Relative adjoint error |<A x, y> - <x, Aᵀ y>| / (||A x|| ||y||) on random x, y."""
    if not op.is_linear:
        raise ValueError(f"op: expected a linear operator, got {type(op).__name__}")
    return _adjoint_gap(op, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=2)
def _adjoint_gap(op, key, dtype):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, op.image_shape, dtype)
    y = jax.random.normal(ky, op.y_shape, dtype)
    return adjoint_gap(op, x, y)


def adjoint_gap(op: LinearOperator, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """|<A x, y> - <x, Aᵀ y>| / (||A x|| ||y||) for given x [H, W, C] and y (``y_shape``)."""
    ax = op.A(x)
    lhs = jnp.vdot(ax, y)
    rhs = jnp.vdot(x, op.A_adjoint(y))
    return jnp.abs(lhs - rhs) / (jnp.linalg.norm(ax) * jnp.linalg.norm(y))
