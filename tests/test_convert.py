"""The torch-free state-dict readers, the key/layout converter and the `convert` command."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from reddiff_jax import cli
from reddiff_jax.cli.convert import load_config_file
from reddiff_jax.convert import (
    CONVERTER_VERSION,
    CheckpointFormatError,
    UnsafeCheckpointError,
    convert_file,
    convert_state_dict,
    expected_torch_shapes,
    flax_path,
    read_state_dict,
    read_torch_zip,
    torch_to_flax_layout,
)
from reddiff_jax.model import ScoreModel, load_pretrained, param_shapes, read_metadata
from reddiff_jax.unet import PRESETS, UNetConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "guided_diffusion"
TINY = [
    "tiny_imagenet_like",
    "tiny_ffhq_like",
    "tiny_newattn_classcond",
    "tiny_plain_conv_resample",
]
MANIFESTS = {  # manifest -> preset reproducing it
    "imagenet256_uncond": "imagenet256_uncond",
    "imagenet256_cond": "imagenet256_cond",
    "ffhq256_dps": "ffhq256",
}


def _config(name: str) -> UNetConfig:
    return load_config_file(FIXTURES / f"{name}.config.json")


@pytest.fixture(scope="module")
def small():
    """The smallest fixture: (config, state dict)."""
    name = "tiny_plain_conv_resample"
    return _config(name), read_torch_zip(FIXTURES / f"{name}.pt")


# --- reading -------------------------------------------------------------------------------


def test_torch_reader_matches_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    for name in TINY:
        path = FIXTURES / f"{name}.pt"
        ours = read_torch_zip(path)
        ref = torch.load(path, map_location="cpu", weights_only=True)
        assert list(ours) == list(ref)
        for key, tensor in ref.items():
            np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)
            assert ours[key].dtype == tensor.numpy().dtype
    # views, offsets, other dtypes and a Parameter, as torch.save writes them
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    odd = {
        "transposed": base.t(),
        "offset_view": base[1:, 2:5],
        "half": base.half(),
        "bf16": base.to(torch.bfloat16)[::2],
        "int64": torch.arange(5)[1:],
        "param": torch.nn.Parameter(torch.ones(2, 3)),
        "empty": torch.zeros(0, 3),
    }
    torch.save(odd, tmp_path / "odd.pt")
    ours = read_torch_zip(tmp_path / "odd.pt")
    for key, tensor in odd.items():
        want = tensor.detach().float().numpy()
        chex.assert_shape(ours[key], want.shape)
        np.testing.assert_array_equal(ours[key].astype(np.float32), want, err_msg=key)
    # bfloat16 / float16 through safetensors as well
    st_torch = pytest.importorskip("safetensors.torch")
    narrow = {"bf16": base.to(torch.bfloat16), "half": base.half()}
    st_torch.save_file(narrow, str(tmp_path / "narrow.safetensors"))
    ours = read_state_dict(tmp_path / "narrow.safetensors")
    for key, tensor in narrow.items():
        np.testing.assert_array_equal(ours[key].astype(np.float32), tensor.float().numpy())


def test_safetensors_reader_matches_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {
        "a.weight": np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32),
        "b": np.arange(6, dtype=np.float16).reshape(2, 3),
        "c": np.arange(5, dtype=np.int64),
    }
    st.save_file(arrays, str(tmp_path / "x.safetensors"), metadata={"note": "test"})
    ours = read_state_dict(tmp_path / "x.safetensors")
    assert ours.keys() == arrays.keys()
    for key, value in arrays.items():
        assert ours[key].dtype == value.dtype
        np.testing.assert_array_equal(ours[key], value)


def _torch_like_zip(path: Path, pickle_bytes: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")


_SYSTEM = os.system  # `posix.system` on Linux: what pickle names when it pickles os.system


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (_SYSTEM, (self.command,))


@pytest.mark.parametrize("via", ["os.system", "pickle.dumps"])
def test_refuses_foreign_callable_without_calling_it(tmp_path, monkeypatch, via):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    if via == "os.system":  # hand-written protocol-2 pickle: GLOBAL 'os system', REDUCE
        cmd = command.encode()
        payload = b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."
        refused = "os.system"
    else:  # what pickle itself writes for os.system
        payload = pickle.dumps({"w": _Evil(command)}, protocol=2)
        refused = f"{_SYSTEM.__module__}.system"
    calls = []
    for module in (os, sys.modules[_SYSTEM.__module__]):
        monkeypatch.setattr(module, "system", lambda *a: calls.append(a) or 0)
    _torch_like_zip(tmp_path / "evil.pt", payload)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {refused}"):
        read_torch_zip(tmp_path / "evil.pt")
    assert not calls and not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, small, suffix):
    if suffix == ".pt":
        raw = (FIXTURES / "tiny_plain_conv_resample.pt").read_bytes()
    else:
        st = pytest.importorskip("safetensors.numpy")
        st.save_file(dict(small[1]), str(tmp_path / "full.safetensors"))
        raw = (tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointFormatError, match=r"cut\.(pt|safetensors).*truncated"):
        read_state_dict(path)


# --- key accounting --------------------------------------------------------------------------


def test_missing_key_is_named(small):
    config, sd = small
    sd = dict(sd)
    del sd["middle_block.1.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\):\n\s+middle_block\.1\.qkv\.weight"):
        convert_state_dict(sd, config)


def test_extra_key_is_named(small):
    config, sd = small
    sd = {**sd, "output_blocks.9.0.op.weight": np.zeros((3, 3, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"unused keys \(1\):\n\s+output_blocks\.9\.0\.op\.weight"):
        convert_state_dict(sd, config)


def test_shape_mismatch_is_named(small):
    config, sd = small
    sd = {**sd, "out.2.weight": np.zeros((6, 32, 3, 3), np.float32)}
    with pytest.raises(
        ValueError, match=r"mis-shaped keys \(1\):\n\s+out\.2\.weight: got \(6, 32, 3, 3\), "
    ):
        convert_state_dict(sd, config)


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'.*imagenet256_uncond"):
        _run_convert(["missing.pt", str(tmp_path / "out"), "--preset", "nope"])


def test_converted_params_are_float32_in_flax_layout(small):
    config, sd = small
    half = {k: v.astype(np.float16) for k, v in sd.items()}
    params = convert_state_dict(half, config)
    kernel = params["input_blocks_0_0"]["kernel"]
    chex.assert_type(kernel, np.float32)
    np.testing.assert_array_equal(
        kernel,
        sd["input_blocks.0.0.weight"].astype(np.float16).astype(np.float32).transpose(2, 3, 1, 0),
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(params, _zeros_like(param_shapes(config)))


def _zeros_like(tree):
    if isinstance(tree, dict):
        return {k: _zeros_like(v) for k, v in tree.items()}
    return np.zeros(tree.shape, np.float32)


# --- expected keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_expected_torch_shapes_match_manifest_and_preset(manifest):
    record = json.loads((FIXTURES / f"{manifest}.keys.json").read_text())
    want = {k["key"]: tuple(k["shape"]) for k in record["keys"]}
    from_kwargs = UNetConfig.from_create_model_kwargs(record["create_model_kwargs"])
    preset = PRESETS[MANIFESTS[manifest]]
    for config in (from_kwargs, preset):
        got = expected_torch_shapes(config)
        assert list(got.items()) == list(want.items())  # keys, shapes and order
    assert sum(int(np.prod(s)) for s in want.values()) == record["total_params"]
    # the preset is this config; use_fp16 only changes the torch compute dtype
    assert preset.replace(use_fp16=False) == from_kwargs.replace(use_fp16=False)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_expected_torch_shapes_cover_unet_params(preset):
    """Every expected torch key maps, with its layout rule, onto exactly one UNet param."""
    config = PRESETS[preset]
    mapped = {}
    for key, shape in expected_torch_shapes(config).items():
        path = flax_path(key)
        assert path is not None and path not in mapped, key
        mapped[path] = torch_to_flax_layout(key, np.broadcast_to(np.float32(0), shape)).shape
    target = {}

    def walk(tree, prefix=()):
        for k, v in tree.items():
            walk(v, (*prefix, k)) if isinstance(v, dict) else target.__setitem__((*prefix, k), v)

    walk(param_shapes(config))
    assert mapped == {p: tuple(s.shape) for p, s in target.items()}


# --- files and the command line ----------------------------------------------------------------


def _run_convert(argv: list[str]) -> int:
    """`reddiff_jax.cli.main(["convert", ...])` with only the convert command registered.

    Other subcommands live in modules owned elsewhere; this test must not depend on them.
    Errors are re-raised (the CLI turns them into exit status 2) so tests can match them.
    """
    from reddiff_jax.cli import convert as convert_cli

    parser = argparse.ArgumentParser(prog="reddiff-jax")
    convert_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


def test_convert_cli_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"convert": "reddiff_jax.cli.convert"})
    name = "tiny_plain_conv_resample"
    src, cfg = FIXTURES / f"{name}.pt", FIXTURES / f"{name}.config.json"
    dst = tmp_path / "ckpt"
    assert cli.main(["convert", str(src), str(dst), "--config", str(cfg)]) == 0
    meta = read_metadata(dst)
    assert meta["metadata"]["source_file"] == src.name
    assert meta["metadata"]["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["metadata"]["converter_version"] == CONVERTER_VERSION
    model = load_pretrained(dst)
    assert model.config == _config(name)
    io_ = np.load(FIXTURES / f"{name}.io.npz")
    apply = jax.jit(ScoreModel.apply)  # one compile, not one per op of the UNet
    out = np.asarray(apply(model, io_["x"].transpose(0, 2, 3, 1), io_["t"]))
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), io_["out"], atol=1e-4, rtol=1e-4)

    # an existing DST is kept without --force (exit status 2, clear message) ...
    before = (dst / "reddiff_model.json").read_text()
    assert cli.main(["convert", str(src), str(dst), "--config", str(cfg)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "reddiff_model.json").read_text() == before
    # ... and replaced with it; a config file with top-level kwargs works too
    flat = tmp_path / "kwargs.json"
    flat.write_text(json.dumps(json.loads(cfg.read_text())["create_model_kwargs"]))
    assert cli.main(["convert", str(src), str(dst), "--config", str(flat), "--force"]) == 0
    assert load_pretrained(dst).config == model.config


def test_convert_file_reads_safetensors(tmp_path, small):
    st = pytest.importorskip("safetensors.numpy")
    config, sd = small
    st.save_file(
        {k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "w.safetensors")
    )
    model = convert_file(tmp_path / "w.safetensors", tmp_path / "ckpt", config)
    ref = convert_state_dict(sd, config)
    chex.assert_trees_all_equal(model.params, ref)
    digest = hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert read_metadata(tmp_path / "ckpt")["metadata"]["source_sha256"] == digest
