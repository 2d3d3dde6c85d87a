"""UNetConfig parsing and validation, and UNet options that the fixtures do not cover."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax.model import param_shapes
from reddiff_jax.unet import PRESETS, UNet, UNetConfig, get_preset

_SMALL = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
)


def _inputs(cfg: UNetConfig):
    x = jax.random.normal(jax.random.key(0), (2, cfg.image_size, cfg.image_size, cfg.in_channels))
    return x, jnp.array([10, 900])


def test_create_model_kwargs_are_resolved():
    cfg = UNetConfig.from_create_model_kwargs(
        {"create_model_kwargs": {"image_size": 256, "num_channels": 128, "num_res_blocks": 1,
                                 "channel_mult": "", "attention_resolutions": 16,
                                 "learn_sigma": True, "class_cond": True, "use_checkpoint": True}}
    )  # fmt: skip
    assert cfg.channel_mult == (1, 1, 2, 2, 4, 4)
    assert cfg.attention_resolutions == (16,) and cfg.attention_ds == frozenset({16})
    assert cfg.out_channels == 6 and cfg.num_classes == 1000 and cfg.use_checkpoint
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    gray = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1,),
                      in_channels=1, learn_sigma=True)  # fmt: skip
    assert gray.out_channels == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 48, "num_channels": 32, "num_res_blocks": 1}, "no default for image_size"),
        ({**_SMALL, "num_channels": 48}, "multiples of 32"),
        ({**_SMALL, "attention_resolutions": "5"}, "does not divide"),
        ({**_SMALL, "channel_mult": "1,x"}, "comma-separated integers"),
        ({**_SMALL, "bogus": 1}, "unknown create_model keywords"),
        ({**_SMALL, "dtype": "int8"}, "dtype"),
    ],
)
def test_bad_configs_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_create_model_kwargs(kwargs)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="imagenet256_uncond"):
        get_preset("imagenet512")
    assert get_preset("ffhq256") is PRESETS["ffhq256"]


def test_bad_inputs_are_rejected():
    cfg = UNetConfig.from_create_model_kwargs(_SMALL)
    x, t = _inputs(cfg)
    params = jax.eval_shape(UNet(cfg).init, jax.random.key(1), x, t)
    with pytest.raises(ValueError, match="NHWC"):
        UNet(cfg).apply(params, jnp.moveaxis(x, -1, 1), t)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(cfg).apply(params, x, t, jnp.array([1, 2]))


def _random_params(cfg: UNetConfig, seed: int = 0):
    """Random params without `UNet.init` (whose compile dominates a small test): kernels
    N(0, 1/fan_in), GroupNorm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if len(s.shape) > 1:
            std, mean = 1 / np.sqrt(np.prod(s.shape[:-1])), 0.0
        else:
            std, mean = 0.1, float(path[-1].key == "scale")
        return jnp.asarray(mean + std * rng.standard_normal(s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


# One level with attention at full resolution: every block kind, the cheapest compile.
_ONE_LEVEL = {**_SMALL, "channel_mult": "1", "attention_resolutions": "8"}


def test_remat_gives_the_same_output_and_gradient():
    cfg = UNetConfig.from_create_model_kwargs(_ONE_LEVEL)
    x, t = _inputs(cfg)
    params = _random_params(cfg, seed=1)

    def loss(p, c):
        return jnp.sum(UNet(c).apply({"params": p}, x, t) ** 2)

    remat_cfg = cfg.replace(use_checkpoint=True)
    v0, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
    v1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat_cfg)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    # Some leaves (conv biases right before a GroupNorm) have an exact zero gradient, so their
    # float32 values are pure rounding noise: compare on the scale of the whole gradient.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
    chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-6 * scale)


