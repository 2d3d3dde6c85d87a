"""Fixtures shared by several test files."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from reddiff_jax.model import ScoreModel, init_params
from reddiff_jax.unet import PRESETS


@pytest.fixture(scope="module")
def tiny_model() -> ScoreModel:
    """A random one-level grayscale 32x32 UNet: the cheapest model the main job accepts."""
    cfg = dataclasses.replace(
        PRESETS["tiny"],
        in_channels=1,
        out_channels=None,
        channel_mult=(1,),
        attention_resolutions=(),
        learn_sigma=False,
        resblock_updown=False,
    )
    return ScoreModel(config=cfg, params=init_params(jax.random.key(0), cfg))
