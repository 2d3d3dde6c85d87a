"""The embedded priors, installed as the package ``reddiff_jax.checkpoints`` (data only).

See ``reddiff_jax.assets`` for the names and paths.
"""
