"""Images and files at the boundary: reading image files, channel conversion, value ranges, and
atomic writes.

The contract:

- **Files** hold uint8, uint16 or float images. ``read_image`` decodes any of them (EXIF
  orientation applied) to float32 [H, W, C] in [0, 1] with the file's own channels: C = 1 grey,
  2 grey + alpha, 3 RGB, 4 RGBA. 8-bit values are v / 255, 16-bit values v / 65535, float images
  must already be in [0, 1].
- **The library** works in float32 NHWC [-1, 1]. ``to_model`` maps [0, 1] floats (or uint8)
  there; ``to_unit`` and ``to_uint8`` map back. ``from_uint8`` / ``to_uint8`` are the exact
  formulas the library has always used (u8 / 127.5 - 1 and round(clip((x + 1) / 2) * 255)), and
  for uint8 data ``to_model(u8 / 255)`` gives the same bits as ``from_uint8(u8)``.
- **Channels** are converted only by ``fit_channels``, which names every conversion (or refuses
  it); nothing is turned grey or RGB silently.
- **Writes** go to a hidden temporary file or folder beside the target, which is moved into
  place with ``os.replace`` / ``os.rename``: an interruption or error leaves the old target (or
  none) and no partial file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "fit_channels",
    "from_uint8",
    "list_images",
    "png_bytes",
    "read_image",
    "save_png",
    "to_model",
    "to_uint8",
    "to_unit",
    "unique_names",
]

IMAGE_SUFFIXES = (
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

#: How far outside [0, 1] a float image may stray (rounding) before ``read_image`` refuses it.
FLOAT_TOLERANCE = 1e-6

_CHANNEL_NAMES = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}
_CONVERSIONS = {
    (1, 3): "grey repeated to RGB",
    (2, 1): "alpha dropped",
    (2, 3): "alpha dropped, grey repeated to RGB",
    (3, 1): "ITU-R 601 luma",
    (4, 1): "alpha dropped, ITU-R 601 luma",
    (4, 3): "alpha dropped",
}
_LUMA_601 = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as PIL's convert("L")
_READ_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)


# ------------------------------------------------------------------------------------------------
# reading


class _DecodeError(ValueError):
    """A readable file whose content ``read_image`` refuses (the message names the file)."""


_GREY_8BIT = ("L", "LA", "La")
_ALPHA_8BIT = ("LA", "La", "PA", "RGBA", "RGBa")
_OTHER_8BIT = ("P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _decode(im: Image.Image, path: Path) -> np.ndarray:
    """A loaded PIL image -> float32 [H, W, C] in [0, 1] (the file's channels)."""
    mode = im.mode
    if mode == "1":
        arr = np.asarray(im, np.float32)  # bool -> {0, 1}
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im).astype(np.float32) / np.float32(65535)
    elif mode == "I":  # 32-bit int; Pillow's mode for e.g. 16-bit PGM
        raw = np.asarray(im)
        lo, hi = int(raw.min(initial=0)), int(raw.max(initial=0))
        if lo < 0 or hi > 65535:
            raise _DecodeError(
                f"{path}: 32-bit integer image with values in [{lo}, {hi}]; expected 16-bit "
                "values in [0, 65535] (save it as 8- or 16-bit, or as float in [0, 1])"
            )
        arr = raw.astype(np.float32) / np.float32(65535)
    elif mode == "F":
        arr = np.asarray(im, np.float32)
        if not np.all(np.isfinite(arr)):
            raise _DecodeError(
                f"{path}: float image holds {int((~np.isfinite(arr)).sum())} non-finite values"
            )
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
            raise _DecodeError(
                f"{path}: float image with values in [{lo:.6g}, {hi:.6g}]; expected [0, 1] "
                "(rescale it to [0, 1] first, e.g. divide by 255 or 65535)"
            )
        arr = np.clip(arr, 0.0, 1.0)
    elif mode in _GREY_8BIT + _ALPHA_8BIT + _OTHER_8BIT:
        alpha = (
            mode in _ALPHA_8BIT
            or "transparency" in im.info  # P / L / RGB with a transparent colour (tRNS)
            or (mode == "P" and im.palette is not None and "A" in im.palette.mode)
        )
        target = ("LA" if alpha else "L") if mode in _GREY_8BIT else ("RGBA" if alpha else "RGB")
        arr = np.asarray(im if target == mode else im.convert(target))
        arr = arr.astype(np.float32) / np.float32(255)
    else:
        raise _DecodeError(f"{path}: unsupported image mode {mode!r}")
    return arr[..., None] if arr.ndim == 2 else arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads one image file (its first frame) with its EXIF orientation applied.

    Returns:
      float32 [H, W, C] in [0, 1], C the file's channels: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA.
      8-bit: v / 255; 16-bit (PNG, TIFF, PGM): v / 65535; 1-bit: {0, 1}; float TIFF (mode F):
      as stored, within ``FLOAT_TOLERANCE`` of [0, 1] (then clipped). Palette images become RGB,
      or RGBA when they have transparency; CMYK / YCbCr become RGB.
      16-bit RGB(A) PNGs are read at 8 bits: Pillow keeps only their high byte.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: not a readable image (corrupt, truncated, unknown format), a float image
        outside [0, 1] or with non-finite values, or an integer image beyond 16 bits; the message
        names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return _decode(ImageOps.exif_transpose(im), path)
    except _DecodeError:
        raise
    except _READ_ERRORS as err:
        raise ValueError(f"{path}: cannot read as an image: {err}") from err


