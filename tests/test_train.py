"""Training: data loading, deterministic batches, determinism, resume, export, the shipped prior."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from reddiff_jax import cli, data, diffusion
from reddiff_jax import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
PRIOR = ROOT / "checkpoints" / "mnist32"

MODEL = train_lib.get_model_config("test-16")
CONFIG = train_lib.TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2)


def _digits(n: int = 24, size: int = 16) -> np.ndarray:
    """uint8 [n, size, size, 1]: bright squares at varying places on a dark background."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, size, size, 1), np.uint8)
    for i in range(n):
        r, c = rng.integers(0, size - 6, size=2)
        images[i, r : r + 6, c : c + 6] = 255
    return images


def _equal_trees(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ------------------------------------------------------------------------------------------------
# data.py


def test_load_npz_npy_and_folder(tmp_path):
    images = _digits(5)
    np.savez(tmp_path / "named.npz", images=images, labels=np.arange(5))
    np.savez(tmp_path / "single.npz", x=images[..., 0])  # [N, H, W] gains a channel axis
    np.save(tmp_path / "plain.npy", images)
    for name in ("named.npz", "single.npz", "plain.npy"):
        loaded = data.load_images(tmp_path / name)
        assert loaded.dtype == np.uint8 and loaded.shape == (5, 16, 16, 1)
        np.testing.assert_array_equal(loaded, images)
        assert not loaded.flags.writeable

    gray, rgb = tmp_path / "gray", tmp_path / "rgb"
    gray.mkdir()
    rgb.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0]).save(gray / f"{i:02d}.png")
        Image.fromarray(np.repeat(im, 3, axis=-1)).save(rgb / f"{i:02d}.png")
    np.testing.assert_array_equal(data.load_images(gray), images)
    np.testing.assert_array_equal(data.load_images(rgb), np.repeat(images, 3, axis=-1))


