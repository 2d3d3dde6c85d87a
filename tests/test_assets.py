"""The embedded prior: resolved through importlib.resources, loadable by name or by path."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from reddiff_jax import assets
from reddiff_jax.model import ScoreModel, load_pretrained, param_shapes, save_pretrained
from reddiff_jax.unet import UNetConfig

REPO_PRIOR = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist32"


def test_editable_install_resolves_to_the_top_level_checkpoints_folder():
    """In a source checkout the package data *is* checkpoints/ (no copy that could go stale)."""
    assert assets.EMBEDDED == ("mnist32",)
    assert assets.embedded_model_path("mnist32").resolve() == REPO_PRIOR
    assert assets.default_model_path() == assets.embedded_model_path("mnist32")
    assert assets.default_heldout_path().resolve() == REPO_PRIOR / "heldout.npz"


def test_heldout_digits_are_uint8_images():
    with np.load(assets.default_heldout_path()) as z:
        images = z["images"]
    assert images.dtype == np.uint8 and images.shape == (1000, 32, 32, 1)


def test_unknown_embedded_name_lists_the_names():
    with pytest.raises(ValueError, match=r"'mnist64' is not an embedded prior.*mnist32"):
        assets.embedded_model_path("mnist64")


def test_load_pretrained_by_name_equals_by_path():
    by_name, by_path = load_pretrained("mnist32"), load_pretrained(REPO_PRIOR)
    assert by_name.config == by_path.config
    chex.assert_trees_all_equal(by_name.params, by_path.params)


def test_load_pretrained_unknown_name_lists_embedded_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint directory at nope.*mnist32"):
        load_pretrained("nope")


def test_existing_path_wins_over_embedded_name(tmp_path, monkeypatch):
    config = UNetConfig(
        image_size=8,
        in_channels=1,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1,),
        attention_resolutions=(),
    )
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), param_shapes(config))
    save_pretrained(ScoreModel(config=config, params=params), tmp_path / "mnist32")
    monkeypatch.chdir(tmp_path)
    assert load_pretrained("mnist32").config == config
