"""`reddiff-jax restore` (moving here from reddiff_jax.restore)."""

from reddiff_jax.restore import register

__all__ = ["register"]
