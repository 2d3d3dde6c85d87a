"""Sweeps: one compilation for a whole grid, the validation split, records, resume, the CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from reddiff_jax import cli, splits
from reddiff_jax import sweep as sweep_lib
from reddiff_jax.model import ScoreModel

STEPS = 4  # grid range(0, 1000, 250): four steps


@pytest.fixture
def counted(monkeypatch):
    """Counts the traces of ``ScoreModel.eps``: one per compilation of a solve's scan body."""
    calls = {"n": 0}
    eps = ScoreModel.eps

    def counting_eps(self, x, t):
        calls["n"] += 1
        return eps(self, x, t)

    monkeypatch.setattr(ScoreModel, "eps", counting_eps)
    return calls


def test_a_4x5_grid_over_8_images_compiles_once(tiny_model, counted, tmp_path):
    grid = {"lam": [0.05, 0.1, 0.25, 0.5], "lr": [0.05, 0.1, 0.25, 0.5, 1.0]}
    res = sweep_lib.sweep(jax.random.key(0), grid=grid, task="sr:4", n=8, steps=STEPS,
                          model=tiny_model, chunk=48, lpips=False, progress=False,
                          out=tmp_path / "s")  # fmt: skip
    assert counted["n"] == 1  # 160 solves in 4 calls of 48 (the last padded): one trace
    assert res["timing"]["calls"] == 4 and res["timing"]["solves"] == 160
    assert len(res["cells"]) == 20
    assert [c["params"] for c in res["cells"][:2]] == [{"lam": 0.05, "lr": 0.05},
                                                       {"lam": 0.05, "lr": 0.1}]  # fmt: skip
    for cell in res["cells"]:
        assert len(cell["psnr"]["per_image"]) == 8 and len(cell["ssim"]["per_image"]) == 8
        assert cell["psnr"]["mean"] == pytest.approx(np.mean(cell["psnr"]["per_image"]))
    best = res["best"]
    means = [c["psnr"]["mean"] for c in res["cells"]]
    assert best["value"] == max(means)
    assert best["restore"] == " ".join(f"--param {k}={v:g}" for k, v in best["params"].items())
    assert best["eval"].startswith("--param reddiff@sr.lam=")
    assert (tmp_path / "s" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert on_disk["best"] == best and on_disk["images"][0] == "heldout_0000"
    # New values of the same grid shape: nothing new to compile.
    grid2 = {"lam": [0.06, 0.11, 0.26, 0.51], "lr": [0.06, 0.11, 0.26, 0.51, 1.1]}
    sweep_lib.sweep(jax.random.key(0), grid=grid2, task="sr:4", n=8, steps=STEPS,
                    model=tiny_model, chunk=48, lpips=False, progress=False)  # fmt: skip
    assert counted["n"] == 1


def test_cells_match_a_plain_solve_many_and_resume(tiny_model, tmp_path, counted):
    """A cell is exactly solve_many of its settings; a rerun reuses finished cells; a sweep
    with other settings into the same folder is refused."""
    from reddiff_jax import imageio, operators, pipeline
    from reddiff_jax.restore import algo_config
    from reddiff_jax.solvers import solve_many

    key = jax.random.key(3)
    grid = {"lam": [0.1, 0.5]}
    res = sweep_lib.sweep(key, grid=grid, task="inpaint:box", n=3, steps=STEPS, model=tiny_model,
                          chunk=4, lpips=False, progress=False, out=tmp_path)  # fmt: skip
    _, truth = splits.load("validation", 3, image_shape=(32, 32, 1))
    op = operators.make_from_spec("inpaint:box", (32, 32, 1), key=jax.random.fold_in(key, 0))
    y = pipeline.simulate(op, imageio.from_uint8(truth), jax.random.fold_in(key, 1), sigma_y=0.0)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, 2), i))(np.arange(3))
    config = algo_config("reddiff", "inpaint:box", steps=STEPS, overrides={"lam": 0.5})
    x = np.asarray(solve_many(config, tiny_model.eps, op, y, keys, op_axis=None).x)
    want = sweep_lib.score_images(x, truth, use_lpips=False)["psnr"]
    np.testing.assert_allclose(res["cells"][1]["psnr"]["per_image"], want, rtol=1e-6)
    # every cell also records the digit classifier's verdict on each restoration
    from reddiff_jax.sample_quality import classifier_accuracy

    hit = classifier_accuracy(imageio.to_uint8(x), splits.labels("validation", 3))
    assert res["cells"][1]["accuracy"]["per_image"] == hit.astype(float).tolist()

    before = counted["n"]
    again = sweep_lib.sweep(key, grid=grid, task="inpaint:box", n=3, steps=STEPS,
                            model=tiny_model, chunk=4, lpips=False, progress=False,
                            out=tmp_path)  # fmt: skip
    assert again["timing"]["solves"] == 0 and again["cells"] == res["cells"]
    assert counted["n"] == before
    # a widened grid solves only its new cells; the seconds of all runs add up
    wide = {k: [*v, 0.75] for k, v in grid.items()}
    more = sweep_lib.sweep(key, grid=wide, task="inpaint:box", n=3, steps=STEPS,
                           model=tiny_model, chunk=4, lpips=False, progress=False,
                           out=tmp_path)  # fmt: skip
    assert more["timing"]["solves"] == 3 * (len(more["cells"]) - len(res["cells"]))
    assert [c for c in more["cells"] if c["params"]["lam"] != 0.75] == res["cells"]
    t0, t1 = again["timing"], more["timing"]
    assert t1["seconds_all_runs"] == pytest.approx(t0["seconds_all_runs"] + t1["seconds"])
    assert t0["seconds_all_runs"] >= res["timing"]["seconds"]
    with pytest.raises(FileExistsError, match="other settings"):
        sweep_lib.sweep(key, grid=grid, task="inpaint:box", n=2, steps=STEPS, model=tiny_model,
                        chunk=4, lpips=False, progress=False, out=tmp_path)  # fmt: skip


