"""Sample quality of a digit prior, judged by the embedded digit classifier.

Draws ``--num`` unconditional DDIM samples of the prior (``reddiff_jax.train.sample``: ``--steps``
50 and ``--eta`` 0 by default, x̂0 clipped to [-1, 1], in batches from one key), then reports with
``reddiff_jax.sample_quality.sample_quality``: the fraction the classifier labels with
confidence >= 0.9, the fraction per class, and the Fréchet distance and KID on the classifier's
penultimate features against the 1,000 held-out digits, beside the same distances of the
first ``--num`` training digits (the floor).

Writes ``--out`` (JSON, default ``quality.json`` in the model folder) and ``samples_quality.png``
next to it (the first 100 samples), and replaces the "## Sample quality" section of the model
card ``--card`` (appended when absent). A stochastic sampler (``--eta`` > 0) gets its own names
(``quality_eta1_250.json``, ``samples_eta1_250.png``, "## Sample quality, eta = 1, 250 steps").

Usage: python scripts/prior_quality.py [--model checkpoints/mnist32] [--num 1000] [--seed 0]
    [--steps 50] [--eta 0]
Needs data/mnist32.npz (python scripts/fetch_mnist.py) for the floor.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jax

from reddiff_jax import sharding

if __name__ == "__main__":  # before any JAX work: one CPU device per core, as the CLI does
    sharding.use_cpu_cores()

import numpy as np  # noqa: E402

from reddiff_jax import assets, imageio, train  # noqa: E402
from reddiff_jax.model import load_pretrained, read_metadata  # noqa: E402
from reddiff_jax.sample_quality import sample_quality  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Sample quality"


def draw(key: jax.Array, model, num: int, batch: int, steps: int, eta: float) -> np.ndarray:
    """uint8 [num, H, W, C] samples; batch j draws from fold_in(key, j)."""
    parts = []
    devices = jax.local_device_count()
    mesh = sharding.data_mesh(devices) if devices > 1 and batch % devices == 0 else None
    for j in range(-(-num // batch)):
        k = jax.random.fold_in(key, j)
        x = train.sample(k, model, num=batch, num_steps=steps, eta=eta, mesh=mesh)
        parts.append(imageio.to_uint8(x))
    return np.concatenate(parts)[:num]


def names(eta: float, steps: int) -> tuple[str, str, str]:
    """The card section, JSON and PNG names of a run: the plain ones for the deterministic
    sampler, suffixed with the sampler for a stochastic one (both can stand in one card)."""
    if eta == 0:
        return SECTION, "quality.json", "samples_quality.png"
    tag = f"eta{eta:g}_{steps}"
    return f"{SECTION}, eta = {eta:g}, {steps} steps", f"quality_{tag}.json", f"samples_{tag}.png"


def card_section(q: dict, num: int, steps: int, eta: float, seed: int, seconds: float) -> str:
    hist = ", ".join(f"{d}: {100 * f:.1f}%" for d, f in enumerate(q["class_histogram"]))
    section, _, png = names(eta, steps)
    flags = "" if eta == 0 else f" --eta {eta:g} --steps {steps}"
    return "\n".join(
        [
            section,
            "",
            f"{num} unconditional DDIM samples ({steps} steps, eta = {eta:g}, x̂0 clipped; seed "
            f"{seed}; `python scripts/prior_quality.py{flags}`, {seconds / 60:.1f} min), judged by "
            "the embedded digit classifier (`checkpoints/mnist32_classifier`):",
            "",
            f"- labelled with confidence >= 0.9: **{100 * q['confident_fraction']:.1f}%**",
            f"- fraction per class: {hist}",
            f"- Fréchet distance (classifier features) to the 1,000 held-out digits: "
            f"**{q['fd']:.2f}**; floor (as many training digits): {q['floor_fd']:.2f}",
            f"- KID (unbiased MMD², cubic kernel, same features; subsets of "
            f"{min(q['num_samples'], 1000)}): {q['kid']:.2f}; floor {q['floor_kid']:.2f}",
            "",
            f"`{png}`: the first 100 of these samples.",
            "",
        ]
    )


def replace_section(card: str, section: str) -> str:
    """`card` with the section headed like `section` replaced by it (appended when absent)."""
    heading = section.split("\n", 1)[0]
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(card):
        return pattern.sub(lambda _: section + "\n", card, count=1)
    return card.rstrip("\n") + "\n\n" + section


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "mnist32"))
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (1: DDPM-like ancestral)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-data", default=str(ROOT / "data" / "mnist32.npz"))
    p.add_argument("--heldout", default=None, help="held-out digits (default MODEL/heldout.npz)")
    p.add_argument("--out", default=None, help="JSON (default MODEL/quality.json)")
    p.add_argument("--card", default=None, help="model card (default MODEL/README.md)")
    args = p.parse_args()
    model_dir = Path(args.model)
    model = load_pretrained(model_dir)
    start = time.perf_counter()
    samples = draw(jax.random.key(args.seed), model, args.num, args.batch, args.steps, args.eta)
    seconds = time.perf_counter() - start
    heldout = Path(args.heldout) if args.heldout else model_dir / "heldout.npz"
    if not heldout.exists() and not args.heldout:  # a fresh export: the embedded digits
        heldout = assets.default_heldout_path()
    with np.load(heldout) as d:
        reference = np.asarray(d["images"])
    with np.load(args.train_data) as d:  # as many training digits as samples: the same FD bias
        floor = np.asarray(d["images"])[: args.num]
    q = sample_quality(jax.random.key(args.seed + 1), samples, reference, floor_u8=floor)
    q = {**q, "num_samples": args.num, "ddim_steps": args.steps, "ddim_eta": args.eta,
         "seed": args.seed,
         "sampling_seconds": round(seconds, 1),
         "prior_steps": read_metadata(model_dir).get("metadata", {}).get("steps")}  # fmt: skip
    _, json_name, png = names(args.eta, args.steps)
    out = Path(args.out) if args.out else model_dir / json_name
    out.parent.mkdir(parents=True, exist_ok=True)
    imageio.atomic_write_json(out, q)
    imageio.save_png(out.parent / png, train._tile(samples[:100] / 127.5 - 1))
    card = Path(args.card) if args.card else model_dir / "README.md"
    text = card_section(q, args.num, args.steps, args.eta, args.seed, seconds)
    card.write_text(replace_section(card.read_text(), text))
    print(json.dumps(q, indent=1))


if __name__ == "__main__":
    main()
