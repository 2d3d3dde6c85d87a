"""UNet benchmark: time and achieved GFLOP/s per layer kind and for the whole network.

Prints, in one run and per batch size (``--batch 1,8,32``):

* per layer kind -- a 3x3 convolution at each width, GroupNorm+SiLU at each width, the
  attention core (packed qkv -> softmax(q k^T / sqrt(ch)) v) at each attention resolution,
  alone and with its VJP (variant ``query_major``: differentiated without the key-major rule of
  ``reddiff_jax.attention``), GroupNorm+SiLU alone and with its input VJP -- and for the whole
  forward and the forward + input VJP (what DPS differentiates): the median
  time, the GFLOP/s achieved (FLOPs from XLA's ``cost_analysis`` of the compiled call), the
  GFLOP/s of a jitted square matmul of about the same FLOPs measured in the same run, and the
  fraction of it reached;
* with ``--compare-old``: the same layers (and the whole network) in the formulation this
  repository used before the speed work, kept below (``old_group_norm``, ``old_qkv_attention``)
  and swapped into ``reddiff_jax.unet`` for the "old" whole-network rows, timed interleaved
  with the new one (round-robin, medians) so machine noise hits both alike;
* with ``--torch`` (default on when torch is importable): the same layers written with
  ``torch.nn.functional`` (conv2d, group_norm + silu, scaled_dot_product_attention) and the
  whole network as a small functional port of guided-diffusion's forward over the fixture's
  torch state dict (checked against the fixture's golden output), so the ratio to torch shows
  per layer. Torch is only imported here; it is timed after JAX (XLA's worker threads spin for
  a while after each call, which would slow torch's OpenMP threads on a small machine);
* with more than one local device (one CPU device per core: the script calls
  ``sharding.use_cpu_cores()`` as the command line does): the forward and forward+VJP with the
  batch sharded over them (variant ``shardedN``); and, where ``solve`` micro-batches by default
  (CPU, 8 or more images a device), the forward as it runs there (variant ``microR``: a
  ``lax.map`` over strided chunks of R images a device, ``reddiff_jax.solvers._microbatch``);
* with ``--conv-variants``: the 3x3 convolution as NHWC/HWIO (the UNet's), NCHW/OIHW with
  transposes, and im2col + matmul;
* with ``--flags-sweep``: the whole forward re-measured in child processes under each XLA CPU
  flag set of ``FLAG_SETS`` below (flags only take effect before JAX starts
  its backend, hence the child processes), interleaved over ``--rounds`` rounds.

The model is the random-weight fixture UNet ``tiny_imagenet_like`` (tests/fixtures), or the
``tiny`` preset with random weights when the fixture is absent
(``--model tiny`` forces it). Usage::

    python benchmarks/bench_unet.py [--batch 1,8,32] [--compare-old] [--no-torch]
        [--conv-variants] [--flags-sweep] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reddiff_jax import attention, sharding, unet
from reddiff_jax.model import ScoreModel
from reddiff_jax.solvers import _microbatch
from reddiff_jax.unet import UNetConfig

if __name__ == "__main__":  # before any JAX work: one CPU device per core, as the CLI does
    sharding.use_cpu_cores()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# --------------------------------------------------------------------------------------
# The formulations the UNet used before the speed work (reference for --compare-old).
# --------------------------------------------------------------------------------------


def old_group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    modulation: tuple[jax.Array, jax.Array] | None = None,
    silu: bool = False,
    num_groups: int = 32,
    eps: float = 1e-5,
) -> jax.Array:
    """Before: flax nn.GroupNorm on float32 [N, H, W, C], cast back, then scale/shift, SiLU."""
    gn = nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_fast_variance=False)
    y = gn.apply({"params": {"scale": scale, "bias": bias}}, x.astype(jnp.float32))
    y = y.astype(x.dtype)
    if modulation is not None:
        m_scale, m_shift = (m.reshape(x.shape[0], 1, 1, -1) for m in modulation)
        y = y * (1 + m_scale) + m_shift
    return nn.silu(y) if silu else y


def old_qkv_attention(qkv: jax.Array, heads: int, use_new_attention_order: bool) -> jax.Array:
    """Before: q, k, v kept token-major [N, T, heads, ch]; einsums contract across it."""
    n, t, c3 = qkv.shape
    ch = c3 // (3 * heads)
    if use_new_attention_order:
        qkv = qkv.reshape(n, t, 3, heads, ch)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        qkv = qkv.reshape(n, t, heads, 3, ch)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    logits = jnp.einsum("nthc,nshc->nhts", q * scale, k * scale)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("nhts,nshc->nthc", weights, v).reshape(n, t, heads * ch)


@contextlib.contextmanager
def old_layers() -> Iterator[None]:
    """Swaps the old GroupNorm and attention into reddiff_jax.unet while tracing."""
    saved = unet.group_norm, unet.qkv_attention
    unet.group_norm, unet.qkv_attention = old_group_norm, old_qkv_attention
    try:
        yield
    finally:
        unet.group_norm, unet.qkv_attention = saved


# Convolution formulations (3x3, stride 1, padding 1); x [N, H, W, C], w [3, 3, C, O] (HWIO).
_PAD = ((1, 1), (1, 1))


def conv_nhwc(x: jax.Array, w: jax.Array) -> jax.Array:
    """The UNet's: lax conv, NHWC / HWIO / NHWC (what nn.Conv emits)."""
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), _PAD, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_nchw(x: jax.Array, w: jax.Array) -> jax.Array:
    """NCHW / OIHW with the transposes in and out."""
    y = jax.lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1), _PAD,
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )  # fmt: skip
    return y.transpose(0, 2, 3, 1)


