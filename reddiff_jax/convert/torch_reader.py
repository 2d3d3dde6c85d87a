"""Torch-free readers for PyTorch state dicts (`.pt`/`.pth` zip files) and `.safetensors` files.

A `.pt` file written by `torch.save` (torch >= 1.6) is a zip archive holding `<prefix>/data.pkl`
(a pickle of the state dict) and one raw little-endian record per storage, `<prefix>/data/<key>`.
The pickle is read with a restricted unpickler: only the globals a state dict of dense tensors needs
(`torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`, the typed `torch.*Storage`
markers and `collections.OrderedDict`) resolve, each to a local stand-in; torch itself is never
imported and no callable named by the file is ever called. Any other global raises
`UnsafeCheckpointError` naming it.

Untrusted bytes never reach an unchecked allocation or recursion: before anything is unpickled,
the opcode stream is walked once (`pickletools.genops`, which builds nothing) to check that every
length fits in the data, that memo indices are in range (the C unpickler sizes its memo table by
the largest index) and that containers nest at most `_MAX_NESTING` deep (hashing a deeply nested
tuple overflows the C stack). Zip members are read only up to their declared size, within a budget
of `_MAX_EXPANSION` times the file size, and tensors may not hold more elements than their storage.
Every malformed input raises `CheckpointFormatError` (a `ValueError`) naming the file and problem.

Both readers return `dict[str, np.ndarray]` in the file's layout and dtype (PyTorch layout: conv
weights [O, I, kh, kw]). Arrays may be read-only views of the file's bytes.
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import pickletools
import reprlib
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "read_safetensors",
    "read_state_dict",
    "read_torch_zip",
]


class CheckpointFormatError(ValueError):
    """The file is not a readable state dict (truncated, corrupt, or an unsupported layout)."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The pickle references a global outside the state-dict allow-list."""


_MAX_INDEX = 2**63 - 1  # sizes, strides, offsets and element counts must fit an int64
_MAX_BYTES = 2**62  # nominal byte size of any array shape (numpy refuses larger)
_MAX_NDIM = 32  # numpy 1.x's limit; real checkpoints use <= 5
_MAX_NESTING = 100  # containers in a pickle; a state dict nests about 6 deep
_MAX_EXPANSION = 16  # bytes read out of a zip <= this many times the file size, plus the slack
_EXPANSION_SLACK = 1 << 24
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit

# torch storage class name -> numpy dtype of one element
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# safetensors dtype tag -> numpy dtype
_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class _ShortRepr(reprlib.Repr):
    """`reprlib` with small limits, also for `OrderedDict` (default repr recurses unbounded)."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxstring = self.maxother = 80
        self.maxlong = 40

    def repr_OrderedDict(self, x, level):  # noqa: N802 (reprlib dispatches on the type name)
        return self.repr_dict(x, level)


_SHORT_REPR = _ShortRepr()


def _describe(value: Any) -> str:
    """A short repr of untrusted data for error messages; never raises, never recurses deep."""
    try:
        return _SHORT_REPR.repr(value)
    except Exception:  # e.g. an int too long for str(), or a repr that fails
        return f"<{type(value).__name__}>"


def _name(text: str) -> str:
    """`text` as is when short and printable, else its short repr."""
    return text if len(text) <= 200 and text.isprintable() else _describe(text)


def _is_index(value: Any) -> bool:
    """An int (not a bool) in [0, 2**63)."""
    return type(value) is int and 0 <= value <= _MAX_INDEX


def _check_shape(shape: tuple[int, ...], itemsize: int) -> None:
    """Refuses shapes numpy cannot represent (also when they hold no elements)."""
    if math.prod(n or 1 for n in shape) * itemsize > _MAX_BYTES:
        raise pickle.UnpicklingError(f"tensor size {shape} is too large for an array")


class _StorageType:
    """Stand-in for a `torch.<Name>Storage` class: only carries the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"cannot set attributes of torch.{self.name}")

    def __setstate__(self, state: Any) -> None:  # BUILD
        raise pickle.UnpicklingError(f"unexpected BUILD on torch.{self.name}")

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __reduce__(self):  # never pickled back out
        raise TypeError("_StorageType is not picklable")


class _Global:
    """An allow-listed callable; refuses BUILD and attribute writes, so a file cannot alter it."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"cannot set attributes of {self.name}")

    def __setstate__(self, state: Any) -> None:  # BUILD
        raise pickle.UnpicklingError(f"unexpected BUILD on {self.name}")

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self):  # never pickled back out
        raise TypeError("_Global is not picklable")


class _Storage:
    """A storage resolved from the zip: a flat array of `numel` elements."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):
        raise pickle.UnpicklingError("unexpected BUILD on a storage")


