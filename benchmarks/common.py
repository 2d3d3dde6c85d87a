"""What the benchmark scripts share: the benchmark model and a warm median timer.

The model is the random-weight upstream fixture UNet ``tiny_imagenet_like`` (``tests/fixtures``,
converted from its PyTorch state dict) when present, else a preset with random weights
(``tiny`` at 32 px, ``imagenet256_uncond`` at 256 px). Scripts import this module with
``sys.path.insert(0, str(Path(__file__).resolve().parent)); import common``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from reddiff_jax.model import ScoreModel, init_params
from reddiff_jax.unet import UNetConfig, get_preset

FIXTURE = "tiny_imagenet_like"
FIXTURE_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "guided_diffusion"


def has_fixture() -> bool:
    """Whether the fixture UNet's state dict and config are in the checkout."""
    return (FIXTURE_DIR / f"{FIXTURE}.pt").is_file()


def random_model(config: UNetConfig, seed: int = 0) -> ScoreModel:
    """`config` with random params from ``jax.random.key(seed)``."""
    return ScoreModel(config, init_params(jax.random.key(seed), config))


def bench_model(
    size: int = 32, dtype: str = "float32", *, fixture: bool = True
) -> tuple[ScoreModel, str]:
    """The benchmark model and a label: the fixture at 32 px (unless ``fixture=False`` or it is
    absent), else the ``tiny`` / ``imagenet256_uncond`` preset with random weights; ``dtype`` is
    the compute dtype (params stay float32)."""
    if size not in (32, 256):
        raise ValueError(f"size must be 32 or 256, got {size}")
    if size == 32 and fixture and has_fixture():
        from reddiff_jax.convert import convert_state_dict, read_state_dict

        meta = json.loads((FIXTURE_DIR / f"{FIXTURE}.config.json").read_text())
        config = UNetConfig.from_create_model_kwargs(meta)
        params = convert_state_dict(read_state_dict(FIXTURE_DIR / f"{FIXTURE}.pt"), config)
        model = ScoreModel(config, jax.tree.map(jnp.asarray, params))
        label = f"{FIXTURE} (fixture)"
    else:
        name = "tiny" if size == 32 else "imagenet256_uncond"
        model, label = random_model(get_preset(name)), f"{name} (random weights)"
    if dtype != "float32":
        config = dataclasses.replace(model.config, dtype=dtype)
        model, label = ScoreModel(config, model.params), f"{label}, {dtype}"
    return model, label


def median_s(fn: Callable[[], Any], repeats: int, *, warmup: bool = True) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn`` (results blocked on), after one
    untimed compiling / warm-up call unless ``warmup=False``."""
    if warmup:
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
