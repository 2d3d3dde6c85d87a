"""Property tests of reddiff_jax.operators driven by ONE table of operators, plus per-operator
references (scipy.ndimage blur, jax.image / PIL bicubic, PIL JPEG, analytic formulas), masks,
the registry / task strings, measurement noise, and bad-input errors.

Speed: every table test computes all of its arrays inside ONE ``jax.jit`` (operators are jit
arguments), so each test costs about one compilation; inputs come from numpy's RNG.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reddiff_jax.operators as O
from reddiff_jax.operators.blur import MODES

S = 16  # image side for the table (small: fast tests)
K = jax.random.key(7)


def _k(i: int) -> jax.Array:
    return jax.random.fold_in(K, i)


# name -> (factory(shape, i) building instance i, channels supported)
TABLE = {
    "inpaint_box": (lambda s, i: O.make("inpaint", s, size=(6, 5 + i)), (1, 3)),
    "sr_avgpool": (lambda s, i: O.make("sr", s, factor=4), (1, 3)),
    "sr_bicubic": (lambda s, i: O.make("sr", s, factor=2, method="bicubic"), (1, 3)),
    "blur_gaussian": (lambda s, i: O.make("blur", s, size=5, sigma=1.0 + i), (1, 3)),
    "blur_uniform_wrap": (lambda s, i: O.make("blur", s, kind="uniform", mode="wrap"), (1,)),
    "blur_motion": (lambda s, i: O.make("blur", s, kind="motion", size=7, key=_k(i)), (1, 3)),
    "colorize": (lambda s, i: O.make("colorize", s, weights=(0.3 + 0.1 * i, 0.3, 0.3)), (3,)),
    "denoise": (lambda s, i: O.make("denoise", s), (1, 3)),
    "cs": (lambda s, i: O.make("cs", s, ratio=0.3, key=_k(i)), (1, 3)),
    "phase_retrieval": (lambda s, i: O.make("phase_retrieval", s), (1, 3)),
    "hdr": (lambda s, i: O.make("hdr", s), (1, 3)),
    "quantize_smooth": (lambda s, i: O.make("quantize", s, bits=3, rounding="smooth"), (1, 3)),
    "jpeg": (lambda s, i: O.make("jpeg", s, quality=30), (1, 3)),
}
EXACT_PINV = ("inpaint_box", "sr_avgpool", "colorize")


def _cases(all_channels: bool) -> list:
    """(name, C) pairs: every supported C, or only the first (C = 1 except colorize)."""
    return [
        pytest.param(name, c, id=f"{name}-C{c}")
        for name, (_, chans) in TABLE.items()
        for c in (chans if all_channels else chans[:1])
    ]


ALL_C = _cases(True)
ONE_C = _cases(False)


def _build(name: str, channels: int, i: int = 0) -> O.Operator:
    return TABLE[name][0]((S, S, channels), i)


def _image(shape, seed=0, dtype=np.float32) -> jnp.ndarray:
    """A test image in (-1, 1) from numpy's RNG (device_put: no JAX compilation)."""
    return jax.device_put(np.tanh(np.random.default_rng(seed).standard_normal(shape)).astype(dtype))