def test_splits_are_disjoint_and_named_by_file_index():
    val, test = splits.indices("validation"), splits.indices("test")
    assert len(val) == 200 and len(test) == 800 and not set(val) & set(test)
    names, images = splits.load("test", 2, image_shape=(32, 32, 1))
    assert names == ["heldout_0200", "heldout_0201"] and images.shape == (2, 32, 32, 1)
    with pytest.raises(ValueError, match="1 .. 200"):
        splits.indices("validation", 201)


def test_grid_checks_and_helpers(tiny_model):
    with pytest.raises(ValueError, match="not a numeric"):
        sweep_lib.sweep(jax.random.key(0), grid={"num_steps": [1, 2]}, model=tiny_model, n=1)
    with pytest.raises(ValueError, match="lr"):
        sweep_lib.sweep(jax.random.key(0), grid={"lr": [-1.0]}, model=tiny_model, n=1)
    assert sweep_lib.parse_grid(["lam=0.1,0.2", "zeta=1"]) == {"lam": [0.1, 0.2], "zeta": [1.0]}
    with pytest.raises(ValueError, match="NAME="):
        sweep_lib.parse_grid(["lam"])
    assert sweep_lib.chunk_size(160, 1e6, 50e6) == 50
    assert sweep_lib.chunk_size(10, 1e6, 50e6) == 10
    assert sweep_lib.chunk_size(10, 1e9, 1e6) == 1
    cells = [
        {"params": {"a": 1}, "lpips": {"mean": 0.3}},
        {"params": {"a": 2}, "lpips": {"mean": 0.1}},
    ]
    assert sweep_lib.best_cell(cells, "lpips")["params"] == {"a": 2}
    tied = [
        {"params": {"a": 1}, "accuracy": {"mean": 0.5}, "psnr": {"mean": 11.0}},
        {"params": {"a": 2}, "accuracy": {"mean": 0.5}, "psnr": {"mean": 12.0}},
        {"params": {"a": 3}, "accuracy": {"mean": 0.25}, "psnr": {"mean": 20.0}},
    ]
    assert sweep_lib.best_cell(tied, "accuracy")["params"] == {"a": 2}  # PSNR breaks the tie
    assert sweep_lib.param_strings("dps", "blur:gaussian", {"zeta": 0.5}) == {
        "restore": "--param zeta=0.5", "eval": "--param dps@blur.zeta=0.5"}  # fmt: skip


def _main(argv: list[str]) -> int:
    """``reddiff-jax`` with only this subcommand registered (the others are not under test)."""
    import argparse
    import importlib

    assert cli.COMMANDS[argv[0]] == f"reddiff_jax.cli.{argv[0]}"
    parser = argparse.ArgumentParser(prog="reddiff-jax")
    importlib.import_module(cli.COMMANDS[argv[0]]).register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def test_dps_sweep_over_zeta_and_the_cli(tiny_model, tmp_path, monkeypatch, capsys):
    """Any algorithm's traced settings sweep (DPS' zeta); the CLI prints the best --param."""
    from reddiff_jax import sweep as mod

    real = mod.resolve_model
    monkeypatch.setattr(mod, "resolve_model", lambda m: real(tiny_model))
    rc = _main(["sweep", "--task", "sr:4", "--algo", "dps", "--grid", "zeta=0.1,1",
                "--grid", "eta=0.5,1", "--n", "2", "--steps", str(STEPS), "--out",
                str(tmp_path), "--no-lpips", "--no-progress", "--chunk", "8"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    assert "best" in text and "--param zeta=" in text and "--param dps@sr.zeta=" in text
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["settings"]["algo"] == "dps" and len(data["cells"]) == 4
    assert (tmp_path / "heatmap.png").is_file()


def test_posterior_samples_mean_and_std(tiny_model, tmp_path):
    from reddiff_jax import imageio, operators, posterior
    from reddiff_jax.solvers import RedDiffConfig, solve_many

    _, truth = splits.load("validation", 2, image_shape=(32, 32, 1))
    op = operators.make_from_spec("inpaint:box", (32, 32, 1), key=jax.random.key(0))
    y = jax.vmap(op.A)(imageio.from_uint8(truth))
    cfg = RedDiffConfig(num_steps=STEPS, sigma_x0=0.1)
    key = jax.random.key(5)
    post = posterior.posterior(cfg, tiny_model.eps, op, y, key, samples=3, chunk=4)
    assert post.samples.shape == (2, 3, 32, 32, 1) and post.status.shape == (2, 3)
    np.testing.assert_allclose(post.mean, post.samples.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(post.std, post.samples.std(axis=1), atol=1e-6)
    assert post.std.max() > 0
    # sample 1 of image 1 is solve_many with the key fold_in(fold_in(key, 1), 1)
    k11 = jax.random.fold_in(jax.random.fold_in(key, 1), 1)
    one = solve_many(cfg, tiny_model.eps, op, y[1:2], k11[None], op_axis=None)
    np.testing.assert_allclose(post.samples[1, 1], np.asarray(one.x[0]), atol=1e-6)
    files = posterior.write_posterior(tmp_path, ["a", "b"], post)
    assert (tmp_path / "posterior" / "b_std.png").is_file()
    assert (tmp_path / "posterior" / "a_sample_02.png").is_file()
    assert files["std_scale"] == pytest.approx(float(post.std.max()))
