"""Measurement operators y = A(x) (+ noise) on one NHWC image [H, W, C] in [-1, 1].

Build by name (``make("sr", (32, 32, 1), factor=4)``), from a task string
(``make_from_spec("inpaint:random:0.5", shape, key=key)``), or with the classes' ``create``.
Batch with ``jax.vmap(op.A)`` or :func:`batched`; per-image operators with :func:`stack`.
See ``base`` for the API and the SVD convention, ``registry`` for names and the spec syntax.
"""

from reddiff_jax.operators.base import (
    SVD,
    LinearOperator,
    Operator,
    SeparableOperator,
    adjoint_gap,
    adjointness_error,
    batched,
    stack,
)
from reddiff_jax.operators.blur import (
    Blur,
    SeparableBlur,
    gaussian_kernel,
    motion_kernel,
    uniform_kernel,
)
from reddiff_jax.operators.colorize import Colorization
from reddiff_jax.operators.cs import CompressedSensing
from reddiff_jax.operators.denoise import Denoising
from reddiff_jax.operators.hdr import HDR
from reddiff_jax.operators.inpainting import Inpainting, box_mask, freeform_mask, random_mask
from reddiff_jax.operators.jpeg import JPEG
from reddiff_jax.operators.noise import gaussian_noise, measure, poisson_noise
from reddiff_jax.operators.phase_retrieval import PhaseRetrieval
from reddiff_jax.operators.quantize import Quantization, round_surrogate
from reddiff_jax.operators.registry import NAMES, make, make_from_spec, parse_spec, valid_params
from reddiff_jax.operators.superres import AvgPoolSR, BicubicSR

__all__ = [
    "HDR",
    "JPEG",
    "NAMES",
    "SVD",
    "AvgPoolSR",
    "BicubicSR",
    "Blur",
    "Colorization",
    "CompressedSensing",
    "Denoising",
    "Inpainting",
    "LinearOperator",
    "Operator",
    "PhaseRetrieval",
    "Quantization",
    "SeparableBlur",
    "SeparableOperator",
    "adjoint_gap",
    "adjointness_error",
    "batched",
    "box_mask",
    "freeform_mask",
    "gaussian_kernel",
    "gaussian_noise",
    "make",
    "make_from_spec",
    "measure",
    "motion_kernel",
    "parse_spec",
    "poisson_noise",
    "random_mask",
    "round_surrogate",
    "stack",
    "uniform_kernel",
    "valid_params",
]
