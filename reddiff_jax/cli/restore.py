"""`reddiff-jax restore`: parses the arguments and calls :func:`reddiff_jax.restore.restore`.

Exit status: 0 done, 2 bad arguments or inputs (one-line error), 3 some images diverged (their
status is in metrics.json and records/), 130 interrupted (finished outputs are kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import jax

from reddiff_jax.cli import seed
from reddiff_jax.restore import DEFAULT_STEPS, restore
from reddiff_jax.solvers import MAX_ABS, registry

__all__ = ["add_solver_arguments", "parse_params", "register"]


def _defaults_text() -> str:
    lines = [f"solver defaults ({DEFAULT_STEPS} steps; official settings, see the module doc):"]
    for name in registry.conditional_names():
        table = registry.get(name).task_defaults
        parts = [", ".join(f"{k} {v}" for k, v in table.get("*", {}).items()) or "config defaults"]
        parts += [f"{task}: " + ", ".join(f"{k} {v}" for k, v in kv.items())
                  for task, kv in table.items() if task != "*"]  # fmt: skip
        lines.append(f"  {name}: " + "; ".join(parts))
    lines.append(
        "a checkpoint folder with a tuned.json (the embedded prior has one: RED-Diff "
        "tuned per task) overrides these for its model; options override both"
    )
    lines.append("example: reddiff-jax restore --demo --n 8 --task sr:4 --out outputs/demo_sr4")
    return "\n".join(lines)


def parse_params(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def add_solver_arguments(parser: argparse.ArgumentParser) -> None:
    """The solver options shared by ``restore`` and ``eval``."""
    parser.add_argument(
        "--steps", type=int, default=None, help=f"solver steps (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--sigma-y", type=float, default=0.0, help="noise: y = A(x) + 2 sigma_y n")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: mnist32)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    parser.add_argument("--batch", type=int, default=8, help="images per solver call (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _fmt(v: float | None, digits: int) -> str:
    return "inf" if v is None else f"{v:.{digits}f}"


def devices_arg(text: str) -> int | str:
    """``--devices``: ``all`` or a positive int."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive int, got {text!r}")
    return value


def _init_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` with --coordinator/--num-processes/--process-id (JAX's
    cluster detection fills in what is not given); before any other JAX work."""
    given = [f for f in ("coordinator", "num_processes", "process_id")
             if getattr(args, f) is not None]  # fmt: skip
    if not args.distributed:
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag}: only with --distributed")
        return
    from reddiff_jax import sharding

    sharding.initialize(args.coordinator, args.num_processes, args.process_id)


def _run(args: argparse.Namespace) -> int:
    _init_distributed(args)
    params = parse_params(args.param or [])
    if "num_steps" in params:  # it would override --steps, and the grid note would mislead
        raise ValueError("--param num_steps: set the number of steps with --steps")
    for name in ("lam", "lr", "zeta", "eta"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    steps = args.steps
    if args.tuned:
        from reddiff_jax.tune import load_tuned

        tuned = load_tuned(args.tuned, algo=args.algo, task=args.task)
        params = {**tuned["params"], **params}
        steps = tuned["num_steps"] if steps is None else steps
    result = restore(
        jax.random.key(args.seed),
        inputs=args.inputs,
        out=args.out,
        task=args.task,
        algo=args.algo,
        sigma_y=args.sigma_y,
        steps=steps,
        model=args.model,
        demo=args.demo,
        n=args.n,
        y=args.y,
        batch=args.batch,
        devices=args.devices,
        params=params,
        grid_rows=args.grid_rows,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        samples=args.samples,
    )
    if steps is not None and result.iterations != steps:
        print(f"note: the official grid range(0, 1000, 1000 // {steps}) takes "
              f"{result.iterations} steps, not {steps}")  # fmt: skip
    print(
        f"restored {result.solved} image(s), kept {result.skipped} finished; "
        f"outputs in {result.out}"
    )
    if result.metrics is not None:
        acc = result.metrics.get("accuracy")
        for which in ("pinv", "restored"):
            m = result.metrics[which]
            print(
                f"  {which:>8}: PSNR {_fmt(m['psnr']['mean'], 2)} dB  "
                f"SSIM {_fmt(m['ssim']['mean'], 4)}"
                + (f"  digit accuracy {acc[which]['mean']:.2f}" if acc else "")
                + f" (mean of {result.metrics['n_images']})"
            )
    print(f"  grid: {result.grid}")
    if result.failed:
        print(
            f"reddiff-jax restore: warning: {len(result.failed)} image(s) diverged "
            f"(non-finite or |x| > {MAX_ABS:g}): {', '.join(result.failed[:10])}; lower the step "
            "size (--lr, --zeta, ...) and rerun with --overwrite",
            file=sys.stderr,
        )
        return 3
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``reddiff-jax restore`` to the CLI's subparsers (sets ``func``)."""
    p = subparsers.add_parser(
        "restore",
        help="restore images (files, a folder, or --demo digits) with a diffusion prior",
        description=(
            "Simulates a measurement of each input image (or reads --y), restores it with the "
            "chosen solver and writes restored/*.png, grid.png and metrics.json into --out. "
            "A rerun into the same --out skips finished images."
        ),
        epilog=_defaults_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", help="image files or folders (size of the model)")
    p.add_argument("--demo", action="store_true", help="use the held-out digits of mnist32")
    p.add_argument("--n", type=int, default=None, help="number of images (demo default 8)")
    p.add_argument("--task", default="inpaint:box", help="operator spec (default inpaint:box)")
    p.add_argument(
        "--algo",
        default="reddiff",
        choices=registry.conditional_names(),
        help="solver (default reddiff)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--y", default=None, help="measured y (.npy/.npz, or image files)")
    p.add_argument("--lam", type=float, default=None, help="reddiff lambda (default per task)")
    p.add_argument("--lr", type=float, default=None, help="reddiff Adam lr (default per task)")
    p.add_argument("--zeta", type=float, default=None, help="dps/diffpir step zeta")
    p.add_argument("--eta", type=float, default=None, help="dps/pgdm/ddrm eta")
    p.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="any solver setting (repeatable)"
    )
    p.add_argument("--grid-rows", type=int, default=8, help="images shown in grid.png")
    p.add_argument("--overwrite", action="store_true", help="reuse an --out of another run")
    p.add_argument("--tuned", metavar="FILE", help="settings learned by reddiff-jax tune")
    p.add_argument(
        "--samples", type=int, default=None, metavar="S", help="also write S posterior samples"
    )
    p.add_argument(
        "--devices",
        type=devices_arg,
        default="all",
        help="'all' (default) or N local devices; the batch is sharded over them",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one of several processes (jax.distributed.initialize); --out shared",
    )
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="with --distributed: process 0's address (default: cluster detection)",
    )
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed")
    add_solver_arguments(p)
    p.set_defaults(func=_run)
    return p
