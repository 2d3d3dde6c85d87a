"""Issue 12: no bad input gives a traceback or a silent wrong result.

One table, one test. Each row provokes one class of bad input through the command line
(``reddiff_jax.cli.main`` in-process, or a subprocess where the noise could only show there) or
the library, and states what must happen: the exit status (CLI) or the exception type (library),
and a regex that names the problem. CLI rows also check that stderr holds no "Traceback" and that
a refused run (status 2) wrote no restored image (it failed before solving).

Rows marked ``# was:`` reproduce a failure of the issue-12 probe that today's fixes removed; they
failed before those fixes as described.

Cost: every row that solves uses the same settings (reddiff, inpaint:box, --steps 3 = 4 grid
steps, --batch 2, one 32x32 grey model), so they share one compilation; the denoise row adds one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import reddiff_jax as rj
from reddiff_jax import cli, operators
from reddiff_jax import restore as R
from reddiff_jax.model import load_pretrained, save_pretrained
from reddiff_jax.solvers import DDIMConfig, RedDiffConfig, SolveError, registry

REPO = Path(__file__).resolve().parents[1]
STEPS = "3"  # the official grid range(0, 1000, 333) takes 4 steps: every solving row shows a note
ITERATIONS = 4


@dataclasses.dataclass
class Ctx:
    """What a row's ``provoke`` gets: the shared checkpoint and a fresh folder for the row."""

    ckpt: Path
    model: Any
    tmp: Path
    baseline: Path  # a finished run of `restore(ITERATIONS)` on 2 demo digits

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def restore(self, *extra: str, model: str | Path | None = None, out: Path | None = None):
        return ["restore", "--model", str(model or self.ckpt), "--steps", STEPS,
                "--batch", "2", "--no-progress", "--out", str(out or self.out), *extra]  # fmt: skip

    def demo(self, *extra: str, **kw) -> list[str]:
        return self.restore("--demo", "--n", "2", *extra, **kw)

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def image(self, name: str, array: np.ndarray, **save) -> Path:
        path = self.tmp / name
        Image.fromarray(array).save(path, **save)
        return path

    def npy(self, name: str, array: np.ndarray) -> Path:
        path = self.tmp / name
        np.save(path, array, allow_pickle=array.dtype == object)
        return path

    def ckpt_copy(self, edit: Callable[[Path], None]) -> Path:
        path = self.tmp / "ckpt"
        shutil.copytree(self.ckpt, path)
        edit(path)
        return path


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    kind: str  # "cli" | "subprocess" | "lib"
    provoke: Callable[[Ctx], Any]  # argv for cli/subprocess; a zero-argument callable for lib
    expect: int | type[BaseException]  # exit status, or the exception type
    pattern: str  # regex naming the problem: stderr (status != 0), stdout+stderr, or the error
    check: Callable[[Ctx, str], None] | None = None  # more assertions, given stdout+stderr
    patch: Callable[[Ctx, pytest.MonkeyPatch], None] | None = None


# ------------------------------------------------------------------------------------------------
# helpers for the rows

GRADIENT16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
GRADIENT01 = np.linspace(0.0, 1.0, 32 * 32, dtype=np.float32).reshape(32, 32)


def _grid_truth(out: Path) -> np.ndarray:
    """The first truth tile of grid.png (column 0, row 0; tiles drawn at 3x, see grid_png)."""
    with Image.open(out / "grid.png") as im:
        g = np.asarray(im.convert("RGB"))
    return g[18 : 18 + 96 : 3, 4 : 4 + 96 : 3, 0]


def _u8(x01: np.ndarray) -> np.ndarray:  # as restore.load_images rounds [0, 1] floats
    return np.round(x01 * 255.0).astype(np.uint8)


def _truth_is(expected_u8: np.ndarray) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, _: str) -> None:
        np.testing.assert_array_equal(_grid_truth(ctx.out), expected_u8)

    return check


def _rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _iterations_recorded(ctx: Ctx, text: str) -> None:
    run = json.loads((ctx.out / "run.json").read_text())
    metrics = json.loads((ctx.out / "metrics.json").read_text())
    assert run["iterations"] == metrics["iterations"] == ITERATIONS


