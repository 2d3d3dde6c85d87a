"""reddiff-jax: RED-Diff image restoration with diffusion priors, in JAX.

Images are NHWC float32 in [-1, 1] inside the library; files at the boundary are
uint8 or [0, 1]. PyTorch layouts (NCHW) appear only in the checkpoint converter.
"""

__version__ = "0.1.0"