def conv_im2col(x: jax.Array, w: jax.Array) -> jax.Array:
    """im2col: the 9 shifted views concatenated on channels, one [NHW, 9C] x [9C, O] matmul."""
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i : i + h, j : j + wd] for i in range(3) for j in range(3)], -1)
    return (cols.reshape(-1, 9 * c) @ w.reshape(9 * c, -1)).reshape(n, h, wd, -1)


# XLA CPU flag sets tried by --flags-sweep (one child process each).
FLAG_SETS: dict[str, str] = {
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "single_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    # no YNNPACK fusions of reductions / elementwise ops (dots and convolutions stay on it): a
    # small batch's GroupNorm backward is bound by those kernels' fixed cost
    "ynn_dot_conv_only": (
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"
    ),
}

# --------------------------------------------------------------------------------------
# Measurement helpers.
# --------------------------------------------------------------------------------------


def cost_flops(compiled: Any) -> float:
    """FLOPs of a compiled call; `cost_analysis()` returns a dict or a list of dicts."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def interleaved_ms(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median ms of each zero-argument call, measured round-robin after one warm call each."""
    for fn in fns:
        jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


@dataclasses.dataclass(frozen=True)
class Call:
    """A compiled call with its arguments bound, and its FLOPs from XLA's cost analysis."""

    compiled: Any
    args: tuple[Any, ...]
    flops: float
    fn: Callable | None = None  # the traced function (to compile it again for other inputs)

    def __call__(self) -> Any:
        return self.compiled(*self.args)


def _compile(fn: Callable, *args: Any) -> Call:
    compiled = jax.jit(fn).lower(*args).compile()
    return Call(compiled, args, cost_flops(compiled), fn)


def matmul_call(flops: float) -> tuple[Callable[[], Any], float, int]:
    """A jitted float32 square matmul with about `flops` FLOPs (2 n^3): (call, flops, n)."""
    n = max(16, int(round((max(flops, 1.0) / 2) ** (1 / 3) / 8)) * 8)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    return _compile(jnp.matmul, a, b), 2.0 * n**3, n


# --------------------------------------------------------------------------------------
# The model and the layer cases.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    """One benchmarked layer: kind, a label, and its input shapes (NHWC)."""

    kind: str  # "conv3x3" | "gn_silu" | "gn_silu+vjp" | "attention" | "attention+vjp"
    label: str
    shape: tuple[int, ...]  # conv/gn: [N, H, W, C]; attention: [N, T, 3C]
    out: int = 0  # conv: output channels
    heads: int = 0  # attention


