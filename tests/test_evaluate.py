"""`reddiff-jax eval` on a tiny random UNet: the table's structure, skips, reruns, the CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from reddiff_jax import cli, metrics, pipeline
from reddiff_jax import evaluate as E
from reddiff_jax.cli import evaluate as CE
from reddiff_jax.model import save_pretrained

TASKS = ("inpaint:box", "phase_retrieval")
ALGOS = ("reddiff", "ddrm")


def _evaluate(model, out, **kw):
    kw = {"tasks": TASKS, "algos": ALGOS, "n": 3, "steps": 2, "batch": 2, "progress": False, **kw}
    return E.evaluate(jax.random.key(3), out=out, model=model, **kw)


def test_eval_table_skips_reruns_and_reproduces(tiny_model, tmp_path, monkeypatch):
    res = _evaluate(tiny_model, tmp_path / "a")
    assert set(res["tasks"]) == set(TASKS)
    box, pr = res["tasks"]["inpaint:box"], res["tasks"]["phase_retrieval"]
    assert set(box["algos"]) == {"reddiff", "ddrm"} and box["skipped"] == {}
    assert set(pr["algos"]) == {"reddiff"} and "SVD" in pr["skipped"]["ddrm"]
    keys = {"psnr", "ssim", "accuracy"} | ({"lpips"} if metrics.lpips_available() else set())
    for row in (box["pinv"], box["algos"]["reddiff"], box["algos"]["ddrm"]):
        assert keys <= set(row)
        assert row["psnr"]["mean"] is not None and -1 <= row["ssim"]["mean"] <= 1
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0
        for m in keys:  # the 95% bootstrap interval holds the mean
            lo, hi = row[m]["ci95"]
            assert lo <= row[m]["mean"] <= hi
    row = box["algos"]["reddiff"]
    assert row["nfe"] == 2 and row["backprop_through_network"] is False
    assert row["seconds_per_image"] > 0 and row["config"]["lr"] == 0.5
    assert json.loads((tmp_path / "a" / "eval.json").read_text()) == res
    md = (tmp_path / "a" / "eval.md").read_text()
    assert "| task | σ_y | method | PSNR ↑ | SSIM ↑ |" in md and "digit acc. % ↑" in md
    assert "| inpaint:box | 0.00 | reddiff |" in md
    assert "| phase_retrieval | 0.00 | pinv (A⁺y, start) |" in md
    # the figure: 2 task rows x (truth, A⁺y, reddiff, ddrm) columns of 96-px tiles
    with Image.open(tmp_path / "a" / "eval.png") as im:
        assert im.size[1] == 14 + 2 * (96 + 4) + 4 and im.size[0] > 4 * (96 + 4)
    assert "- ddrm on phase_retrieval: not applicable" in md

    # a rerun reuses the finished pairs without solving
    def no_solve(*args, **kw):
        raise AssertionError("finished pairs must not be solved again")

    monkeypatch.setattr(pipeline.solvers, "solve", no_solve)
    again = _evaluate(tiny_model, tmp_path / "a")
    assert again["tasks"] == res["tasks"]
    monkeypatch.undo()

    # the same key into a new folder gives the same metrics (timings aside)
    fresh = _evaluate(tiny_model, tmp_path / "b", tasks=("inpaint:box",), algos=("reddiff",))
    got, want = fresh["tasks"]["inpaint:box"], res["tasks"]["inpaint:box"]
    for m in keys:
        assert got["algos"]["reddiff"][m] == want["algos"]["reddiff"][m]
        assert got["pinv"][m] == want["pinv"][m]


def test_a_task_with_a_dot_keeps_one_result_per_algorithm(tiny_model, tmp_path, monkeypatch):
    """inpaint:random:0.5 has a dot in its name: each pair keeps its own files, and resumes."""
    task = "inpaint:random:0.5"
    res = _evaluate(tiny_model, tmp_path, tasks=(task,), n=2)
    names = sorted(p.name for p in (tmp_path / "results").iterdir())
    want = [f"inpaint_random_0.5__{a}.{e}" for a in ("ddrm", "reddiff") for e in ("json", "npz")]
    assert names == want
    monkeypatch.setattr(pipeline.solvers, "solve", lambda *a, **k: pytest.fail("solved again"))
    assert _evaluate(tiny_model, tmp_path, tasks=(task,), n=2)["tasks"] == res["tasks"]


def test_eval_argument_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="algo: expected one of"):
        _evaluate(tiny_model, tmp_path, algos=("magic",))
    with pytest.raises(ValueError, match="steps: entries"):
        _evaluate(tiny_model, tmp_path, steps={"dps": 3})
    with pytest.raises(ValueError, match="n: expected"):
        _evaluate(tiny_model, tmp_path, n=0)
    assert CE._parse_steps_arg("reddiff=5,dps=3") == {"reddiff": 5, "dps": 3}
    assert CE._parse_steps_arg("7") == 7
    with pytest.raises(ValueError, match="--steps"):
        CE._parse_steps_arg("many")
    assert CE._parse_algo_params(["reddiff.lr=0.3", "dps.zeta=1"]) == {
        "reddiff": {"lr": "0.3"},
        "dps": {"zeta": "1"},
    }
    with pytest.raises(ValueError, match=r"ALGO\[@TASK\].KEY=VALUE"):
        CE._parse_algo_params(["lr=0.3"])
    # per-task settings: the operator name or the full spec after "@"
    params = CE._parse_algo_params(
        ["reddiff.lr=0.3", "reddiff@blur.lam=0.05", "reddiff@blur:gaussian:9:2.0.lr=0.2"]
    )
    assert params["reddiff@blur:gaussian:9:2.0"] == {"lr": "0.2"}
    assert E._overrides(params, "reddiff", "blur:gaussian") == {"lr": "0.3", "lam": "0.05"}
    assert E._overrides(params, "reddiff", "blur:gaussian:9:2.0") == {"lr": "0.2", "lam": "0.05"}
    assert E._overrides(params, "reddiff", "sr:4") == {"lr": "0.3"}
    with pytest.raises(ValueError, match="params: entries"):
        _evaluate(tiny_model, tmp_path, params={"dps@sr": {"zeta": 1.0}})


def test_cli_eval(tiny_model, tmp_path, capsys):
    path = save_pretrained(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "cli"
    argv = ["eval", "--tasks", "inpaint:box", "--algos", "reddiff", "--n", "2", "--steps", "2"]
    argv += ["--batch", "2", "--model", str(path), "--out", str(out), "--no-progress"]
    assert cli.main(argv + ["--no-lpips"]) == 0
    assert "| inpaint:box | 0.00 | reddiff |" in capsys.readouterr().out
    assert (out / "eval.md").is_file()
    assert json.loads((out / "eval.json").read_text())["settings"]["lpips"] is False
    assert cli.main(argv + ["--algos", "nothing"]) == 2
    assert "algo: expected one of" in capsys.readouterr().err


def test_bootstrap_interval_matches_the_normal_approximation():
    """For n = 400 draws the percentile interval of the mean is mean ± 1.96 s / sqrt(n) to
    within 10% of its half-width; the same key gives the same interval."""
    v = np.asarray(jax.random.normal(jax.random.key(0), (400,)), np.float64) * 3.0 + 5.0
    lo, hi = E.bootstrap_ci(v, jax.random.key(1))
    half = 1.96 * v.std() / np.sqrt(v.size)
    assert abs((hi - lo) / 2 - half) < 0.1 * half
    assert abs((hi + lo) / 2 - v.mean()) < 0.1 * half
    assert E.bootstrap_ci(v, jax.random.key(1)) == [lo, hi]
    assert E.bootstrap_ci([np.nan, np.inf], jax.random.key(1)) is None
    assert E.bootstrap_ci([2.0], jax.random.key(1)) == [2.0, 2.0]


def test_per_task_noise_and_its_errors(tiny_model, tmp_path):
    res = _evaluate(tiny_model, tmp_path, tasks=("sr:4", "inpaint:box"), algos=("ddrm",),
                    sigma_y={"sr:4": 0.05})  # fmt: skip
    assert res["tasks"]["sr:4"]["sigma_y"] == 0.05 and res["tasks"]["inpaint:box"]["sigma_y"] == 0
    assert res["tasks"]["sr:4"]["algos"]["ddrm"]["config"]["sigma_y"] == 0.05
    with pytest.raises(ValueError, match="sigma_y: entries"):
        _evaluate(tiny_model, tmp_path, sigma_y={"blur:gaussian": 0.1})
    with pytest.raises(ValueError, match="sigma_y: expected a finite number"):
        _evaluate(tiny_model, tmp_path, sigma_y=-1.0)
    with pytest.raises(ValueError, match="figure_index"):
        _evaluate(tiny_model, tmp_path, figure_index=3)