def _overwrite_smaller(ctx: Ctx) -> list[str]:
    shutil.copytree(ctx.baseline, ctx.out)  # a finished run of 2 images
    return ctx.restore("--demo", "--n", "1", "--overwrite")


def _no_stale_outputs(ctx: Ctx, _: str) -> None:
    assert sorted(p.name for p in (ctx.out / "restored").iterdir()) == ["heldout_0000.png"]
    assert sorted(p.name for p in (ctx.out / "records").iterdir()) == ["heldout_0000.json"]
    assert json.loads((ctx.out / "metrics.json").read_text())["images"] == ["heldout_0000"]


def _rerun_other_settings(ctx: Ctx) -> list[str]:
    shutil.copytree(ctx.baseline, ctx.out)
    return ctx.demo("--sigma-y", "0.1")


def _fake_restore(ctx: Ctx, mp: pytest.MonkeyPatch) -> None:
    """The real grid of --steps 600 (1000 iterations), without solving 1000 steps here."""

    def fake(key, *, out, algo, task, steps, sigma_y, params, **_):
        cfg = R.algo_config(algo, task, steps=steps, sigma_y=sigma_y, overrides=params)
        return R.RestoreOutputs(out=Path(out), names=[], restored=[], grid=Path(out) / "grid.png",
                                metrics_path=None, metrics=None, solved=0, skipped=0,
                                iterations=cfg.num_iterations)  # fmt: skip

    mp.setattr("reddiff_jax.cli.restore.restore", fake)