def layer_inventory(config: UNetConfig, batch: int) -> list[Layer]:
    """A 3x3 conv and a GroupNorm+SiLU per level width, attention per attention resolution."""
    layers: list[Layer] = []
    seen: set[tuple[int, int]] = set()
    for level, mult in enumerate(config.channel_mult):
        res, width = config.image_size // 2**level, int(mult * config.num_channels)
        if (res, width) in seen:
            continue
        seen.add((res, width))
        shape = (batch, res, res, width)
        layers.append(Layer("conv3x3", f"conv3x3 {res}x{res}x{width}->{width}", shape, out=width))
        layers.append(Layer("gn_silu", f"GN+SiLU {res}x{res}x{width}", shape))
        layers.append(Layer("gn_silu+vjp", f"GN+SiLU {res}x{res}x{width} +VJP", shape))
        if res in config.attention_resolutions:
            heads = (
                config.num_heads
                if config.num_head_channels == -1
                else width // config.num_head_channels
            )
            label = f"attention {res}x{res} C={width} heads={heads}"
            qkv = (batch, res * res, 3 * width)
            layers.append(Layer("attention", label, qkv, heads=heads))
            layers.append(Layer("attention+vjp", f"{label} +VJP", qkv, heads=heads))
    return layers


def _jax_variants(layer: Layer, compare_old: bool, conv_variants: bool) -> dict[str, Any]:
    """name -> (fn, args) for the JAX formulations of one layer; "new" first."""
    key = jax.random.key(0)
    x = jax.random.normal(key, layer.shape, jnp.float32)
    if layer.kind == "conv3x3":
        c = layer.shape[-1]
        w = jax.random.normal(jax.random.key(1), (3, 3, c, layer.out)) / math.sqrt(9 * c)
        out = {"new": (conv_nhwc, (x, w))}
        if conv_variants:
            out.update(nchw=(conv_nchw, (x, w)), im2col=(conv_im2col, (x, w)))
        return out
    if layer.kind in ("gn_silu", "gn_silu+vjp"):
        c = layer.shape[-1]
        scale = 1 + 0.2 * jax.random.normal(jax.random.key(1), (c,))
        bias = 0.2 * jax.random.normal(jax.random.key(2), (c,))
        if layer.kind == "gn_silu+vjp":  # the input VJP, as DPS differentiates it
            return {"new": (_with_vjp(lambda x: unet.group_norm(x, scale, bias, silu=True)), (x,))}
        out = {"new": (lambda x, s, b: unet.group_norm(x, s, b, silu=True), (x, scale, bias))}
        if compare_old:
            out["old"] = (lambda x, s, b: old_group_norm(x, s, b, silu=True), (x, scale, bias))
        return out
    heads = layer.heads
    if layer.kind == "attention+vjp":  # what DPS differentiates; variant: no key-major rule

        def query_major(q: jax.Array) -> jax.Array:
            with query_major_vjp():  # active while jit traces it
                return unet.qkv_attention(q, heads, False)

        out = {"new": (_with_vjp(lambda q: unet.qkv_attention(q, heads, False)), (x,))}
        out["query_major"] = (_with_vjp(query_major), (x,))
        return out
    out = {"new": (lambda q: unet.qkv_attention(q, heads, False), (x,))}
    if compare_old:
        out["old"] = (lambda q: old_qkv_attention(q, heads, False), (x,))
    return out


def _with_vjp(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], Any]:
    """``x -> (fn(x), VJP of fn at x applied to fn(x))``: a forward and its backward pass."""

    def run(x: jax.Array) -> Any:
        out, pull = jax.vjp(fn, x)
        return out, pull(out)[0]

    return run


@contextlib.contextmanager
def query_major_vjp() -> Iterator[None]:
    """Differentiates the attention core in its plain (query-major) form while tracing: the
    formulation before ``reddiff_jax.attention`` gave it a key-major derivative rule."""
    saved = attention.softmax_attention
    attention.softmax_attention = attention._query_major
    try:
        yield
    finally:
        attention.softmax_attention = saved


