"""`reddiff-jax eval` (moving here from reddiff_jax.evaluate)."""

from reddiff_jax.evaluate import register

__all__ = ["register"]
