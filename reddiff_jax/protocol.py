"""The comparison protocol of the embedded prior: every algorithm tuned, then scored, alike.

:data:`PROTOCOL` fixes six tasks (box inpainting, random inpainting with 80% of the pixels
missing, x4 super-resolution, Gaussian deblurring at sigma_y = 0.05, phase retrieval, HDR), the
conditional algorithms, one budget of network evaluations per image (``nfe``: 100 steps of one
forward pass each) and a grid of settings per algorithm. :func:`run` then

1. tunes every applicable (task, algorithm) pair on the validation split: a grid sweep
   (:func:`reddiff_jax.sweep.sweep`) over the first ``n_tune`` validation digits picks the cell
   with the best mean ``metric``; the choices are written to ``out/tuned.json`` and a table of
   them (:func:`tuning_markdown`) to ``out/tuning.md``;
2. scores the tuned settings on the first ``n_test`` digits of the test split, which no sweep
   ever sees (:func:`reddiff_jax.evaluate.evaluate`, into ``out/test``: PSNR, SSIM, LPIPS where
   installed and digit-classifier accuracy, with 95% bootstrap intervals, seconds and NFE per
   image, and the figure).

Every step resumes: finished sweep cells and finished (task, algorithm) pairs are kept in ``out``
and reused by a rerun with the same settings. The same key gives the same table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from reddiff_jax import evaluate as evaluate_lib
from reddiff_jax import imageio, operators
from reddiff_jax import sweep as sweep_lib
from reddiff_jax.model import resolve_model
from reddiff_jax.solvers import registry

__all__ = ["PROTOCOL", "Protocol", "run", "tune_all", "tuning_markdown"]

_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "reddiff": {"lam": (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
                "lr": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)},
    "dps": {"zeta": (0.1, 0.3, 1.0, 3.0, 10.0), "eta": (0.0, 1.0)},
    "pgdm": {"w": (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), "eta": (0.0, 1.0)},
    "ddrm": {"eta": (0.5, 0.85, 1.0), "eta_b": (0.5, 1.0)},
    "diffpir": {"lam": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0), "zeta": (0.1, 0.3, 1.0)},
}  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class Protocol:
    """What is compared, and how it is tuned.

    Attributes:
      tasks: (operator spec, sigma_y) pairs; ``y = A(x) + 2 sigma_y n``.
      algos: the algorithms (each runs on the tasks it applies to).
      nfe: network evaluations per image: every algorithm runs ``nfe`` steps of one forward pass
        (DPS and PiGDM back-propagate through it as well).
      grids: algo -> {setting: values}; the sweep's cells are their cartesian product.
      n_tune: validation digits per sweep cell (at most 200).
      n_test: test digits scored (at most 800).
      metric: what the sweep maximises (``"psnr"``, ``"ssim"``, ``"accuracy"``) or minimises
        (``"lpips"``).
      task_metrics: task spec -> the metric for that task instead (default: box inpainting by
        digit accuracy: the box hides most of the digit, so PSNR rewards a grey fill).
    """

    tasks: tuple[tuple[str, float], ...] = (
        ("inpaint:box", 0.0),
        ("inpaint:random:0.8", 0.0),
        ("sr:4", 0.0),
        ("blur:gaussian", 0.05),
        ("phase_retrieval", 0.0),
        ("hdr", 0.0),
    )
    algos: tuple[str, ...] = ("reddiff", "dps", "pgdm", "ddrm", "diffpir")
    nfe: int = 100
    grids: Mapping[str, Mapping[str, tuple[float, ...]]] = dataclasses.field(
        default_factory=lambda: _GRIDS
    )
    n_tune: int = 32
    n_test: int = 800
    metric: str = "psnr"
    task_metrics: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"inpaint:box": "accuracy"}
    )

    def __post_init__(self) -> None:
        for algo in self.algos:
            registry.get(algo)
            if algo not in self.grids:
                raise ValueError(f"grids: no grid for the algorithm {algo!r}")
        for spec, sigma in self.tasks:
            operators.parse_spec(spec)
            if not 0.0 <= sigma < float("inf"):
                raise ValueError(f"tasks: sigma_y of {spec!r} must be >= 0, got {sigma!r}")
        for name in ("nfe", "n_tune", "n_test"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for m in (self.metric, *self.task_metrics.values()):
            if m not in sweep_lib.METRICS:
                raise ValueError(f"metric: expected one of {tuple(sweep_lib.METRICS)}, got {m!r}")


PROTOCOL = Protocol()
"""The protocol of the README's comparison table."""


def _pairs(protocol: Protocol, image_shape: tuple[int, int, int]) -> list[tuple[str, float, str]]:
    """The applicable (task, sigma_y, algo) triples, in table order."""
    out = []
    for spec, sigma in protocol.tasks:
        op = operators.make_from_spec(spec, image_shape, key=jax.random.key(0))
        out += [(spec, sigma, a) for a in protocol.algos if registry.applicable(a, op) is None]
    return out


