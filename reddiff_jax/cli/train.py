"""`reddiff-jax train`: parses the arguments, then calls `reddiff_jax.train.train` and `export`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import jax

from reddiff_jax import data as data_lib
from reddiff_jax import train as train_lib
from reddiff_jax.cli import seed

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Adds the `train` subcommand."""
    p = subparsers.add_parser(
        "train",
        help="train a UNet prior (DDPM epsilon prediction)",
        description="Train an ADM UNet with the DDPM simple loss; resumable; exports EMA weights.",
    )
    p.add_argument("--data", required=True, help=".npz/.npy (uint8 [N,H,W,C]) or image folder")
    p.add_argument("--out", required=True, help="export directory (EMA params, README.md, PNG)")
    p.add_argument(
        "--config",
        default="tiny-mnist",
        help="preset name or UNetConfig .json (default tiny-mnist)",
    )
    p.add_argument("--workdir", help="training checkpoints (default outputs/train/<out name>)")
    defaults = train_lib.TrainConfig()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--samples", type=int, default=64, help="images in the sample grid")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the grid")
    p.add_argument("--name", default=None, help="title of the model card")
    p.add_argument("--card-notes", default=None, help="markdown file appended to the model card")
    p.add_argument(
        "--export-only", action="store_true", help="export the latest checkpoint without training"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _command_line(args: argparse.Namespace, workdir: Path) -> str:
    """The training command with every setting spelled out (defaults included)."""
    parts = ["reddiff-jax", "train", "--data", str(args.data), "--out", str(args.out)]
    parts += ["--config", str(args.config), "--workdir", str(workdir)]
    for flag, value in (
        ("--steps", args.steps),
        ("--batch", args.batch),
        ("--lr", args.lr),
        ("--warmup", args.warmup),
        ("--weight-decay", args.weight_decay),
        ("--grad-clip", args.grad_clip),
        ("--ema-decay", args.ema_decay),
        ("--checkpoint-every", args.checkpoint_every),
        ("--seed", args.seed),
    ):
        parts += [flag, str(value)]
    return shlex.join(parts)


def _train_config(args: argparse.Namespace) -> train_lib.TrainConfig:
    return train_lib.TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
    )


def _card_notes(path: str | None) -> str:
    if not path:
        return ""
    notes_path = Path(path)
    if not notes_path.is_file():
        raise FileNotFoundError(f"card-notes: {notes_path} does not exist")
    return notes_path.read_text()


def _log(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)  # keeps the progress bar intact


def _hardware() -> str:
    return (
        f"{jax.devices()[0].platform}, {jax.device_count()} device(s), {os.cpu_count()} CPU cores"
    )


def run(args: argparse.Namespace) -> int:
    """Runs `reddiff-jax train` from parsed arguments."""
    model_config = train_lib.get_model_config(args.config)
    notes = _card_notes(args.card_notes)
    train_config = _train_config(args)
    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else Path("outputs") / "train" / out.name
    images = data_lib.load_images(args.data)
    key = jax.random.key(args.seed)  # the only seed -> key conversion
    command = _command_line(args, workdir)
    result = train_lib.train(
        key,
        images,
        model_config,
        train_config,
        workdir=workdir,
        progress=not args.no_progress,
        stop_after=0 if args.export_only else None,
        log=_log,
        command=command,
    )
    info = {
        "name": args.name or f"reddiff-jax prior {out.name}",
        "export_command": command + (" --export-only" if args.export_only else ""),
        "data": str(args.data),
        "num_examples": int(images.shape[0]),
        "seed": args.seed,
        "hardware": _hardware(),
    }
    train_lib.export(
        jax.random.fold_in(key, 1_000_003),
        result,
        model_config,
        train_config,
        out,
        info=info,
        num_samples=args.samples,
        sample_steps=args.sample_steps,
        card_extra=notes,
    )
    _log(f"exported step {int(result.state.step)} EMA weights to {out}")
    return 0
