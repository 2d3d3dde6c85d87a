"""`reddiff-jax train` (moving here from reddiff_jax.train)."""

from reddiff_jax.train import register

__all__ = ["register"]