def tune_all(
    key: jax.Array,
    *,
    protocol: Protocol = PROTOCOL,
    out: str | os.PathLike,
    model: Any = None,
    lpips: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Sweeps every applicable (task, algorithm) pair on the validation split.

    Writes ``out/sweeps/<task>__<algo>/`` (see :func:`reddiff_jax.sweep.sweep`) and
    ``out/tuned.json``; returns its content, ``{"algo@task": {setting: value}}`` (the ``params``
    argument of :func:`reddiff_jax.evaluate.evaluate`; a full task spec, so
    ``inpaint:box`` and ``inpaint:random:0.8`` are tuned apart).
    """
    model, _ = resolve_model(model)
    image_shape = (model.config.image_size, model.config.image_size, model.config.in_channels)
    out = Path(out)
    tuned: dict[str, dict[str, float]] = {}
    for spec, sigma, algo in _pairs(protocol, image_shape):
        summary = sweep_lib.sweep(
            key,
            grid={k: list(v) for k, v in protocol.grids[algo].items()},
            out=_sweep_dir(out, spec, algo),
            task=spec,
            algo=algo,
            n=protocol.n_tune,
            steps=protocol.nfe,
            sigma_y=sigma,
            model=model,
            metric=protocol.task_metrics.get(spec, protocol.metric),
            lpips=lpips,
            progress=progress,
        )
        if summary["best"] is None:
            raise RuntimeError(f"tune: every cell of {algo} on {spec} diverged")
        tuned[f"{algo}@{spec}"] = dict(summary["best"]["params"])
    imageio.atomic_write_bytes(out / "tuning.md", tuning_markdown(out, protocol=protocol).encode())
    imageio.atomic_write_json(out / "tuned.json", tuned, sort_keys=True)
    return tuned


def _sweep_dir(out: Path, spec: str, algo: str) -> Path:
    return out / "sweeps" / f"{imageio.unique_names([spec])[0]}__{algo}"


def _fmt(value: float | None, metric: str) -> str:
    return "–" if value is None else f"{value:.3f}" if metric != "psnr" else f"{value:.2f}"


def tuning_markdown(out: str | os.PathLike, *, protocol: Protocol = PROTOCOL) -> str:
    """The tuning stage as a markdown table: per (task, algorithm) sweep found in ``out``, the
    best cell's settings and its mean PSNR, SSIM and digit accuracy on the validation digits,
    beside the worst cell's value of the metric tuned (how much the settings matter).

    Reads ``out/sweeps/*/sweep.json``; pairs whose sweep has not finished are left out, so the
    table of a partial run is the finished part.
    """
    out = Path(out)
    lines = [
        "| task | σ_y | method | tuned by | best settings | PSNR | SSIM | accuracy "
        "| worst cell | cells | sweep s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_images = set()
    for spec, sigma in protocol.tasks:
        for algo in protocol.algos:
            path = _sweep_dir(out, spec, algo) / "sweep.json"
            if not path.is_file():
                continue
            summary = json.loads(path.read_text())
            best, metric = summary["best"], summary["metric"]
            if best is None:
                continue
            n_images.add(len(summary["images"]))
            cell = next(c for c in summary["cells"] if c["params"] == best["params"])
            values = [c[metric]["mean"] for c in summary["cells"] if metric in c]
            worst = (min if sweep_lib.METRICS[metric] == "max" else max)(values)
            settings = ", ".join(f"{k} {v:g}" for k, v in best["params"].items())
            scores = [_fmt(cell.get(m, {}).get("mean"), m) for m in ("psnr", "ssim", "accuracy")]
            scores.append(_fmt(worst, metric))
            timing = summary["timing"]
            seconds = f"{timing.get('seconds_all_runs', timing['seconds']):.0f}"
            row = [spec, f"{sigma:g}", algo, metric, settings, *scores]
            row += [str(len(summary["cells"])), seconds]
            lines.append("| " + " | ".join(row) + " |")
    digits = "/".join(str(n) for n in sorted(n_images)) or "no"
    head = (
        f"Tuning on {digits} validation digits at {protocol.nfe} NFE per image: each sweep's "
        "best cell (mean over the digits) and the worst cell's value of the metric tuned."
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def run(
    key: jax.Array,
    *,
    protocol: Protocol = PROTOCOL,
    out: str | os.PathLike,
    model: Any = None,
    tuned: Mapping[str, Mapping[str, float]] | None = None,
    batch: int = 25,
    lpips: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Tunes (unless ``tuned`` is given), then scores on the test split; returns eval.json."""
    if tuned is None:
        tuned = tune_all(key, protocol=protocol, out=out, model=model, progress=progress)
    algos = list(protocol.algos)
    steps = {a: protocol.nfe for a in algos}
    return evaluate_lib.evaluate(
        key,
        out=Path(out) / "test",
        tasks=[spec for spec, _ in protocol.tasks],
        algos=algos,
        n=protocol.n_test,
        steps=steps,
        sigma_y=dict(protocol.tasks),
        model=model,
        batch=batch,
        params={k: dict(v) for k, v in tuned.items()},
        lpips=lpips,
        progress=progress,
    )
