"""Fuzzing the torch-zip/pickle reader and the safetensors parser (issue 12).

Thousands of truncated, overwritten, spliced and structurally mutated files must give either arrays
or the converter's own `CheckpointFormatError` (a `ValueError`, so the CLI prints one clean line)
naming the file; no other exception, and no code from the file ever runs. Resource attacks (huge
declared sizes, deep nesting, zip bombs) run in a child process under a 1 GiB address-space cap and
must be refused promptly. Seeds: a tiny `torch.save` state dict (pickle protocols 2 and 4) and a
tiny `.safetensors` file written by the `safetensors` library.
"""

from __future__ import annotations

import collections
import functools
import importlib
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reddiff_jax.convert import torch_reader
from reddiff_jax.convert.torch_reader import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_state_dict,
)

# derandomize: the same examples on every run and machine; no .hypothesis database in the repo
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# a valid file never grows in memory beyond this when read (see torch_reader._MAX_EXPANSION)
_EXPANSION, _SLACK = torch_reader._MAX_EXPANSION, torch_reader._EXPANSION_SLACK


# --- seeds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def torch_seed() -> dict[str, np.ndarray]:
    """A small state dict with the layouts torch.save writes: views, dtypes, a Parameter."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3))
    sd = net.state_dict()  # an OrderedDict with _metadata: BUILD in the pickle
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd["transposed"] = base.t()
    sd["offset_view"] = base[1:, 1:3]
    sd["half"] = base.half()
    sd["bf16"] = base.to(torch.bfloat16)[::2]
    sd["int64"] = torch.arange(3)
    sd["param"] = torch.nn.Parameter(torch.ones(2))
    sd["empty"] = torch.zeros(0, 2)
    return sd


@pytest.fixture(scope="module", params=[2, 4], ids=["protocol2", "protocol4"])
def torch_zip(request, torch_seed) -> bytes:
    """The seed state dict as torch.save writes it (protocol 4: STACK_GLOBAL, FRAME, MEMOIZE)."""
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(torch_seed, buf, pickle_protocol=request.param)
    return buf.getvalue()


@pytest.fixture(scope="module")
def safetensors_file() -> bytes:
    st_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {
        "conv.weight": np.arange(54, dtype=np.float32).reshape(3, 2, 3, 3),
        "conv.bias": np.arange(3, dtype=np.float16),
        "steps": np.arange(4, dtype=np.int64),
        "flag": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
    }
    return st_numpy.save(arrays, metadata={"note": "fuzz seed"})


@functools.cache
def _members(zip_bytes: bytes) -> tuple[tuple[str, bytes], ...]:
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        return tuple((name, zf.read(name)) for name in zf.namelist())


def _pickle_name(members: tuple[tuple[str, bytes], ...]) -> str:
    return next(name for name, _ in members if name.endswith("/data.pkl"))


def _rezip(members: tuple[tuple[str, bytes], ...], replace: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, replace.get(name, data))
    return buf.getvalue()


def _read(path: Path, data: bytes) -> dict[str, np.ndarray] | None:
    """Reads `data` as `path`: arrays, or None after a clean CheckpointFormatError.

    Any other exception propagates and fails the test.
    """
    path.write_bytes(data)
    try:
        out = read_state_dict(path)
    except CheckpointFormatError as err:
        message = str(err)
        assert message.startswith(f"{path}: "), message  # names the file
        assert len(message) < 2000, message[:300]  # untrusted values are shortened
        return None
    assert isinstance(out, dict)
    for name, array in out.items():
        assert isinstance(name, str) and isinstance(array, np.ndarray)
        assert array.nbytes <= _EXPANSION * len(data) + _SLACK, (name, array.shape)
        array.tobytes()  # every element lies inside the file's buffers
    return out


def test_seeds_read_back(tmp_path, torch_seed, torch_zip, safetensors_file):
    out = _read(tmp_path / "seed.pt", torch_zip)
    assert out is not None and list(out) == list(torch_seed)
    for key, tensor in torch_seed.items():
        want = tensor.detach().float().numpy()
        np.testing.assert_array_equal(out[key].astype(np.float32), want, err_msg=key)
    out = _read(tmp_path / "seed.safetensors", safetensors_file)
    assert out is not None and out["conv.weight"].shape == (3, 2, 3, 3)
    np.testing.assert_array_equal(out["steps"], np.arange(4))


# --- (a)-(c): byte-level damage ---------------------------------------------------------------


def _damage(kind: str) -> st.SearchStrategy:
    """A function bytes -> damaged bytes: truncation, byte overwrites/flips, or a splice."""
    if kind == "truncate":
        return st.floats(0, 1, exclude_max=True).map(lambda f: lambda b: b[: int(f * len(b))])
    if kind == "overwrite":
        edit = st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255), st.booleans())

        def apply(edits):
            def run(b: bytes) -> bytes:
                out = bytearray(b)
                for f, value, flip in edits:
                    i = int(f * len(out))
                    out[i] = out[i] ^ value if flip else value
                return bytes(out)

            return run

        return st.lists(edit, min_size=1, max_size=8).map(apply)
    # splice: replace a slice by random bytes or by a copy of another part of the file
    junk = st.one_of(
        st.binary(max_size=64),
        st.tuples(st.floats(0, 1), st.integers(1, 64)).map(lambda t: ("copy", *t)),
    )

    def splice(args):
        f, cut, insert = args

        def run(b: bytes) -> bytes:
            i = int(f * len(b))
            if isinstance(insert, tuple):  # ("copy", where, length)
                j = int(insert[1] * len(b))
                piece = b[j : j + insert[2]]
            else:
                piece = insert
            return b[:i] + piece + b[i + cut :]

        return run

    return st.tuples(st.floats(0, 1), st.integers(0, 64), junk).map(splice)


@settings(FUZZ, max_examples=150)
@given(damage=_damage("truncate"))
def test_truncated_torch_zip_is_refused(workdir, torch_zip, damage):
    assert _read(workdir / "cut.pt", damage(torch_zip)) is None


@settings(FUZZ, max_examples=100)
@given(damage=_damage("truncate"))
def test_truncated_safetensors_is_refused(workdir, safetensors_file, damage):
    assert _read(workdir / "cut.safetensors", damage(safetensors_file)) is None


@settings(FUZZ, max_examples=200)
@given(damage=_damage("overwrite"))
def test_overwritten_torch_zip(workdir, torch_zip, damage):
    _read(workdir / "flip.pt", damage(torch_zip))


@settings(FUZZ, max_examples=150)
@given(damage=_damage("splice"))
def test_spliced_torch_zip(workdir, torch_zip, damage):
    _read(workdir / "splice.pt", damage(torch_zip))


@settings(FUZZ, max_examples=300)
@given(damage=_damage("overwrite"))
def test_overwritten_safetensors(workdir, safetensors_file, damage):
    _read(workdir / "flip.safetensors", damage(safetensors_file))


@settings(FUZZ, max_examples=200)
@given(damage=_damage("splice"))
def test_spliced_safetensors(workdir, safetensors_file, damage):
    _read(workdir / "splice.safetensors", damage(safetensors_file))


# --- (d): a valid zip around a mutated pickle -------------------------------------------------

_OPCODES = [op.code.encode("latin-1") for op in pickletools.opcodes]
_INTERESTING_INTS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([-(2**63), 2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**30]),
)


@functools.lru_cache(maxsize=64)
def _op_spans(data: bytes) -> list[tuple[int, int, str]]:
    """(start, end, name) of each opcode that still parses."""
    starts: list[tuple[int, str]] = []
    try:
        for op, _, pos in pickletools.genops(data):
            starts.append((pos, op.name))
    except Exception:  # a mutated pickle: keep the opcodes before the damage
        pass
    if not starts:
        return [(0, len(data), "?")]
    ends = [pos for pos, _ in starts[1:]] + [len(data)]
    return [(pos, end, name) for (pos, name), end in zip(starts, ends, strict=True)]


def _push(value) -> bytes:
    """The opcodes that push `value` (an int, str or tuple) onto the unpickler's stack."""
    return pickletools.optimize(pickle.dumps(value, protocol=2))[2:-1]


