"""guided-diffusion `UNetModel` state dict <-> `reddiff_jax.unet.UNet` params (numpy only).

Key rule: a torch key `input_blocks.1.0.in_layers.0.weight` names the Flax param
`params["input_blocks_1_0"]["in_layers_0"]["scale"]`: numeric segments are glued to the name
before them with "_", and the leaf `weight` becomes `kernel`, `scale` or `embedding` by the kind
of module (table `_MODULE_KINDS`); `bias` stays `bias`. Layout rule per kind (`_KINDS`):

  conv2d     [O, I, kh, kw] -> kernel [kh, kw, I, O]   (w.transpose(2, 3, 1, 0))
  conv1d     [O, I, 1]      -> Dense kernel [I, O]     (w[:, :, 0].T; attention qkv / proj_out)
  linear     [O, I]         -> Dense kernel [I, O]     (w.T)
  group_norm [C]            -> scale [C]
  embedding  [K, D]         -> embedding [K, D]
  any bias   [O]            -> bias [O]

Everything is cast to float32. The conversion is strict: every source key must be consumed and
every model parameter filled with the right shape; otherwise a ValueError lists the offending keys.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from reddiff_jax.model import param_shapes
from reddiff_jax.unet import UNetConfig

__all__ = ["convert_state_dict", "expected_torch_shapes", "flax_path", "torch_to_flax_layout"]


@dataclasses.dataclass(frozen=True)
class _Kind:
    """How one kind of torch module's weight maps to Flax."""

    name: str
    weight_leaf: str  # Flax leaf name of the torch `weight`
    to_flax: Callable[[np.ndarray], np.ndarray]


_KINDS = {
    "conv2d": _Kind("conv2d", "kernel", lambda w: w.transpose(2, 3, 1, 0)),
    "conv1d": _Kind("conv1d", "kernel", lambda w: w[:, :, 0].T),
    "linear": _Kind("linear", "kernel", lambda w: w.T),
    "group_norm": _Kind("group_norm", "scale", lambda w: w),
    "embedding": _Kind("embedding", "embedding", lambda w: w),
}

# torch module path (key without `.weight`/`.bias`) -> kind; first full match wins.
_MODULE_KINDS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"time_embed\.\d+|.+\.emb_layers\.\d+", "linear"),
        (r"label_emb", "embedding"),
        (r".+\.(qkv|proj_out)", "conv1d"),
        (r"out\.0|.+\.(in_layers|out_layers)\.0|.+\.norm", "group_norm"),
        (
            r"out\.2|input_blocks\.0\.0"
            r"|.+\.(in_layers\.2|out_layers\.3|skip_connection|op|conv)",
            "conv2d",
        ),
    )
)


def _module_kind(module_path: str) -> _Kind | None:
    for pattern, kind in _MODULE_KINDS:
        if pattern.fullmatch(module_path):
            return _KINDS[kind]
    return None


def flax_path(torch_key: str) -> tuple[str, ...] | None:
    """Flax param path of a torch state-dict key, or None when no rule applies.

    >>> flax_path("input_blocks.1.0.in_layers.0.weight")
    ('input_blocks_1_0', 'in_layers_0', 'scale')
    """
    module_path, _, leaf = torch_key.rpartition(".")
    kind = _module_kind(module_path)
    if kind is None or leaf not in ("weight", "bias"):
        return None
    glued: list[str] = []
    for segment in module_path.split("."):
        if segment.isdigit() and glued:
            glued[-1] = f"{glued[-1]}_{segment}"
        else:
            glued.append(segment)
    return (*glued, kind.weight_leaf if leaf == "weight" else "bias")


