"""`reddiff-jax eval`: parses the arguments and calls :func:`reddiff_jax.evaluate.evaluate`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from reddiff_jax.cli import seed
from reddiff_jax.evaluate import DEFAULT_ALGOS, DEFAULT_TASKS, evaluate, format_markdown

__all__ = ["register"]


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_steps_arg(text: str | None) -> int | dict[str, int] | None:
    if text is None:
        return None
    if "=" not in text:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--steps: expected an int or ALGO=INT,..., got {text!r}") from None
    out = {}
    for item in _split_list(text):
        algo, _, value = item.partition("=")
        try:
            out[algo.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--steps: expected ALGO=INT, got {item!r}") from None
    return out


def _parse_algo_params(items: Sequence[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        lhs, eq, value = item.partition("=")
        algo, dot, name = lhs.rpartition(".")
        if not eq or not dot:
            raise ValueError(f"--param: expected ALGO[@TASK].KEY=VALUE, got {item!r}")
        out.setdefault(algo.strip(), {})[name.strip().replace("-", "_")] = value.strip()
    return out


def _run(args: argparse.Namespace) -> int:
    params, steps = _parse_algo_params(args.param or []), _parse_steps_arg(args.steps)
    for path in args.tuned or []:  # settings learned by `reddiff-jax tune`, for their task
        from reddiff_jax.tune import load_tuned

        tuned = load_tuned(path)
        params.setdefault(f"{tuned['algo']}@{tuned['task']}", {}).update(tuned["params"])
        steps = {tuned["algo"]: tuned["num_steps"]} if steps is None else steps
    results = evaluate(
        jax.random.key(args.seed),
        out=args.out,
        tasks=_split_list(args.tasks),
        algos=_split_list(args.algos),
        n=args.n,
        steps=steps,
        sigma_y=args.sigma_y,
        model=args.model,
        inputs=args.inputs,
        batch=args.batch,
        params=params,
        lpips=not args.no_lpips,
        progress=not args.no_progress,
    )
    print(format_markdown(results))
    print(f"written: {Path(args.out) / 'eval.md'} and eval.json")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``reddiff-jax eval`` to the CLI's subparsers (sets ``func``)."""
    p = subparsers.add_parser(
        "eval",
        help="table of PSNR/SSIM/LPIPS, time and NFE per algorithm and task",
        description=(
            "Restores the first --n held-out digits (or INPUTS) for every task and algorithm and "
            "writes eval.md and eval.json into --out; a rerun reuses finished pairs."
        ),
    )
    p.add_argument("inputs", nargs="*", help="image files or folders (default: held-out digits)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated specs")
    p.add_argument("--algos", default=",".join(DEFAULT_ALGOS), help="comma-separated solvers")
    p.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--steps", default=None, help="solver steps: INT for all, or ALGO=INT,... (default 100)"
    )
    p.add_argument("--sigma-y", type=float, default=0.0, help="noise: y = A(x) + 2 sigma_y n")
    p.add_argument("--model", default=None, help="checkpoint folder (default: mnist32)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    p.add_argument("--batch", type=int, default=25, help="images per solver call (default 25)")
    p.add_argument(
        "--param",
        action="append",
        metavar="ALGO[@TASK].KEY=VALUE",
        help="a solver setting, for all tasks or one (reddiff@blur.lam=0.05); repeatable",
    )
    p.add_argument(
        "--tuned",
        action="append",
        metavar="FILE",
        help="settings written by `reddiff-jax tune`, for its algo@task (repeatable)",
    )
    p.add_argument("--no-lpips", action="store_true", help="leave LPIPS out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_run)
    return p
