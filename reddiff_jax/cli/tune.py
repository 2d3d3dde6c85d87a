"""`reddiff-jax tune`: parses the arguments and calls :func:`reddiff_jax.tune.tune`."""

from __future__ import annotations

import argparse
from typing import Any

import jax

from reddiff_jax.cli.restore import parse_params
from reddiff_jax.solvers import registry

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from reddiff_jax.tune import tune

    learn = [t.strip() for t in args.learn.split(",") if t.strip()]
    rec = tune(
        jax.random.key(args.seed),
        task=args.task,
        algo=args.algo,
        learn=learn,
        n=args.n,
        steps=args.steps,
        iters=args.iters,
        batch=args.batch,
        learning_rate=args.learning_rate,
        ssim_weight=args.ssim_weight,
        sigma_y=args.sigma_y,
        model=args.model,
        params=parse_params(args.param or []),
        remat=not args.no_remat,
        out=args.out,
        progress=not args.no_progress,
    )
    losses = [h["loss"] for h in rec["history"] if h["loss"] is not None]
    if losses:
        print(f"validation loss {losses[0]:.5f} (first iteration) -> {losses[-1]:.5f} (last), "
              f"{len(rec['history'])} iterations in {rec['seconds']:.1f} s")  # fmt: skip
    for k, v in rec["params"].items():
        shown = ", ".join(f"{a:.3g}" for a in v) if isinstance(v, list) else f"{v:.4g}"
        print(f"  {k}: {shown}")
    print(f"written: {args.out}; use it with `reddiff-jax restore --tuned {args.out} ...` "
          f"(num_steps {rec['num_steps']})")  # fmt: skip
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``reddiff-jax tune`` to the CLI's subparsers (sets ``func``)."""
    p = subparsers.add_parser(
        "tune",
        help="learn lam / lr / a per-step weight schedule by gradient descent on validation digits",
        description=(
            "Differentiates the validation MSE (optionally + SSIM) through the whole solve "
            "(jax.grad through the scan, jax.checkpoint on each step) and takes Adam steps on "
            "the chosen settings; writes them to --out (JSON), which `restore --tuned` and "
            "`eval --tuned` read."
        ),
        epilog="example: reddiff-jax tune --task sr:4 --learn schedule --steps 25 --n 64 "
        "--iters 40 --out outputs/tuned_sr4.json",
    )
    p.add_argument("--task", default="sr:4", help="operator spec (default sr:4)")
    p.add_argument("--algo", default="reddiff", choices=registry.conditional_names())
    p.add_argument(
        "--learn",
        default="lam,lr",
        help="comma-separated: lam, lr (any traced setting) and/or schedule",
    )
    p.add_argument("--n", type=int, default=32, help="validation digits (default 32, max 200)")
    p.add_argument("--batch", type=int, default=8, help="digits per iteration (default 8)")
    p.add_argument("--iters", type=int, default=50, help="Adam iterations (default 50)")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=0.05,
        help="Adam step on the softplus-raw settings (default 0.05)",
    )
    p.add_argument("--ssim-weight", type=float, default=0.0, help="adds w * (1 - SSIM)")
    p.add_argument("--out", required=True, help="the JSON file of the learned setting")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 100)")
    p.add_argument("--sigma-y", type=float, default=0.0, help="noise: y = A(x) + 2 sigma_y n")
    p.add_argument("--model", default=None, help="checkpoint folder (default: mnist32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="a starting / fixed setting (repeatable)",
    )
    p.add_argument(
        "--no-remat",
        action="store_true",
        help="store every step's activations instead of recomputing them",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run)
    return p