def _network_variants(
    model: ScoreModel, batch: int, compare_old: bool
) -> dict[str, dict[str, Call]]:
    """{"forward": {...}, "forward+vjp": {...}} of compiled zero-argument calls."""
    cfg = model.config
    x = jax.random.normal(jax.random.key(0), (batch, cfg.image_size, cfg.image_size, 3))
    t = jnp.full((batch,), 500, jnp.int32)
    ct = jax.random.normal(
        jax.random.key(1), (batch, cfg.image_size, cfg.image_size, cfg.out_channels)
    )

    def compile_both() -> dict[str, Call]:
        # Fresh function objects per variant: jax.jit caches traces by function identity, so
        # reusing one `forward` under `old_layers()` would silently reuse the new trace.
        def forward(m: ScoreModel, x: jax.Array, t: jax.Array) -> jax.Array:
            return m.apply(x, t)

        def forward_vjp(m: ScoreModel, x: jax.Array, t: jax.Array, ct: jax.Array) -> Any:
            out, pull = jax.vjp(lambda x: m.apply(x, t), x)
            return out, pull(ct)[0]

        return {
            "forward": _compile(forward, model, x, t),
            "forward+vjp": _compile(forward_vjp, model, x, t, ct),
        }

    rows: dict[str, dict[str, Call]] = {"forward": {}, "forward+vjp": {}}
    for name, call in compile_both().items():
        rows[name]["new"] = call
    # The sharded inputs get their own names: compile_both() (the "old" rows below) must keep
    # compiling for the unsharded ones.
    ndev, mesh, m_r, xs, ts = jax.local_device_count(), None, model, x, t
    if ndev > 1 and batch % ndev == 0:  # the batch sharded over one CPU device per core
        mesh = sharding.data_mesh(ndev)
        bat, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        m_r = jax.device_put(model, rep)
        xs, ts, cts = (jax.device_put(v, bat) for v in (x, t, ct))
        for name, call in compile_both().items():
            args = (m_r, xs, ts) if name == "forward" else (m_r, xs, ts, cts)
            rows[name][f"sharded{ndev}"] = _compile(call.fn, *args)
    devices = 1 if mesh is None else ndev
    micro = _microbatch.auto_rows(batch, devices, jax.default_backend())
    if micro:  # the forward as solve() runs it for RED-Diff: strided chunks of `micro` a device

        def forward_micro(m: ScoreModel, x: jax.Array, t: jax.Array) -> jax.Array:
            return _microbatch.Microbatched(m.apply, micro, devices, mesh)(x, t)

        rows["forward"][f"micro{micro}"] = _compile(forward_micro, m_r, xs, ts)
    if compare_old:
        with old_layers():
            for name, call in compile_both().items():
                rows[name]["old"] = call
    return rows


# --------------------------------------------------------------------------------------
# Torch counterparts (imported lazily, only here).
# --------------------------------------------------------------------------------------


def _torch_layer(layer: Layer) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    g = torch.Generator().manual_seed(0)
    if layer.kind in ("attention", "attention+vjp"):
        n, t, c3 = layer.shape
        qkv = torch.randn(n, c3, t, generator=g)  # torch layout [N, 3C, T]
        heads, ch = layer.heads, c3 // 3 // layer.heads

        def attn(qkv: Any = qkv) -> Any:
            q, k, v = qkv.reshape(n, heads, 3, ch, t).permute(2, 0, 1, 4, 3).unbind(0)
            return F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2).reshape(n, -1, t)

        if layer.kind == "attention":
            return torch.no_grad()(attn)
        leaf = qkv.clone().requires_grad_(True)

        def attn_vjp() -> Any:
            out = attn(leaf)
            return torch.autograd.grad(out, leaf, out)

        return attn_vjp
    n, h, w, c = layer.shape
    x = torch.randn(n, c, h, w, generator=g)
    if layer.kind == "conv3x3":
        weight = torch.randn(layer.out, c, 3, 3, generator=g) / math.sqrt(9 * c)
        bias = torch.zeros(layer.out)
        return lambda: F.conv2d(x, weight, bias, padding=1)
    scale, shift = torch.ones(c), torch.zeros(c)
    if layer.kind == "gn_silu":
        return torch.no_grad()(lambda: F.silu(F.group_norm(x, 32, scale, shift, 1e-5)))
    leaf = x.clone().requires_grad_(True)

    def gn_vjp() -> Any:
        out = F.silu(F.group_norm(leaf, 32, scale, shift, 1e-5))
        return torch.autograd.grad(out, leaf, out)

    return gn_vjp


