"""The ADM (guided-diffusion) UNet as a Flax linen module, NHWC.

`UNet(config)` maps a noisy image x [N, H, W, in_channels], integer (or float) timesteps
t [N] and, for class-conditional models, labels y [N] to the raw network output
[N, H, W, out_channels]: the noise prediction in the first `in_channels` channels, followed
by the learned-variance channels when `learn_sigma` is set.

Dtypes. Convolutions and dense layers compute in `config.dtype` (float32 by default;
bfloat16, float16, or float64 when `jax_enable_x64` is on). The sensitive parts (timestep
sinusoid, GroupNorm statistics, attention softmax) and the output use the accumulation dtype
`accumulation_dtype(config.dtype)` = `promote_types(dtype, float32)`: float32 for
float32 / bfloat16 / float16 compute, exactly as guided-diffusion, and float64 for float64
compute, so a float64 model is float64 all through (for finite-difference checks).
Parameters are stored in float32 and cast to the compute dtype at use; float64 parameters
may be passed as well.

The parameter tree mirrors the PyTorch state dict of guided-diffusion's `UNetModel`: a
torch key `input_blocks.1.0.in_layers.0.weight` lives at
`params["input_blocks_1_0"]["in_layers_0"]["scale"]` (numeric segments are glued to the
name before them), so the checkpoint converter is a readable table of rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from reddiff_jax import attention
from reddiff_jax.norm import NUM_GROUPS as _NUM_GROUPS
from reddiff_jax.norm import group_norm
from reddiff_jax.precision import accumulation_dtype

# Default channel multipliers per image size, as guided-diffusion's `create_model`.
_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64 needs x64 on
# create_model keywords that change nothing in the forward pass, accepted and ignored.
_IGNORED_KWARGS = frozenset({"model_path"})


def _parse_ints(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError as err:
            raise ValueError(f"{name}: expected comma-separated integers, got {value!r}") from err
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Hyper-parameters of an ADM UNet: guided-diffusion's `create_model` keywords, resolved.

    `channel_mult=()` selects the per-image-size default (64, 128, 256 or 512 px);
    `attention_resolutions` holds pixel resolutions (e.g. (32, 16, 8)); `out_channels=None`
    means `2 * in_channels` with `learn_sigma` and `in_channels` otherwise; `num_classes=None`
    means 1000 when `class_cond` (as guided-diffusion hard-codes). `use_fp16` is recorded
    but computation follows `dtype` (the compute dtype: "float32" unless asked otherwise;
    "bfloat16" and "float16" keep float32 statistics and output, "float64" is float64 all
    through and needs `jax_enable_x64`, checked when the model is applied).
    `use_checkpoint` rematerialises each ResBlock and attention block in the backward pass
    (`nn.remat`): the same numbers, less activation memory for DPS and for training.
    """

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...] = ()
    attention_resolutions: tuple[int, ...] = (16,)
    learn_sigma: bool = False
    class_cond: bool = False
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    use_checkpoint: bool = False
    in_channels: int = 3
    out_channels: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        mult = tuple(self.channel_mult)
        if not mult:
            if self.image_size not in _DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"channel_mult: no default for image_size={self.image_size}; give "
                    f"channel_mult explicitly (defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)})"
                )
            mult = _DEFAULT_CHANNEL_MULT[self.image_size]
        object.__setattr__(self, "channel_mult", tuple(mult))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
        )
        if self.class_cond and self.num_classes is None:
            object.__setattr__(self, "num_classes", 1000)
        if not self.class_cond:
            object.__setattr__(self, "num_classes", None)
        if self.out_channels is None:
            out = self.in_channels * (2 if self.learn_sigma else 1)
            object.__setattr__(self, "out_channels", out)
        self._validate()

    def _validate(self) -> None:
        if self.dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"dtype: expected one of {_COMPUTE_DTYPES}, got {self.dtype!r}")
        for name in ("image_size", "num_channels", "num_res_blocks", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for mult in self.channel_mult:
            width = int(mult * self.num_channels)
            if width % _NUM_GROUPS:
                raise ValueError(
                    f"channel widths must be multiples of {_NUM_GROUPS} (GroupNorm32): "
                    f"num_channels={self.num_channels} x mult {mult} gives {width}"
                )
        for res in self.attention_resolutions:
            if res < 1 or self.image_size % res:
                raise ValueError(
                    f"attention_resolutions: {res} does not divide image_size={self.image_size}"
                )
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError(f"num_heads: expected >= 1, got {self.num_heads}")

    @property
    def attention_ds(self) -> frozenset[int]:
        """Downsample factors at which attention blocks sit (image_size // resolution)."""
        return frozenset(self.image_size // r for r in self.attention_resolutions)

    @property
    def heads_upsample(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    @property
    def emb_dim(self) -> int:
        return 4 * self.num_channels

    @classmethod
    def from_create_model_kwargs(cls, kwargs: Mapping[str, Any]) -> UNetConfig:
        """Builds a config from guided-diffusion `create_model` keywords.

        Accepts the keywords at the top level or under "create_model_kwargs"; string forms
        ("1,1,2", "32,16,8", "") as well as ints and lists. Unknown keywords raise.
        """
        if "create_model_kwargs" in kwargs:
            kwargs = kwargs["create_model_kwargs"]
        kw = dict(kwargs)
        for name in _IGNORED_KWARGS:
            kw.pop(name, None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - fields)
        if unknown:
            raise ValueError(f"unknown create_model keywords {unknown}; known: {sorted(fields)}")
        if "channel_mult" in kw:
            cm = kw["channel_mult"]
            if isinstance(cm, str):
                cm = () if not cm.strip() else _parse_ints(cm, "channel_mult")
            kw["channel_mult"] = tuple(cm)
        if "attention_resolutions" in kw:
            kw["attention_resolutions"] = _parse_ints(
                kw["attention_resolutions"], "attention_resolutions"
            )
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); `from_dict` inverts it."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        return cls.from_create_model_kwargs(d)

    def replace(self, **changes: Any) -> UNetConfig:
        return dataclasses.replace(self, **changes)


_IMAGENET256 = UNetConfig(
    image_size=256,
    num_channels=256,
    num_res_blocks=2,
    attention_resolutions=(32, 16, 8),
    learn_sigma=True,
    num_heads=4,
    num_head_channels=64,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_fp16=True,
)

PRESETS: dict[str, UNetConfig] = {
    # OpenAI 256x256_diffusion_uncond.pt (guided-diffusion README flags)
    "imagenet256_uncond": _IMAGENET256,
    # OpenAI 256x256_diffusion.pt: the same plus 1000-class label embedding
    "imagenet256_cond": _IMAGENET256.replace(class_cond=True),
    # DPS ffhq_10m.pt (DPS configs/model_config.yaml)
    "ffhq256": UNetConfig(
        image_size=256,
        num_channels=128,
        num_res_blocks=1,
        attention_resolutions=(16,),
        learn_sigma=True,
        num_heads=4,
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
    # A small model for tests and CPU experiments (32x32 RGB).
    "tiny": UNetConfig(
        image_size=32,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(16,),
        learn_sigma=True,
        num_head_channels=32,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
}


def get_preset(name: str) -> UNetConfig:
    """Returns the named preset config; raises ValueError listing the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name]


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10000.0, *, dtype: Any = jnp.float32
) -> jax.Array:
    """Sinusoidal features [N, dim] of timesteps t [N]: [cos, sin] order, as guided-diffusion.

    Computed and returned in `dtype` (float32 as upstream; float64 for a float64 model).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=dtype) / half)
    args = jnp.asarray(t).astype(dtype)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm(nn.Module):
    """GroupNorm32 (NHWC) with params `scale` [C] and `bias` [C], as flax's nn.GroupNorm.

    `__call__(x, modulation=None, silu=False)` runs `group_norm`; the params (names, shapes,
    ones / zeros init) are those of `nn.GroupNorm`, so converted checkpoints load unchanged.
    """

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        modulation: tuple[jax.Array, jax.Array] | None = None,
        silu: bool = False,
    ) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x, scale, bias, modulation=modulation, silu=silu)