def list_images(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image paths from files and folders: files as given (any suffix), folders as their image
    files (suffix in ``IMAGE_SUFFIXES``, case-insensitive, hidden files skipped), sorted by
    name, not recursive. A single path may be passed instead of a list.

    Raises:
      FileNotFoundError: a missing path. ValueError: no inputs, or a folder with no image files.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                q
                for q in p.iterdir()
                if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith(".") and q.is_file()
            )
            if not found:
                raise ValueError(
                    f"inputs: folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})"
                )
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"inputs: no such file or folder: {p}")
    if not paths:
        raise ValueError("inputs: expected at least one image file or folder, got none")
    return paths


def unique_names(stems: Sequence[str]) -> list[str]:
    """File-safe, unique names for ``stems``, in order: characters other than letters, digits
    and ``-_.`` become ``_`` (an empty stem becomes ``image``); a repeat gets ``_1``, ``_2``, ...
    (skipping any suffix already taken)."""
    seen: dict[str, int] = {}
    used: set[str] = set()
    out = []
    for stem in stems:
        s = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem) or "image"
        n = seen.get(s, 0)
        name = s if n == 0 else f"{s}_{n}"
        while name in used:
            n += 1
            name = f"{s}_{n}"
        seen[s] = n + 1
        used.add(name)
        out.append(name)
    return out


# ------------------------------------------------------------------------------------------------
# channels and value ranges


def _luma(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float32) @ _LUMA_601)[..., None]


def fit_channels(
    image: np.ndarray,
    channels: int,
    *,
    name: str,
    notify: Callable[[str], None] | None = print,
) -> np.ndarray:
    """Converts [..., H, W, c] images (c = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) to ``channels``
    (1 or 3), keeping the dtype (float in [0, 1], or uint8 / uint16).

    grey -> RGB repeats the channel; RGB -> grey is the ITU-R BT.601 luma
    0.299 R + 0.587 G + 0.114 B (rounded for integer dtypes); alpha is dropped (the stored colour
    is kept, not composited on a background, as PIL's ``convert`` does). Every conversion calls
    ``notify`` with one line naming ``name`` and the conversion; equal channels return ``image``.

    Raises:
      ValueError: ``notify`` is None and a conversion is needed (the message names the mismatch
        and how to allow it), or unsupported channel counts.
    """
    image = np.asarray(image)
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grey) or 3 (RGB), got {channels!r}")
    if image.ndim < 3 or image.shape[-1] not in _CHANNEL_NAMES:
        raise ValueError(
            f"{name}: expected images [..., H, W, C] with C in 1..4, got shape {image.shape}"
        )
    c = image.shape[-1]
    if c == channels:
        return image
    how = _CONVERSIONS[c, channels]
    message = (
        f"{name}: converted {_CHANNEL_NAMES[c]} ({c} channels) to {_CHANNEL_NAMES[channels]} "
        f"({channels}): {how}"
    )
    if notify is None:
        raise ValueError(
            f"{name}: the image is {_CHANNEL_NAMES[c]} ({c} channels) but "
            f"{_CHANNEL_NAMES[channels]} ({channels}) is expected; convert the file, or pass a "
            f"notify callback to allow the conversion ({how})"
        )
    colour = image[..., : 3 if c >= 3 else 1]
    if colour.shape[-1] == channels:  # only alpha dropped
        out = colour
    elif channels == 3:
        out = np.repeat(colour, 3, axis=-1)
    elif np.issubdtype(image.dtype, np.integer):
        out = np.round(_luma(colour)).astype(image.dtype)
    else:
        out = _luma(colour).astype(image.dtype)
    notify(message)
    return out


