"""`reddiff-jax restore` end to end on a tiny random UNet (a few steps; outputs, not quality)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from reddiff_jax import cli, grid, imageio, operators, pipeline
from reddiff_jax import restore as R
from reddiff_jax.model import save_pretrained
from reddiff_jax.solvers import registry

STEPS, BATCH, TASK = 3, 2, "inpaint:box"  # one compiled solve shared by most tests


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    return save_pretrained(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """Five held-out digits written as PNG files."""
    _, images = R.load_heldout(5, image_shape=(32, 32, 1))
    folder = tmp_path_factory.mktemp("digits")
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0]).save(folder / f"digit{i}.png")
    return folder


def _run(model, out, inputs=(), **kw):
    kw = {"task": TASK, "steps": STEPS, "batch": BATCH, "progress": False, **kw}
    return R.restore(jax.random.key(7), inputs=inputs, out=out, model=model, **kw)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or ".write-test" in p.name]


def test_restore_writes_outputs_metrics_and_skips_on_rerun(tiny_model, digits_dir, tmp_path):
    out = tmp_path / "out"
    res = _run(tiny_model, out, [digits_dir])
    names = [f"digit{i}" for i in range(5)]
    assert res.names == names and res.solved == 5 and res.skipped == 0
    for p in res.restored:
        with Image.open(p) as im:
            assert im.size == (32, 32) and im.mode == "L"
    assert (out / "grid.png").is_file() and (out / "run.json").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m == res.metrics and m["images"] == names and m["n_images"] == 5
    for which in ("restored", "pinv"):
        for metric in ("psnr", "ssim"):
            per = m[which][metric]["per_image"]
            assert len(per) == 5 and all(np.isfinite(per))
            np.testing.assert_allclose(m[which][metric]["mean"], np.mean(per), rtol=1e-12)
    # the stored PSNR is that of the written PNG against the input file
    with Image.open(res.restored[0]) as a, Image.open(digits_dir / "digit0.png") as b:
        mse = np.mean(((np.asarray(a, float) - np.asarray(b, float)) / 255.0) ** 2)
    np.testing.assert_allclose(
        m["restored"]["psnr"]["per_image"][0], -10 * np.log10(mse), atol=1e-3
    )
    assert not _temp_files(out)

    mtimes = {p: p.stat().st_mtime_ns for p in res.restored}
    again = _run(tiny_model, out, [digits_dir])
    assert again.solved == 0 and again.skipped == 5
    assert {p: p.stat().st_mtime_ns for p in res.restored} == mtimes
    assert again.metrics == res.metrics

    # other settings into the same folder are refused unless overwrite=True
    with pytest.raises(FileExistsError, match="other settings"):
        _run(tiny_model, out, [digits_dir], sigma_y=0.05)


def test_interrupted_run_leaves_no_partial_file_and_resumes_identically(
    tiny_model, monkeypatch, tmp_path
):
    full = _run(tiny_model, tmp_path / "full", demo=True, n=5)

    calls = {"n": 0}
    real_solve = pipeline.solvers.solve

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_solve(*args, **kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(pipeline.solvers, "solve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, out, demo=True, n=5)
    assert sorted(p.name for p in (out / "restored").iterdir()) == [
        "heldout_0000.png",
        "heldout_0001.png",
    ]
    assert not (out / "metrics.json").exists() and not _temp_files(out)

    # an interruption inside a write: the temporary file is removed, the target never appears
    real_replace = os.replace

    def replace_interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.solvers, "solve", real_solve)
    monkeypatch.setattr(os, "replace", replace_interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, out, demo=True, n=5)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "restored" / "heldout_0002.png").exists() and not _temp_files(out)

    resumed = _run(tiny_model, out, demo=True, n=5)
    assert resumed.solved == 3 and resumed.skipped == 2
    for a, b in zip(full.restored, resumed.restored, strict=True):
        assert a.read_bytes() == b.read_bytes()  # same as the uninterrupted run
    assert resumed.metrics == full.metrics


def test_measured_y_without_truth(tiny_model, tmp_path):
    op = operators.make_from_spec(TASK, (32, 32, 1), key=jax.random.key(0))
    _, truth = R.load_heldout(3, image_shape=(32, 32, 1))
    y = np.array(pipeline.simulate(op, imageio.from_uint8(truth), jax.random.key(1), sigma_y=0.05))
    np.save(tmp_path / "y.npy", y)
    res = _run(tiny_model, tmp_path / "out", y=tmp_path / "y.npy")
    assert res.metrics is None and res.metrics_path is None
    assert res.names == ["y_0000", "y_0001", "y_0002"]
    assert all(p.is_file() for p in res.restored) and res.grid.is_file()

    y[1, 3, 3, 0] = np.nan
    np.save(tmp_path / "bad.npy", y)
    with pytest.raises(ValueError, match="finite"):
        _run(tiny_model, tmp_path / "out2", y=tmp_path / "bad.npy")
    np.save(tmp_path / "shape.npy", y[:, :16])
    with pytest.raises(ValueError, match=r"shape \[N, \*\(32, 32, 1\)\]"):
        _run(tiny_model, tmp_path / "out3", y=tmp_path / "shape.npy")


def test_bad_inputs_give_clear_errors(tiny_model, digits_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown operator 'warp'"):
        _run(tiny_model, tmp_path / "a", [digits_dir], task="warp:2")
    with pytest.raises(ValueError, match="algo: expected one of"):
        _run(tiny_model, tmp_path / "a", [digits_dir], algo="magic")
    with pytest.raises(ValueError, match="no setting 'lambda'"):
        _run(tiny_model, tmp_path / "a", [digits_dir], params={"lambda": 1})
    with pytest.raises(ValueError, match="ddrm cannot solve task 'phase_retrieval'"):
        _run(tiny_model, tmp_path / "a", [digits_dir], algo="ddrm", task="phase_retrieval")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(small)
    with pytest.raises(ValueError, match="28x28 does not match the model's 32x32"):
        _run(tiny_model, tmp_path / "a", [small])
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*broken.png"):
        _run(tiny_model, tmp_path / "a", [broken])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        _run(tiny_model, tmp_path / "a", [tmp_path / "missing.png"])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="out: cannot write"):
        _run(tiny_model, blocker / "out", [digits_dir])
    with pytest.raises(ValueError, match="inputs: expected"):
        _run(tiny_model, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run(str(tmp_path / "nomodel"), tmp_path / "a", [digits_dir])


def test_algo_configs_follow_the_documented_defaults():
    cfg = R.algo_config("reddiff", "sr:4", steps=7)
    assert (cfg.num_steps, cfg.lr, cfg.lam) == (7, 0.1, 0.25)
    assert R.algo_config("reddiff", "inpaint:box").lr == 0.5
    assert R.algo_config("reddiff", "sr4", overrides={"lam": "0.5"}).lam == 0.5  # official name
    assert R.algo_config("dps", "blur:gaussian").eta == 1.0
    assert R.algo_config("pgdm", "inpaint:box").project is True
    assert R.algo_config("ddrm", "sr:4", sigma_y=0.05).sigma_y == 0.05
    for algo in registry.conditional_names():
        for task in ("inpaint:box", "sr:4", "blur:gaussian", "phase_retrieval", "hdr"):
            assert R.algo_config(algo, task).num_steps == R.DEFAULT_STEPS
    with pytest.raises(ValueError, match="expected a float for lr"):
        R.algo_config("reddiff", "sr:4", overrides={"lr": "fast"})


def test_measurement_display_shapes():
    img = (32, 32, 1)
    lowres = np.full((8, 8, 1), 0.5, np.float32)
    np.testing.assert_array_equal(grid.measurement_display(lowres, img), np.full(img, 0.5))
    mag = np.random.default_rng(0).uniform(0, 5, (48, 48, 1)).astype(np.float32)
    shown = grid.measurement_display(mag, img)
    assert shown.shape == img and shown.min() >= -1 and shown.max() <= 1
    assert np.all(grid.measurement_display(np.ones(17, np.float32), img) == 0)


def test_cli_restore(model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["restore", "--demo", "--n", "3", "--model", str(model_dir), "--out", str(out)]
    argv += ["--task", TASK, "--steps", str(STEPS), "--batch", str(BATCH), "--no-progress"]
    assert cli.main(argv + ["--lam", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "restored 3 image(s)" in printed and "digit accuracy" in printed
    # the demo digits have labels: the embedded classifier judges restored and pinv images
    from reddiff_jax.sample_quality import classifier_accuracy

    acc = json.loads((out / "metrics.json").read_text())["accuracy"]
    with np.load(R.default_heldout_path()) as held:
        truth_labels = held["labels"][:3]
    pngs = np.stack([np.asarray(Image.open(out / "restored" / f"heldout_{i:04d}.png"))
                     for i in range(3)])[..., None]  # fmt: skip
    want = classifier_accuracy(pngs, truth_labels).astype(float)
    assert acc["restored"]["per_image"] == want.tolist()
    assert acc["restored"]["mean"] == pytest.approx(want.mean())
    assert len(acc["pinv"]["per_image"]) == 3 and 0 <= acc["pinv"]["mean"] <= 1
    settings = json.loads((out / "run.json").read_text())
    assert settings["config"]["lam"] == 0.3 and settings["algo"] == "reddiff"
    assert len(list((out / "restored").glob("*.png"))) == 3
    assert cli.main(argv + ["--lam", "0.3"]) == 0
    assert "restored 0 image(s), kept 3 finished" in capsys.readouterr().out
    assert cli.main(argv[:-1] + ["--task", "nope"]) == 2
    assert "unknown operator 'nope'" in capsys.readouterr().err
    assert cli.main(argv + ["--param", "lam"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_posterior_samples_and_tuned_settings(model_dir, tmp_path, capsys):
    """``restore --samples S`` writes the posterior mean, samples and std per image; ``--tuned``
    reads a tune file, and a command-line setting overrides it."""
    from reddiff_jax.tune import FORMAT

    out = tmp_path / "post"
    argv = ["restore", "--demo", "--n", "2", "--model", str(model_dir), "--out", str(out)]
    argv += ["--task", TASK, "--steps", str(STEPS), "--batch", str(BATCH), "--no-progress"]
    assert cli.main(argv + ["--samples", "2"]) == 2  # RED-Diff needs sigma_x0 > 0
    assert "sigma_x0" in capsys.readouterr().err
    assert cli.main(argv + ["--samples", "2", "--param", "sigma_x0=0.1", "--overwrite"]) == 0
    files = sorted(p.name for p in (out / "posterior").iterdir())
    assert len(files) >= 2 * 3 and any("std" in f for f in files), files

    tuned = tmp_path / "tuned.json"
    record = {"format": FORMAT, "algo": "reddiff", "task": TASK, "num_steps": STEPS,
              "params": {"lam": 0.4, "lr": 0.2}}  # fmt: skip
    tuned.write_text(json.dumps(record))
    out2 = tmp_path / "tuned_out"
    argv2 = [a if a != str(out) else str(out2) for a in argv] + ["--tuned", str(tuned)]
    assert cli.main(argv2 + ["--lr", "0.3"]) == 0
    settings = json.loads((out2 / "run.json").read_text())
    assert settings["config"]["lam"] == 0.4 and settings["config"]["lr"] == 0.3
    assert cli.main(argv2[:-1] + [str(tmp_path / "missing.json")]) == 2