def _normal(shape, seed) -> jnp.ndarray:
    return jax.device_put(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------------
# Table-driven properties
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "channels"), ALL_C)
def test_core_properties(name, channels):
    """Shapes, A_dagger, grad; adjoint dot-product test (linear); SVD consistency (if any)."""
    op = _build(name, channels)
    shape, y_shape = op.image_shape, op.y_shape
    n, m = int(np.prod(shape)), int(np.prod(y_shape))
    x, x_true = _image(shape, 20), _image(shape, 21)
    xs = [_normal(shape, seed) for seed in range(3)]
    ys = [_normal(y_shape, seed + 100) for seed in range(3)]
    v = _normal((n,), 5)

    @jax.jit
    def probe(o, x, x_true, xs, ys, v):
        y = jax.lax.stop_gradient(o(x_true))
        r = {
            "y": y,
            "back": o.A_dagger(y),
            "grad": jax.grad(lambda z: jnp.sum((o(z) - y) ** 2))(x),
        }
        if o.is_linear:
            r["gaps"] = [O.adjoint_gap(o, a, b) for a, b in zip(xs, ys, strict=True)]
        if o.svd is not None:
            svd, yy = o.svd, ys[0]
            s = svd.singulars
            c = v.at[m:].set(0.0)
            r |= {
                "s": s,
                "usv": svd.U(s * svd.Vt(x)),
                "ax": o.A(x),
                "vsu": svd.V(s * svd.Ut(yy)),
                "aty": o.A_adjoint(yy),
                "vvt": svd.V(svd.Vt(x)),
                "vtv": svd.Vt(svd.V(v)),
                "vt": svd.Vt(x),
                "ut": svd.Ut(yy),
                "uut": svd.U(svd.Ut(yy)),
                "c": c,
                "utu": svd.Ut(svd.U(c)),
            }
        return r

    r = jax.tree.map(np.asarray, probe(op, x, x_true, xs, ys, v))
    assert r["y"].shape == y_shape and r["y"].dtype == jnp.float32
    assert r["back"].shape == shape and bool(np.all(np.isfinite(r["back"])))
    assert op.is_linear == isinstance(op, O.LinearOperator)
    assert (op.svd is not None) == op.has_svd
    # jax.grad of ||op(x) - y||² is finite and non-zero (quantize: smooth rounding; the exact
    # official rounding has zero gradient, see test_hdr_and_quantize_analytic).
    g = r["grad"]
    assert g.shape == shape and bool(np.all(np.isfinite(g)))
    assert float(np.max(np.abs(g))) > 0
    if op.is_linear:
        # |<Ax, y> - <x, Aᵀy>| / (||Ax|| ||y||) on random inputs, float32.
        assert max(float(e) for e in r["gaps"]) < 1e-5, (name, r["gaps"])
    if op.svd is not None:
        s = r["s"]
        assert s.shape == (n,) and s.dtype == jnp.float32
        assert bool(np.all(s >= 0)) and bool(np.all(s[m:] == 0))
        assert _rel(r["usv"], r["ax"]) < 1e-5  # A(x) = U(s * Vt(x))
        assert _rel(r["vsu"], r["aty"]) < 1e-5  # Aᵀ y = V(s * Ut(y))
        # Orthogonality: V, U isometries, inverse to their transposes.
        assert _rel(r["vvt"], x) < 1e-5 and _rel(r["vtv"], v) < 1e-5
        assert abs(float(np.linalg.norm(r["vt"]) / np.linalg.norm(x)) - 1) < 1e-5
        assert r["ut"].shape == (n,) and bool(np.all(r["ut"][m:] == 0))
        assert _rel(r["uut"], ys[0]) < 1e-5
        assert abs(float(np.linalg.norm(r["ut"]) / np.linalg.norm(ys[0])) - 1) < 1e-5
        assert _rel(r["utu"], r["c"]) < 1e-5


@pytest.mark.parametrize("name", EXACT_PINV)
def test_pseudo_inverse(name):
    op = _build(name, 3)
    x = _image(op.image_shape, 1)
    y = _normal(op.y_shape, 2)

    @jax.jit
    def probe(o, x, y):
        ax = o.A(x)
        pinv_y = o.A_dagger(y)
        return ax, o.A(o.A_dagger(ax)), pinv_y, o.A_dagger(o.A(pinv_y))

    ax, aapax, pinv_y, ppy = probe(op, x, y)
    assert _rel(aapax, ax) < 1e-6  # A A† A x = A x
    assert _rel(ppy, pinv_y) < 1e-6  # A† A A† y = A† y


@pytest.mark.parametrize(("name", "channels"), ONE_C)
def test_dtype_preserved(name, channels):
    op = _build(name, channels)
    x32 = _image(op.image_shape, 7)
    dtypes = (jnp.bfloat16, jnp.float16, jnp.float32)

    @jax.jit
    def probe(o, x):
        out = {}
        for dt in dtypes:
            y = o(x.astype(dt))
            out[jnp.dtype(dt).name] = (y, o.A_dagger(y), o.A_adjoint(y) if o.is_linear else y)
        return out

    out = probe(op, x32)
    ref = out["float32"][0]
    tol = 3e-2 * float(np.max(np.abs(ref))) + 3e-2
    for dt in dtypes:
        y, back, adj = out[jnp.dtype(dt).name]
        assert y.dtype == dt and back.dtype == dt and adj.dtype == dt, (name, dt)
        if not name.startswith(("quantize", "jpeg")):  # rounding may move by one level
            np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=tol)
    # float64 in, float64 out; and the adjoint test to float64 precision.
    with jax.enable_x64(True):
        x64 = x32.astype(jnp.float64)
        a64 = jax.device_put(np.random.default_rng(0).standard_normal(op.image_shape))
        b64 = jax.device_put(np.random.default_rng(1).standard_normal(op.y_shape))

        @jax.jit
        def probe64(o, x, a, b):
            y = o(x)
            return y, o.A_dagger(y), O.adjoint_gap(o, a, b) if o.is_linear else jnp.zeros(())

        y64, back64, gap64 = probe64(op, x64, a64, b64)
        assert y64.dtype == jnp.float64 and back64.dtype == jnp.float64
        np.testing.assert_allclose(y64, ref, atol=1e-4)
        assert float(gap64) < 1e-12, (name, float(gap64))


