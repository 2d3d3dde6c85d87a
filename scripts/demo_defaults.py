"""Does the main job's default improve on its start? ``restore --demo`` on each protocol task.

For each task of :data:`reddiff_jax.protocol.PROTOCOL` (with its sigma_y), runs the main job
(:func:`reddiff_jax.restore.restore`, RED-Diff, its defaults: the embedded prior's tuned
settings) on the first ``--n`` held-out digits and prints the pseudo-inverse start's and the
restoration's mean PSNR and digit accuracy, and whether each improved. Outputs go to
``--out/<task>/``. Usage::

    python scripts/demo_defaults.py [--n 64] [--out outputs/demo_defaults] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from reddiff_jax import sharding

if __name__ == "__main__":  # before any JAX work: one CPU device per core, as the CLI does
    sharding.use_cpu_cores()

from reddiff_jax import imageio, protocol  # noqa: E402
from reddiff_jax import restore as restore_lib  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/demo_defaults"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = []
    print(f"{'task':20} {'sigma_y':>7} {'settings':>22} {'PSNR pinv':>9} {'PSNR':>6} "
          f"{'acc pinv':>8} {'acc':>5}")  # fmt: skip
    for task, sigma in protocol.PROTOCOL.tasks:
        res = restore_lib.restore(
            jax.random.key(args.seed), out=args.out / imageio.unique_names([task])[0],
            task=task, sigma_y=sigma, demo=True, n=args.n, overwrite=True, progress=False,
        )  # fmt: skip
        m = res.metrics
        run = json.loads((res.out / "run.json").read_text())
        acc = m["accuracy"]
        row = {"task": task, "sigma_y": sigma, "settings": run["tuned_defaults"],
               "psnr_pinv": m["pinv"]["psnr"]["mean"], "psnr": m["restored"]["psnr"]["mean"],
               "acc_pinv": acc["pinv"]["mean"], "acc": acc["restored"]["mean"]}  # fmt: skip
        rows.append(row)
        shown = ", ".join(f"{k} {v:g}" for k, v in (row["settings"] or {}).items()) or "official"
        print(f"{task:20} {sigma:7.2f} {shown:>22} {row['psnr_pinv']:9.2f} {row['psnr']:6.2f} "
              f"{row['acc_pinv']:8.2f} {row['acc']:5.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
