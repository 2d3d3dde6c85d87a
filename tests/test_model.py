"""ScoreModel (pure, jit/vmap-safe) and its orbax checkpoint format (save/load/metadata)."""

from __future__ import annotations

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax.model import (
    ScoreModel,
    load_pretrained,
    param_shapes,
    read_metadata,
    save_pretrained,
)
from reddiff_jax.unet import UNetConfig

# Small class-conditional model: exercises y, attention and both resample paths quickly.
CONFIG = UNetConfig(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult=(1, 2),
    attention_resolutions=(8,),
    learn_sigma=True,
    class_cond=True,
    num_classes=10,
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
)


@pytest.fixture(scope="module")
def model() -> ScoreModel:
    # Random params of the right shapes (numpy: no per-shape PRNG compilation on CPU).
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), jnp.float32), param_shapes(CONFIG)
    )
    return ScoreModel(config=CONFIG, params=params)


def _inputs(key):
    x = jax.random.normal(key, (2, 16, 16, 3))
    return x, jnp.array([10, 900], jnp.int32), jnp.array([3, 7], jnp.int32)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_pretrained(model, path, metadata={"note": "round trip", "n": 3})
    return path


def test_round_trip_gives_identical_params_and_config(model, saved):
    loaded = load_pretrained(saved)
    assert loaded.config == model.config
    chex.assert_trees_all_equal(loaded.params, model.params)  # bit-identical
    chex.assert_trees_all_equal_shapes_and_dtypes(loaded.params, model.params)
    record = read_metadata(saved)
    assert record["metadata"] == {"note": "round trip", "n": 3}
    assert UNetConfig.from_dict(record["config"]) == model.config


def test_save_refuses_existing_path_unless_forced(model, saved, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        save_pretrained(model, saved)
    path = tmp_path / "copy"
    shutil.copytree(saved, path)
    other = jax.tree.map(lambda p: p + 1.0, model)
    save_pretrained(other, path, force=True, metadata={"version": 2})
    chex.assert_trees_all_equal(load_pretrained(path).params, other.params)
    assert read_metadata(path)["metadata"] == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temp dirs left
    (tmp_path / "not_a_ckpt").mkdir()
    (tmp_path / "not_a_ckpt" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a reddiff-jax checkpoint"):
        save_pretrained(model, tmp_path / "not_a_ckpt", force=True)
    assert (tmp_path / "not_a_ckpt" / "precious.txt").read_text() == "keep"


def test_load_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_pretrained(tmp_path / "nothing_here")


def _break_json(path):
    (path / "reddiff_model.json").write_text("{not json")


def _drop_params(path):
    shutil.rmtree(path / "params")


def _wipe_param_data(path):
    for child in (path / "params").iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        elif child.name != "_CHECKPOINT_METADATA":
            child.unlink()


def _change_config(path):
    record = json.loads((path / "reddiff_model.json").read_text())
    record["config"]["num_channels"] = 64
    (path / "reddiff_model.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_break_json, "not valid JSON"),
        (_drop_params, "params is missing"),
        (_wipe_param_data, "corrupt checkpoint"),
        (
            _change_config,
            r"(?s)do not match the recorded config:\n.*stored \(3, 3, 3, 32\), expected",
        ),
    ],
)
def test_load_corrupt_dir_is_a_clear_error(saved, tmp_path, corrupt, message):
    path = tmp_path / "broken"
    shutil.copytree(saved, path)
    corrupt(path)
    with pytest.raises(ValueError, match=message):
        load_pretrained(path)


@pytest.fixture(scope="module")
def plain(model):
    """Inputs and the plain (un-jitted) output, computed once."""
    x, t, y = _inputs(jax.random.key(2))
    return (x, t, y), model.apply(x, t, y)


def test_apply_and_eps_shapes(model, plain):
    (x, t, y), out = plain
    chex.assert_shape(out, (2, 16, 16, 6))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_array_equal(model.eps(x, t, y), out[..., :3])


def test_jit_and_vmap_match_plain_call(model, plain):
    # Same float32 computation, differently fused by XLA: equal to float32 rounding noise.
    tol = {"atol": 1e-5, "rtol": 1e-5}
    (x, t, y), out = plain
    np.testing.assert_allclose(jax.jit(model.apply)(x, t, y), out, **tol)
    # vmap over a leading axis: each of the 2 calls sees a batch of one
    vmapped = jax.jit(jax.vmap(model.apply))(x[:, None], t[:, None], y[:, None])
    chex.assert_shape(vmapped, (2, 1, 16, 16, 6))
    np.testing.assert_allclose(vmapped[:, 0], out, **tol)


def test_score_model_is_a_pytree(model):
    leaves = jax.tree.leaves(model)
    assert len(leaves) == len(jax.tree.leaves(model.params))
    doubled = jax.tree.map(lambda p: 2 * p, model)
    assert isinstance(doubled, ScoreModel) and doubled.config == model.config