def _group_norm(name: str) -> GroupNorm:
    # Params sit directly under `name` (scale, bias), matching the torch key layout.
    return GroupNorm(name=name)


def qkv_attention(qkv: jax.Array, heads: int, use_new_attention_order: bool) -> jax.Array:
    """Multi-head self-attention from packed projections: qkv [N, T, 3C] -> [N, T, C].

    Channel order of qkv: legacy `head*3ch + {q,k,v}*ch + i` or new `{q,k,v}*C + head*ch + i`;
    the output channel is `head*ch + i` either way. Logits are scaled by 1/sqrt(ch) and the
    softmax over keys runs in `accumulation_dtype(qkv.dtype)` (float32, or float64 for float64
    qkv); the output is in qkv.dtype. q, k and v are first laid out heads-major
    [N, heads, T, ch] so that both products are plain batched matmuls (batch dims leading,
    contraction on the minor dim), which XLA lowers to its fast GEMM on every backend; the core
    is `attention.softmax_attention` (a faster layout of its own under differentiation).
    """
    n, t, c3 = qkv.shape
    ch = c3 // (3 * heads)
    if use_new_attention_order:
        qkv = qkv.reshape(n, t, 3, heads, ch).transpose(2, 0, 3, 1, 4)
    else:
        qkv = qkv.reshape(n, t, heads, 3, ch).transpose(3, 0, 2, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [N, heads, T, ch]
    scale = 1.0 / math.sqrt(math.sqrt(ch))  # on both q and k, as upstream
    a = attention.softmax_attention(q * scale, k * scale, v)
    return a.transpose(0, 2, 1, 3).reshape(n, t, heads * ch)


def _avg_pool2(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _upsample2(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _conv(features: int, dtype: Any, name: str, *, kernel: int = 3, stride: int = 1) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),  # PyTorch's symmetric padding, not 'SAME'
        dtype=dtype,
        name=name,
    )


class ResBlock(nn.Module):
    """ADM residual block with timestep conditioning and optional 2x up/down-sampling."""

    out_channels: int
    use_scale_shift_norm: bool
    dropout: float
    up: bool = False
    down: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
        h = _group_norm("in_layers_0")(x, silu=True)
        if self.up or self.down:
            resample = _upsample2 if self.up else _avg_pool2
            h, x = resample(h), resample(x)
        h = _conv(self.out_channels, self.dtype, "in_layers_2")(h)
        e_dim = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        e = nn.Dense(e_dim, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))
        e = e.astype(h.dtype)
        if not self.use_scale_shift_norm:
            e = e[:, None, None, :]
        out_norm = _group_norm("out_layers_0")
        if self.use_scale_shift_norm:
            h = out_norm(h, modulation=tuple(jnp.split(e, 2, axis=-1)), silu=True)
        else:
            h = out_norm(h + e, silu=True)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_channels, self.dtype, "out_layers_3")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, self.dtype, "skip_connection", kernel=1)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over H*W tokens with the legacy or the new qkv head order."""

    num_heads: int
    use_new_attention_order: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, hgt, wid, c = x.shape
        tokens = _group_norm("norm")(x).reshape(n, hgt * wid, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(tokens)
        a = qkv_attention(qkv, self.num_heads, self.use_new_attention_order)
        out = nn.Dense(c, dtype=self.dtype, name="proj_out")(a)
        return x + out.reshape(n, hgt, wid, c)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (`op`), padding (1, 1) as PyTorch."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(x.shape[-1], self.dtype, "op", stride=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (`conv`)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(x.shape[-1], self.dtype, "conv")(_upsample2(x))


class UNet(nn.Module):
    """guided-diffusion `UNetModel`: x [N, H, W, Cin], t [N], y [N] -> [N, H, W, Cout].

    The output is float32 for float32 / bfloat16 / float16 compute and float64 for
    `dtype="float64"` (`accumulation_dtype(config.dtype)`); a float64 model raises a
    ValueError unless `jax_enable_x64` is on (`jax.enable_x64(True)` or the config flag).
    """

    config: UNetConfig

    def _heads(self, channels: int, num_heads: int) -> int:
        cfg = self.config
        return num_heads if cfg.num_head_channels == -1 else channels // cfg.num_head_channels

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        cfg = self.config
        if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(
                'dtype: this UNet computes in "float64", but 64-bit types are disabled '
                "(jax_enable_x64 is off), so JAX would silently run it in float32; apply it "
                "under `with jax.enable_x64(True):` or after "
                '`jax.config.update("jax_enable_x64", True)`, or use dtype="float32"'
            )
        dtype = jnp.dtype(cfg.dtype)
        acc = accumulation_dtype(dtype)
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"x: expected [N, H, W, {cfg.in_channels}] (NHWC), got shape {tuple(x.shape)}"
            )
        if cfg.class_cond and y is None:
            raise ValueError("y: this model is class-conditional; pass integer labels [N]")
        if not cfg.class_cond and y is not None:
            raise ValueError("y: this model is unconditional; pass y=None")
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        mc = cfg.num_channels
        emb = timestep_embedding(t, mc, dtype=acc)
        emb = nn.Dense(cfg.emb_dim, name="time_embed_0")(emb)
        emb = nn.Dense(cfg.emb_dim, name="time_embed_2")(nn.silu(emb))
        if cfg.class_cond:
            emb = emb + nn.Embed(cfg.num_classes, cfg.emb_dim, name="label_emb")(y)
        emb = emb.astype(dtype)

        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if cfg.use_checkpoint else ResBlock
        attn_cls = nn.remat(AttentionBlock) if cfg.use_checkpoint else AttentionBlock

        def res(out_ch: int, name: str, **kw: bool) -> ResBlock:
            return res_cls(
                out_ch, cfg.use_scale_shift_norm, cfg.dropout, dtype=dtype, name=name, **kw
            )

        def attn(channels: int, num_heads: int, name: str) -> AttentionBlock:
            heads = self._heads(channels, num_heads)
            return attn_cls(heads, cfg.use_new_attention_order, dtype=dtype, name=name)

        ch = int(cfg.channel_mult[0] * mc)
        h = _conv(ch, dtype, "input_blocks_0_0")(x.astype(dtype))
        hs = [h]
        ds, k = 1, 1
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                ch = int(mult * mc)
                h = res(ch, f"input_blocks_{k}_0")(h, emb, train)
                if ds in cfg.attention_ds:
                    h = attn(ch, cfg.num_heads, f"input_blocks_{k}_1")(h)
                hs.append(h)
                k += 1
            if level != last:
                name = f"input_blocks_{k}_0"
                if cfg.resblock_updown:
                    h = res(ch, name, down=True)(h, emb, train)
                else:
                    h = Downsample(dtype=dtype, name=name)(h)
                hs.append(h)
                ds *= 2
                k += 1

        h = res(ch, "middle_block_0")(h, emb, train)
        h = attn(ch, cfg.num_heads, "middle_block_1")(h)
        h = res(ch, "middle_block_2")(h, emb, train)

        k = 0
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)  # current features first
                ch = int(mc * mult)
                h = res(ch, f"output_blocks_{k}_0")(h, emb, train)
                j = 1
                if ds in cfg.attention_ds:
                    h = attn(ch, cfg.heads_upsample, f"output_blocks_{k}_1")(h)
                    j = 2
                if level and i == cfg.num_res_blocks:
                    name = f"output_blocks_{k}_{j}"
                    if cfg.resblock_updown:
                        h = res(ch, name, up=True)(h, emb, train)
                    else:
                        h = Upsample(dtype=dtype, name=name)(h)
                    ds //= 2
                k += 1

        h = _group_norm("out_0")(h, silu=True)
        h = _conv(cfg.out_channels, dtype, "out_2")(h)
        return h.astype(acc)
