"""Fixtures shared by several test files."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import jax
import pytest

from reddiff_jax.model import ScoreModel, init_params
from reddiff_jax.unet import PRESETS

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE: str | None = None


def _share_compiled_programs() -> None:
    """One persistent XLA compilation cache per test run, in a fresh temporary folder.

    Many tests compile the same program from a fresh closure (a new trace, the same HLO), and
    the subprocess tests, notebooks and xdist workers each recompile what another process
    already has. The first process sets ``JAX_COMPILATION_CACHE_DIR``; the processes it starts
    inherit it. A hit returns the executable XLA built for the same HLO, flags and devices, so
    results are unchanged; only the compile time goes. Removed when the creating process ends.
    """
    global _OWN_CACHE
    if _CACHE_ENV not in os.environ:
        _OWN_CACHE = tempfile.mkdtemp(prefix="reddiff-jax-test-xla-cache-")
        os.environ[_CACHE_ENV] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )


_share_compiled_programs()


def pytest_unconfigure(config: pytest.Config) -> None:
    del config
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