@st.composite
def _mutated_pickle(draw, seed: bytes) -> bytes:
    data = seed
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        spans = _op_spans(data)
        start, end, name = spans[draw(st.integers(0, len(spans) - 1))]
        kind = draw(
            st.sampled_from(
                ["opcode", "byte", "int", "delete", "duplicate", "move", "insert", "truncate"]
            )
        )
        if kind == "opcode":  # another opcode, same argument bytes
            data = data[:start] + draw(st.sampled_from(_OPCODES)) + data[start + 1 :]
        elif kind == "byte":
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
        elif kind == "int":  # sizes, strides, offsets, numels, memo indices: odd integers
            ints = [s for s in spans if s[2] in ("BININT", "BININT1", "BININT2", "LONG1")]
            if ints:
                start, end, _ = ints[draw(st.integers(0, len(ints) - 1))]
            data = data[:start] + _push(draw(_INTERESTING_INTS)) + data[end:]
        elif kind == "delete":
            data = data[:start] + data[end:]
        elif kind == "duplicate":
            data = data[:end] + data[start:end] + data[end:]
        elif kind == "move":
            piece, rest = data[start:end], data[:start] + data[end:]
            i = draw(st.integers(0, len(rest)))
            data = rest[:i] + piece + rest[i:]
        elif kind == "insert":
            op = draw(st.sampled_from(_OPCODES)) + draw(st.binary(max_size=9))
            data = data[:start] + op + data[start:]
        else:
            data = data[: draw(st.integers(0, len(data)))]
    return data


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_mutated_pickle_in_valid_zip(workdir, torch_zip, data):
    members = _members(torch_zip)
    name = _pickle_name(members)
    pkl = data.draw(_mutated_pickle(dict(members)[name]))
    _read(workdir / "pickle.pt", _rezip(members, {name: pkl}))


