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
    p.add_argument(
        "--decay-steps",
        type=int,
        default=defaults.decay_steps,
        help="cosine decay of the learning rate to 0 over the last N of --steps (default 0: none)",
    )
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument(
        "--init-from",
        default=None,
        help="warm start a new run from an exported model's EMA weights (a folder such as "
        "checkpoints/mnist32, or an embedded name); ignored when --workdir holds a checkpoint",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="data parallel over N local devices (default: as many as divide the batch, up to "
        "all; one per CPU core on a CPU)",
    )
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
        ("--decay-steps", args.decay_steps),
        ("--weight-decay", args.weight_decay),
        ("--grad-clip", args.grad_clip),
        ("--ema-decay", args.ema_decay),
        ("--checkpoint-every", args.checkpoint_every),
        ("--seed", args.seed),
    ):
        parts += [flag, str(value)]
    if args.init_from:
        parts += ["--init-from", str(args.init_from)]
    return shlex.join(parts)


def _train_config(args: argparse.Namespace) -> train_lib.TrainConfig:
    return train_lib.TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        warmup_steps=args.warmup,
        decay_steps=args.decay_steps,
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


def _warm_start(source: str | None, model_config: Any) -> tuple[Any, dict[str, Any] | None]:
    """(EMA params, record) of the exported model ``source``, or (None, None)."""
    if not source:
        return None, None
    from reddiff_jax.model import read_metadata, resolve_model

    model, name = resolve_model(source)
    if model.config != model_config:
        raise ValueError(
            f"init-from: {name} is a {model.config.to_dict()} model; --config gives "
            f"{model_config.to_dict()}"
        )
    meta = read_metadata(name).get("metadata") or {}
    info = {
        "path": str(source),
        "steps": meta.get("steps"),
        "wall_time_s": meta.get("wall_time_s", 0),
    }
    return model.params, info


def _mesh(devices: int | None, batch: int) -> Any:
    """A data mesh over ``devices`` local devices (default: the most, up to all, that divide
    ``batch``), or None for one device."""
    from reddiff_jax import sharding

    if jax.process_count() > 1:
        raise ValueError("train: multi-process training is not supported; run one process")
    local = jax.local_device_count()
    if devices is None:
        devices = max(d for d in range(1, local + 1) if batch % d == 0)
    elif not 1 <= devices <= local or batch % devices:
        raise ValueError(
            f"devices: expected an int in 1 .. {local} (the local devices) that divides the "
            f"batch {batch}, got {devices}"
        )
    return sharding.data_mesh(devices) if devices > 1 else None


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
    warm, warm_info = _warm_start(args.init_from, model_config)
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
        warm_start=warm,
        warm_start_info=warm_info,
        mesh=_mesh(args.devices, train_config.batch_size),
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
