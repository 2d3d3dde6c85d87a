"""Parity of the operators with the official RED-Diff operators (NVlabs/RED-diff @ 66482f2).

The fixtures (``tests/fixtures/reddiff_official/*.npz``, see their README) hold the official
``y_clean = H(x)`` and ``mu0 = H_pinv(y)`` for a 32x32 photo, NCHW. We compare after
NCHW -> NHWC. The official sr ``y`` is flat channel-major; ``y_clean_img`` / ``y_img`` hold the
same data as images. Tolerance 1e-5 absolute (float32 arithmetic on values of order 1; the phase
retrieval amplitudes reach ~5, still well within 1e-5 here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reddiff_jax.operators as O

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL = FIXTURES / "reddiff_official"
ATOL = 1e-5


def _load(name: str):
    return np.load(OFFICIAL / f"{name}.npz")


def _nhwc(a: np.ndarray) -> np.ndarray:
    """One image (1, C, H, W) -> (H, W, C)."""
    assert a.shape[0] == 1
    return np.asarray(a[0]).transpose(1, 2, 0)


def test_inpainting_in2_box():
    d = _load("reddiff_in2_box")
    x, mask = _nhwc(d["x"]), _nhwc(d["mask"])
    op = O.make("inpaint", (32, 32, 3), mask=mask)
    # The fixture's mask is the centred 16x16 box (rows/cols 8:24), i.e. our default box.
    np.testing.assert_array_equal(np.asarray(O.box_mask((32, 32, 3))), mask)
    y_clean = _nhwc(d["y_clean"].reshape(1, 3, 32, 32))
    y = _nhwc(d["y"].reshape(1, 3, 32, 32))
    np.testing.assert_allclose(op(x), y_clean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(op.A_dagger(y), _nhwc(d["mu0"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        O.make_from_spec("in2_box", (32, 32, 3))(x), y_clean, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("case", ["reddiff_sr4", "dps_sr4", "pgdm_sr4"])
def test_superresolution_sr4(case):
    d = _load(case)
    x = _nhwc(d["x"])
    op = O.make("sr", (32, 32, 3), factor=4)
    y_clean = _nhwc(d["y_clean_img"])
    # The flat official layout is channel-major: index = c*h*h + i*h + j.
    np.testing.assert_array_equal(y_clean.transpose(2, 0, 1).ravel(), d["y_clean"][0])
    np.testing.assert_allclose(op(x), y_clean, atol=ATOL, rtol=0)
    pinv = np.asarray(op.A_dagger(_nhwc(d["y_img"])))
    if "mu0" in d:
        np.testing.assert_allclose(pinv, _nhwc(d["mu0"]), atol=ATOL, rtol=0)
    else:  # DPS / PGDM: x_init = sqrt(a_T) H_pinv(y) + sqrt(1 - a_T) noise_init
        a = np.float32(d["alpha_t"][0])
        x_init = np.sqrt(a) * pinv + np.sqrt(1 - a) * _nhwc(d["noise_init"])
        np.testing.assert_allclose(x_init, _nhwc(d["x_init"]), atol=ATOL, rtol=0)
    # Measurement: y = y_clean + 2 sigma_y n with the recorded n (sigma_y = 0.05).
    y = np.asarray(op(x)) + 2 * 0.05 * _nhwc(d["noise_y"].reshape(1, 3, 8, 8))
    np.testing.assert_allclose(y, _nhwc(d["y_img"]), atol=ATOL, rtol=0)


def test_hdr():
    d = _load("reddiff_hdr")
    x = _nhwc(d["x"])
    op = O.make("hdr", (32, 32, 3))
    np.testing.assert_allclose(op(x), _nhwc(d["y_clean"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(op.A_dagger(_nhwc(d["y"])), _nhwc(d["mu0"]), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("case", "pad", "size"),
    [("reddiff_phase_retrieval", 8, 48), ("reddiff_phase_retrieval_pad64", 64, 160)],
)
def test_phase_retrieval(case, pad, size):
    d = _load(case)
    x = _nhwc(d["x"])
    op = O.make("phase_retrieval", (32, 32, 3), pad=pad)
    assert op.y_shape == (size, size, 3) == _nhwc(d["y"]).shape
    np.testing.assert_allclose(op(x), _nhwc(d["y_clean"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(op.A_dagger(_nhwc(d["y"])), _nhwc(d["mu0"]), atol=ATOL, rtol=0)
    if pad == 8:
        # Our default pad int(oversample / 8 * H) = 8 at H = 32 is the fixture's main case.
        assert O.make("phase_retrieval", (32, 32, 3)).y_shape == (48, 48, 3)
