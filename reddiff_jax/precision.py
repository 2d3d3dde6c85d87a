"""The UNet's precision policy: which dtype its statistics and softmax accumulate in."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

__all__ = ["accumulation_dtype"]


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of a UNet's statistics, softmax, sinusoid and output for compute `dtype`:
    float32 for float32 / bfloat16 / float16, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)