class _Tensor:
    """Result of a tensor rebuild; unwrapped to its array after unpickling."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):
        raise pickle.UnpicklingError("unexpected BUILD on a tensor")


def _as_index_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not (
        isinstance(value, tuple) and len(value) <= _MAX_NDIM and all(_is_index(v) for v in value)
    ):
        raise pickle.UnpicklingError(
            f"tensor {what} must be a tuple of at most {_MAX_NDIM} ints in [0, 2**63), "
            f"got {_describe(value)}"
        )
    return value


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
) -> _Tensor:
    """Local stand-in for `torch._utils._rebuild_tensor_v2`: a read-only view of the storage."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(
            f"tensor storage must be a storage record, got {_describe(storage)}"
        )
    if not _is_index(storage_offset):
        raise pickle.UnpicklingError(
            f"tensor storage offset must be an int in [0, 2**63), got {_describe(storage_offset)}"
        )
    size = _as_index_tuple(size, "size")
    stride = _as_index_tuple(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    flat = storage.array
    _check_shape(size, flat.itemsize)
    numel = math.prod(size)
    if numel == 0:
        return _Tensor(np.zeros(size, flat.dtype))
    if numel > flat.size:  # only overlapping strides (broadcasting) can do this
        raise pickle.UnpicklingError(
            f"tensor size {size} has {numel} elements but its storage only {flat.size} "
            "(tensors with overlapping strides are not supported)"
        )
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise pickle.UnpicklingError(
            f"tensor (offset {storage_offset}, size {size}, stride {stride}) reaches element "
            f"{last} of a storage with {flat.size} elements"
        )
    contiguous = tuple(math.prod(size[i + 1 :]) for i in range(len(size)))
    if all(s == c for n, s, c in zip(size, stride, contiguous, strict=True) if n > 1):
        return _Tensor(flat[storage_offset : storage_offset + numel].reshape(size))
    # a view like torch's own; copying could multiply memory (many views of one storage)
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:],
        shape=size,
        strides=tuple(s * flat.itemsize if n > 1 else 0 for n, s in zip(size, stride, strict=True)),
        writeable=False,
    )
    return _Tensor(view)


def _rebuild_parameter(data, requires_grad, backward_hooks) -> _Tensor:
    """Local stand-in for `torch._utils._rebuild_parameter`: a Parameter is its tensor."""
    del requires_grad, backward_hooks
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError(f"parameter data must be a tensor, got {_describe(data)}")
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> stand-in; made afresh per file so no file can affect another's."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _Global("collections.OrderedDict", collections.OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2"): _Global(
            "torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2
        ),
        ("torch._utils", "_rebuild_parameter"): _Global(
            "torch._utils._rebuild_parameter", _rebuild_parameter
        ),
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    return allowed


_ALLOWED_NAMES = frozenset(_allowed_globals())


def _refuse(path: Path, module: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refusing to load {_name(module)}.{_name(name)}: a state dict may only reference "
        "torch tensor rebuild functions, torch.*Storage types and collections.OrderedDict"
    )


# opcodes that add items to the container below the mark / below them (the result is that one)
_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})


def _check_pickle(data: bytes, path: Path) -> None:
    """Walks the opcodes of `data` without building any object; raises on anything unsafe.

    Checks that the pickle parses (every declared length fits in the data), that memo indices stay
    below the number of opcodes, that no container nests more than `_MAX_NESTING` deep, and that
    every `GLOBAL`/`INST` names an allow-listed global (`STACK_GLOBAL` is checked on load).
    """
    stack: list[int] = []  # nesting depth of each object on the unpickler's stack
    marks: list[int] = []  # stack heights at each MARK
    memo: dict[int, int] = {}  # memo index -> nesting depth
    where = f"{path}: malformed pickle in the torch checkpoint"
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = arg.partition(" ")
                if (module, attr) not in _ALLOWED_NAMES:
                    raise _refuse(path, module, attr)
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else arg
                if not 0 <= index <= count:
                    raise CheckpointFormatError(
                        f"{where}: memo index {index} at byte {pos} is out of range"
                    )
                if not stack:
                    raise CheckpointFormatError(f"{where}: {name} on an empty stack at byte {pos}")
                memo[index] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise CheckpointFormatError(
                        f"{where}: {name} of unset memo index {arg} at byte {pos}"
                    )
                stack.append(memo[arg])
                continue
            if name == "FRAME" and arg > len(data) - pos - 9:
                raise CheckpointFormatError(
                    f"{where}: frame of {arg} bytes at byte {pos} runs past the end of the pickle"
                )
            before = op.stack_before
            popped: list[int] = []
            below = len(before)
            if pickletools.markobject in before:
                if not marks:
                    raise CheckpointFormatError(f"{where}: {name} without a MARK at byte {pos}")
                height = marks.pop()
                popped = stack[height:]
                del stack[height:]
                below = before.index(pickletools.markobject)
            if below > len(stack):
                raise CheckpointFormatError(f"{where}: stack underflow at {name}, byte {pos}")
            if below:
                popped = stack[len(stack) - below :] + popped
                del stack[len(stack) - below :]
            if not op.stack_after:
                continue
            if name == "DUP":
                stack.extend(popped * 2)
                continue
            if name in _IN_PLACE:
                depth = max(popped[0], 1 + max(popped[1:], default=-1))
            else:
                depth = 1 + max(popped, default=-1)
            if depth > _MAX_NESTING:
                raise CheckpointFormatError(
                    f"{where}: objects nest deeper than {_MAX_NESTING} levels (byte {pos})"
                )
            stack.append(depth)
    except CheckpointFormatError:
        raise
    except (ValueError, OverflowError, EOFError, struct.error, IndexError, TypeError) as err:
        raise CheckpointFormatError(f"{where}: {err}") from err


