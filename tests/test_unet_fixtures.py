"""The Flax ADM UNet with converted weights against guided-diffusion's golden outputs.

Each tiny fixture (tests/fixtures/guided_diffusion) holds a torch state dict, its
create_model kwargs and the upstream float32 outputs (NCHW). Tolerances follow the fixture
README: out atol=rtol=1e-4 (>10x the measured float32 noise, ~8e-6), emb atol 1e-5,
h_middle atol 1e-4 (|h_middle| up to ~11); the sinusoid also atol 1e-5 (its arguments reach
900 rad, where one float32 ulp is ~6e-5, so cos/sin implementations differ by ~1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax.convert import convert_state_dict, read_torch_zip
from reddiff_jax.unet import UNet, UNetConfig, timestep_embedding

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "guided_diffusion"
TINY = [
    "tiny_imagenet_like",
    "tiny_ffhq_like",
    "tiny_newattn_classcond",
    "tiny_plain_conv_resample",
]


@pytest.fixture(scope="module", params=TINY)
def run(request):
    """Converts one fixture and runs it once, capturing the intermediates."""
    name = request.param
    config = UNetConfig.from_create_model_kwargs(
        json.loads((FIXTURES / f"{name}.config.json").read_text())
    )
    params = convert_state_dict(read_torch_zip(FIXTURES / f"{name}.pt"), config)
    io = dict(np.load(FIXTURES / f"{name}.io.npz"))
    x = io["x"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    y = io.get("y")

    # One compiled call (op-by-op dispatch would compile each of its few hundred ops).
    @jax.jit
    def apply(params, x, t, y):
        return UNet(config).apply(
            {"params": params}, x, t, y, capture_intermediates=True, mutable=["intermediates"]
        )

    with jax.default_matmul_precision("highest"):
        out, state = apply(params, x, io["t"], y)
    return name, config, io, out, state["intermediates"]


def test_output_matches_upstream(run):
    name, config, io, out, _ = run
    n, _, h, w = io["x"].shape
    chex.assert_shape(out, (n, h, w, config.out_channels))
    chex.assert_type(out, jnp.float32)
    got = np.asarray(out).transpose(0, 3, 1, 2)
    print(f"{name}: max |out - upstream| = {np.abs(got - io['out']).max():.3g}")
    np.testing.assert_allclose(got, io["out"], atol=1e-4, rtol=1e-4)


def test_timestep_embedding_matches_upstream(run):
    _, config, io, _, inter = run
    np.testing.assert_allclose(
        timestep_embedding(jnp.asarray(io["t"]), config.num_channels),
        io["t_sinusoid"],
        atol=1e-5,
        rtol=0,
    )
    emb = inter["time_embed_2"]["__call__"][0]
    if config.class_cond:
        emb = emb + inter["label_emb"]["__call__"][0]
    np.testing.assert_allclose(emb, io["emb"], atol=1e-5, rtol=0)


def test_middle_block_matches_upstream(run):
    _, _, io, _, inter = run
    h_middle = np.asarray(inter["middle_block_2"]["__call__"][0]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(h_middle, io["h_middle"], atol=1e-4, rtol=0)
