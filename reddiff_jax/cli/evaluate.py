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
    if args.protocol:
        return _run_protocol(args)
    if args.tune_n is not None or args.tuned_settings is not None:
        raise ValueError("--tune-n and --tuned-settings belong to --protocol")
    params, steps = _parse_algo_params(args.param or []), _parse_steps_arg(args.steps)
    for path in args.tuned or []:  # settings learned by `reddiff-jax tune`, for their task
        from reddiff_jax.tune import load_tuned

        tuned = load_tuned(path)
        params.setdefault(f"{tuned['algo']}@{tuned['task']}", {}).update(tuned["params"])
        steps = {tuned["algo"]: tuned["num_steps"]} if steps is None else steps
    results = evaluate(
        jax.random.key(args.seed),
        out=args.out,
        tasks=_split_list(args.tasks or ",".join(DEFAULT_TASKS)),
        algos=_split_list(args.algos or ",".join(DEFAULT_ALGOS)),
        n=100 if args.n is None else args.n,
        steps=steps,
        sigma_y=0.0 if args.sigma_y is None else args.sigma_y,
        model=args.model,
        inputs=args.inputs,
        batch=args.batch,
        params=params,
        lpips=not args.no_lpips,
        progress=not args.no_progress,
    )
    print(format_markdown(results))
    print(f"written: {Path(args.out) / 'eval.md'}, eval.json and eval.png")
    return 0


def _run_protocol(args: argparse.Namespace) -> int:
    """``--protocol``: tune every pair on the validation split, then score on the test split."""
    import dataclasses
    import json

    from reddiff_jax import protocol

    fixed = {"--tasks": args.tasks, "--algos": args.algos, "--steps": args.steps,
             "--sigma-y": args.sigma_y, "--param": args.param, "--tuned": args.tuned,
             "INPUTS": args.inputs or None}  # fmt: skip
    given = [name for name, value in fixed.items() if value is not None]
    if given:
        raise ValueError(f"--protocol fixes the tasks, algorithms and settings; drop {given}")
    changes = {"n_test": args.n, "n_tune": args.tune_n}
    spec = dataclasses.replace(
        protocol.PROTOCOL, **{k: v for k, v in changes.items() if v is not None}
    )
    tuned = None
    if args.tuned_settings is not None:
        try:
            tuned = json.loads(Path(args.tuned_settings).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            msg = f"--tuned-settings: cannot read {args.tuned_settings}: {err}"
            raise ValueError(msg) from None
    results = protocol.run(
        jax.random.key(args.seed),
        protocol=spec,
        out=args.out,
        model=args.model,
        tuned=tuned,
        batch=args.batch,
        lpips=not args.no_lpips,
        progress=not args.no_progress,
    )
    print(format_markdown(results))
    test = Path(args.out) / "test"
    print(f"written: {Path(args.out) / 'tuned.json'}, {test / 'eval.md'}, eval.json and eval.png")
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
    p.add_argument(
        "--protocol",
        action="store_true",
        help="the README's comparison: six tasks, every algorithm at 100 NFE, each tuned by a "
        "grid sweep on the validation split, scored on the test split (--n, default 800)",
    )
    p.add_argument(
        "--tasks", default=None, help=f"comma-separated specs (default {','.join(DEFAULT_TASKS)})"
    )
    p.add_argument(
        "--algos", default=None, help=f"comma-separated solvers (default {','.join(DEFAULT_ALGOS)})"
    )
    p.add_argument("--n", type=int, default=None, help="number of images (default 100)")
    p.add_argument(
        "--tune-n", type=int, default=None, help="--protocol: validation digits per sweep cell"
    )
    p.add_argument(
        "--tuned-settings",
        default=None,
        metavar="FILE",
        help="--protocol: a tuned.json of an earlier run (skips the sweeps)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--steps", default=None, help="solver steps: INT for all, or ALGO=INT,... (default 100)"
    )
    p.add_argument(
        "--sigma-y", type=float, default=None, help="noise: y = A(x) + 2 sigma_y n (default 0)"
    )
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
