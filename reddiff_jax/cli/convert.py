"""`reddiff-jax convert SRC DST (--preset NAME | --config FILE.json) [--force]`.

Parses the arguments, reads the config, then calls `reddiff_jax.convert.convert_file`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reddiff_jax.unet import PRESETS, UNetConfig, get_preset

__all__ = ["load_config_file", "register", "run"]


def load_config_file(path: str | Path) -> UNetConfig:
    """Reads `create_model` keywords from JSON, at the top level or under "create_model_kwargs"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--config: {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a JSON object of create_model keywords")
    return UNetConfig.from_create_model_kwargs(data)


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by parsed arguments; returns the exit status."""
    from reddiff_jax.convert.files import convert_file  # heavy imports only when used

    config = get_preset(args.preset) if args.preset else load_config_file(args.config)
    model = convert_file(args.src, args.dst, config, force=args.force)
    n = sum(int(a.size) for a in _leaves(model.params))
    print(f"wrote {args.dst}: {n:,} parameters from {args.src}")
    return 0


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `convert` subcommand."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a guided-diffusion PyTorch checkpoint to a reddiff-jax checkpoint",
        description=(
            "Reads a PyTorch state dict (.pt/.pth zip, read without torch and without running "
            "code from the file, or .safetensors) and writes an orbax checkpoint directory "
            "recording the config, the source file name and its sha256."
        ),
    )
    parser.add_argument("src", help="the .pt/.pth/.safetensors state dict")
    parser.add_argument("dst", help="the checkpoint directory to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"a named config: {', '.join(sorted(PRESETS))}")
    source.add_argument(
        "--config",
        help='JSON file of create_model keywords (top level or under "create_model_kwargs")',
    )
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.set_defaults(func=run)