def torch_to_flax_layout(torch_key: str, array: np.ndarray) -> np.ndarray:
    """Applies the layout rule of `torch_key`'s kind (no dtype change, no shape check)."""
    kind = _module_kind(torch_key.rpartition(".")[0])
    if kind is None:
        raise ValueError(f"torch_key: no conversion rule for {torch_key!r}")
    return kind.to_flax(array) if torch_key.endswith(".weight") else array


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat: dict[tuple[str, ...], Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _report(what: str, items: list[str], limit: int = 25) -> str:
    shown = items[:limit]
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {what} ({len(items)}):\n    " + "\n    ".join(shown) + more


def convert_state_dict(state_dict: Mapping[str, np.ndarray], config: UNetConfig) -> dict[str, Any]:
    """Converts a guided-diffusion `UNetModel` state dict to `UNet(config)` params.

    Args:
      state_dict: torch key -> array in PyTorch layout (e.g. from `read_state_dict`); any float
        dtype (float16 / bfloat16 / float64 are cast to float32).
      config: the model config the checkpoint was trained with.

    Returns:
      The Flax `params` tree (nested dicts of float32 numpy arrays), to be used as
      `UNet(config).apply({"params": params}, ...)`. Its structure and shapes are checked
      against `jax.eval_shape` of `UNet(config).init`.

    Raises:
      ValueError: listing every missing key, every unused source key and every key whose
        shape or dtype does not match `expected_torch_shapes(config)`. Nothing is converted
        then (there is no fallback to random weights).
    """
    expected = expected_torch_shapes(config)
    missing = [f"{key} {shape}" for key, shape in expected.items() if key not in state_dict]
    unused: list[str] = []
    mis_shaped: list[str] = []
    for key, array in state_dict.items():
        shape = tuple(np.shape(array))
        if key not in expected:
            unused.append(f"{key} {shape}")
        elif shape != expected[key]:
            mis_shaped.append(f"{key}: got {shape}, expected {expected[key]}")
        elif not _is_float(np.asarray(array).dtype):
            mis_shaped.append(f"{key}: got dtype {np.asarray(array).dtype}, expected a float dtype")
    if missing or unused or mis_shaped:
        parts = [
            "state dict does not match the UNet config (image_size="
            f"{config.image_size}, num_channels={config.num_channels}, channel_mult="
            f"{config.channel_mult}, num_res_blocks={config.num_res_blocks}, class_cond="
            f"{config.class_cond}, learn_sigma={config.learn_sigma}); nothing was converted:"
        ]
        if missing:
            parts.append(_report("missing keys", missing))
        if unused:
            parts.append(_report("unused keys", unused))
        if mis_shaped:
            parts.append(_report("mis-shaped keys", mis_shaped))
        raise ValueError("\n".join(parts))

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key in expected:
        path = flax_path(key)
        if path is None:  # expected_torch_shapes and _MODULE_KINDS disagree
            raise ValueError(f"internal error: no conversion rule for expected key {key!r}")
        array = torch_to_flax_layout(key, np.asarray(state_dict[key]))
        flat[path] = np.ascontiguousarray(array, dtype=np.float32)
    target = _flatten(param_shapes(config))
    disagree = sorted("/".join(p) for p in set(target) ^ set(flat)) + sorted(
        f"{'/'.join(p)}: converted {flat[p].shape}, model {tuple(target[p].shape)}"
        for p in set(target) & set(flat)
        if flat[p].shape != tuple(target[p].shape)
    )
    if disagree:  # a bug in the UNet or in these rules, not in the file
        raise ValueError(
            "converted params do not match UNet(config) params (internal inconsistency):\n"
            + _report("differences", disagree)
        )
    return _unflatten(flat)


def expected_torch_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The torch state-dict keys and shapes of guided-diffusion's `UNetModel` for `config`.

    Follows upstream's module registration order (that is, `state_dict()` order): time_embed,
    label_emb, input_blocks, middle_block, output_blocks, out.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    mc = config.num_channels
    emb = 4 * mc
    nrb = config.num_res_blocks
    mult = config.channel_mult

    def linear(prefix: str, n_in: int, n_out: int) -> None:
        shapes[f"{prefix}.weight"] = (n_out, n_in)
        shapes[f"{prefix}.bias"] = (n_out,)

    def conv(prefix: str, n_in: int, n_out: int, k: int = 3) -> None:
        shapes[f"{prefix}.weight"] = (n_out, n_in, k, k)
        shapes[f"{prefix}.bias"] = (n_out,)

    def norm(prefix: str, c: int) -> None:
        shapes[f"{prefix}.weight"] = (c,)
        shapes[f"{prefix}.bias"] = (c,)

    def resblock(prefix: str, c_in: int, c_out: int) -> None:
        norm(f"{prefix}.in_layers.0", c_in)
        conv(f"{prefix}.in_layers.2", c_in, c_out)
        linear(f"{prefix}.emb_layers.1", emb, 2 * c_out if config.use_scale_shift_norm else c_out)
        norm(f"{prefix}.out_layers.0", c_out)
        conv(f"{prefix}.out_layers.3", c_out, c_out)
        if c_in != c_out:
            conv(f"{prefix}.skip_connection", c_in, c_out, k=1)

    def attention(prefix: str, c: int) -> None:
        norm(f"{prefix}.norm", c)
        shapes[f"{prefix}.qkv.weight"] = (3 * c, c, 1)
        shapes[f"{prefix}.qkv.bias"] = (3 * c,)
        shapes[f"{prefix}.proj_out.weight"] = (c, c, 1)
        shapes[f"{prefix}.proj_out.bias"] = (c,)

    linear("time_embed.0", mc, emb)
    linear("time_embed.2", emb, emb)
    if config.class_cond:
        shapes["label_emb.weight"] = (config.num_classes, emb)

    ch = int(mult[0] * mc)
    conv("input_blocks.0.0", config.in_channels, ch)
    skip_channels = [ch]
    ds, k = 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            resblock(f"input_blocks.{k}.0", ch, int(m * mc))
            ch = int(m * mc)
            if ds in config.attention_ds:
                attention(f"input_blocks.{k}.1", ch)
            skip_channels.append(ch)
            k += 1
        if level != len(mult) - 1:
            if config.resblock_updown:
                resblock(f"input_blocks.{k}.0", ch, ch)
            else:
                conv(f"input_blocks.{k}.0.op", ch, ch)
            skip_channels.append(ch)
            ds *= 2
            k += 1

    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)

    k = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            resblock(f"output_blocks.{k}.0", ch + skip_channels.pop(), int(mc * m))
            ch = int(mc * m)
            j = 1
            if ds in config.attention_ds:
                attention(f"output_blocks.{k}.1", ch)
                j = 2
            if level and i == nrb:
                if config.resblock_updown:
                    resblock(f"output_blocks.{k}.{j}", ch, ch)
                else:
                    conv(f"output_blocks.{k}.{j}.conv", ch, ch)
                ds //= 2
            k += 1

    norm("out.0", ch)
    conv("out.2", int(mult[0] * mc), config.out_channels)
    return shapes
