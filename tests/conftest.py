"""Fixtures shared by several test files."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from reddiff_jax.model import ScoreModel
from reddiff_jax.unet import PRESETS, UNet


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
    x = jnp.zeros((1, 32, 32, 1))
    params = jax.jit(UNet(cfg).init)(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    return ScoreModel(config=cfg, params=params)
