"""`reddiff-jax sweep`: parses the arguments and calls :func:`reddiff_jax.sweep.sweep`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax

from reddiff_jax.cli.restore import parse_params
from reddiff_jax.solvers import registry

__all__ = ["register"]


def _fmt(v: float | None) -> str:
    return "     –" if v is None else f"{v:6.3f}"


def _run(args: argparse.Namespace) -> int:
    from reddiff_jax.sweep import parse_grid, sweep

    res = sweep(
        jax.random.key(args.seed),
        grid=parse_grid(args.grid or []),
        out=args.out,
        task=args.task,
        algo=args.algo,
        n=args.n,
        steps=args.steps,
        sigma_y=args.sigma_y,
        model=args.model,
        params=parse_params(args.param or []),
        split=args.split,
        metric=args.metric,
        chunk=args.chunk,
        memory_budget=None if args.memory_budget is None else args.memory_budget * 2**20,
        lpips=not args.no_lpips,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    metrics = [m for m in ("psnr", "ssim", "lpips", "accuracy") if m in res["cells"][0]]
    print("  ".join(f"{k:>8}" for k in res["grid"]) + "  " + "  ".join(f"{m:>6}" for m in metrics)
          + "  diverged")  # fmt: skip
    for cell in res["cells"]:
        vals = "  ".join(f"{v:8.4g}" for v in cell["params"].values())
        print(vals + "  " + "  ".join(_fmt(cell[m]["mean"]) for m in metrics)
              + f"  {cell['diverged']:8d}")  # fmt: skip
    t = res["timing"]
    print(f"{t['solves']} solves in {t['calls']} compiled call(s) of {t['chunk']}, "
          f"{t['seconds']:.1f} s; outputs in {args.out}")  # fmt: skip
    best = res["best"]
    if best is None:
        print("no cell could be scored")
        return 3
    print(f"best {best['metric']} {best['value']:.4f}: {best['params']}")
    print(f"  reddiff-jax restore ... {best['restore']}")
    print(f"  reddiff-jax eval ...    {best['eval']}")
    if len(res["grid"]) == 2:
        print(f"  heat map: {Path(args.out) / 'heatmap.png'}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``reddiff-jax sweep`` to the CLI's subparsers (sets ``func``)."""
    p = subparsers.add_parser(
        "sweep",
        help="grid sweep of a solver's numeric settings on the validation digits",
        description=(
            "Restores the first --n validation digits (held-out 0..199, never in the eval's "
            "test split) for every cell of the --grid, all cells in vmapped calls of one "
            "compiled solve, and writes sweep.json (per-cell mean and per-image PSNR/SSIM/LPIPS), "
            "heatmap.png (2-D grids) and cells/ into --out; a rerun skips finished cells."
        ),
        epilog="example: reddiff-jax sweep --task sr:4 --algo reddiff --grid "
        "lam=0.05,0.1,0.25,0.5,1 --grid lr=0.05,0.1,0.25,0.5 --n 32 --out outputs/sweep_sr4",
    )
    p.add_argument("--task", default="sr:4", help="operator spec (default sr:4)")
    p.add_argument("--algo", default="reddiff", choices=registry.conditional_names())
    p.add_argument(
        "--grid",
        action="append",
        metavar="NAME=V1,V2,...",
        required=True,
        help="a traced setting and its values (repeatable; e.g. lam=0.1,0.25)",
    )
    p.add_argument("--n", type=int, default=32, help="validation digits (default 32, max 200)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 100)")
    p.add_argument("--sigma-y", type=float, default=0.0, help="noise: y = A(x) + 2 sigma_y n")
    p.add_argument("--model", default=None, help="checkpoint folder (default: mnist32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="a setting fixed for the whole grid (repeatable)",
    )
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument(
        "--metric",
        default="psnr",
        choices=("psnr", "ssim", "lpips", "accuracy"),
        help="what picks the best cell (default psnr)",
    )
    p.add_argument("--chunk", type=int, default=None, help="solves per compiled call")
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="MIB",
        help="solve memory per call in MiB (default: half the accelerator, 2 GiB CPU)",
    )
    p.add_argument("--no-lpips", action="store_true", help="leave LPIPS out")
    p.add_argument("--overwrite", action="store_true", help="reuse an --out of another sweep")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run)
    return p