def torch_unet_forward(sd: dict[str, Any], kw: dict[str, Any]) -> Callable[..., Any]:
    """guided-diffusion's UNetModel forward as torch functions over its state dict (NCHW).

    Covers what `tiny_imagenet_like` uses (resblock_updown, use_scale_shift_norm, legacy
    attention order, no class labels); used only to time torch on the same network.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    cfg = UNetConfig.from_create_model_kwargs(kw)
    mc = cfg.num_channels

    def gn(p: str, h: Any) -> Any:
        return F.group_norm(h.float(), 32, sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)

    def conv(p: str, h: Any) -> Any:
        w = sd[f"{p}.weight"]
        return F.conv2d(h, w, sd[f"{p}.bias"], padding=w.shape[-1] // 2)

    def res(p: str, h: Any, emb: Any, up: bool = False, down: bool = False) -> Any:
        a = F.silu(gn(f"{p}.in_layers.0", h))
        if up or down:
            rs = (
                (lambda z: F.interpolate(z, scale_factor=2, mode="nearest"))
                if up
                else (lambda z: F.avg_pool2d(z, 2))
            )
            a, h = rs(a), rs(h)
        a = conv(f"{p}.in_layers.2", a)
        e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])
        scale, shift = e[..., None, None].chunk(2, dim=1)
        a = gn(f"{p}.out_layers.0", a) * (1 + scale) + shift
        a = conv(f"{p}.out_layers.3", F.silu(a))
        if f"{p}.skip_connection.weight" in sd:
            h = conv(f"{p}.skip_connection", h)
        return h + a

    def attn(p: str, h: Any) -> Any:
        n, c, hh, ww = h.shape
        heads = c // cfg.num_head_channels if cfg.num_head_channels != -1 else cfg.num_heads
        ch = c // heads
        tok = gn(f"{p}.norm", h).reshape(n, c, -1)
        qkv = F.conv1d(tok, sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
        q, k, v = qkv.reshape(n, heads, 3, ch, -1).permute(2, 0, 1, 4, 3).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2).reshape(n, c, -1)
        a = F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
        return h + a.reshape(n, c, hh, ww)

    def forward(x: Any, t: Any) -> Any:
        half = mc // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        emb = F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])
        emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
        h = conv("input_blocks.0.0", x)
        hs, ds, k = [h], 1, 1
        for level, _ in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                h = res(f"input_blocks.{k}.0", h, emb)
                if ds in cfg.attention_ds:
                    h = attn(f"input_blocks.{k}.1", h)
                hs.append(h)
                k += 1
            if level != len(cfg.channel_mult) - 1:
                h = res(f"input_blocks.{k}.0", h, emb, down=True)
                hs.append(h)
                ds, k = ds * 2, k + 1
        h = res("middle_block.0", h, emb)
        h = attn("middle_block.1", h)
        h = res("middle_block.2", h, emb)
        k = 0
        for level, _ in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                h = res(f"output_blocks.{k}.0", torch.cat([h, hs.pop()], 1), emb)
                j = 1
                if ds in cfg.attention_ds:
                    h, j = attn(f"output_blocks.{k}.1", h), 2
                if level and i == cfg.num_res_blocks:
                    h = res(f"output_blocks.{k}.{j}", h, emb, up=True)
                    ds //= 2
                k += 1
        return conv("out.2", F.silu(gn("out.0", h)))

    return forward


def checked_torch_forward() -> tuple[Callable[..., Any], dict[str, Any]]:
    """The torch port of the fixture network (``torch_unet_forward``) and the fixture's config,
    after checking the port against the fixture's recorded output to 1e-4 (RuntimeError when
    the fixture is missing or the port disagrees)."""
    import torch

    if not common.has_fixture():
        raise RuntimeError(f"the fixture UNet is missing ({common.FIXTURE_DIR})")
    d, name = common.FIXTURE_DIR, common.FIXTURE
    sd = torch.load(d / f"{name}.pt", map_location="cpu", weights_only=True)
    kw = json.loads((d / f"{name}.config.json").read_text())
    if not all(kw["create_model_kwargs"][k] for k in ("resblock_updown", "use_scale_shift_norm")):
        raise RuntimeError("the torch port covers resblock_updown + use_scale_shift_norm only")
    fwd = torch_unet_forward(sd, kw)
    io = np.load(d / f"{name}.io.npz")
    with torch.no_grad():
        got = fwd(torch.from_numpy(io["x"]), torch.from_numpy(io["t"])).numpy()
    err = float(np.abs(got - io["out"]).max())
    if err > 1e-4:
        raise RuntimeError(f"the torch port disagrees with the fixture output (max abs {err:.2g})")
    return fwd, kw


def _torch_network(batch: int) -> dict[str, Callable[[], Any]] | None:
    """Torch forward (no_grad) and forward + input gradient of the fixture network, or None."""
    import torch

    try:
        fwd, kw = checked_torch_forward()
    except RuntimeError as e:
        print(f"{e}; torch network not timed")
        return None
    size = kw["create_model_kwargs"]["image_size"]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500)

    def forward() -> Any:
        with torch.no_grad():
            return fwd(x, t)

    def forward_vjp() -> Any:
        xr = x.clone().requires_grad_(True)
        out = fwd(xr, t)
        (g,) = torch.autograd.grad(out, xr, torch.ones_like(out))
        return g

    return {"forward": forward, "forward+vjp": forward_vjp}


def torch_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


# --------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------


def run_batch(model: ScoreModel, batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measures every row at one batch size; returns one dict per row (ms, GFLOP/s, ratios)."""
    rows: list[dict[str, Any]] = []
    groups: list[tuple[str, str, dict[str, Callable[[], Any]], Callable[[], Any] | None]] = []
    for layer in layer_inventory(model.config, batch):
        variants = _jax_variants(layer, args.compare_old, args.conv_variants)
        calls = {k: _compile(fn, *a) for k, (fn, a) in variants.items()}
        groups.append((layer.kind, layer.label, calls, layer))
    for name, calls in _network_variants(model, batch, args.compare_old).items():
        groups.append((name, f"{name} (batch {batch})", calls, None))

    for kind, label, calls, layer in groups:
        flops = calls["new"].flops
        mm, mm_flops, mm_n = matmul_call(flops)
        names = list(calls)
        ms = interleaved_ms([calls[k] for k in names] + [mm], args.repeats)
        row: dict[str, Any] = {
            "batch": batch, "kind": kind, "label": label, "mflop": flops / 1e6,
            "matmul_n": mm_n, "matmul_gflops": mm_flops / ms[-1] / 1e6,
        }  # fmt: skip
        for k, t in zip(names, ms[:-1], strict=True):
            row[f"{k}_ms"] = t
            row[f"{k}_gflops"] = flops / t / 1e6
        row["new_frac_of_matmul"] = row["new_gflops"] / row["matmul_gflops"]
        if "old_ms" in row:
            row["speedup_vs_old"] = row["old_ms"] / row["new_ms"]
        row["_layer"] = layer
        rows.append(row)
    return rows