def test_to_float_range():
    x = data.to_float(np.array([0, 255, 128], np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [-1.0, 1.0, 128 / 127.5 - 1.0], rtol=0, atol=1e-7)


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_images(tmp_path / "missing.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        data.load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 8, 8), np.uint8), b=np.zeros(2))
    with pytest.raises(ValueError, match="'images'"):
        data.load_images(tmp_path / "two.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((2, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        data.load_images(tmp_path / "shape.npz")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="at least one image"):
        data.load_images(tmp_path / "empty.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
        data.load_images(tmp_path / "junk.npz")

    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        data.load_images(folder)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(folder / "b.png")
    with pytest.raises(ValueError, match="same size"):
        data.load_images(folder)
    (folder / "b.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read image"):
        data.load_images(folder)

    with pytest.raises(ValueError, match=r"images: expected uint8 \[N, 16, 16, 1\]"):
        train_lib.train(
            jax.random.key(0), np.zeros((4, 8, 8, 1), np.uint8), MODEL, CONFIG, workdir=tmp_path
        )


def test_batches_are_deterministic_and_tile_each_epoch():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    key = jax.random.key(3)
    it = data.batches(key, images, 4)
    seen = np.concatenate([next(it) for _ in range(5)]).ravel()  # 20 = two epochs
    values = np.round((seen + 1.0) * 127.5).astype(int)
    assert sorted(values[:10]) == list(range(10)) and sorted(values[10:]) == list(range(10))
    for step in range(5):
        idx = data.batch_indices(key, step, num_examples=10, batch_size=4)
        np.testing.assert_array_equal(values[step * 4 : step * 4 + 4], idx)
    resumed = next(data.batches(key, images, 4, start_step=3))
    np.testing.assert_array_equal(resumed.ravel(), seen[12:16])


# ------------------------------------------------------------------------------------------------
# train.py


def test_deterministic_and_resume_matches_uninterrupted(tmp_path):
    images = _digits()
    before = images.copy()
    key = jax.random.key(7)
    a = train_lib.train(key, images, MODEL, CONFIG, workdir=tmp_path / "a")
    b = train_lib.train(key, images, MODEL, CONFIG, workdir=tmp_path / "b")
    np.testing.assert_array_equal(images, before)  # the data is only read
    assert int(a.state.step) == 4 and a.losses.shape == (4,)
    assert _equal_trees(a.state, b.state)
    np.testing.assert_array_equal(a.losses, b.losses)

    # Interrupted after 3 steps (checkpoint at the stop), then resumed in a new call.
    part = train_lib.train(key, images, MODEL, CONFIG, workdir=tmp_path / "c", stop_after=3)
    assert int(part.state.step) == 3
    rest = train_lib.train(key, images, MODEL, CONFIG, workdir=tmp_path / "c")
    assert rest.resumed_from == 3 and rest.losses.shape == (1,)
    assert _equal_trees(a.state, rest.state)  # params, EMA, optimiser state and step
    np.testing.assert_array_equal(a.losses, np.concatenate([part.losses, rest.losses]))

    other = train_lib.TrainConfig(steps=4, batch_size=8, warmup_steps=2)
    with pytest.raises(ValueError, match="other settings"):
        train_lib.train(key, images, MODEL, other, workdir=tmp_path / "c")


def test_loss_decreases_on_a_trivial_dataset(tmp_path):
    images = np.zeros((8, 16, 16, 1), np.uint8)  # one image: x0 = -1 everywhere
    config = train_lib.TrainConfig(steps=40, batch_size=4, lr=1e-3, warmup_steps=2)
    result = train_lib.train(jax.random.key(0), images, MODEL, config, workdir=tmp_path)
    first, last = result.losses[:5].mean(), result.losses[-10:].mean()
    assert np.all(np.isfinite(result.losses))
    assert last < 0.5 * first, (first, last)


def test_non_finite_loss_is_a_clear_error(tmp_path, monkeypatch):
    def nan_batches(key, images, batch_size, *, start_step=0):
        while True:
            yield np.full((batch_size, *images.shape[1:]), np.nan, np.float32)

    monkeypatch.setattr(data, "batches", nan_batches)
    with pytest.raises(ValueError, match=r"non-finite \(nan\) at step 0; lower the learning rate"):
        train_lib.train(jax.random.key(0), _digits(), MODEL, CONFIG, workdir=tmp_path)


def test_learning_rate_schedule_warmup_constant_cosine_decay():
    """Analytic values: linear ramp, plateau, then lr * (1 + cos(pi * k / decay)) / 2 to 0."""
    config = train_lib.TrainConfig(steps=100, lr=2e-3, warmup_steps=10, decay_steps=40)
    lr = train_lib.learning_rate(config)
    want = {0: 0.0, 5: 1e-3, 10: 2e-3, 59: 2e-3, 60: 2e-3, 70: 1e-3 * (1 + np.cos(np.pi / 4))}
    want |= {80: 1e-3, 100: 0.0}
    for step, value in want.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, atol=1e-12, err_msg=step)
    plain = train_lib.learning_rate(dataclasses.replace(config, decay_steps=0))
    assert float(plain(100)) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match=r"warmup_steps \+ decay_steps"):
        train_lib.TrainConfig(steps=40, warmup_steps=10, decay_steps=31)
    with pytest.raises(ValueError, match="decay_steps: expected an int"):
        train_lib.TrainConfig(decay_steps=-1)


class _OracleModel:
    """`scale` times the exact eps of a point-mass data distribution at `target` [H, W, C] (a
    ScoreModel stand-in for `train.sample`): scale (x_t - sqrt(a_t) target) / sqrt(1 - a_t);
    exact at scale 1."""

    def __init__(self, target: np.ndarray, scale: float = 1.0):
        h, w, c = target.shape
        self.scale = scale
        self.config = types.SimpleNamespace(image_size=h, in_channels=c)
        self.target = jnp.asarray(target)
        self.ac = diffusion.alphas_cumprod("linear", 1000)

    def eps(self, x, t):
        a = self.ac[t][:, None, None, None]
        return self.scale * (x - jnp.sqrt(a) * self.target) / jnp.sqrt(1.0 - a)


def test_sample_draws_the_point_mass_at_any_eta_and_eta_adds_noise():
    """Analytic: under the exact eps of a point mass every step's x̂0 is the point, so DDIM ends
    on it for eta 0 and 1 alike (to float32 rounding); along the way eta 1 adds fresh noise, so
    with a model that is not exact the two samplers differ, and each repeats under its key."""
    target = np.linspace(-0.9, 0.9, 8 * 8).reshape(8, 8, 1).astype(np.float32)
    oracle = _OracleModel(target)
    for eta in (0.0, 1.0):
        x = train_lib.sample(jax.random.key(0), oracle, num=3, num_steps=10, eta=eta)
        chex.assert_shape(x, (3, 8, 8, 1))
        np.testing.assert_allclose(x, np.broadcast_to(target, x.shape), atol=1e-5, err_msg=eta)
    biased = _OracleModel(target, scale=0.5)  # a wrong (shrunk) eps
    key = jax.random.key(1)
    x0 = train_lib.sample(key, biased, num=3, num_steps=10, eta=0.0)
    x1 = train_lib.sample(key, biased, num=3, num_steps=10, eta=1.0)
    assert np.abs(x1 - x0).max() > 1e-2
    np.testing.assert_array_equal(x1, train_lib.sample(key, biased, num=3, num_steps=10, eta=1.0))
    assert np.abs(x1).max() <= 1.0


def test_train_steps_share_a_compile_unless_a_decay_ends_at_steps():
    """The compiled step is keyed by the settings that change it: `steps` only with a decay."""
    plain = [dataclasses.replace(CONFIG, steps=n) for n in (40, 80)]
    assert train_lib.make_train_step(MODEL, plain[0]) is train_lib.make_train_step(MODEL, plain[1])
    decay = [dataclasses.replace(c, decay_steps=20) for c in plain]
    assert train_lib.make_train_step(MODEL, decay[0]) is not train_lib.make_train_step(
        MODEL, decay[1]
    )


def test_resume_with_a_decay_keeps_its_end_step(tmp_path):
    """With a decay the schedule is tied to `steps`: a resume that changes it is refused."""
    images, key = _digits(), jax.random.key(0)
    config = dataclasses.replace(CONFIG, decay_steps=2)
    train_lib.train(key, images, MODEL, config, workdir=tmp_path, stop_after=2)
    with pytest.raises(ValueError, match="other settings"):
        train_lib.train(key, images, MODEL, dataclasses.replace(config, steps=6), workdir=tmp_path)


def test_config_errors():
    with pytest.raises(ValueError, match="preset name"):
        train_lib.get_model_config("nope")
    with pytest.raises(ValueError, match="batch_size"):
        train_lib.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        train_lib.TrainConfig(ema_decay=1.0)


def test_cli_trains_and_exports(tmp_path, monkeypatch):
    from reddiff_jax.model import load_pretrained

    # Only `train` is registered: the other subcommands' modules are not under test here.
    monkeypatch.setattr(cli, "COMMANDS", {"train": "reddiff_jax.cli.train"})
    np.savez(tmp_path / "d.npz", images=_digits())
    out = tmp_path / "prior"
    out.mkdir()
    (out / "heldout.npz").write_bytes(b"kept")  # non-export files survive the export
    argv = ["train", "--data", str(tmp_path / "d.npz"), "--out", str(out), "--config", "test-16"]
    argv += ["--workdir", str(tmp_path / "work"), "--steps", "4", "--batch", "4", "--warmup", "2"]
    argv += ["--checkpoint-every", "2", "--samples", "4", "--sample-steps", "2", "--no-progress"]
    assert cli.main(argv) == 0
    assert (out / "heldout.npz").read_bytes() == b"kept"
    model = load_pretrained(out)
    assert model.config == train_lib.get_model_config("test-16")
    record = json.loads((out / "reddiff_model.json").read_text())
    assert record["metadata"]["steps"] == 4
    assert "reddiff-jax train --data" in (out / "README.md").read_text()
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (2 * 2 * 16, 2 * 2 * 16)
    # Exporting again (no training) replaces the checkpoint in place.
    assert cli.main([*argv, "--export-only"]) == 0
    assert (out / "heldout.npz").read_bytes() == b"kept"
    assert cli.main(["train", "--data", str(tmp_path / "nothing.npz"), "--out", str(out)]) == 2
    empty = ["--workdir", str(tmp_path / "empty"), "--export-only"]
    assert cli.main([*argv, *empty]) == 2  # nothing to export

    # A warm start: a new run from the exported EMA weights. One step whose learning rate is 0
    # (the first of the warm-up) leaves them as they are, up to the EMA's rounding (e*d + e*(1-d)).
    def warm_argv(config: str, dst: str) -> list[str]:
        return ["train", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / dst),
                "--config", config, "--workdir", str(tmp_path / f"work-{dst}"), "--steps", "1",
                "--batch", "4", "--warmup", "2", "--samples", "4", "--sample-steps", "2",
                "--no-progress", "--init-from", str(out)]  # fmt: skip

    assert cli.main(warm_argv("test-16", "warm")) == 0
    for a, b in zip(jax.tree.leaves(load_pretrained(tmp_path / "warm").params),
                    jax.tree.leaves(model.params), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    card = (tmp_path / "warm" / "README.md").read_text()
    assert f"warm start: the EMA weights of `{out}` (4 steps" in card and "--init-from" in card
    # ... of the same model config only
    wider = {**train_lib.get_model_config("test-16").to_dict(), "num_channels": 8}
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    assert cli.main(warm_argv(str(tmp_path / "wider.json"), "bad")) == 2


def test_cli_sigterm_keeps_the_last_step(tmp_path, monkeypatch, capsys):
    """SIGTERM (how a background run is stopped) ends `train` as Ctrl-C does: the state after
    the last finished step is checkpointed and resumes; the previous handler is restored."""
    import signal

    monkeypatch.setattr(cli, "COMMANDS", {"train": "reddiff_jax.cli.train"})
    real_batches = data.batches

    def batches_then_sigterm(*args, **kwargs):
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if i == 3:  # after 3 finished steps (the 1st checkpoint is at 2)
                signal.raise_signal(signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data, "batches", batches_then_sigterm)
    np.savez(tmp_path / "d.npz", images=_digits())
    work = tmp_path / "work"
    argv = ["train", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "prior"),
            "--config", "test-16", "--workdir", str(work), "--steps", "4", "--batch", "4",
            "--warmup", "2", "--checkpoint-every", "2", "--no-progress"]  # fmt: skip
    handler = signal.getsignal(signal.SIGTERM)
    assert cli.main(argv) == 130
    assert signal.getsignal(signal.SIGTERM) is handler
    assert "interrupted; finished outputs are kept" in capsys.readouterr().err
    monkeypatch.setattr(data, "batches", real_batches)
    rest = train_lib.train(jax.random.key(0), _digits(), MODEL, CONFIG, workdir=work)
    assert rest.resumed_from == 3 and rest.losses.shape == (1,)


_TWO_DEVICES = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_train import CONFIG, MODEL, _digits
from reddiff_jax import data, diffusion, sharding, train as T

out = {}
for name, mesh in (("one", None), ("two", sharding.data_mesh(2))):
    r = T.train(jax.random.key(0), _digits(), MODEL, CONFIG, workdir=sys.argv[2] + name, mesh=mesh)
    out[name] = [np.asarray(v) for v in jax.tree.leaves(r.state.ema_params)]
    out[name + "_loss"] = r.losses.tolist()
flat = {k: np.concatenate([v.ravel() for v in out[k]]) for k in ("one", "two")}
err = float(np.linalg.norm(flat["one"] - flat["two"]) / np.linalg.norm(flat["one"]))

# One gradient of the loss, the batch whole on one device vs sharded over two.
mesh = sharding.data_mesh(2)
params = T.init_params(jax.random.key(1), MODEL)
x0 = jax.numpy.asarray(data.to_float(_digits()[: CONFIG.batch_size]))
ac = diffusion.alphas_cumprod("linear", 1000)
grad = jax.jit(jax.grad(lambda p, x: T.diffusion_loss(p, jax.random.key(2), x,
                                                     model_config=MODEL, alphas_cumprod=ac)))
g1 = grad(params, x0)
g2 = grad(jax.device_put(params, sharding.replicated(mesh)),
          jax.device_put(x0, sharding.batch_sharding(mesh)))
d = [np.asarray(a, np.float64).ravel() - np.asarray(b, np.float64).ravel()
     for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))]
