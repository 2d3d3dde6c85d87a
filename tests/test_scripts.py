"""scripts/gpu_train_prior.py at a tiny size on the CPU: every stage runs and its outputs land.

The script is meant for one short call on a GPU; here it trains 2 steps from the shipped prior
on the held-out digits (data/mnist32.npz is not committed; the probe is skipped, its step count
arithmetic tested alone) and judges 4 samples with each sampler.
"""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRIOR = ROOT / "checkpoints" / "mnist32"


def _load():
    spec = importlib.util.spec_from_file_location(
        "gpu_train_prior", ROOT / "scripts" / "gpu_train_prior.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_steps_fit_the_budget():
    script = _load()
    # 500 steps in 20 s (start-up included) -> 25 steps/s -> 7,500 in 300 s
    assert script.steps_for(300, 500, 20.0, 200_000) == 7_500
    assert script.steps_for(300, 500, 0.1, 200_000) == 200_000  # capped
    assert script.steps_for(1, 500, 20.0, 200_000) == 500  # never fewer than the probe ran


@pytest.mark.skipif(not (PRIOR / "heldout.npz").is_file(), reason="no embedded held-out digits")
def test_tiny_run_exports_judges_and_packs(tmp_path):
    script = _load()
    out = tmp_path / "out"
    record = script.main([
        "--out", str(out), "--steps", "2", "--batch", "8",
        "--data", str(PRIOR / "heldout.npz"), "--samples", "4", "--sample-steps", "2",
        "--quality-num", "4", "--quality-batch", "4", "--eta0-steps", "2", "--eta1-steps", "2",
        "--scratch", str(tmp_path / "scratch"),
    ])  # fmt: skip
    assert record["steps"] == 2 and record["train_s"] > 0
    assert json.loads((out / "gpu_train_prior.json").read_text())["steps"] == 2
    for key in ("eta0", "eta1_2"):
        assert 0 <= record[key]["confident_fraction"] <= 1, record[key]
    with tarfile.open(out / "mnist32.tgz") as tar:
        names = set(tar.getnames())
    for name in ("reddiff_model.json", "README.md", "heldout.npz", "quality.json"):
        assert f"mnist32/{name}" in names, sorted(names)
    card = (out / "mnist32" / "README.md").read_text()
    assert "## Sample quality" in card and "--steps 2 --batch 8" in card