# --- (e): a valid safetensors layout around a mutated JSON header ------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | _INTERESTING_INTS | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=4,
)
_DTYPES = st.sampled_from(
    [*torch_reader._SAFETENSORS_DTYPES, "F8_E4M3", "U16", "f32", "", "F32 ", "\udcff"]
)


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


_FIELD_KINDS = ("dtype", "shape", "offsets", "nudge", "drop")


@st.composite
def _mutated_header(draw, header: dict) -> dict | object:
    header = json.loads(json.dumps(header))  # a deep copy
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        kind = draw(
            st.sampled_from(["dtype", "shape", "offsets", "nudge", "drop", "entry", "alias", "top"])
        )
        if kind in _FIELD_KINDS and not (isinstance(entry, dict) and entry):
            kind = "entry"
        if kind == "dtype":
            entry["dtype"] = draw(_DTYPES | _JSON)
        elif kind == "shape":
            entry["shape"] = draw(st.lists(_INTERESTING_INTS, max_size=5) | _JSON)
        elif kind == "offsets":
            entry["data_offsets"] = draw(st.lists(_INTERESTING_INTS, max_size=3) | _JSON)
        elif kind == "nudge":  # plausible offsets a few bytes off
            offsets = entry.get("data_offsets")
            pair = isinstance(offsets, list) and len(offsets) == 2
            begin, end = offsets if pair and all(type(v) is int for v in offsets) else (0, 0)
            d1, d2 = draw(st.integers(-8, 8)), draw(st.integers(-8, 8))
            entry["data_offsets"] = [begin + d1, end + d2]
        elif kind == "drop":
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif kind == "entry":
            header[name] = draw(_JSON)
        elif kind == "alias":  # a second entry over the same bytes
            header[name + ".alias"] = json.loads(json.dumps(header[draw(st.sampled_from(names))]))
        else:
            return draw(_JSON)
    return header


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_mutated_safetensors_header(workdir, safetensors_file, data):
    header, payload = _split_safetensors(safetensors_file)
    new = data.draw(_mutated_header(header))
    text = json.dumps(new).encode()
    length = data.draw(st.none() | st.integers(0, 2**64 - 1), label="header length")
    raw = struct.pack("<Q", len(text) if length is None else length) + text + payload
    out = _read(workdir / "header.safetensors", raw)
    if out is not None:  # only a header that describes its arrays exactly
        for name, array in out.items():
            assert list(array.shape) == new[name]["shape"]
            assert array.dtype == torch_reader._SAFETENSORS_DTYPES[new[name]["dtype"]]


@settings(FUZZ, max_examples=100)
@given(header=st.binary(max_size=64))
def test_non_utf8_or_non_json_header(workdir, header):
    raw = struct.pack("<Q", len(header)) + header
    _read(workdir / "junk.safetensors", raw)


# --- never code execution ---------------------------------------------------------------------