n = [np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(g1)]
grad_err = float(np.linalg.norm(np.concatenate(d)) / np.linalg.norm(np.concatenate(n)))
print("RESULT " + json.dumps({"err": err, "grad_err": grad_err, "one": out["one_loss"],
                              "two": out["two_loss"]}))
"""


def test_data_parallel_training_equals_one_device(tmp_path):
    """Data parallel over 2 CPU devices equals one device, to float rounding of the batch mean.

    The precise check is one gradient of the loss, the batch whole vs sharded: only the order of
    the batch reduction differs, measured 2.7e-7 relative L2 (about 2 float32 epsilons); bound 2e-6.
    End to end, over 4 training steps the losses agree to 1e-5 relative and the EMA weights to
    2e-5 relative L2. That figure is loose because Adam divides by sqrt(v): a weight whose
    gradient is ~0 moves by rounding alone (6.9e-6 measured with the query-major attention
    derivative, 1.06e-5 with the key-major one; both agree with float64 to ~1e-6 of their max,
    tests/test_attention.py).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES, str(Path(__file__).parent), str(tmp_path / "w")],
        env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert got["grad_err"] < 2e-6, got
    assert got["err"] < 2e-5, got
    np.testing.assert_allclose(got["two"], got["one"], rtol=1e-5)
    with pytest.raises(ValueError, match="do not divide the batch"):
        train_lib.train(jax.random.key(0), _digits(), MODEL,
                        dataclasses.replace(CONFIG, batch_size=3), workdir=tmp_path / "x",
                        mesh=_FakeMesh())  # fmt: skip


