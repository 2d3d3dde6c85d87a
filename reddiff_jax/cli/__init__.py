"""The `reddiff-jax` command line: parses arguments, then calls the library.

This package is the only place that parses arguments. Each subcommand has a module here
(`reddiff_jax.cli.restore`, ...) exposing `register(subparsers)`, which adds its parser and
sets `func(args) -> int`; `func` converts the arguments and calls one library function
(`reddiff_jax.restore.restore`, `reddiff_jax.evaluate.evaluate`, `reddiff_jax.train.train`, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator

# command name -> module exposing `register(subparsers)`
COMMANDS: dict[str, str] = {
    "convert": "reddiff_jax.cli.convert",
    "train": "reddiff_jax.cli.train",
    "restore": "reddiff_jax.cli.restore",
    "eval": "reddiff_jax.cli.evaluate",
    "sweep": "reddiff_jax.cli.sweep",
    "tune": "reddiff_jax.cli.tune",
}


def seed(text: str) -> int:
    """argparse type of ``--seed``: an int in [0, 2**32) (jax keys hold 32 bits of a seed, so a
    larger or negative one would silently repeat another seed's draws, or overflow)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**32), got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**32), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Builds the top-level parser with one subparser per available command."""
    parser = argparse.ArgumentParser(
        prog="reddiff-jax", description="RED-Diff image restoration with diffusion priors in JAX."
    )
    from reddiff_jax import __version__

    parser.add_argument("--version", action="version", version=f"reddiff-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's pre-emption) stops a command as Ctrl-C does, so its
    finished outputs are kept (``train`` checkpoints its last step). A nohup'd background job
    ignores SIGINT; SIGTERM is how it is stopped. The previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    from reddiff_jax import sharding

    sharding.use_cpu_cores()  # one CPU device per core, before any JAX work (no-op on GPU/TPU)
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_interrupts():
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"reddiff-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"reddiff-jax {args.command}: interrupted; finished outputs are kept.", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