def add_torch(rows: list[dict[str, Any]], repeats: int, threads: int) -> None:
    """Times the torch counterpart of every row (after all JAX work of the batch)."""
    import torch

    torch.set_num_threads(threads)
    time.sleep(0.5)  # let XLA's worker threads stop spinning
    nets: dict[int, Any] = {}
    for row in rows:
        layer = row.pop("_layer", None)
        if layer is not None:
            fn = _torch_layer(layer)
        else:
            b = row["batch"]
            if b not in nets:
                nets[b] = _torch_network(b)
            if nets[b] is None:
                continue
            fn = nets[b][row["kind"]]
        row["torch_ms"] = torch_ms(fn, repeats)
        row["new_over_torch"] = row["new_ms"] / row["torch_ms"]


def peak_matmul(repeats: int, n: int = 2048) -> float:
    """GFLOP/s of a jitted float32 n x n matmul (the reference for the whole network)."""
    call, flops, _ = matmul_call(2.0 * n**3)
    return flops / interleaved_ms([call], repeats)[0] / 1e6


def _opt(row: dict[str, Any], key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def print_rows(rows: list[dict[str, Any]], peak: float) -> None:
    head = (
        f"{'layer':<38} {'MFLOP':>8} {'new ms':>8} {'GF/s':>6} {'mm GF/s':>7} {'frac':>5}"
        f" {'old ms':>8} {'speedup':>7} {'torch ms':>8} {'new/torch':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        opt = functools.partial(_opt, r)
        print(
            f"{r['label']:<38} {r['mflop']:>8.1f} {r['new_ms']:>8.3f} {r['new_gflops']:>6.1f}"
            f" {r['matmul_gflops']:>7.1f} {r['new_frac_of_matmul']:>5.2f}"
            f" {opt('old_ms', '>8.3f'):>8} {opt('speedup_vs_old', '>7.2f'):>7}"
            f" {opt('torch_ms', '>8.3f'):>8} {opt('new_over_torch', '>9.2f'):>9}"
        )
        extra = [k[:-3] for k in r if k.endswith("_ms") and k[:-3] not in ("new", "old", "torch")]
        for k in extra:
            print(f"    variant {k}: {r[k + '_ms']:.3f} ms, {r[k + '_gflops']:.1f} GF/s")
    fwd = [r for r in rows if r["kind"] == "forward"]
    for r in fwd:
        sharded = [k[:-7] for k in r if k.startswith("sharded") and k.endswith("_gflops")]
        micro = [k[:-7] for k in r if k.startswith("micro") and k.endswith("_gflops")]
        print(
            f"whole forward, batch {r['batch']}: {r['new_gflops']:.1f} GF/s = "
            f"{r['new_gflops'] / peak:.2f} of the 2048^2 matmul's {peak:.1f} GF/s"
            + (f" (old: {r['old_gflops'] / peak:.2f})" if "old_gflops" in r else "")
            + "".join(f"; {k[7:]} devices: {r[k + '_gflops'] / peak:.2f}" for k in sharded)
            + "".join(
                f"; micro-batched by {k[5:]} a device: {r[k + '_gflops'] / peak:.2f}" for k in micro
            )  # fmt: skip
        )


def flags_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Whole forward per XLA CPU flag set, each in a child process, interleaved over rounds."""
    sets = {"default": ""} | FLAG_SETS
    results: dict[str, list[dict[str, float]]] = {k: [] for k in sets}
    for _ in range(args.rounds):
        for name, flags in sets.items():
            env = dict(
                os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
            )
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--batch",
                args.batch,
                "--repeats",
                str(args.repeats),
                "--model",
                args.model,
            ]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = []
    print(f"\nXLA CPU flag sets (median of {args.rounds} child runs; forward ms, matmul GF/s):")
    for name, runs in results.items():
        row = {"flags": name, "xla_flags": sets[name]}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        summary.append(row)
        cells = "  ".join(f"{k}={v:.2f}" for k, v in row.items() if isinstance(v, float))
        print(f"  {name:<28} {cells}   [{sets[name] or '-'}]")
    return summary


def child(args: argparse.Namespace) -> None:
    model, _ = common.bench_model(fixture=args.model == common.FIXTURE)
    out: dict[str, float] = {}
    for b in _batches(args.batch):
        calls = _network_variants(model, b, False)
        fwd, vjp = calls["forward"]["new"], calls["forward+vjp"]["new"]
        mm, mm_flops, _ = matmul_call(2.0 * 2048**3)
        t = interleaved_ms([fwd, vjp, mm], args.repeats)
        out |= {
            f"fwd_ms_b{b}": t[0],
            f"vjp_ms_b{b}": t[1],
            f"mm_gflops_b{b}": mm_flops / t[2] / 1e6,
        }
    print(json.dumps(out))


def _batches(spec: str) -> list[int]:
    return [int(b) for b in spec.split(",") if b]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--model", default=common.FIXTURE, choices=[common.FIXTURE, "tiny"])
    p.add_argument("--repeats", type=int, default=15, help="timed calls per variant (median)")
    p.add_argument("--compare-old", action="store_true", help="also time the old formulations")
    p.add_argument("--conv-variants", action="store_true", help="NCHW and im2col convolutions")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--flags-sweep", action="store_true", help="XLA CPU flag sets (subprocesses)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the flag sweep")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    if args.torch is None:
        try:
            import torch  # noqa: F401

            args.torch = True
        except ImportError:
            args.torch = False
    model, what = common.bench_model(fixture=args.model == common.FIXTURE)
    print(f"model: {what}; backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")  # fmt: skip
    peak = peak_matmul(args.repeats)
    result: dict[str, Any] = {"model": what, "peak_matmul_gflops": peak, "rows": []}
    for b in _batches(args.batch):
        rows = run_batch(model, b, args)
        if args.torch:
            add_torch(rows, args.repeats, args.torch_threads)
        for r in rows:
            r.pop("_layer", None)
        print(f"\n== batch {b} ==")
        print_rows(rows, peak)
        result["rows"].extend(rows)
    if args.flags_sweep:
        result["flags"] = flags_sweep(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