_DANGEROUS = [
    ("os", "system"),
    ("posix", "system"),
    ("nt", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("__builtin__", "eval"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("subprocess", "Popen"),
    ("subprocess", "check_output"),
    ("importlib", "import_module"),
    ("copyreg", "_reconstructor"),
    ("functools", "partial"),
    ("pickle", "loads"),
    ("runpy", "run_path"),
    ("torch", "load"),
    ("torch._utils", "_rebuild_tensor"),  # allow-listed module, other name
    ("torch", "FloatTensor"),
    ("collections", "defaultdict"),
    ("numpy.core.multiarray", "_reconstruct"),
]


def _command_for(module: str, name: str, marker: Path) -> tuple:
    """Arguments that would create `marker` if the callable ran."""
    if name in ("eval", "exec"):
        return (f"open({str(marker)!r}, 'w').close()",)
    if name == "Popen" or name == "check_output":
        return (["touch", str(marker)],)
    return (f"touch {marker}",)


def _call_pickle(module: str, name: str, args: tuple, via: str) -> bytes:
    """A state dict {'w': module.name(*args)} calling the global through `via`."""
    g_module, g_name = module.encode(), name.encode()
    if via == "GLOBAL":
        call = b"c" + g_module + b"\n" + g_name + b"\n" + _push(args) + b"R"
    elif via == "STACK_GLOBAL":
        call = _push(module) + _push(name) + b"\x93" + _push(args) + b"R"
    elif via == "INST":
        call = b"(" + b"".join(_push(a) for a in args) + b"i" + g_module + b"\n" + g_name + b"\n"
    else:  # OBJ
        call = b"(c" + g_module + b"\n" + g_name + b"\n" + b"".join(_push(a) for a in args) + b"o"
    protocol = b"\x80\x04" if via == "STACK_GLOBAL" else b"\x80\x02"
    return protocol + b"}" + _push("w") + call + b"s."


class _Spies:
    """Replaces os.system, posix.system and subprocess.Popen/check_output with recorders."""

    def __init__(self):
        self.calls: list[tuple] = []
        self._patches = [
            mock.patch.object(module, attr, lambda *a, **k: self.calls.append(a) or 0)
            for module, attr in [
                (os, "system"),
                (sys.modules[os.system.__module__], "system"),
                (subprocess, "Popen"),
                (subprocess, "check_output"),
            ]
        ]

    def __enter__(self) -> _Spies:
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self._patches):
            p.stop()


def _torch_like_zip(pickle_bytes: bytes, storages: dict[str, bytes] | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", **kw) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
    return buf.getvalue()


@pytest.mark.parametrize("via", ["GLOBAL", "STACK_GLOBAL", "INST", "OBJ"])
@pytest.mark.parametrize(("module", "name"), _DANGEROUS, ids=[".".join(g) for g in _DANGEROUS])
def test_dangerous_global_is_refused_and_never_called(tmp_path, module, name, via):
    marker = tmp_path / "pwned"
    payload = _call_pickle(module, name, _command_for(module, name, marker), via)
    path = tmp_path / "evil.pt"
    path.write_bytes(_torch_like_zip(payload))
    with _Spies() as spies, pytest.raises(UnsafeCheckpointError) as err:
        read_state_dict(path)
    assert f"refusing to load {module}.{name}:" in str(err.value)
    assert str(err.value).startswith(f"{path}: ")
    assert not spies.calls and not marker.exists()


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_pickle_written_by_pickle_is_refused(tmp_path, target, protocol):
    marker = tmp_path / "pwned"
    module, name = target.split(".")
    func = getattr(importlib.import_module(module), name)
    args = _command_for(module, name, marker)
    payload = pickle.dumps(collections.OrderedDict(w=_Evil(func, args)), protocol=protocol)
    path = tmp_path / "evil.pt"
    path.write_bytes(_torch_like_zip(payload))
    with _Spies() as spies, pytest.raises(UnsafeCheckpointError, match=r"refusing to load \S+"):
        read_state_dict(path)
    assert not spies.calls and not marker.exists()


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_dangerous_global_anywhere_in_a_real_pickle(workdir, torch_zip, data):
    members = _members(torch_zip)
    name = _pickle_name(members)
    seed = dict(members)[name]
    module, attr = data.draw(st.sampled_from(_DANGEROUS))
    via = data.draw(st.sampled_from(["GLOBAL", "STACK_GLOBAL", "INST", "OBJ"]))
    marker = workdir / "pwned"
    call = _call_pickle(module, attr, _command_for(module, attr, marker), via)[3:-2]  # {'w': ...}
    spans = _op_spans(seed)
    start = spans[data.draw(st.integers(0, len(spans) - 1))][0]  # before any opcode
    evil = bytearray(seed[:start] + call + seed[start:])
    for frame, _, op in spans:  # protocol 4: the frame around the insertion grows with it
        if op != "FRAME":
            continue
        (length,) = struct.unpack("<Q", seed[frame + 1 : frame + 9])
        if frame + 9 <= start < frame + 9 + length:
            evil[frame + 1 : frame + 9] = struct.pack("<Q", length + len(call))
    path = workdir / "evil.pt"
    path.write_bytes(_rezip(members, {name: bytes(evil)}))
    with _Spies() as spies, pytest.raises(UnsafeCheckpointError, match=f"{module}.{attr}"):
        read_state_dict(path)
    assert not spies.calls and not marker.exists()


_REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
_PARAM = b"ctorch._utils\n_rebuild_parameter\n"
_ODICT = b"ccollections\nOrderedDict\n"
_STORAGE = b"(" + _push("storage") + b"ctorch\nFloatStorage\n" + _push("0") + _push("cpu")
_STORAGE += _push(4) + b"tQ"  # BINPERSID ('storage', FloatStorage, '0', 'cpu', 4)
_MISUSE = {  # value of 'w' in a state dict: allowed globals used wrongly
    "rebuild_no_args": _REBUILD + b")R",
    "rebuild_str_storage": _REBUILD + _push(("x", 0, (1,), (1,), False, None)) + b"R",
    "rebuild_float_size": _REBUILD
    + b"("
    + _STORAGE
    + b"".join(_push(v) for v in (0, (1.5,), (1,), False, None))
    + b"tR",
    "rebuild_too_few_args": _REBUILD + b"(" + _STORAGE + _push(0) + b"tR",
    "parameter_of_int": _PARAM + _push((1, False, None)) + b"R",
    "storage_type_called": b"ctorch\nFloatStorage\n)R",
    "odict_of_int": _ODICT + _push((1,)) + b"R",
    "odict_of_triples": _ODICT + _push((((1, 2, 3),),)) + b"R",
    "odict_newobj": _ODICT + b")\x81",
    "build_storage_dtype": b"ctorch\nFloatStorage\n" + _push((None, {"dtype": "x"})) + b"b",
    "build_rebuild_defaults": _REBUILD + _push((None, {"__defaults__": (1, 2, 3, 4, 5, 6)})) + b"b",
    "build_odict_class": _ODICT + _push((None, {"x": 1})) + b"b",
    "build_storage": _STORAGE + _push({"x": 1}) + b"b",
    "global_as_value": _ODICT,
    "persid_str": _push("0") + b"Q",
    "persid_short_tuple": _push(("storage", "0", "cpu")) + b"Q",
    "persid_missing_record": _STORAGE.replace(_push("0"), _push("nope")),
    "persid_negative_numel": _STORAGE.replace(_push(4) + b"tQ", _push(-4) + b"tQ"),
    "ext1_unregistered": b"\x82\x01",
}


@pytest.mark.parametrize("case", sorted(_MISUSE))
def test_allowed_globals_used_wrongly(tmp_path, case):
    payload = b"\x80\x02}" + _push("w") + _MISUSE[case] + b"s."
    path = tmp_path / "misuse.pt"
    path.write_bytes(_torch_like_zip(payload, {"0": np.arange(4, dtype="<f4").tobytes()}))
    with _Spies() as spies, pytest.raises(CheckpointFormatError) as err:
        read_state_dict(path)
    assert not isinstance(err.value, UnsafeCheckpointError) and not spies.calls
    assert str(err.value).startswith(f"{path}: ")
    # the allow-listed stand-ins are unchanged (BUILD cannot alter them): a valid file still reads
    path.write_bytes(_torch_like_zip(_tensor_pickle((2, 2), (1, 2)), _FLOATS4))
    np.testing.assert_array_equal(read_state_dict(path)["w"], [[0, 2], [1, 3]])


# --- resource attacks, in a child process under an address-space cap ---------------------------


def _tensor_pickle(size, stride, *, offset=0, numel=4) -> bytes:
    """{'w': _rebuild_tensor_v2(<FloatStorage '0' of `numel`>, offset, size, stride, ...)}."""
    storage = _STORAGE.replace(_push(4) + b"tQ", _push(numel) + b"tQ")
    args = b"(" + storage + _push(offset) + _push(size) + _push(stride) + b"\x89" + _ODICT + b")Rt"
    return b"\x80\x02}" + _push("w") + _REBUILD + args + b"Rs."


_FLOATS4 = {"0": np.arange(4, dtype="<f4").tobytes()}


def _patched_zip(
    member: bytes,
    *,
    file_size: int | None = None,
    flag: int | None = None,
    offset: int | None = None,
) -> bytes:
    """A torch-like zip whose first member (data/0) has its size, flags or offset patched."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data/0", member)
        zf.writestr("archive/data.pkl", _tensor_pickle((1,), (1,), numel=1))
    raw = bytearray(buf.getvalue())
    central = raw.index(b"PK\x01\x02")  # the first central directory entry: data/0
    if file_size is not None:  # local header and central directory
        raw[22:26] = raw[central + 24 : central + 28] = struct.pack("<I", file_size)
    if flag is not None:
        raw[6:8] = raw[central + 8 : central + 10] = struct.pack("<H", flag)
    if offset is not None:
        raw[central + 42 : central + 46] = struct.pack("<I", offset)
    return bytes(raw)


def _safetensors(header: bytes | dict, payload: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + payload


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _dangerous_sizes_header(shape: str) -> bytes:
    return ('{"w":{"dtype":"F32","shape":' + shape + ',"data_offsets":[0,0]}}').encode()


_ZEROS = b"\0" * (20 << 20)  # deflates to ~20 KB: 20 MiB > 16 x the file + slack
_BZIP2 = _torch_like_zip(_tensor_pickle((1,), (1,), numel=1), compression=zipfile.ZIP_BZIP2)
_LZMA = _torch_like_zip(_tensor_pickle((1,), (1,), numel=1), compression=zipfile.ZIP_LZMA)
_RESOURCE_CASES: dict[str, tuple[str, bytes, str]] = {  # name -> (suffix, bytes, message part)
    # pickle-level
    "memo_long_binput": (".pt", _torch_like_zip(b"\x80\x02}r\xff\xff\xff\x7f."), "memo index"),
    "memo_put_text": (".pt", _torch_like_zip(b"\x80\x02}p99999999999\n."), "memo index"),
    "memo_get_unset": (".pt", _torch_like_zip(b"\x80\x02}h\x05."), "unset memo index 5"),
    "binbytes8_huge": (
        ".pt",
        _torch_like_zip(b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"x."),
        "bytes8",
    ),
    "binunicode8_huge": (
        ".pt",
        _torch_like_zip(b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"x."),
        "unicodestring8",
    ),
    "long4_huge": (".pt", _torch_like_zip(b"\x80\x02\x8b\xff\xff\xff\x7fx."), "long4"),
    "frame_huge": (
        ".pt",
        _torch_like_zip(b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"}."),
        "runs past the end",
    ),
    "deep_tuple_key": (  # hashing it would overflow the C stack (segfault)
        ".pt",
        _torch_like_zip(b"\x80\x02}" + b")" + b"\x85" * 10**6 + b"Ns."),
        "nest deeper than 100",
    ),
    "deep_list": (
        ".pt",
        _torch_like_zip(b"\x80\x02}" + _push("w") + b"]" * 10**5 + b"a" * (10**5 - 1) + b"s."),
        "nest deeper than 100",
    ),
    "huge_decimal_int": (".pt", _torch_like_zip(b"\x80\x02I" + b"9" * 10**5 + b"\n."), "digits"),
    "stack_underflow": (".pt", _torch_like_zip(b"\x80\x02s."), "stack underflow"),
    "no_mark": (".pt", _torch_like_zip(b"\x80\x02}u."), "without a MARK"),
    "no_stop": (".pt", _torch_like_zip(b"\x80\x02}"), "STOP"),
    "unknown_opcode": (".pt", _torch_like_zip(b"\x80\x02\xff."), "unknown"),
    # tensor-level
    "storage_numel_huge": (
        ".pt",
        _torch_like_zip(_tensor_pickle((1,), (1,), numel=2**62), _FLOATS4),
        "holds 16 bytes",
    ),
    "storage_numel_overflow": (
        ".pt",
        _torch_like_zip(_tensor_pickle((1,), (1,), numel=2**64), _FLOATS4),
        "malformed storage record",
    ),
    "tensor_broadcast_huge": (
        ".pt",
        _torch_like_zip(_tensor_pickle((2**20, 2**20), (0, 0)), _FLOATS4),
        "overlapping strides",
    ),
    "tensor_size_overflow": (
        ".pt",
        _torch_like_zip(_tensor_pickle((2**32, 2**32), (1, 1)), _FLOATS4),
        "too large",
    ),
    "tensor_empty_but_huge": (
        ".pt",
        _torch_like_zip(_tensor_pickle((0, 2**62), (1, 1)), _FLOATS4),
        "too large",
    ),
    "tensor_negative_size": (
        ".pt",
        _torch_like_zip(_tensor_pickle((-1,), (1,)), _FLOATS4),
        "ints in [0, 2**63)",
    ),
    "tensor_size_2_64": (
        ".pt",
        _torch_like_zip(_tensor_pickle((2**64,), (1,)), _FLOATS4),
        "ints in [0, 2**63)",
    ),
    "tensor_ndim_40": (
        ".pt",
        _torch_like_zip(_tensor_pickle((1,) * 40, (1,) * 40), _FLOATS4),
        "at most 32 ints",
    ),
    "tensor_offset_past_end": (
        ".pt",
        _torch_like_zip(_tensor_pickle((2,), (1,), offset=1000), _FLOATS4),
        "reaches element 1001",
    ),
    "tensor_stride_past_end": (
        ".pt",
        _torch_like_zip(_tensor_pickle((2, 2), (2**62, 1)), _FLOATS4),
        "reaches element",
    ),
    "tensor_huge_singleton_stride": (  # valid: a stride on a size-1 dim is never used
        ".pt",
        _torch_like_zip(_tensor_pickle((2, 1, 2), (1, 2**62, 2)), _FLOATS4),
        "",
    ),
    # zip-level
    "zip_bomb_declared": (
        ".pt",
        _torch_like_zip(_tensor_pickle((1,), (1,), numel=1), {"0": _ZEROS}, compression=8),
        "zip bomb",
    ),
    "zip_lying_size": (".pt", _patched_zip(_ZEROS, file_size=4), "Bad CRC-32"),
    "zip_encrypted": (".pt", _patched_zip(b"\0" * 4, flag=1), "encrypted"),
    "zip_bzip2": (".pt", _BZIP2, "compression method 12"),
    "zip_lzma": (".pt", _LZMA, "compression method 14"),
    "zip_missing_storage": (
        ".pt",
        _torch_like_zip(_tensor_pickle((1,), (1,))),
        "data/0 is missing",
    ),
    "zip_offset_past_end": (".pt", _patched_zip(b"\0" * 4, offset=2**32 - 16), "Truncated"),
    "not_a_zip": (".pt", pickle.dumps({"w": 1}, protocol=2), "torch < 1.6"),
    "empty_file": (".pt", b"", "not a readable zip"),
    # safetensors
    "st_header_len_huge": (".safetensors", _safetensors(b"{}", length=2**64 - 1), "exceeds"),
    "st_header_len_past_end": (".safetensors", _safetensors(b"{}", length=2**20), "truncated"),
    "st_short_file": (".safetensors", b"\x01\x00", "truncated"),
    "st_non_utf8": (".safetensors", _safetensors(b'{"\xff\xfe": 1}'), "malformed"),
    "st_non_json": (".safetensors", _safetensors(b"{not json"), "malformed"),
    "st_json_array": (".safetensors", _safetensors(b"[]"), "not a JSON object"),
    "st_deep_json": (".safetensors", _safetensors(b"[" * 10**5 + b"]" * 10**5), "malformed"),
    "st_huge_json_int": (".safetensors", _safetensors(_dangerous_sizes_header("9" * 5000)), ""),
    "st_shape_infinity": (".safetensors", _safetensors(_dangerous_sizes_header("[Infinity]")), ""),
    "st_shape_wraps_int64": (
        ".safetensors",
        _safetensors(_dangerous_sizes_header("[4294967296, 4294967296]")),
        "too large",
    ),
    "st_shape_empty_but_huge": (
        ".safetensors",
        _safetensors(_dangerous_sizes_header(f"[0, {2**62}]")),
        "too large",
    ),
    "st_shape_negative": (".safetensors", _safetensors(_dangerous_sizes_header("[-1]")), "shape"),
    "st_shape_float": (".safetensors", _safetensors(_dangerous_sizes_header("[2.0]")), "shape"),
    "st_shape_bool": (".safetensors", _safetensors(_dangerous_sizes_header("[true]")), "shape"),
    "st_shape_str": (".safetensors", _safetensors(_dangerous_sizes_header('["2"]')), "shape"),
    "st_ndim_100": (".safetensors", _safetensors(_dangerous_sizes_header(str([1] * 100))), "32"),
    "st_dtype_unknown": (
        ".safetensors",
        _safetensors({"w": _entry(dtype="F7")}, b"\0" * 4),
        "unsupported dtype 'F7'",
    ),
    "st_dtype_list": (
        ".safetensors",
        _safetensors({"w": _entry(dtype=["F32"])}, b"\0" * 4),
        "unsupported dtype",
    ),
    "st_entry_not_object": (".safetensors", _safetensors({"w": 5}), "must be an object"),
    "st_offsets_past_end": (
        ".safetensors",
        _safetensors({"w": _entry(offsets=(1000, 1004))}, b"\0" * 4),
        "spans bytes [1000, 1004)",
    ),
    "st_offsets_reversed": (
        ".safetensors",
        _safetensors({"w": _entry(offsets=(4, 0))}, b"\0" * 4),
        "spans bytes [4, 0)",
    ),
    "st_offsets_negative": (
        ".safetensors",
        _safetensors({"w": _entry(offsets=(-4, 0))}, b"\0" * 4),
        "data_offsets",
    ),
    "st_offsets_three": (
        ".safetensors",
        _safetensors({"w": _entry(offsets=(0, 4, 8))}, b"\0" * 8),
        "data_offsets",
    ),
    "st_offsets_overlap": (
        ".safetensors",
        _safetensors({"a": _entry(shape=(2,), offsets=(0, 8)), "b": _entry()}, b"\0" * 8),
        "overlap",
    ),
}

_HARNESS = textwrap.dedent(
    """
    import importlib.util, json, resource, sys, time
    spec = importlib.util.spec_from_file_location("reader_alone", sys.argv[1])
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    cap = vm + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in sys.argv[2:]:
        print(json.dumps({"start": path}), flush=True)
        result, t = {"path": path}, time.perf_counter()
        try:
            out = reader.read_state_dict(path)
            result.update(outcome="ok", shapes={k: list(v.shape) for k, v in out.items()})
        except reader.CheckpointFormatError as err:
            result.update(outcome="CheckpointFormatError", message=str(err))
        except BaseException as err:
            result.update(outcome="other", message=f"{type(err).__name__}: {err}"[:500])
        result["seconds"] = time.perf_counter() - t
        result["rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
        print(json.dumps(result), flush=True)
    """
)


@pytest.fixture(scope="module")
def resource_results(tmp_path_factory) -> tuple[dict[str, dict], str]:
    """Reads every resource case in one child process; (path -> result, how the child ended)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("the address-space cap needs Linux /proc")
    folder = tmp_path_factory.mktemp("attacks")
    paths = []
    for name, (suffix, raw, _) in _RESOURCE_CASES.items():
        paths.append(folder / f"{name}{suffix}")
        paths[-1].write_bytes(raw)
    proc = subprocess.run(
        [sys.executable, "-c", _HARNESS, torch_reader.__file__, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = {}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        results[record.get("path", record.get("start"))] = record
    return results, f"child exited with {proc.returncode}: {proc.stderr[-2000:]}"


@pytest.mark.parametrize("case", list(_RESOURCE_CASES))
def test_resource_attack_is_refused_promptly(resource_results, case):
    results, ending = resource_results
    suffix, _, part = _RESOURCE_CASES[case]
    matches = [r for path, r in results.items() if Path(path).name == f"{case}{suffix}"]
    assert matches and "outcome" in matches[0], f"{case} crashed the reader: {ending}"
    result = matches[0]
    assert result["seconds"] < 5, result  # generous for a slow shared CI core
    assert result["rss_growth_kb"] < 512 * 1024, result
    if case == "tensor_huge_singleton_stride":
        assert result["outcome"] == "ok" and result["shapes"] == {"w": [2, 1, 2]}, result
        return
    assert result["outcome"] == "CheckpointFormatError", result
    assert result["message"].startswith(result["path"] + ": "), result
    assert part in result["message"], result


def test_deflated_members_within_budget_still_read(tmp_path):
    """Deflate is accepted; the budget only stops expansion far beyond the file's size."""
    raw = np.arange(1 << 16, dtype="<f4").tobytes()
    pkl = _tensor_pickle((1 << 16,), (1,), numel=1 << 16)
    path = tmp_path / "deflated.pt"
    path.write_bytes(_torch_like_zip(pkl, {"0": raw}, compression=zipfile.ZIP_DEFLATED))
    out = read_state_dict(path)
    np.testing.assert_array_equal(out["w"], np.arange(1 << 16, dtype=np.float32))
    assert zlib.crc32(out["w"].tobytes()) == zlib.crc32(raw)
