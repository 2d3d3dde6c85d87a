"""reddiff_jax.imageio: decoding every image kind to [0, 1], channel conversion with notices,
the [-1, 1] <-> uint8 formulas, PNG bytes and atomic writes (issue 12)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import chex
import numpy as np
import pytest
from PIL import Image

from reddiff_jax import imageio

EXIF_ORIENTATION = 0x0112


# ------------------------------------------------------------------------------------------------
# reading: one table of files and the exact arrays they decode to


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _palette(transparency: int | None) -> Image.Image:
    im = Image.new("P", (3, 2))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    im.putdata([0, 1, 2, 2, 1, 0])
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


GREY8 = np.array([[0, 1, 128], [200, 254, 255]], np.uint8)
GREY16 = np.array([[0, 1000], [40000, 65535]], np.uint16)
RGB8 = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 14
RGBA8 = np.concatenate([RGB8, np.array([[[0], [128], [255]]] * 2, np.uint8)], axis=-1)
FLOAT01 = np.array([[0.0, 0.25, 1e-7], [0.5, 0.999999, 1.0]], np.float32)
PALETTE_RGB = np.array([[[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 0], [1, 0, 0], [0, 0, 0]]])
PALETTE_ALPHA = np.array([[0, 1, 1], [1, 1, 0]])[..., None]


def _u8(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) / np.float32(255)


# (id, writer(tmp_path) -> path, expected float32 [H, W, C], atol)
READ_CASES = [
    ("grey8_png", lambda d: _save(Image.fromarray(GREY8), d / "g.png"), _u8(GREY8)[..., None], 0),
    (
        "grey16_png",
        lambda d: _save(Image.fromarray(GREY16), d / "g16.png"),
        (GREY16 / 65535.0)[..., None],
        1e-7,
    ),
    (
        "grey16_tiff_big_endian",
        lambda d: _save(
            Image.frombytes("I;16B", (2, 2), GREY16.astype(">u2").tobytes()), d / "g16.tif"
        ),
        (GREY16 / 65535.0)[..., None],
        1e-7,
    ),
    (
        "grey16_pgm_mode_I",
        lambda d: _save(Image.fromarray(GREY16), d / "g16.pgm"),
        (GREY16 / 65535.0)[..., None],
        1e-7,
    ),
    ("float_tiff", lambda d: _save(Image.fromarray(FLOAT01), d / "f.tif"), FLOAT01[..., None], 0),
    (
        "float_tiff_rounding_clipped",
        lambda d: _save(Image.fromarray(np.array([[-5e-7, 1 + 5e-7]], np.float32)), d / "f.tif"),
        np.array([[[0.0], [1.0]]]),
        0,
    ),
    ("rgb_png", lambda d: _save(Image.fromarray(RGB8), d / "c.png"), _u8(RGB8), 0),
    ("rgba_png", lambda d: _save(Image.fromarray(RGBA8), d / "c.png"), _u8(RGBA8), 0),
    (
        "grey_alpha_png",
        lambda d: _save(Image.fromarray(RGBA8[..., 2:]), d / "la.png"),
        _u8(RGBA8[..., 2:]),
        0,
    ),
    ("palette_png", lambda d: _save(_palette(None), d / "p.png"), PALETTE_RGB, 0),
    (
        "palette_png_transparent",
        lambda d: _save(_palette(0), d / "p.png", transparency=0),
        np.concatenate([PALETTE_RGB, PALETTE_ALPHA], axis=-1),
        0,
    ),
    ("palette_gif", lambda d: _save(_palette(None), d / "p.gif"), PALETTE_RGB, 0),
    (
        "palette_gif_transparent",
        lambda d: _save(_palette(0), d / "p.gif", transparency=0),
        np.concatenate([PALETTE_RGB, PALETTE_ALPHA], axis=-1),
        0,
    ),
    (
        "grey_png_transparent_value",
        lambda d: _save(Image.fromarray(GREY8), d / "g.png", transparency=128),
        np.stack([_u8(GREY8), (GREY8 != 128).astype(np.float32)], axis=-1),
        0,
    ),
    (
        "one_bit_png",
        lambda d: _save(Image.fromarray(np.array([[True, False], [False, True]])), d / "b.png"),
        np.array([[1.0, 0.0], [0.0, 1.0]])[..., None],
        0,
    ),
    ("rgb_bmp", lambda d: _save(Image.fromarray(RGB8), d / "c.bmp"), _u8(RGB8), 0),
    ("rgb_tiff", lambda d: _save(Image.fromarray(RGB8), d / "c.tif"), _u8(RGB8), 0),
    ("rgb_ppm", lambda d: _save(Image.fromarray(RGB8), d / "c.ppm"), _u8(RGB8), 0),
    ("grey_pgm", lambda d: _save(Image.fromarray(GREY8), d / "g.pgm"), _u8(GREY8)[..., None], 0),
    (
        "rgb_webp_lossless",
        lambda d: _save(Image.fromarray(RGB8), d / "c.webp", lossless=True),
        _u8(RGB8),
        0,
    ),
]


@pytest.mark.parametrize(
    "writer, expected, atol", [c[1:] for c in READ_CASES], ids=[c[0] for c in READ_CASES]
)
def test_read_image_decodes_to_unit_range(tmp_path, writer, expected, atol):
    image = imageio.read_image(writer(tmp_path))
    chex.assert_shape(image, expected.shape)
    chex.assert_type(image, np.float32)
    np.testing.assert_allclose(image, expected, rtol=0, atol=atol)
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_read_image_16bit_is_exactly_v_over_65535_in_float32(tmp_path):
    values = np.arange(0, 65536, 7, dtype=np.uint16)
    values[-1] = 65535
    path = _save(Image.fromarray(values.reshape(1, -1)), tmp_path / "ramp.png")
    image = imageio.read_image(path)[0, :, 0]
    np.testing.assert_array_equal(image, values.astype(np.float32) / np.float32(65535))
    np.testing.assert_allclose(image, values / 65535.0, rtol=0, atol=1e-7)
    assert len(np.unique(image)) == len(values)  # not clamped to a few levels


def test_read_image_jpeg_is_8bit_rgb(tmp_path):
    path = _save(Image.fromarray(np.full((8, 8, 3), 100, np.uint8)), tmp_path / "c.jpg")
    image = imageio.read_image(path)
    chex.assert_shape(image, (8, 8, 3))
    np.testing.assert_allclose(image, 100 / 255, atol=2 / 255)  # JPEG is lossy


# orientation -> the displayed array, from the EXIF 2.3 definitions of the tag
ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.swapaxes(a, 0, 1),  # transpose
    6: lambda a: np.rot90(a, -1),  # rotate 90 clockwise
    7: lambda a: np.swapaxes(np.rot90(a, 2), 0, 1),  # transverse
    8: lambda a: np.rot90(a, 1),  # rotate 90 counter-clockwise
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("source", ["rgb8", "grey16"])
def test_read_image_applies_exif_orientation(tmp_path, orientation, source):
    raw = RGB8 if source == "rgb8" else GREY16
    path = _save(Image.fromarray(raw), tmp_path / "o.png", exif=_exif(orientation))
    assert Image.open(path).getexif()[EXIF_ORIENTATION] == orientation  # the tag is stored
    expected = raw / (255.0 if source == "rgb8" else 65535.0)
    expected = ORIENTATIONS[orientation](expected if expected.ndim == 3 else expected[..., None])
    np.testing.assert_allclose(imageio.read_image(path), expected, rtol=0, atol=1e-7)


def test_read_image_applies_exif_orientation_to_jpeg(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    plain = _save(Image.fromarray(raw), tmp_path / "plain.jpg", quality=90)
    rotated = _save(Image.fromarray(raw), tmp_path / "rot.jpg", quality=90, exif=_exif(6))
    # same compressed pixels, so the decoded arrays differ exactly by the rotation
    image = imageio.read_image(rotated)
    chex.assert_shape(image, (24, 16, 3))
    np.testing.assert_array_equal(image, np.rot90(imageio.read_image(plain), -1))


def _write_bytes(name: str, data: bytes):
    def writer(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return writer


def _truncated_png(d: Path) -> Path:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return _write_bytes("trunc.png", buf.getvalue()[: len(buf.getvalue()) // 2])(d)


def _float_tiff(values):
    return lambda d: _save(Image.fromarray(np.array(values, np.float32)), d / "bad.tif")


# (id, writer(tmp_path) -> path, regex the ValueError matches besides the file name)
BAD_FILES = [
    ("float_above_one", _float_tiff([[0.0, 2.0]]), r"\[0, 2\]; expected \[0, 1\]"),
    ("float_0_255", _float_tiff([[0.0, 255.0]]), r"expected \[0, 1\]"),
    ("float_negative", _float_tiff([[-0.01, 0.5]]), r"\[-0.01, 0.5\]; expected \[0, 1\]"),
    ("float_nan", _float_tiff([[np.nan, 0.5]]), "1 non-finite"),
    ("float_inf", _float_tiff([[np.inf, 0.5]]), "1 non-finite"),
    (
        "int32_beyond_16bit",
        lambda d: _save(Image.fromarray(np.array([[0, 70000]], np.int32)), d / "i.tif"),
        r"\[0, 70000\]; expected 16-bit",
    ),
    ("truncated_png", _truncated_png, "cannot read as an image: image file is truncated"),
    ("garbage_png", _write_bytes("junk.png", b"\x89PNG not really"), "cannot read as an image"),
    ("text_file", _write_bytes("notes.txt", b"hello\n"), "cannot read as an image"),
    ("empty_file", _write_bytes("empty.png", b""), "cannot read as an image"),
]


@pytest.mark.parametrize(
    "writer, pattern", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_read_image_refuses_bad_files_naming_them(tmp_path, writer, pattern):
    path = writer(tmp_path)
    with pytest.raises(ValueError, match=pattern) as info:
        imageio.read_image(path)
    assert str(path) in str(info.value)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image file: .*missing.png"):
        imageio.read_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------------
# channels

R, G, B, A = 0.2, 0.6, 1.0, 0.5
LUMA = 0.299 * R + 0.587 * G + 0.114 * B

# (c_in pixel, channels, expected pixel, notice text (after "x.png: converted "))
FIT_CASES = [
    ([R], 3, [R, R, R], "grey (1 channels) to RGB (3): grey repeated to RGB"),
    ([R, A], 1, [R], "grey+alpha (2 channels) to grey (1): alpha dropped"),
    ([R, A], 3, [R, R, R], "grey+alpha (2 channels) to RGB (3): alpha dropped, grey repeated"),
    ([R, G, B], 1, [LUMA], "RGB (3 channels) to grey (1): ITU-R 601 luma"),
    ([R, G, B, A], 1, [LUMA], "RGBA (4 channels) to grey (1): alpha dropped, ITU-R 601 luma"),
    ([R, G, B, A], 3, [R, G, B], "RGBA (4 channels) to RGB (3): alpha dropped"),
]


@pytest.mark.parametrize("pixel, channels, expected, notice", FIT_CASES)
def test_fit_channels_converts_and_says_so(pixel, channels, expected, notice):
    image = np.broadcast_to(np.array(pixel, np.float32), (2, 4, 5, len(pixel)))  # [N, H, W, c]
    messages: list[str] = []
    out = imageio.fit_channels(image, channels, name="x.png", notify=messages.append)
    chex.assert_shape(out, (2, 4, 5, channels))
    chex.assert_type(out, np.float32)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=0, atol=1e-7)
    assert len(messages) == 1 and messages[0].startswith(f"x.png: converted {notice}")


@pytest.mark.parametrize("pixel, channels, expected, notice", FIT_CASES)
def test_fit_channels_refuses_without_notify(pixel, channels, expected, notice):
    image = np.zeros((3, 3, len(pixel)), np.float32)
    with pytest.raises(ValueError, match=r"x.png: the image is .* is expected; .*notify") as info:
        imageio.fit_channels(image, channels, name="x.png", notify=None)
    assert f"({len(pixel)} channels)" in str(info.value)


@pytest.mark.parametrize("c", [1, 3])
def test_fit_channels_same_channels_is_silent_and_unchanged(c):
    image = np.random.default_rng(0).random((4, 4, c), dtype=np.float32)
    messages: list[str] = []
    assert imageio.fit_channels(image, c, name="x", notify=messages.append) is image
    assert imageio.fit_channels(image, c, name="x", notify=None) is image
    assert messages == []


def test_fit_channels_uint8_luma_is_rounded_and_keeps_dtype():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    out = imageio.fit_channels(rgb, 1, name="x", notify=lambda _: None)
    chex.assert_type(out, np.uint8)
    # 0.299 * 255 = 76.245, 0.587 * 255 = 149.685, 0.114 * 255 = 29.07, 2.99 + 11.74 + 3.42
    np.testing.assert_array_equal(out[..., 0], [[76, 150, 29, 18]])
    grey = np.array([[[7]]], np.uint8)
    np.testing.assert_array_equal(
        imageio.fit_channels(grey, 3, name="x", notify=print), [[[7] * 3]]
    )


@pytest.mark.parametrize(
    "shape, channels, pattern",
    [((4, 4, 5), 3, "C in 1..4"), ((4, 4), 1, "C in 1..4"), ((4, 4, 3), 4, "channels: expected")],
)
def test_fit_channels_bad_arguments(shape, channels, pattern):
    with pytest.raises(ValueError, match=pattern):
        imageio.fit_channels(np.zeros(shape, np.float32), channels, name="x")


# ------------------------------------------------------------------------------------------------
# value ranges


def _legacy_to_model(u8):  # restore._to_model at 6a8b4c2, without the jnp.asarray
    return np.asarray(u8, np.float32) / 127.5 - 1.0


def _legacy_to_uint8(x):  # restore._to_uint8 at 6a8b4c2
    x = np.asarray(x, np.float32)
    return np.round(np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


ALL_U8 = np.arange(256, dtype=np.uint8)


def test_from_uint8_is_bit_identical_and_exact_to_an_ulp():
    x = imageio.from_uint8(ALL_U8)
    chex.assert_type(x, np.float32)
    assert x.tobytes() == _legacy_to_model(ALL_U8).tobytes()
    assert x[0] == -1.0 and x[255] == 1.0
    np.testing.assert_allclose(x, ALL_U8 / 127.5 - 1.0, rtol=0, atol=np.spacing(np.float32(1)))


def test_to_uint8_is_bit_identical_to_the_legacy_formula():
    rng = np.random.default_rng(0)
    halfway = (np.arange(256) + 0.5) / 127.5 - 1.0  # the rounding boundaries
    x = np.concatenate([rng.uniform(-1.5, 1.5, 10_000), halfway, [-1.0, 1.0, -7.0, 7.0]])
    out = imageio.to_uint8(x)
    chex.assert_type(out, np.uint8)
    np.testing.assert_array_equal(out, _legacy_to_uint8(x))
    np.testing.assert_array_equal(imageio.to_uint8([-7.0, -1.0, 1.0, 7.0]), [0, 0, 255, 255])


def test_uint8_round_trips_through_model_units():
    np.testing.assert_array_equal(imageio.to_uint8(imageio.from_uint8(ALL_U8)), ALL_U8)


def test_to_model_of_read_8bit_equals_from_uint8_bitwise(tmp_path):
    path = _save(Image.fromarray(ALL_U8.reshape(16, 16)), tmp_path / "all.png")
    x = imageio.to_model(imageio.read_image(path))
    assert x.tobytes() == imageio.from_uint8(ALL_U8.reshape(16, 16, 1)).tobytes()
    assert imageio.to_model(ALL_U8).tobytes() == imageio.from_uint8(ALL_U8).tobytes()


def test_to_model_uint16_and_to_unit():
    x = imageio.to_model(np.array([0, 32768, 65535], np.uint16))
    chex.assert_type(x, np.float32)
    np.testing.assert_allclose(x, [-1.0, 0.5 / 32767.5, 1.0], rtol=0, atol=1e-7)
    u = imageio.to_unit(np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]))
    chex.assert_type(u, np.float32)
    np.testing.assert_array_equal(u, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.int8])
def test_to_model_refuses_other_dtypes(dtype):
    with pytest.raises(ValueError, match=f"got dtype {np.dtype(dtype)}"):
        imageio.to_model(np.zeros((2, 2, 1), dtype))


# ------------------------------------------------------------------------------------------------
# PNG


def _legacy_png_bytes(u8):  # restore._png_bytes at 6a8b4c2
    arr = u8[..., 0] if u8.shape[-1] == 1 else u8
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("c", [1, 2, 3, 4])
def test_png_bytes_round_trip_and_match_legacy(tmp_path, c):
    u8 = np.random.default_rng(c).integers(0, 256, (5, 7, c), dtype=np.uint8)
    data = imageio.png_bytes(u8)
    assert data == _legacy_png_bytes(u8)
    (tmp_path / "x.png").write_bytes(data)
    np.testing.assert_array_equal(imageio.read_image(tmp_path / "x.png"), _u8(u8))


def test_png_bytes_16bit_grey_round_trip(tmp_path):
    (tmp_path / "x.png").write_bytes(imageio.png_bytes(GREY16[..., None]))
    np.testing.assert_allclose(
        imageio.read_image(tmp_path / "x.png"), (GREY16 / 65535.0)[..., None], rtol=0, atol=1e-7
    )


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4, 3), np.uint16),
    ],
    ids=["2d", "5ch", "float", "rgb16"],
)
def test_png_bytes_refuses_bad_arrays(array):
    with pytest.raises(ValueError, match="png: expected uint8"):
        imageio.png_bytes(array)


def test_save_png_scales_and_skips_identical(tmp_path):
    u8 = np.arange(6, dtype=np.uint8).reshape(2, 3, 1) * 40
    path = tmp_path / "s.png"
    assert imageio.save_png(path, u8, scale=3) is True
    expected = np.repeat(np.repeat(u8, 3, axis=0), 3, axis=1)
    np.testing.assert_array_equal(imageio.read_image(path), _u8(expected))
    assert imageio.save_png(path, u8, scale=3) is False
    with pytest.raises(ValueError, match="scale: expected a positive int"):
        imageio.save_png(path, u8, scale=0)


# ------------------------------------------------------------------------------------------------
# atomic writes


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_bytes_writes_and_reports_unchanged(tmp_path):
    path = tmp_path / "a.bin"
    assert imageio.atomic_write_bytes(path, b"one") is True
    assert imageio.atomic_write_bytes(path, b"one") is False
    assert imageio.atomic_write_bytes(str(path), b"two") is True
    assert path.read_bytes() == b"two" and _entries(tmp_path) == ["a.bin"]


class _FailingFile:
    """Writes the first half of the data to the real file, then raises."""

    def __init__(self, f):
        self._f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError("disk full (simulated)")


def _fail_mid_write(monkeypatch):
    monkeypatch.setattr(imageio, "open", lambda p, m: _FailingFile(open(p, m)), raising=False)


def _fail_fsync(monkeypatch):
    def fsync(fd):
        raise OSError("fsync failed (simulated)")

    monkeypatch.setattr(os, "fsync", fsync)


def _fail_replace(monkeypatch):
    def replace(src, dst):
        raise OSError("replace failed (simulated)")

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fail", [_fail_mid_write, _fail_fsync, _fail_replace])
@pytest.mark.parametrize("existing", [True, False])
def test_atomic_write_bytes_failure_leaves_old_file_and_no_temp(
    tmp_path, monkeypatch, fail, existing
):
    path = tmp_path / "a.bin"
    if existing:
        path.write_bytes(b"old contents")
    fail(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        imageio.atomic_write_bytes(path, b"new contents that never land")
    monkeypatch.undo()
    assert _entries(tmp_path) == (["a.bin"] if existing else [])
    if existing:
        assert path.read_bytes() == b"old contents"


def test_atomic_write_json(tmp_path):
    obj = {"b": 1.5, "a": [1, None, "x"]}
    assert imageio.atomic_write_json(tmp_path / "x.json", obj) is True
    text = (tmp_path / "x.json").read_text()
    assert text == json.dumps(obj, indent=2) + "\n" and text.index('"b"') < text.index('"a"')
    imageio.atomic_write_json(tmp_path / "s.json", obj, sort_keys=True)
    assert (tmp_path / "s.json").read_text() == json.dumps(obj, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize(
    "obj, error, pattern",
    [
        ({"psnr": float("nan")}, ValueError, "Out of range float"),
        ({"psnr": float("inf")}, ValueError, "Out of range float"),
        ({"x": {1, 2}}, TypeError, "not JSON serializable"),
    ],
)
def test_atomic_write_json_refuses_before_writing(tmp_path, obj, error, pattern):
    path = tmp_path / "x.json"
    path.write_text("{}\n")
    with pytest.raises(error, match=pattern) as info:
        imageio.atomic_write_json(path, obj)
    assert str(path) in str(info.value)
    assert path.read_text() == "{}\n" and _entries(tmp_path) == ["x.json"]


def test_atomic_directory_creates_and_replaces(tmp_path):
    final = tmp_path / "ckpt"
    with imageio.atomic_directory(final) as tmp:
        assert tmp.parent == final.parent.absolute() and tmp.name.startswith(".ckpt.tmp-")
        (tmp / "a.txt").write_text("1")
        assert not final.exists()
    assert _entries(final) == ["a.txt"] and _entries(tmp_path) == ["ckpt"]
    with pytest.raises(FileExistsError, match="replace=True"):
        with imageio.atomic_directory(final):
            pass
    with imageio.atomic_directory(final, replace=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert _entries(final) == ["b.txt"] and _entries(tmp_path) == ["ckpt"]


def test_atomic_directory_error_in_block_keeps_old(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with imageio.atomic_directory(final, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert _entries(final) == ["old.txt"] and _entries(tmp_path) == ["ckpt"]


def test_atomic_directory_failed_swap_restores_old(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        with imageio.atomic_directory(final, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert _entries(final) == ["old.txt"] and _entries(tmp_path) == ["ckpt"]


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        with imageio.atomic_directory(tmp_path / "f", replace=True):
            pass


# ------------------------------------------------------------------------------------------------
# listing and naming


def test_list_images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ["b.png", "a.JPG", "c.tiff", "notes.txt", ".hidden.png", "z.ppm"]:
        (folder / name).write_bytes(b"")
    (folder / "sub.png").mkdir()  # a folder with an image suffix is not an image
    (folder / "sub.png" / "deep.png").write_bytes(b"")
    single = tmp_path / "x.data"
    single.write_bytes(b"")
    got = imageio.list_images([folder, str(single)])
    assert got == [folder / n for n in ["a.JPG", "b.png", "c.tiff", "z.ppm"]] + [single]
    assert imageio.list_images(folder) == got[:4]  # one path, not a list of characters


@pytest.mark.parametrize(
    "inputs, error, pattern",
    [
        (["missing"], FileNotFoundError, "no such file or folder"),
        (["empty"], ValueError, "holds no image files"),
        ([], ValueError, "at least one"),
    ],
)
def test_list_images_errors(tmp_path, inputs, error, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(error, match=pattern):
        imageio.list_images([tmp_path / p for p in inputs])


def test_image_suffixes():
    assert imageio.IMAGE_SUFFIXES == (
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".pgm",
        ".ppm",
    )


def _legacy_unique_names(stems):  # restore._unique_names at 6a8b4c2
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        s = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s) or "image"
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.append(s if n == 0 else f"{s}_{n}")
    return out


@pytest.mark.parametrize(
    "stems, expected",
    [
        (["a", "b"], ["a", "b"]),
        (["a", "a", "a"], ["a", "a_1", "a_2"]),
        (["a b", "", "é.x"], ["a_b", "image", "é.x"]),
        (["a/b", "a?b"], ["a_b", "a_b_1"]),
        (["a", "a", "a_1"], ["a", "a_1", "a_1_1"]),  # the legacy code gave a_1 twice
        (["a_1", "a", "a"], ["a_1", "a", "a_2"]),
    ],
)
def test_unique_names(stems, expected):
    got = imageio.unique_names(stems)
    assert got == expected and len(set(got)) == len(got)
    if len(set(_legacy_unique_names(stems))) == len(stems):  # no legacy collision: same names
        assert got == _legacy_unique_names(stems)