@pytest.mark.parametrize(("name", "channels"), ONE_C)
def test_jit_and_vmap_over_operator_instances(name, channels):
    ops = [_build(name, channels, i) for i in range(3)]
    stacked = O.stack(ops)
    xs = _image((3, *ops[0].image_shape), 10)

    @jax.jit
    def probe(stacked, ops, xs):
        ys = O.batched(stacked, "A", per_image=True)(xs)
        back = O.batched(stacked, "A_dagger", per_image=True)(ys)
        loop = [(o.A(x), o.A_dagger(o.A(x))) for o, x in zip(ops, xs, strict=True)]
        return ys, back, O.batched(ops[0], "A")(xs), loop

    ys, back, ys_shared, loop = jax.tree.map(np.asarray, probe(stacked, ops, xs))
    assert ys.shape == (3, *ops[0].y_shape) and back.shape == xs.shape
    # vmap over (operator, image) pairs, one mask / kernel per image == each operator alone.
    for i in range(3):
        np.testing.assert_allclose(ys[i], loop[i][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(back[i], loop[i][1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ys_shared[0], loop[0][0], rtol=1e-5, atol=1e-5)
    assert ys_shared.shape == ys.shape
    # jit == no jit (eager dispatch) for one instance.
    np.testing.assert_allclose(ops[1](np.asarray(xs)[1]), ys[1], rtol=1e-5, atol=1e-5)
    if name.startswith(("inpaint", "blur_motion", "cs", "colorize")):
        assert not np.allclose(ys[0], ys[1])  # the instances really differ


# ------------------------------------------------------------------------------------------------
# Per-operator references
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "uniform", "motion"])
def test_blur_matches_scipy(kind):
    ndimage = pytest.importorskip("scipy.ndimage")
    shape = (S, S + 4, 3)
    x = _image(shape, 30)
    for mode in MODES:
        if kind == "gaussian":
            op = O.make("blur", shape, size=7, sigma=1.7, mode=mode)
            kernel = np.outer(op.kernel_h, op.kernel_w)
        elif kind == "uniform":
            op = O.make("blur", shape, kind="uniform", size=5, mode=mode)
            kernel = np.outer(op.kernel_h, op.kernel_w)
        else:
            op = O.make("blur", shape, kind="motion", size=9, intensity=0.8, key=_k(3), mode=mode)
            kernel = np.asarray(op.kernel)
        ref = np.stack(
            [
                ndimage.convolve(
                    np.asarray(x[..., c], np.float64), kernel.astype(np.float64), mode=mode
                )
                for c in range(3)
            ],
            -1,
        )
        # float32 arithmetic vs float64 scipy on the same kernel and boundary mode.
        np.testing.assert_allclose(op(x), ref, atol=2e-6, rtol=0, err_msg=f"{kind} {mode}")


def test_adjointness_error_helper():
    assert float(O.adjointness_error(O.make("sr", (8, 8, 3), factor=2), _k(0))) < 1e-5
    with pytest.raises(ValueError, match="op: expected a linear operator"):
        O.adjointness_error(O.make("hdr", (8, 8, 1)), _k(0))


def test_blur_kernels():
    g = np.asarray(O.gaussian_kernel(5, sigma=25.0), np.float64)
    i = np.arange(5) - 2
    ref = np.exp(-0.5 * (i / 25.0) ** 2)
    np.testing.assert_allclose(g, ref / ref.sum(), rtol=1e-6)
    np.testing.assert_allclose(g, [0.1997, 0.2002, 0.2003, 0.2002, 0.1997], atol=1e-4)
    np.testing.assert_allclose(O.uniform_kernel(9), np.full(9, 1 / 9), rtol=1e-6)
    m = O.motion_kernel(_k(0), size=15, intensity=0.7)
    assert m.shape == (15, 15) and bool(np.all(m >= 0))
    np.testing.assert_allclose(float(m.sum()), 1.0, rtol=1e-6)
    assert int(np.sum(np.asarray(m) > 1e-3)) >= 5  # a path, not a point
    np.testing.assert_array_equal(O.motion_kernel(_k(0), size=15, intensity=0.7), m)
    assert not np.allclose(O.motion_kernel(_k(1), size=15, intensity=0.7), m)


def test_blur_pinv_recovers_smooth_components():
    op = O.make("blur", (S, S, 1), size=5, sigma=1.0, mode="reflect")
    # With threshold 0 the SVD pseudo-inverse is exact: A A† A x = A x.
    exact = O.SeparableBlur.create(op.image_shape, kernel_h=op.kernel_h, pinv_threshold=0.0)
    x = _image(op.image_shape, 31)
    assert _rel(exact.A(exact.A_dagger(exact.A(x))), exact.A(x)) < 1e-4
    # Thresholded (default 3e-2): still a least-squares fit on the kept components.
    assert _rel(op.A(op.A_dagger(op.A(x))), op.A(x)) < 5e-2


@pytest.mark.parametrize("factor", [2, 4])
def test_bicubic_matches_jax_image_resize(factor):
    shape = (32, 24, 3)
    op = O.make("sr", shape, factor=factor, method="bicubic")
    x = _image(shape, 40)
    ref = jax.image.resize(x, (32 // factor, 24 // factor, 3), method="bicubic", antialias=True)
    # Same definition (Keys a = -0.5, kernel stretched by the factor, border renormalisation).
    np.testing.assert_allclose(op(x), ref, atol=1e-6)


@pytest.mark.parametrize("factor", [2, 4])
def test_bicubic_matches_pil(factor):
    pil = pytest.importorskip("PIL.Image")
    shape = (32, 24, 1)
    op = O.make("sr", shape, factor=factor, method="bicubic")
    x = _image(shape, 41)
    img = pil.fromarray(np.asarray(x[..., 0], np.float32), mode="F")
    ref = np.asarray(img.resize((24 // factor, 32 // factor), pil.Resampling.BICUBIC))
    # PIL computes the same weights in double and accumulates in float: agreement to 1e-5.
    np.testing.assert_allclose(op(x)[..., 0], ref, atol=1e-5)


def test_avgpool_sr_analytic():
    x = _image((8, 12, 2), 42)
    op = O.make("sr", (8, 12, 2), factor=4)
    ref = np.asarray(x).reshape(2, 4, 3, 4, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(op(x), ref, atol=1e-6)
    up = op.A_dagger(op(x))
    np.testing.assert_array_equal(
        np.asarray(up)[:4, :4], np.broadcast_to(np.asarray(op(x))[0, 0], (4, 4, 2))
    )
    np.testing.assert_allclose(op.svd.singulars[: op.svd.m], 0.25, rtol=1e-6)


def test_colorize_analytic():
    x = _image((4, 4, 3), 43)
    op = O.make("colorize", (4, 4, 3))
    ref = np.asarray(x, np.float64) @ np.array([0.3333, 0.3334, 0.3333])
    np.testing.assert_allclose(op(x)[..., 0], ref, atol=1e-6)
    w = np.array([0.3333, 0.3334, 0.3333])
    np.testing.assert_allclose(
        op.A_dagger(op(x)), ref[..., None] * w / np.dot(w, w), rtol=1e-5, atol=1e-6
    )
    # Also a one-hot weight (Householder edge case).
    op1 = O.make("colorize", (4, 4, 3), weights=(1.0, 0.0, 0.0))
    assert _rel(op1.svd.U(op1.svd.singulars * op1.svd.Vt(x)), op1(x)) < 1e-6


def test_cs_rows_are_orthonormal():
    op = O.make("cs", (S, S, 1), ratio=0.25, key=_k(0))
    assert op.y_shape == (64,)
    y = jax.random.normal(jax.random.key(0), op.y_shape)
    np.testing.assert_allclose(op.A(op.A_adjoint(y)), y, atol=1e-5)  # A Aᵀ = I
    np.testing.assert_allclose(op.A_dagger(y), op.A_adjoint(y), atol=0)


def test_phase_retrieval_analytic():
    x = _image((S, S, 2), 44)
    op = O.make("phase_retrieval", (S, S, 2))
    assert (op.pad_h, op.pad_w) == (4, 4) and op.y_shape == (24, 24, 2)
    y = op(x)
    assert bool(np.all(y >= 0))
    # Orthonormal FFT (Parseval) per channel.
    np.testing.assert_allclose(
        np.sum(np.asarray(y) ** 2, axis=(0, 1)), np.sum(np.asarray(x) ** 2, axis=(0, 1)), rtol=1e-5
    )
    xp = np.pad(np.asarray(x, np.float64), ((4, 4), (4, 4), (0, 0)))
    ref = np.abs(
        np.fft.fftshift(
            np.fft.fft2(np.fft.ifftshift(xp, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1)
        )
    )
    np.testing.assert_allclose(y, ref, atol=2e-6)
    # Magnitude is invariant to a sign flip of x (a trivial ambiguity of phase retrieval).
    np.testing.assert_allclose(op(-x), y, atol=1e-6)
    assert O.make("phase_retrieval", (S, S, 2), pad=(1, 3)).y_shape == (18, 22, 2)


def test_hdr_and_quantize_analytic():
    x = np.asarray(_image((S, S, 3), 45), np.float64) * 1.2
    np.testing.assert_allclose(O.make("hdr", (S, S, 3))(x), np.clip(2 * x, -1, 1), atol=1e-6)
    for bits in (1, 3, 8):
        q = O.make("quantize", (S, S, 3), bits=bits)(x)
        n = 2**bits - 1
        ref = np.floor((x + 1) / 2 * n + 0.5) / n * 2 - 1
        np.testing.assert_allclose(q, ref, atol=1e-6)
    u = jnp.linspace(-2.0, 2.0, 41)
    r = jnp.floor(u + 0.5)
    np.testing.assert_array_equal(O.round_surrogate(u, "exact"), r)
    np.testing.assert_array_equal(O.round_surrogate(u, "ste"), r)
    assert float(np.max(np.abs(O.round_surrogate(u, "smooth") - r))) <= 0.125 + 1e-6
    np.testing.assert_allclose(jax.grad(lambda v: O.round_surrogate(v, "ste").sum())(u), 1.0)


@pytest.mark.parametrize("quality", [10, 50, 95])
def test_jpeg_grayscale_matches_pil(quality):
    pil = pytest.importorskip("PIL.Image")
    d = np.asarray(_image((32, 32, 1), 46))
    u8 = np.round((d[..., 0] + 1) * 127.5).astype(np.uint8)
    buf = io.BytesIO()
    pil.fromarray(u8).save(buf, "JPEG", quality=quality)
    ref = np.asarray(pil.open(io.BytesIO(buf.getvalue())), np.float64)
    x = jnp.asarray(u8 / 127.5 - 1.0, jnp.float32)[..., None]
    op = O.make("jpeg", (32, 32, 1), quality=quality, rounding="exact")
    got = (np.asarray(op(x)[..., 0], np.float64) + 1) * 127.5
    # Same tables and DCT; libjpeg works in integers and rounds the output: <= 1 grey level mean.
    assert np.abs(got - ref).mean() < 1.0, np.abs(got - ref).mean()


_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def _pil_jpeg(pil, u8: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    pil.fromarray(u8).save(buf, "JPEG", quality=quality, subsampling=2)  # 4:2:0
    return np.asarray(pil.open(io.BytesIO(buf.getvalue())), np.float64)


def test_jpeg_colour_matches_pil():
    pil = pytest.importorskip("PIL.Image")
    r, c = np.meshgrid(np.arange(32) / 32, np.arange(32) / 32, indexing="ij")
    luma = 128 + 60 * np.sin(2 * np.pi * (r + 2 * c)) + 20 * np.cos(6 * np.pi * r)
    # (a) Constant chroma: subsampling and upsampling are exact for libjpeg and for us, so the
    # whole pipeline (colour transform, DCT, tables, quantisation) is compared.
    ycc = np.stack([luma, np.full_like(luma, 15.0), np.full_like(luma, -10.0)], -1)
    flat = np.round(ycc @ np.linalg.inv(_YCC).T).clip(0, 255).astype(np.uint8)
    # (b) Varying chroma: libjpeg upsamples chroma with a triangular filter, ours replicates (as
    # DiffJPEG), so only the luma of the decoded images is compared.
    tint = np.stack([np.sin(2 * np.pi * (r + 2 * c)), np.sin(2 * np.pi * (2 * r + c) + 1)], -1)
    ycc = np.concatenate([luma[..., None], 40 * tint], -1)
    varying = np.round(ycc @ np.linalg.inv(_YCC).T).clip(0, 255).astype(np.uint8)
    for quality in (10, 50, 90):
        op = O.make("jpeg", (32, 32, 3), quality=quality, rounding="exact")
        for u8, what in ((flat, "flat"), (varying, "varying")):
            ref = _pil_jpeg(pil, u8, quality)
            got = np.asarray(op(jnp.asarray(u8 / 127.5 - 1.0, jnp.float32)), np.float64) + 1
            got = got * 127.5
            if what == "flat":  # libjpeg is integer arithmetic: < 1 grey level on average
                err = np.abs(got - ref).mean()
            else:
                err = np.abs((got - ref) @ _YCC[0]).mean()
            assert err < 1.0, (quality, what, err)
            if quality <= 50:  # far below the compression error itself
                assert err < 0.5 * np.abs(u8 - ref).mean()


def test_jpeg_pads_odd_sizes():
    op = O.make("jpeg", (20, 12, 3), quality=50)
    y = op(_image((20, 12, 3), 48))
    assert y.shape == (20, 12, 3) and bool(np.all(np.abs(np.asarray(y)) <= 1))


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
def test_box_mask():
    m = np.asarray(O.box_mask((32, 32, 3)))
    ref = np.ones((32, 32, 3), np.float32)
    ref[8:24, 8:24] = 0
    np.testing.assert_array_equal(m, ref)
    m2 = np.asarray(O.box_mask((10, 12, 1), size=(3, 4), position=(1, 2)))
    assert m2.sum() == 120 - 12 and m2[1:4, 2:6].sum() == 0


def test_random_mask():
    m = O.random_mask(_k(0), (32, 32, 3), fraction=0.3)
    assert int(m[..., 0].sum()) == round(0.3 * 1024)
    np.testing.assert_array_equal(m[..., 0], m[..., 2])
    np.testing.assert_array_equal(O.random_mask(_k(0), (32, 32, 3), fraction=0.3), m)
    assert not np.array_equal(O.random_mask(_k(1), (32, 32, 3), fraction=0.3), m)


def test_freeform_mask_hole_fraction():
    side = 32
    masks = np.stack([O.freeform_mask(_k(i), (side, side, 1)) for i in range(8)])
    holes = 1 - np.asarray(masks).mean(axis=(1, 2, 3))
    assert set(np.unique(np.asarray(masks))) <= {0.0, 1.0}
    # Target drawn in [0.2, 0.3]; realised within about half a stroke of it.
    assert holes.min() >= 0.17 and holes.max() <= 0.33, holes
    fixed = O.freeform_mask(_k(0), (side, side, 1), hole_fraction=0.25)
    assert abs(1 - float(fixed.mean()) - 0.25) < 0.04
    np.testing.assert_array_equal(O.freeform_mask(_k(0), (side, side, 1)), masks[0])


# ------------------------------------------------------------------------------------------------
# Registry and task strings
# ------------------------------------------------------------------------------------------------
SPECS = [
    ("sr:4", "sr", {"factor": 4}),
    ("sr:4:bicubic", "sr", {"factor": 4, "method": "bicubic"}),
    ("sr4", "sr", {"factor": 4}),
    ("bicubic2", "sr", {"factor": 2, "method": "bicubic"}),
    ("inpaint:box", "inpaint", {"mask": "box"}),
    ("inpaint:box:8", "inpaint", {"mask": "box", "size": 8}),
    ("inpaint:box:size=4,6:position=0,0", "inpaint",
     {"mask": "box", "size": (4, 6), "position": (0, 0)}),
    ("inpaint:random:0.5", "inpaint", {"mask": "random", "fraction": 0.5}),
    ("inpaint:freeform", "inpaint", {"mask": "freeform"}),
    ("in2_20ff", "inpaint", {"mask": "freeform", "hole_fraction": (0.2, 0.3)}),
    ("in2_box", "inpaint", {"mask": "box"}),
    ("blur:gaussian", "blur", {"kind": "gaussian"}),
    ("blur:gaussian:9:2.5:mode=constant", "blur",
     {"kind": "gaussian", "size": 9, "sigma": 2.5, "mode": "constant"}),
    ("blur:motion:7:0.3", "blur", {"kind": "motion", "size": 7, "intensity": 0.3}),
    ("deblur_gauss", "blur", {"kind": "gaussian", "size": 5, "sigma": 25.0, "mode": "constant"}),
    ("deblur_uni", "blur", {"kind": "uniform", "size": 9, "mode": "constant"}),
    ("colorize", "colorize", {}),
    ("color", "colorize", {}),
    ("denoise", "denoise", {}),
    ("deno", "denoise", {}),
    ("cs:0.1", "cs", {"ratio": 0.1}),
    ("phase_retrieval", "phase_retrieval", {}),
    ("phase_retrieval:pad=8", "phase_retrieval", {"pad": 8}),
    ("phase_retrieval:2.0", "phase_retrieval", {"oversample": 2.0}),
    ("hdr", "hdr", {}),
    ("hdr:3", "hdr", {"scale": 3}),
    ("quantize:3", "quantize", {"bits": 3}),
    ("quant4", "quantize", {"bits": 4}),
    ("jpeg:10", "jpeg", {"quality": 10}),
    ("jpeg20", "jpeg", {"quality": 20}),
    ("jpeg:10:rounding=exact", "jpeg", {"quality": 10, "rounding": "exact"}),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "name", "params"), SPECS, ids=[s for s, _, _ in SPECS])
def test_parse_spec(spec, name, params):
    assert O.parse_spec(spec) == (name, params)
    shape = (32, 32, 3)
    op = O.make_from_spec(spec, shape, key=_k(0))
    assert op.image_shape == shape


def test_make_from_spec_builds_expected_classes():
    shape = (32, 32, 1)
    kinds = {
        "sr:4": O.AvgPoolSR,
        "sr:2:bicubic": O.BicubicSR,
        "blur:gaussian": O.SeparableBlur,
        "blur:motion": O.Blur,
        "inpaint:random:0.5": O.Inpainting,
        "cs:0.5": O.CompressedSensing,
        "jpeg:10": O.JPEG,
    }
    for spec, cls in kinds.items():
        assert type(O.make_from_spec(spec, shape, key=_k(1))) is cls, spec
    op = O.make_from_spec("inpaint:random:0.5", shape, key=_k(1))
    assert float(op.observed_fraction) == 0.5
    assert O.make_from_spec("phase_retrieval:pad=8", shape).y_shape == (48, 48, 1)
    assert O.make_from_spec("blur:uniform:5", shape).kernel_h.shape == (5,)


def test_public_api_is_documented():
    import inspect

    for name in O.__all__:
        obj = getattr(O, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
    # Random functions take the key first; options are keyword-only.
    for fn in (O.random_mask, O.freeform_mask, O.motion_kernel, O.CompressedSensing.create):
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].name == "key", fn
        assert all(p.kind is p.KEYWORD_ONLY for p in params if p.default is not p.empty), fn


def test_registry_lists_names_and_params():
    assert set(O.NAMES) == {
        "inpaint",
        "sr",
        "blur",
        "colorize",
        "denoise",
        "cs",
        "phase_retrieval",
        "hdr",
        "quantize",
        "jpeg",
    }
    assert O.valid_params("sr") == ("factor", "method")
    assert "key" in O.valid_params("cs")


# ------------------------------------------------------------------------------------------------
# Measurement noise
# ------------------------------------------------------------------------------------------------
def test_measure_gaussian_statistics():
    op = O.make("denoise", (32, 32, 3))
    x = jnp.stack([_image((32, 32, 3), 60 + i) for i in range(8)])
    sigma_y = 0.05
    y = O.measure(op, x, _k(0), sigma_y)
    noise = np.asarray(y - x, np.float64).ravel()
    n = noise.size  # 24576
    std = 2 * sigma_y
    # Monte-Carlo tolerances: 6 standard errors.
    assert abs(noise.mean()) < 6 * std / np.sqrt(n)
    assert abs(noise.std() / std - 1) < 6 / np.sqrt(2 * n)
    # Independent noise per image of the batch.
    assert abs(np.corrcoef(noise.reshape(8, -1)[0], noise.reshape(8, -1)[1])[0, 1]) < 0.05
    # Same key, same y; another key, another y; sigma_y = 0 is exact.
    np.testing.assert_array_equal(O.measure(op, x, _k(0), sigma_y), y)
    assert not np.allclose(O.measure(op, x, _k(1), sigma_y), y)
    np.testing.assert_array_equal(O.measure(op, x, _k(0), 0.0), x)
    # One image: y_shape of the operator.
    sr = O.make("sr", (32, 32, 3), factor=4)
    assert O.measure(sr, x[0], _k(0), 0.1).shape == (8, 8, 3)


def test_measure_poisson_statistics():
    op = O.make("denoise", (64, 64, 3))
    u = 0.5  # [0, 1] intensity
    x = jnp.full((64, 64, 3), 2 * u - 1, jnp.float32)
    sigma_y = 0.1
    y = O.measure(op, x, _k(2), sigma_y, kind="poisson")
    noisy = (np.asarray(y, np.float64).ravel() + 1) / 2
    n = noisy.size  # 12288
    var = sigma_y**2 * u
    assert abs(noisy.mean() - u) < 6 * np.sqrt(var / n)
    assert abs(noisy.var() / var - 1) < 6 * np.sqrt(2 / n) + 0.02  # (Poisson excess kurtosis)
    counts = noisy / sigma_y**2
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)  # integer photon counts
    np.testing.assert_array_equal(O.measure(op, x, _k(2), sigma_y, kind="poisson"), y)
    np.testing.assert_allclose(O.measure(op, x, _k(2), 0.0, kind="poisson"), x, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_error_unknown_operator_name():
    with pytest.raises(ValueError, match=r"name: expected one of .*inpaint.*jpeg"):
        O.make("superres", (32, 32, 3))
    with pytest.raises(ValueError, match="unknown operator 'deblur'"):
        O.make_from_spec("deblur:3", (32, 32, 3))


def test_error_wrong_image_shape():
    op = O.make("sr", (32, 32, 3), factor=4)
    with pytest.raises(
        ValueError, match=r"x: expected one image .* \(32, 32, 3\), got \(2, 32, 32, 3\)"
    ):
        op(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="x: expected"):
        op(np.zeros((32, 32, 1), np.float32))
    with pytest.raises(TypeError, match="x: expected a floating array"):
        op(np.zeros((32, 32, 3), np.int32))
    with pytest.raises(ValueError, match="y: expected one measurement"):
        op.A_dagger(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="image_shape"):
        O.make("hdr", (32, 32))
    with pytest.raises(ValueError, match="image_shape: colorize needs C = 3"):
        O.make("colorize", (32, 32, 1))


def test_error_mask_of_wrong_shape():
    with pytest.raises(ValueError, match=r"mask: expected shape \(32, 32\).*got \(16, 16\)"):
        O.make("inpaint", (32, 32, 3), mask=np.ones((16, 16)))
    with pytest.raises(ValueError, match="mask: expected values in"):
        O.make("inpaint", (4, 4, 1), mask=np.full((4, 4), 0.5))


def test_error_factor_does_not_divide():
    with pytest.raises(
        ValueError, match=r"factor: expected a divisor of the image size \(30, 30\)"
    ):
        O.make("sr", (30, 30, 3), factor=4)
    with pytest.raises(ValueError, match="factor: expected a positive int"):
        O.make("sr", (32, 32, 3), factor=0)


def test_error_non_finite_y():
    op = O.make("inpaint", (8, 8, 1))
    y = np.zeros((8, 8, 1), np.float32)
    y[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="y: expected finite values"):
        op.A_dagger(y)
    with pytest.raises(ValueError, match="y: expected finite values"):
        O.make("phase_retrieval", (8, 8, 1)).A_dagger(np.full((12, 12, 1), np.inf, np.float32))
    with pytest.raises(ValueError, match="measurement op\\(x\\) \\+ noise is not finite"):
        O.measure(op, np.full((8, 8, 1), np.nan, np.float32), _k(0), 0.1)


def test_error_bad_params():
    with pytest.raises(ValueError, match=r"sigmaa: not a parameter of operator 'blur'; valid"):
        O.make("blur", (32, 32, 3), sigmaa=2.0)
    with pytest.raises(ValueError, match="sigma: not a parameter of blur with kind='uniform'"):
        O.make("blur", (32, 32, 3), kind="uniform", sigma=2.0)
    with pytest.raises(ValueError, match="size: expected an odd positive int"):
        O.make("blur", (32, 32, 3), size=4)
    with pytest.raises(ValueError, match="mode: expected one of"):
        O.make("blur", (32, 32, 3), mode="periodic")
    with pytest.raises(ValueError, match="kernel: expected a half-width smaller"):
        O.make("blur", (4, 4, 1), size=9)
    with pytest.raises(ValueError, match="key: inpaint with mask='random' is random"):
        O.make("inpaint", (32, 32, 3), mask="random")
    with pytest.raises(ValueError, match="key: cs"):
        O.make_from_spec("cs:0.5", (32, 32, 3))
    with pytest.raises(ValueError, match="fraction: expected a number in"):
        O.make("inpaint", (32, 32, 3), mask="random", fraction=1.5, key=_k(0))
    with pytest.raises(ValueError, match="method: expected 'avgpool' or 'bicubic'"):
        O.make("sr", (32, 32, 3), method="lanczos")
    with pytest.raises(ValueError, match="quality: expected an int in 1..100"):
        O.make("jpeg", (32, 32, 3), quality=0)
    with pytest.raises(ValueError, match="bits: expected an int"):
        O.make("quantize", (32, 32, 3), bits=0)
    with pytest.raises(ValueError, match="rounding: expected one of"):
        O.make("quantize", (32, 32, 3), rounding="floor")
    with pytest.raises(ValueError, match="ratio: expected a number in"):
        O.make("cs", (32, 32, 3), ratio=0.0, key=_k(0))
    with pytest.raises(ValueError, match="too many positional arguments"):
        O.parse_spec("sr:4:bicubic:9")
    with pytest.raises(ValueError, match="kind: expected one of"):
        O.measure(
            O.make("hdr", (4, 4, 1)), np.zeros((4, 4, 1), np.float32), _k(0), 0.1, kind="laplace"
        )
    with pytest.raises(ValueError, match="sigma_y: expected a finite number >= 0"):
        O.measure(O.make("hdr", (4, 4, 1)), np.zeros((4, 4, 1), np.float32), _k(0), -0.1)
    with pytest.raises(ValueError, match="position: expected the 16x16 hole inside"):
        O.make("inpaint", (32, 32, 3), position=(20, 0))