def _truncate_params(path: Path) -> None:
    data = sorted((path / "params").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    os.truncate(data[-1], 0)  # the largest array data file


def _edit_record(**changes: Any) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        record = json.loads((path / "reddiff_model.json").read_text())
        record["config"].update(changes)
        (path / "reddiff_model.json").write_text(json.dumps(record))

    return edit


def _torch_zip(ctx: Ctx, name: str, pickle_bytes: bytes) -> Path:
    path = ctx.tmp / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    return path


def _os_system_pickle(ctx: Ctx) -> list[str]:
    cmd = f"touch {ctx.tmp / 'pwned'}".encode()  # protocol-2 pickle: GLOBAL 'os system', REDUCE
    payload = b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."
    return ["convert", str(_torch_zip(ctx, "evil.pt", payload)), str(ctx.out), "--preset", "tiny"]


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _pickle_dumps_exploit(ctx: Ctx) -> list[str]:
    payload = pickle.dumps({"w": _Evil(str(ctx.tmp / "pwned"))}, protocol=2)
    return ["convert", str(_torch_zip(ctx, "evil2.pt", payload)), str(ctx.out), "--preset", "tiny"]


def _not_pwned(ctx: Ctx, _: str) -> None:
    assert not (ctx.tmp / "pwned").exists() and not ctx.out.exists()


def _solve(ctx: Ctx, op: Any, y: Any, key: Any = "default", **kw) -> Callable[[], Any]:
    key = jax.random.key(0) if isinstance(key, str) else key
    return lambda: rj.solve(RedDiffConfig(num_steps=2), ctx.model.eps, op, y, key, **kw)


def _op(size: int = 32, channels: int = 1, spec: str = "denoise") -> Any:
    return operators.make_from_spec(spec, (size, size, channels))


Y = np.zeros((1, 32, 32, 1), np.float32)


def _solve_many(ctx: Ctx, keys: Any) -> Callable[[], Any]:
    ys = np.zeros((2, 32, 32, 1), np.float32)
    cfg = RedDiffConfig(num_steps=2)
    return lambda: rj.solve_many(cfg, ctx.model.eps, _op(), ys, keys, op_axis=None)


def _sample(ctx: Ctx, key: Any, shape=(1, 32, 32, 1)) -> Callable[[], Any]:
    return lambda: rj.sample(DDIMConfig(num_steps=2), ctx.model.eps, shape, key)


def _dps_phase_retrieval_diverges(ctx: Ctx) -> Callable[[], Any]:
    op = _op(8, spec="phase_retrieval")
    y = jax.vmap(op.A)(jnp.linspace(-1.0, 1.0, 64).reshape(1, 8, 8, 1))
    cfg = registry.config_for("dps", "phase_retrieval", steps=2, overrides={"zeta": 1e6})
    return lambda: rj.solve(cfg, lambda x, t: 0.1 * x, op, y, jax.random.key(0))


def _library_restore(ctx: Ctx, **kw: Any) -> Callable[[], Any]:
    kw = {"demo": True, "n": 2, "steps": 3, "batch": 2, "progress": False, "model": ctx.model,
          "out": ctx.out, **kw}  # fmt: skip
    return lambda: R.restore(jax.random.key(0), **kw)


# ------------------------------------------------------------------------------------------------
# the table

# fmt: off
ROWS = [
    # --- arguments -------------------------------------------------------------------------------
    Row("unknown_subcommand", "cli", lambda c: ["frobnicate"], 2, r"invalid choice: 'frobnicate'"),
    Row("unknown_task", "cli", lambda c: c.demo("--task", "warp:2"), 2,
        r"unknown operator 'warp'"),
    Row("empty_task", "cli", lambda c: c.demo("--task", ""), 2, r"spec: expected a task string"),
    Row("bad_task_parameter", "cli", lambda c: c.demo("--task", "sr:3"), 2,
        r"factor: expected a divisor of the image size"),
    Row("unknown_task_option", "cli", lambda c: c.demo("--task", "inpaint:box:foo=1"), 2,
        r"foo: not a parameter of operator 'inpaint'"),
    Row("unknown_algo", "cli", lambda c: c.demo("--algo", "magic"), 2,
        r"argument --algo: invalid choice: 'magic'"),
    Row("malformed_param", "cli", lambda c: c.demo("--param", "lam"), 2, r"--param: .*KEY=VALUE"),
    Row("unknown_setting", "cli", lambda c: c.demo("--param", "lambda=1"), 2,
        r"reddiff has no setting 'lambda'"),
    Row("option_of_another_algo", "cli", lambda c: c.demo("--eta", "0.5"), 2,
        r"reddiff has no setting 'eta'"),
    Row("param_not_a_number", "cli", lambda c: c.demo("--param", "lam=abc"), 2,
        r"expected a float for lam, got 'abc'"),
    # found by this table: --param num_steps silently overrode --steps (and the grid note blamed
    # the official grid for it); now refused
    Row("param_num_steps_conflicts_with_steps", "cli",
        lambda c: c.demo("--param", "num_steps=5"), 2, r"--param num_steps: .*--steps"),
    Row("sigma_y_negative", "cli", lambda c: c.demo("--sigma-y", "-0.1"), 2,
        r"sigma_y: expected a finite float >= 0, got -0.1"),
    Row("sigma_y_nan", "cli", lambda c: c.demo("--sigma-y", "nan"), 2,
        r"sigma_y: expected a finite float >= 0, got nan"),
    Row("sigma_y_not_a_number", "cli", lambda c: c.demo("--sigma-y", "abc"), 2,
        r"argument --sigma-y: invalid float value: 'abc'"),
    Row("steps_zero", "cli", lambda c: c.demo("--steps", "0"), 2,
        r"num_steps: expected an int in 1 \.\. 1000, got 0"),
    Row("steps_negative", "cli", lambda c: c.demo("--steps", "-5"), 2,
        r"num_steps: expected an int in 1 \.\. 1000, got -5"),
    Row("steps_too_many", "cli", lambda c: c.demo("--steps", "5000"), 2,
        r"num_steps: expected an int in 1 \.\. 1000, got 5000"),
    # was: --steps 7 ran 8 iterations (600 ran 1000) and nothing told the user or recorded it
    Row("steps_off_the_official_grid", "cli", lambda c: c.demo(), 0,
        rf"note: the official grid .* takes {ITERATIONS} steps, not {STEPS}",
        check=_iterations_recorded),
    Row("steps_600_runs_1000", "cli", lambda c: c.demo("--steps", "600"), 0,
        r"takes 1000 steps, not 600", patch=_fake_restore),
    Row("n_zero", "cli", lambda c: c.restore("--demo", "--n", "0"), 2,
        r"n: expected an int in 1 \.\. 1000, got 0"),
    Row("n_too_large", "cli", lambda c: c.restore("--demo", "--n", "100000"), 2,
        r"n: expected an int in 1 \.\. 1000, got 100000"),
    Row("batch_zero", "cli", lambda c: c.demo("--batch", "0"), 2,
        r"batch: expected a positive int, got 0"),
    # was: --grid-rows 0 failed after solving, with a numpy message
    Row("grid_rows_zero", "cli", lambda c: c.demo("--grid-rows", "0"), 2,
        r"grid_rows: expected a positive int, got 0"),
    # found by this table: a seed >= 2**63 was an OverflowError traceback, and one >= 2**32 or
    # negative silently repeated another seed's draws
    Row("seed_too_large", "cli", lambda c: c.demo("--seed", str(2**70)), 2,
        r"argument --seed: expected an int in \[0, 2\*\*32\)"),
    Row("seed_aliasing", "cli", lambda c: c.demo("--seed", str(2**32)), 2,
        r"argument --seed: expected an int in \[0, 2\*\*32\), got 4294967296"),
    # was: no --version
    Row("version", "cli", lambda c: ["--version"], 0, r"^reddiff-jax \d+\.\d+"),
    # --- inputs ----------------------------------------------------------------------------------
    Row("no_inputs", "cli", lambda c: c.restore(), 2, r"inputs: expected image files"),
    Row("demo_and_inputs", "cli", lambda c: c.demo(str(c.image("a.png", GRADIENT16))), 2,
        r"inputs: pass either image files/folders or demo=True, not both"),
    Row("missing_input_file", "cli", lambda c: c.restore(str(c.tmp / "missing.png")), 2,
        r"no such file or folder: .*missing\.png"),
    Row("empty_folder", "cli", lambda c: c.restore(str(c.tmp)), 2,
        r"folder .* holds no image files"),
    Row("non_image_file", "cli", lambda c: c.restore(str(c.file("broken.png", "not an image"))),
        2, r"broken\.png: cannot read as an image"),
    Row("wrong_image_size", "cli",
        lambda c: c.restore(str(c.image("small.png", np.zeros((28, 28), np.uint8)))), 2,
        r"image size 28x28 does not match the model's 32x32"),
    Row("float_tiff_out_of_range", "cli",
        lambda c: c.restore(str(c.image("f.tif", GRADIENT01 * 255))), 2,
        r"f\.tif: float image with values in \[0, 255\]; expected \[0, 1\]"),
    # was: a 16-bit PNG was clamped to a binary blob
    Row("png_16bit", "cli", lambda c: c.restore(str(c.image("g16.png", GRADIENT16))), 0,
        r"restored 1 image", check=_truth_is(_u8(GRADIENT16 / np.float32(65535)))),
    # was: a float TIFF in [0, 1] came out black
    Row("float_tiff_01", "cli", lambda c: c.restore(str(c.image("f01.tif", GRADIENT01))), 0,
        r"restored 1 image", check=_truth_is(_u8(GRADIENT01))),
    # was: RGB, RGBA and palette images turned grey with no notice
    Row("rgb_to_grey", "cli", lambda c: c.restore(str(c.image("rgb.png", _rgb()))), 0,
        r"rgb\.png: converted RGB \(3 channels\) to grey \(1\): ITU-R 601 luma"),
    Row("rgba_to_grey", "cli",
        lambda c: c.restore(str(c.image("rgba.png", np.dstack([_rgb(), _rgb()[..., 0]])))), 0,
        r"rgba\.png: converted RGBA \(4 channels\) to grey \(1\): alpha dropped"),
    Row("palette_to_grey", "cli", lambda c: c.restore(str(_palette(c))), 0,
        r"p\.png: converted RGB \(3 channels\) to grey \(1\)"),
    # --- measured y ------------------------------------------------------------------------------
    Row("y_wrong_shape", "cli",
        lambda c: c.restore("--y", str(c.npy("y.npy", np.zeros((2, 16, 16, 1), np.float32)))), 2,
        r"y: expected measurements of shape \[N, \*\(32, 32, 1\)\]"),
    Row("y_not_finite", "cli",
        lambda c: c.restore("--y", str(c.npy("y.npy", np.full_like(Y, np.nan).repeat(2, 0)))),
        2, r"y: expected finite values, .* holds 2048"),
    Row("y_integer_dtype", "cli",
        lambda c: c.restore("--y", str(c.npy("y.npy", np.zeros((2, 32, 32, 1), np.int32)))), 2,
        r"y: expected float measurements, got dtype int32"),
    Row("y_npz_without_y", "cli",
        lambda c: c.restore("--y", str(_npz(c, x=np.zeros(3)))), 2,
        r"expected an array named 'y', found \['x'\]"),
    Row("y_pickled_objects", "cli",
        lambda c: c.restore("--y", str(c.npy("y.npy", np.array([{"a": 1}], dtype=object)))), 2,
        r"y: cannot read .*y\.npy: .*allow_pickle=False"),
    # found by this table: a garbage .npz was a BadZipFile traceback, an empty y a numpy message
    Row("y_npz_garbage", "cli", lambda c: c.restore("--y", str(c.file("g.npz", b"PK\x03\x04x"))),
        2, r"y: cannot read .*g\.npz: BadZipFile"),
    Row("y_empty", "cli",
        lambda c: c.restore("--y", str(c.npy("y.npy", np.zeros((0, 32, 32, 1), np.float32)))), 2,
        r"y: .*y\.npy holds no measurements"),
    Row("y_count_differs_from_truth", "cli",
        lambda c: c.demo("--y", str(c.npy("y.npy", np.zeros((3, 32, 32, 1), np.float32)))), 2,
        r"y: 3 measurements but 2 ground-truth images"),
    # --- checkpoints -----------------------------------------------------------------------------
    Row("missing_checkpoint", "cli", lambda c: c.demo(model=c.tmp / "nomodel"), 2,
        r"no checkpoint directory at .*nomodel.*embedded: mnist32"),
    Row("corrupt_model_json", "cli",
        lambda c: c.demo(model=c.ckpt_copy(lambda p: (p / "reddiff_model.json").write_text("{"))),
        2, r"corrupt checkpoint, .*reddiff_model\.json is not valid JSON"),
    Row("model_json_of_another_format", "cli",
        lambda c: c.demo(model=c.ckpt_copy(
            lambda p: (p / "reddiff_model.json").write_text('{"format": "x"}'))), 2,
        r"reddiff_model\.json is not a reddiff-jax/score-model record"),
    Row("checkpoint_bad_config_value", "cli",
        lambda c: c.demo(model=c.ckpt_copy(_edit_record(num_res_blocks=-1))), 2,
        r"corrupt checkpoint, bad config in .*reddiff_model\.json"),
    Row("checkpoint_of_another_config", "cli",
        lambda c: c.demo(model=c.ckpt_copy(_edit_record(num_channels=64))), 2,
        r"params in .* do not match the recorded config:\n .*stored \(.*\), expected \("),
    Row("params_folder_missing", "cli",
        lambda c: c.demo(model=c.ckpt_copy(lambda p: shutil.rmtree(p / "params"))), 2,
        r"corrupt checkpoint, .*params is missing"),
    Row("params_metadata_truncated", "cli",
        lambda c: c.demo(model=c.ckpt_copy(lambda p: os.truncate(p / "params" / "_METADATA", 9))),
        2, r"params metadata in .*params \(_METADATA\) is missing or unreadable"),
    # was: a good message followed by a dozen "RuntimeError: Event loop is closed" tracebacks
    # (tensorstore reads still in flight when orbax closed its loop); only a subprocess shows them
    Row("params_data_truncated", "subprocess",
        lambda c: c.demo(model=c.ckpt_copy(_truncate_params)), 2,
        r"^reddiff-jax restore: error: path: corrupt checkpoint .*ckpt, cannot read its params"),
    # --- converter -------------------------------------------------------------------------------
    Row("convert_pickle_os_system", "cli", _os_system_pickle, 2, r"refusing to load os\.system",
        check=_not_pwned),
    Row("convert_pickle_dumps_exploit", "cli", _pickle_dumps_exploit, 2,
        rf"refusing to load {os.system.__module__}\.system", check=_not_pwned),
    Row("convert_safetensors_garbage", "cli",
        lambda c: ["convert", str(c.file("x.safetensors", "hi")), str(c.out), "--preset", "tiny"],
        2, r"x\.safetensors: truncated safetensors file"),
    Row("convert_not_a_zip", "cli",
        lambda c: ["convert", str(c.file("x.pt", "garbage")), str(c.out), "--preset", "tiny"], 2,
        r"x\.pt: not a readable zip-format torch checkpoint"),
    Row("convert_missing_source", "cli",
        lambda c: ["convert", str(c.tmp / "no.pt"), str(c.out), "--preset", "tiny"], 2,
        r"src: checkpoint file not found"),
    Row("convert_unknown_preset", "cli",
        lambda c: ["convert", str(c.file("x.pt", "")), str(c.out), "--preset", "nope"], 2,
        r"unknown preset 'nope'"),
    # --- outputs and reruns ----------------------------------------------------------------------
    Row("out_is_a_file", "cli", lambda c: c.demo(out=c.file("afile", "") / "out"), 2,
        r"out: cannot write"),
    Row("rerun_with_other_settings", "cli", _rerun_other_settings, 2,
        r"holds the outputs of a run with other settings \(differences: \['sigma_y'\]\)"),
    # was: --overwrite with a smaller run kept the stale PNG and record beside the new metrics
    Row("overwrite_with_a_smaller_run", "cli", _overwrite_smaller, 0, r"restored 1 image",
        check=_no_stale_outputs),
    Row("ddrm_on_phase_retrieval", "cli",
        lambda c: c.demo("--algo", "ddrm", "--task", "phase_retrieval"), 2,
        r"ddrm cannot solve task 'phase_retrieval'"),
    # was: --task denoise at sigma_y 0 (an infinite PSNR, stored as None) crashed the summary
    Row("denoise_at_sigma_y_0", "cli", lambda c: c.demo("--task", "denoise"), 0,
        r"pinv: PSNR inf dB"),
    # was: --lr -1 / --lam -1 ran and reported OK; --lr 1e9 reported OK with |x| ~ 1e9
    Row("lr_negative", "cli", lambda c: c.demo("--lr", "-1"), 2,
        r"lr: expected a finite value in \[0\.0, inf\], got -1\.0"),
    Row("lam_negative", "cli", lambda c: c.demo("--lam", "-1"), 2,
        r"lam: expected a finite value in \[0\.0, inf\], got -1\.0"),
    Row("lr_nan", "cli", lambda c: c.demo("--lr", "nan"), 2, r"lr: expected a finite value"),
    Row("lr_diverges", "cli", lambda c: c.demo("--lr", "1e9"), 3,
        r"warning: 2 image\(s\) diverged \(non-finite or \|x\| > 1000\): heldout_0000, "
        r"heldout_0001"),
    # --- library ---------------------------------------------------------------------------------
    Row("lib_y_without_batch_axis", "lib", lambda c: _solve(c, _op(), Y[0]), ValueError,
        r"add a leading batch axis: y\[None\]"),
    Row("lib_y_nan", "lib", lambda c: _solve(c, _op(), Y * np.nan), ValueError,
        r"y: expected finite values, got 1024 non-finite"),
    Row("lib_y_bool", "lib", lambda c: _solve(c, _op(), Y.astype(bool)), TypeError,
        r"y: expected a real floating array, got dtype bool"),
    Row("lib_y_not_an_array", "lib", lambda c: _solve(c, _op(), [[0.0]]), TypeError,
        r"y: expected an array"),
    # was: a float32[2] or shape-3 key gave JAX-internal messages (solve, solve_many, sample)
    Row("lib_key_float32", "lib", lambda c: _solve(c, _op(), Y, jnp.zeros(2, jnp.float32)),
        TypeError, r"key: expected one jax PRNG key .*shape \(2,\) and dtype float32"),
    Row("lib_key_shape3", "lib", lambda c: _solve(c, _op(), Y, jnp.zeros(3, jnp.uint32)),
        TypeError, r"key: expected one jax PRNG key .*shape \(3,\) and dtype uint32"),
    Row("lib_key_int", "lib", lambda c: _solve(c, _op(), Y, 0), TypeError,
        r"key: expected one jax PRNG key .*got int"),
    Row("lib_key_none", "lib", lambda c: _solve(c, _op(), Y, None), ValueError,
        r"key: a PRNG key is required"),
    Row("lib_solve_many_key_float32", "lib", lambda c: _solve_many(c, jnp.zeros(2, jnp.float32)),
        TypeError, r"keys: expected one jax PRNG key .*float32"),
    Row("lib_solve_many_key_shape3", "lib", lambda c: _solve_many(c, jnp.zeros(3, jnp.uint32)),
        TypeError, r"keys: expected one jax PRNG key .*shape \(3,\)"),
    Row("lib_solve_many_wrong_key_count", "lib",
        lambda c: _solve_many(c, jax.random.split(jax.random.key(0), 3)), ValueError,
        r"keys: expected 2 keys \(one per measurement\)"),
    Row("lib_sample_key_float32", "lib", lambda c: _sample(c, jnp.zeros(2, jnp.float32)),
        TypeError, r"key: expected one jax PRNG key .*float32"),
    Row("lib_sample_key_shape3", "lib", lambda c: _sample(c, jnp.zeros(3, jnp.uint32)), TypeError,
        r"key: expected one jax PRNG key .*shape \(3,\)"),
    Row("lib_noise_wrong_keys", "lib", lambda c: _solve(c, _op(), Y, noise={"z": np.zeros(1)}),
        ValueError, r"noise: expected a dict with keys \['xt'\], got \['z'\]"),
    Row("lib_noise_wrong_shape", "lib",
        lambda c: _solve(c, _op(), Y, noise={"xt": np.zeros((3, 1, 32, 32, 1))}), ValueError,
        r'noise\["xt"\]: expected shape \(2, 1, 32, 32, 1\), got \(3, 1, 32, 32, 1\)'),
    Row("lib_config_a_string", "lib",
        lambda c: lambda: rj.solve("reddiff", c.model.eps, _op(), Y, jax.random.key(0)),
        TypeError, r"config: expected an algorithm config \(RedDiffConfig, "),
    Row("lib_config_a_class", "lib",
        lambda c: lambda: rj.solve(RedDiffConfig, c.model.eps, _op(), Y, jax.random.key(0)),
        TypeError, r"config: expected an algorithm config"),
    Row("lib_config_steps_a_string", "lib", lambda c: lambda: RedDiffConfig(num_steps="2"),
        ValueError, r"num_steps: expected an int in 1 \.\. 1000, got '2'"),
    Row("lib_eps_fn_not_callable", "lib",
        lambda c: lambda: rj.solve(RedDiffConfig(), None, _op(), Y, jax.random.key(0)), TypeError,
        r"eps_fn: expected a callable"),
    Row("lib_op_not_an_operator", "lib", lambda c: _solve(c, "denoise", Y), TypeError,
        r"op: expected an operator with an `A` method, got str"),
    # was: negative or non-finite hyper-parameters ran
    Row("lib_lr_negative", "lib", lambda c: lambda: RedDiffConfig(lr=-1.0), ValueError,
        r"lr: expected a finite value in \[0\.0, inf\], got -1\.0"),
    Row("lib_lam_inf", "lib", lambda c: lambda: RedDiffConfig(lam=float("inf")), ValueError,
        r"lam: expected a finite value"),
    # was: an operator for 28 or 64 px with the 32-px model solved silently, 28/64-px results
    Row("lib_operator_28px_for_32px_model", "lib",
        lambda c: _solve(c, _op(28), np.zeros((1, 28, 28, 1), np.float32)), ValueError,
        r"x: this model expects images \[N, 32, 32, 1\] .*got shape \(1, 28, 28, 1\)"),
    Row("lib_operator_64px_for_32px_model", "lib",
        lambda c: _solve(c, _op(64), np.zeros((1, 64, 64, 1), np.float32)), ValueError,
        r"x: this model expects images \[N, 32, 32, 1\] .*got shape \(1, 64, 64, 1\)"),
    Row("lib_operator_rgb_for_grey_model", "lib",
        lambda c: _solve(c, _op(32, 3), np.zeros((1, 32, 32, 3), np.float32)), ValueError,
        r"expects images \[N, 32, 32, 1\] .*got shape \(1, 32, 32, 3\)"),
    Row("lib_sample_wrong_size", "lib", lambda c: _sample(c, jax.random.key(0), (1, 28, 28, 1)),
        ValueError, r"expects images \[N, 32, 32, 1\] .*got shape \(1, 28, 28, 1\)"),
    Row("lib_eps_wrong_rank", "lib",
        lambda c: lambda: c.model.eps(jnp.zeros((32, 32, 1)), jnp.zeros((1,), jnp.int32)),
        ValueError, r"expects images \[N, 32, 32, 1\] .*got shape \(32, 32, 1\)"),
    # was: DPS diverging on phase retrieval wrote all-white PNGs with no warning
    Row("lib_dps_phase_retrieval_diverges", "lib", _dps_phase_retrieval_diverges, SolveError,
        r"DPS: image 0 .*diverged.* lower the step size \(zeta\)"),
    Row("lib_load_truncated_params", "lib",
        lambda c: lambda: load_pretrained(c.ckpt_copy(_truncate_params)), ValueError,
        r"corrupt checkpoint .*ckpt, cannot read its params"),
    Row("lib_restore_model_wrong_type", "lib", lambda c: _library_restore(c, model=3), TypeError,
        r"model: expected a ScoreModel, a path or None"),
    Row("lib_restore_sigma_y_a_string", "lib", lambda c: _library_restore(c, sigma_y="0.1"),
        ValueError, r"sigma_y: expected a finite float >= 0, got '0\.1'"),
    Row("lib_restore_unknown_algo", "lib", lambda c: _library_restore(c, algo="magic"),
        ValueError, r"algo: expected one of"),
]
# fmt: on


def _palette(ctx: Ctx) -> Path:
    path = ctx.tmp / "p.png"
    Image.fromarray(_rgb()).convert("P").save(path)
    with Image.open(path) as im:
        assert im.mode == "P"
    return path


def _npz(ctx: Ctx, **arrays: np.ndarray) -> Path:
    path = ctx.tmp / "y.npz"
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------------
# fixtures and the test


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory) -> Path:
    return save_pretrained(tiny_model, tmp_path_factory.mktemp("bad_inputs") / "tiny")


