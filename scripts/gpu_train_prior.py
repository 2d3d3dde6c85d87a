"""Train the embedded MNIST prior further on a GPU in one short device call, then judge it.

GPU time is scarce (minutes a session), so one command does it all inside a wall-clock budget:

1. a probe (unless ``--steps`` is given): ``--probe-steps`` training steps at ``--batch`` in a
   scratch workdir, timed with its start-up and compile, gives a conservative rate;
2. the run: as many steps as fit ``--budget-s`` at that rate (at most ``--max-steps``),
   warm-started from ``--init-from`` (default: the shipped prior), the learning rate warmed up
   and then decayed to 0 over the run, exported to ``OUT/mnist32`` with its model card
   (``scripts/mnist32_card_notes.md`` appended) and the held-out digits;
3. the export's sample quality (``scripts/prior_quality.py``: eta 0 at 50 DDIM steps, and
   eta 1 at ``--eta1-steps``, 250), written into its folder and card, and the whole folder
   packed into ``OUT/mnist32.tgz``, the one file to bring back (``tar xzf mnist32.tgz -C
   checkpoints`` then replaces the shipped prior; ``tuned.json`` stays as it was).

``OUT/gpu_train_prior.json`` records the probe, the chosen steps and each stage's seconds.
On the device machine (jax, flax, optax and orbax are there; dm-pix is not, so it travels as a
wheel in a git-ignored folder: ``echo /.whl/ >> .git/info/exclude; pip download --no-deps
--only-binary=:all: -d .whl dm-pix``), carrying ``data/mnist32.npz`` and ``.whl``::

    python3 -m pip install -q --no-index --no-deps .whl/*.whl &&
        python3 -m pip install -q --no-deps --no-build-isolation -e . &&
        python3 scripts/gpu_train_prior.py --out "$OUT" --budget-s 300

The same script runs on a CPU at a tiny size (``tests/test_scripts.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRIOR = ROOT / "checkpoints" / "mnist32"
CLI = [
    sys.executable,
    "-c",
    "import sys; from reddiff_jax.cli import main; sys.exit(main(sys.argv[1:]))",
]


def train_command(args: argparse.Namespace, out: Path, workdir: Path, steps: int) -> list[str]:
    """The ``reddiff-jax train`` command line for ``steps`` steps into ``out``."""
    warmup = min(100, steps // 10)
    return [
        *CLI, "train",
        "--data", str(args.data), "--out", str(out), "--config", "tiny-mnist",
        "--workdir", str(workdir), "--steps", str(steps), "--batch", str(args.batch),
        "--lr", str(args.lr), "--warmup", str(warmup), "--decay-steps", str(steps - warmup),
        "--weight-decay", "0.0", "--grad-clip", "1.0", "--ema-decay", str(args.ema_decay),
        "--checkpoint-every", str(max(steps, 1)), "--seed", str(args.seed),
        "--init-from", str(args.init_from), "--samples", str(args.samples),
        "--sample-steps", str(args.sample_steps),
        "--card-notes", str(ROOT / "scripts" / "mnist32_card_notes.md"), "--no-progress",
    ]  # fmt: skip


def timed(cmd: list[str]) -> float:
    """Runs ``cmd`` (output passed through; a failure raises) and returns its seconds."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def steps_for(budget_s: float, probe_steps: int, probe_s: float, max_steps: int) -> int:
    """Steps that fit ``budget_s`` at the probe's rate (its start-up counted as steps)."""
    return max(probe_steps, min(max_steps, int(budget_s * probe_steps / probe_s)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder ($OUT on the device)")
    p.add_argument("--budget-s", type=float, default=300.0, help="seconds for the main run")
    p.add_argument("--probe-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=0, help="train this many steps (0: probe)")
    p.add_argument("--max-steps", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "mnist32.npz")
    p.add_argument("--init-from", type=Path, default=PRIOR)
    p.add_argument("--samples", type=int, default=64, help="images in the card's sample grid")
    p.add_argument("--quality-num", type=int, default=1000, help="samples judged per sampler")
    p.add_argument("--quality-batch", type=int, default=100)
    p.add_argument("--eta0-steps", type=int, default=50, help="DDIM steps of the eta-0 sampler")
    p.add_argument("--eta1-steps", type=int, default=250, help="DDIM steps of the eta-1 sampler")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the card's grid")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/gpu_train_prior"))
    args = p.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"{args.data} is missing: run scripts/fetch_mnist.py and carry it")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.scratch, ignore_errors=True)
    export = args.out / "mnist32"
    record: dict = {"batch": args.batch, "lr": args.lr, "ema_decay": args.ema_decay}

    steps = args.steps
    if not steps:
        probe = args.scratch / "probe"
        record["probe_s"] = timed(train_command(args, probe, probe / "work", args.probe_steps))
        record["probe_steps"] = args.probe_steps
        steps = steps_for(args.budget_s, args.probe_steps, record["probe_s"], args.max_steps)
    record["steps"] = steps
    record["train_s"] = timed(train_command(args, export, args.scratch / "work", steps))
    shutil.copy2(PRIOR / "heldout.npz", export / "heldout.npz")
    quality = [sys.executable, str(ROOT / "scripts" / "prior_quality.py"), "--model", str(export)]
    quality += ["--num", str(args.quality_num), "--batch", str(args.quality_batch)]
    quality += ["--train-data", str(args.data)]
    record["quality_eta0_s"] = timed([*quality, "--steps", str(args.eta0_steps)])
    record["quality_eta1_s"] = timed([*quality, "--eta", "1", "--steps", str(args.eta1_steps)])
    eta1 = f"quality_eta1_{args.eta1_steps}.json"
    for name, key in (("quality.json", "eta0"), (eta1, f"eta1_{args.eta1_steps}")):
        record[key] = json.loads((export / name).read_text())
    with tarfile.open(args.out / "mnist32.tgz", "w:gz") as tar:
        tar.add(export, arcname="mnist32")
    (args.out / "gpu_train_prior.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if not k.startswith("eta")}, indent=1))
    return record


if __name__ == "__main__":
    main()
