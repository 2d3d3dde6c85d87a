"""Torch-free readers for PyTorch state dicts (`.pt`/`.pth` zip files) and `.safetensors` files.

A `.pt` file written by `torch.save` (torch >= 1.6) is a zip archive holding `<prefix>/data.pkl`
(a pickle of the state dict) and one raw little-endian record per storage, `<prefix>/data/<key>`.
The pickle is read with a restricted unpickler: only the globals a state dict of dense tensors needs
(`torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`, the typed `torch.*Storage`
markers and `collections.OrderedDict`) resolve, each to a local stand-in; torch itself is never
imported and no callable named by the file is ever called. Any other global raises
`UnsafeCheckpointError` naming it.

Both readers return `dict[str, np.ndarray]` in the file's layout and dtype (PyTorch layout: conv
weights [O, I, kh, kw]). Arrays may be read-only views of the file's bytes.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
import zlib
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


class _StorageType:
    """Stand-in for a `torch.<Name>Storage` class: only carries the element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = dtype

    def __reduce__(self):  # never pickled back out
        raise TypeError("_StorageType is not picklable")


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


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of ints >= 0, got {value!r}")
    return value


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
) -> _Tensor:
    """Local stand-in for `torch._utils._rebuild_tensor_v2`: a strided view of the storage."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage must be a storage record, got {storage!r}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise pickle.UnpicklingError(
            f"tensor storage offset must be an int >= 0: {storage_offset!r}"
        )
    size = _as_int_tuple(size, "size")
    stride = _as_int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    flat = storage.array
    if 0 in size:
        return _Tensor(np.zeros(size, flat.dtype))
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
        raise pickle.UnpicklingError(
            f"tensor (offset {storage_offset}, size {size}, stride {stride}) reaches element "
            f"{last} of a storage with {flat.size} elements"
        )
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    numel = int(np.prod(size))
    if all(s == c for n, s, c in zip(size, stride, contiguous, strict=True) if n > 1):
        return _Tensor(flat[storage_offset : storage_offset + numel].reshape(size))
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:],
        shape=size,
        strides=tuple(s * flat.itemsize for s in stride),
        writeable=False,
    )
    return _Tensor(view.copy())


def _rebuild_parameter(data, requires_grad, backward_hooks) -> _Tensor:
    """Local stand-in for `torch._utils._rebuild_parameter`: a Parameter is its tensor."""
    del requires_grad, backward_hooks
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError(f"parameter data must be a tensor, got {data!r}")
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    return allowed


_ALLOWED = _allowed_globals()


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and storages from the zip."""

    def __init__(self, file, *, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: Path):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._path = path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load {module}.{name}: a state dict may only reference "
                "torch tensor rebuild functions, torch.*Storage types and collections.OrderedDict"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage record {pid!r}")
        if key not in self._storages:
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage record data/{key} is missing") from None
            nbytes = numel * dtype.itemsize
            if len(raw) < nbytes:
                raise pickle.UnpicklingError(
                    f"storage record data/{key} holds {len(raw)} bytes, expected {nbytes}"
                )
            flat = np.frombuffer(raw, dtype=dtype, count=numel)
            if not dtype.isnative:
                flat = flat.astype(dtype.newbyteorder("="))
            self._storages[key] = _Storage(flat)
        storage = self._storages[key]
        if storage.array.dtype.newbyteorder("=") != storage_type.dtype:
            raise pickle.UnpicklingError(f"storage data/{key} is used with two different dtypes")
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
            bad.append(f"{name!r} ({type(value).__name__})")
    if bad:
        raise CheckpointFormatError(
            f"{path}: expected a flat state dict of tensors; these entries are not tensors: "
            + ", ".join(bad[:20])
            + (" ..." if len(bad) > 20 else "")
        )
    return out


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
            pickles = [
                n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1
            ]
            if len(pickles) != 1:
                raise CheckpointFormatError(
                    f"{path}: expected exactly one '<name>/data.pkl' record in the zip, "
                    f"found {len(pickles)}"
                )
            prefix = pickles[0].rsplit("/", 1)[0]
            byteorder = "little"
            if f"{prefix}/byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}/byteorder").decode("ascii").strip()
                if byteorder not in ("little", "big"):
                    raise CheckpointFormatError(f"{path}: unknown byteorder {byteorder!r}")
            unpickler = _StateDictUnpickler(
                io.BytesIO(archive.read(pickles[0])),
                archive=archive,
                prefix=prefix,
                byteorder=byteorder,
                path=path,
            )
            obj = unpickler.load()
    except UnsafeCheckpointError:
        raise
    except CheckpointFormatError:
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
    if header_len > len(raw) - 8:
        raise CheckpointFormatError(
            f"{path}: truncated safetensors file (header of {header_len} bytes, "
            f"file has {len(raw)} bytes)"
        )
    try:
        header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointFormatError(f"{path}: malformed safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: malformed safetensors header (not a JSON object)")
    data = memoryview(raw)[8 + header_len :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointFormatError(
                f"{path}: malformed or unsupported safetensors entry {name!r}: {info!r}"
            ) from err
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != nbytes:
            raise CheckpointFormatError(
                f"{path}: entry {name!r} spans bytes [{begin}, {end}) but needs {nbytes} bytes "
                f"inside a data section of {len(data)} bytes (truncated file?)"
            )
        array = np.frombuffer(data[begin:end], dtype=dtype.newbyteorder("<"))
        out[name] = array.astype(dtype, copy=False).reshape(shape)
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a state dict from `.safetensors` (by suffix) or a zip-format `.pt`/`.pth`/`.bin`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_zip(path)