def to_model(image: Any) -> np.ndarray:
    """[0, 1] floats, uint8 or uint16 [..., H, W, C] -> float32 in [-1, 1] (the library's units).

    Floats: x * 2 - 1; uint8: ``from_uint8``; uint16: v / 32767.5 - 1.

    Raises:
      ValueError: another dtype (e.g. signed integers or bool).
    """
    x = np.asarray(image)
    if x.dtype == np.uint8:
        return from_uint8(x)
    if x.dtype == np.uint16:
        return x.astype(np.float32) / np.float32(32767.5) - np.float32(1.0)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    raise ValueError(f"to_model: expected [0, 1] floats, uint8 or uint16, got dtype {x.dtype}")


def from_uint8(u8: Any) -> np.ndarray:
    """uint8 [..., H, W, C] in [0, 255] -> float32 in [-1, 1]: u8 / 127.5 - 1."""
    return np.asarray(u8, np.float32) / 127.5 - 1.0


def to_unit(x: Any) -> np.ndarray:
    """[-1, 1] floats -> float32 in [0, 1]: clip((x + 1) / 2, 0, 1)."""
    x = np.asarray(x, np.float32)
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def to_uint8(x: Any) -> np.ndarray:
    """[-1, 1] floats -> uint8: round(clip((x + 1) / 2, 0, 1) * 255) (torchvision's save_image)."""
    return np.round(to_unit(x) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# writing


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file bytes of uint8 [H, W, C] (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) or uint16
    [H, W, 1] (16-bit grey); deterministic for equal input.

    Raises:
      ValueError: another shape or dtype.
    """
    image = np.asarray(image)
    ok_u8 = image.dtype == np.uint8 and image.shape[-1:] in ((1,), (2,), (3,), (4,))
    ok_u16 = image.dtype == np.uint16 and image.shape[-1:] == (1,)
    if image.ndim != 3 or not (ok_u8 or ok_u16):
        raise ValueError(
            "png: expected uint8 [H, W, C] with C in 1..4 or uint16 [H, W, 1], got "
            f"{image.dtype} {image.shape}"
        )
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray, *, scale: int = 1) -> bool:
    """Writes ``image`` (as ``png_bytes`` takes it) atomically as a PNG, each pixel repeated
    into a ``scale`` x ``scale`` block; False when the file already holds exactly these bytes."""
    if not isinstance(scale, int | np.integer) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale: expected a positive int, got {scale!r}")
    image = np.asarray(image)
    if scale > 1 and image.ndim == 3:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    return atomic_write_bytes(path, png_bytes(image))


def _fsync_dir(folder: Path) -> None:
    """Best effort: makes a rename in ``folder`` durable (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> bool:
    """Writes ``data`` to ``path`` through a hidden temporary file in the same folder (flushed,
    fsynced, then ``os.replace``d): readers see the old file or the new one, never a part.

    Returns:
      False when ``path`` already holds exactly ``data`` (nothing is written), else True.
    Raises:
      OSError: the write failed; the old file (if any) is intact and the temporary file removed.
    """
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return True


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False) -> bool:
    """Writes ``obj`` as JSON (indent 2, trailing newline) with ``atomic_write_bytes``.

    NaN and infinities are refused (strict JSON; map them to None first). Returns False when the
    file already holds exactly this text.

    Raises:
      ValueError: non-finite floats. TypeError: a value JSON cannot hold. Both name ``path``.
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{path}: cannot write as JSON: {err}") from err
    return atomic_write_bytes(path, (text + "\n").encode())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Context manager for writing a whole folder atomically: yields a new, empty hidden folder
    beside ``final``; when the block exits normally it is renamed to ``final`` (an existing
    ``final`` is first moved aside, then deleted). When the block raises, the temporary folder
    is deleted and ``final`` is untouched.

    A crash between the two renames leaves the old folder as ``.<name>.old-*`` beside ``final``;
    if deleting the old folder fails, it is left there too (the new one is in place).

    Raises:
      FileExistsError: ``final`` exists and ``replace`` is False, or ``final`` is not a folder.
    """
    final = Path(final).absolute()
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a directory")
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists (pass replace=True to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} was created while it was being written")
            old = _tmp_sibling(final, "old")
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