def test_bfloat16_compute_stays_close_and_returns_float32():
    cfg = UNetConfig.from_create_model_kwargs(_ONE_LEVEL)
    x, t = _inputs(cfg)
    params = {"params": _random_params(cfg, seed=1)}
    out32 = jax.jit(UNet(cfg).apply)(params, x, t)
    out16 = jax.jit(UNet(cfg.replace(dtype="bfloat16")).apply)(params, x, t)
    chex.assert_type(out16, jnp.float32)
    chex.assert_shape(out16, (2, 8, 8, 3))
    # bfloat16 keeps 8 mantissa bits: relative error ~ a few 1e-3 per op, well under 5e-2 overall.
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 5e-2, rel


def test_float64_compute_matches_float32_and_returns_float64():
    """dtype="float64" (x64 on) is float64 all through, float32 params promoted at use: its
    output agrees with the float32 model's to float32 rounding (relative L2 error < 1e-5;
    measured 1.1e-6); with x64 off it refuses, naming the flag. (Float64 params are used by the
    float64 finite-difference test in test_tune.py.)"""
    cfg = UNetConfig.from_create_model_kwargs({**_ONE_LEVEL, "class_cond": True})
    x, t = _inputs(cfg)
    y = jnp.array([3, 7])
    params = {"params": _random_params(cfg)}
    out32 = jax.jit(UNet(cfg).apply)(params, x, t, y)
    cfg64 = cfg.replace(dtype="float64")
    with jax.enable_x64(True):
        out64 = jax.jit(UNet(cfg64).apply)(params, x, t, y)
    chex.assert_type(out64, jnp.float64)
    chex.assert_shape(out64, (2, 8, 8, 3))
    out64 = np.asarray(out64)
    assert np.std(out64) > 0.1  # not a trivially small output
    rel = np.linalg.norm(np.asarray(out32, np.float64) - out64) / np.linalg.norm(out64)
    assert rel < 1e-5, rel
    with pytest.raises(ValueError, match="jax_enable_x64 is off"):
        UNet(cfg64).apply(params, x, t, y)


@pytest.mark.parametrize("modulate", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_matches_flax_group_norm(modulate, dtype):
    """The NHWC GroupNorm (+ folded scale/shift, SiLU) against flax nn.GroupNorm, float32 stats."""
    import flax.linen as nn

    from reddiff_jax.unet import group_norm

    k = jax.random.split(jax.random.key(0), 5)
    x = (3 * jax.random.normal(k[0], (2, 6, 5, 64)) + 2).astype(dtype)  # offset: two-pass matters
    scale = 1 + 0.2 * jax.random.normal(k[1], (64,))
    bias = 0.2 * jax.random.normal(k[2], (64,))
    mod = (jax.random.normal(k[3], (2, 64)), jax.random.normal(k[4], (2, 64))) if modulate else None
    ref = nn.GroupNorm(32, epsilon=1e-5, use_fast_variance=False).apply(
        {"params": {"scale": scale, "bias": bias}}, x.astype(jnp.float32)
    )
    if modulate:
        ref = ref * (1 + mod[0][:, None, None]) + mod[1][:, None, None]
    ref = nn.silu(ref)
    got = group_norm(x, scale, bias, modulation=mod, silu=True)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("new_order", [False, True])
def test_qkv_attention_matches_the_definition(new_order):
    """Heads-major attention against a float64 numpy evaluation of guided-diffusion's formula."""
    from reddiff_jax.unet import qkv_attention

    n, t, heads, ch = 2, 12, 3, 8
    qkv = np.asarray(jax.random.normal(jax.random.key(0), (n, t, 3 * heads * ch)), np.float64)
    split = (n, t, 3, heads, ch) if new_order else (n, t, heads, 3, ch)
    r = qkv.reshape(split)
    q, k, v = (r[:, :, i] for i in range(3)) if new_order else (r[:, :, :, i] for i in range(3))
    logits = np.einsum("nthc,nshc->nhts", q, k) / np.sqrt(ch)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("nhts,nshc->nthc", w, v).reshape(n, t, heads * ch)
    got = qkv_attention(jnp.asarray(qkv, jnp.float32), heads, new_order)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