class _Archive:
    """A zip archive whose members are read within a byte budget (no zip bombs)."""

    def __init__(self, archive: zipfile.ZipFile, path: Path):
        self.zip = archive
        self.path = path
        self.budget = _MAX_EXPANSION * path.stat().st_size + _EXPANSION_SLACK

    def read(self, name: str) -> bytes:
        """The bytes of member `name`; raises KeyError if there is none."""
        info = self.zip.getinfo(name)
        where = f"{self.path}: zip member {_name(name)}"
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointFormatError(
                f"{where} uses compression method {info.compress_type}; a torch checkpoint "
                "stores its members uncompressed (or deflated)"
            )
        if info.flag_bits & 0x1:
            raise CheckpointFormatError(f"{where} is encrypted")
        if info.file_size > self.budget:
            raise CheckpointFormatError(
                f"{where} declares {info.file_size} bytes, more than the {self.budget} bytes left "
                f"of {_MAX_EXPANSION}x the file size (a zip bomb, or a corrupt file)"
            )
        try:
            with self.zip.open(info) as member:
                data = member.read(info.file_size)  # never more than declared, even if it lies
        except zipfile.BadZipFile as err:
            raise CheckpointFormatError(f"{where} is corrupt ({err})") from err
        if len(data) != info.file_size:
            raise CheckpointFormatError(
                f"{where} is truncated ({len(data)} of {info.file_size} bytes)"
            )
        self.budget -= len(data)
        return data


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and storages from the zip."""

    def __init__(self, file, *, archive: _Archive, prefix: str, byteorder: str, path: Path):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._path = path
        self._allowed = _allowed_globals()
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise _refuse(self._path, str(module), str(name)) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {_describe(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {_describe(storage_type)}")
        if not isinstance(key, str) or not _is_index(numel):
            raise pickle.UnpicklingError(f"malformed storage record {_describe(pid)}")
        if key not in self._storages:
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(
                    f"storage record data/{_name(key)} is missing"
                ) from None
            nbytes = numel * dtype.itemsize
            if len(raw) < nbytes:
                raise pickle.UnpicklingError(
                    f"storage record data/{_name(key)} holds {len(raw)} bytes, expected {nbytes}"
                )
            flat = np.frombuffer(raw, dtype=dtype, count=numel)
            if not dtype.isnative:
                flat = flat.astype(dtype.newbyteorder("="))
            self._storages[key] = _Storage(flat)
        storage = self._storages[key]
        if storage.array.dtype.newbyteorder("=") != storage_type.dtype:
            raise pickle.UnpicklingError(
                f"storage data/{_name(key)} is used with two different dtypes"
            )
        return storage


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"{path}: expected a state dict (a mapping of names to tensors), "
            f"got {type(obj).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    bad = []
    for name, value in obj.items():
        if isinstance(name, str) and isinstance(value, _Tensor):
            out[name] = value.array
        else:
            bad.append(f"{_describe(name)} ({type(value).__name__})")
    if bad:
        raise CheckpointFormatError(
            f"{path}: expected a flat state dict of tensors; these entries are not tensors: "
            + ", ".join(bad[:20])
            + (" ..." if len(bad) > 20 else "")
        )
    return out


def _load_torch_zip(archive: zipfile.ZipFile, path: Path) -> Any:
    members = _Archive(archive, path)
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointFormatError(
            f"{path}: expected exactly one '<name>/data.pkl' record in the zip, "
            f"found {len(pickles)}"
        )
    prefix = pickles[0].rsplit("/", 1)[0]
    byteorder = "little"
    if f"{prefix}/byteorder" in names:
        raw = members.read(f"{prefix}/byteorder")
        byteorder = raw.decode("ascii", errors="replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointFormatError(
                f"{path}: unknown byteorder {_describe(byteorder)}, expected 'little' or 'big'"
            )
    data = members.read(pickles[0])
    with warnings.catch_warnings():  # e.g. "invalid escape sequence" in a damaged STRING opcode
        warnings.simplefilter("ignore", DeprecationWarning)
        _check_pickle(data, path)
        unpickler = _StateDictUnpickler(
            io.BytesIO(data), archive=members, prefix=prefix, byteorder=byteorder, path=path
        )
        return unpickler.load()


def read_torch_zip(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a zip-format `torch.save` state dict without torch and without running its code.

    Args:
      path: a `.pt`/`.pth` file written by `torch.save(model.state_dict(), path)` (torch >= 1.6).

    Returns:
      name -> array in PyTorch layout and the stored dtype, in the file's key order.

    Raises:
      UnsafeCheckpointError: the pickle references a global outside the allow-list.
      CheckpointFormatError: not a zip file, truncated or corrupt, or not a flat state dict.
      FileNotFoundError: `path` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            obj = _load_torch_zip(archive, path)
    except CheckpointFormatError:  # also UnsafeCheckpointError
        raise
    except zipfile.BadZipFile as err:
        raise CheckpointFormatError(
            f"{path}: not a readable zip-format torch checkpoint ({err}); the file may be "
            "truncated, or saved by torch < 1.6 (re-save it with a recent torch)"
        ) from err
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        NotImplementedError,
        RuntimeError,
        OverflowError,
        struct.error,
        zlib.error,
    ) as err:  # what zipfile / the unpickler raise on damaged data
        raise CheckpointFormatError(
            f"{path}: corrupt torch checkpoint ({type(err).__name__}: {err})"
        ) from err
    return _unwrap_state_dict(obj, path)


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file (8-byte little-endian header length, JSON header, raw data).

    Returns:
      name -> array in the stored layout and dtype, in the header's key order.

    Raises:
      CheckpointFormatError: truncated or malformed file, or an unsupported dtype.
      FileNotFoundError: `path` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    raw = path.read_bytes()
    if len(raw) < 8:
        raise CheckpointFormatError(f"{path}: truncated safetensors file ({len(raw)} bytes)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > _MAX_SAFETENSORS_HEADER:
        raise CheckpointFormatError(
            f"{path}: safetensors header length {header_len} exceeds the format's limit of "
            f"{_MAX_SAFETENSORS_HEADER} bytes (not a safetensors file?)"
        )
    if header_len > len(raw) - 8:
        raise CheckpointFormatError(
            f"{path}: truncated safetensors file (header of {header_len} bytes, "
            f"file has {len(raw)} bytes)"
        )
    try:
        header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: JSON, long ints
        raise CheckpointFormatError(f"{path}: malformed safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: malformed safetensors header (not a JSON object)")
    data = memoryview(raw)[8 + header_len :]
    out: dict[str, np.ndarray] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry = f"{path}: safetensors entry {_describe(name)}"
        if not isinstance(info, dict):
            raise CheckpointFormatError(
                f"{entry} must be an object with dtype, shape and data_offsets, "
                f"got {_describe(info)}"
            )
        tag = info.get("dtype")
        if not isinstance(tag, str) or tag not in _SAFETENSORS_DTYPES:
            raise CheckpointFormatError(
                f"{entry}: unsupported dtype {_describe(tag)} "
                f"(supported: {', '.join(_SAFETENSORS_DTYPES)})"
            )
        dtype = _SAFETENSORS_DTYPES[tag]
        shape = info.get("shape")
        if not (
            isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(_is_index(n) for n in shape)
        ):
            raise CheckpointFormatError(
                f"{entry}: shape must be a list of at most {_MAX_NDIM} ints in [0, 2**63), "
                f"got {_describe(shape)}"
            )
        shape = tuple(shape)
        if math.prod(n or 1 for n in shape) * dtype.itemsize > _MAX_BYTES:
            raise CheckpointFormatError(f"{entry}: shape {shape} is too large for an array")
        offsets = info.get("data_offsets")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(v) for v in offsets)
        ):
            raise CheckpointFormatError(
                f"{entry}: data_offsets must be a list [begin, end] of two ints >= 0, "
                f"got {_describe(offsets)}"
            )
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if not begin <= end <= len(data) or end - begin != nbytes:
            raise CheckpointFormatError(
                f"{entry} spans bytes [{begin}, {end}) but needs {nbytes} bytes "
                f"inside a data section of {len(data)} bytes (truncated file?)"
            )
        if begin < end:
            spans.append((begin, end, name))
        array = np.frombuffer(data[begin:end], dtype=dtype.newbyteorder("<"))
        out[name] = array.astype(dtype, copy=False).reshape(shape)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise CheckpointFormatError(
                f"{path}: safetensors entries {_describe(first)} and {_describe(second)} "
                f"overlap (bytes from {begin} to {end})"
            )
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a state dict from `.safetensors` (by suffix) or a zip-format `.pt`/`.pth`/`.bin`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_zip(path)