class _FakeMesh:  # a 2-device data mesh, as far as the batch check looks
    shape = {"data": 2}
    axis_names = ("data",)


# ------------------------------------------------------------------------------------------------
# The shipped prior.


@pytest.mark.skipif(
    not (PRIOR / "reddiff_model.json").is_file(), reason="checkpoints/mnist32 not exported yet"
)
def test_shipped_prior_predicts_noise_on_heldout_digits():
    from reddiff_jax.model import ScoreModel, load_pretrained

    model = load_pretrained(PRIOR)
    assert model.config.in_channels == 1 and model.config.image_size == 32
    with np.load(PRIOR / "heldout.npz") as held:
        x0 = jnp.asarray(data.to_float(held["images"][:32]))
    ac = diffusion.alphas_cumprod("linear", 1000)
    eps = jax.random.normal(jax.random.key(0), x0.shape)
    eps_fn = jax.jit(ScoreModel.eps)  # one compile, not one per op of the UNet
    for t in (100, 300, 500):
        a = ac[t]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps
        mse = float(jnp.mean((eps_fn(model, x_t, jnp.full((32,), t, jnp.int32)) - eps) ** 2))
        # The trivial predictor (eps_hat = 0) has MSE ~ 1.0; a trained prior is far below
        # (at step 200 of the shipped run it was already 0.10 / 0.05 / 0.02 at t = 100 / 300 / 500).
        assert mse < 0.25, (t, mse)