@pytest.fixture(scope="module")
def baseline(ckpt, tmp_path_factory) -> Path:
    """One finished run with the shared settings (it also compiles the shared solver)."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    argv = Ctx(ckpt, None, out.parent, out).demo()
    assert cli.main(argv) == 0
    return out


def _snapshot(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")} if folder.is_dir() else {}


def _subprocess(argv: list[str]) -> tuple[int, str, str]:
    code = "import sys; from reddiff_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300)  # fmt: skip
    return r.returncode, r.stdout, r.stderr


def test_table_is_large_and_ids_unique():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, ckpt, tiny_model, baseline, tmp_path, capsys, monkeypatch):
    ctx = Ctx(ckpt=ckpt, model=tiny_model, tmp=tmp_path, baseline=baseline)
    if row.patch is not None:
        row.patch(ctx, monkeypatch)
    if row.kind == "lib":
        call = row.provoke(ctx)
        with pytest.raises(row.expect, match=row.pattern):
            call()
        return
    argv = [str(a) for a in row.provoke(ctx)]
    before = _snapshot(ctx.out)
    if row.kind == "subprocess":
        rc, out, err = _subprocess(argv)
    else:
        try:
            rc = cli.main(argv)
        except SystemExit as exit_:  # argparse: usage errors, --version
            rc = exit_.code
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    assert rc == row.expect, f"exit status {rc}\nstdout:\n{out}\nstderr:\n{err}"
    text = err if rc != 0 else out + err
    assert re.search(row.pattern, text, re.MULTILINE), f"no /{row.pattern}/ in:\n{text}"
    assert "Traceback" not in err and "Event loop" not in err, err
    if rc == 2:  # refused before solving: no restored image written or touched
        assert _snapshot(ctx.out) == before
    if row.check is not None:
        row.check(ctx, out + err)
