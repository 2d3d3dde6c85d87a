"""`reddiff-jax convert` (moving here from reddiff_jax.convert.command)."""

from reddiff_jax.convert.command import register

__all__ = ["register"]
