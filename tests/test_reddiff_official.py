"""RED-Diff parity with the official code (NVlabs/RED-diff @ 66482f2), step by step.

Fixtures: tests/fixtures/reddiff_official/reddiff_*.npz (tiny random UNet, a real photo, every
random draw recorded; see that folder's README for layouts and tolerances).

* Teacher-forced: the recorded UNet outputs are replayed as eps_fn, so only the RED-Diff
  arithmetic is compared: mu after every step and the returned x0_pred to atol 1e-5 (README
  "Replay check"), the per-step gradient to 1e-5 x max|grad|, the losses and weights.
* Free-running: the converted tiny UNet, the recorded noises; README tolerances: 5e-4 abs on mu
  after every step and on x0_pred (1e-2 for phase retrieval with the upstream pad 64).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax import operators
from reddiff_jax.solvers import RedDiffConfig, solve, step_inputs
from reddiff_jax.solvers.reddiff import reddiff

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL = FIXTURES / "reddiff_official"
GUIDED = FIXTURES / "guided_diffusion"
CASES = [
    "reddiff_in2_box",
    "reddiff_sr4",
    "reddiff_hdr",
    "reddiff_phase_retrieval",
    "reddiff_phase_retrieval_pad64",
]
FREE_RUNNING_ATOL = {"reddiff_phase_retrieval_pad64": 1e-2}  # README; 5e-4 for the others


def _nhwc(a) -> np.ndarray:
    """(..., C, H, W) -> (..., H, W, C)."""
    return np.moveaxis(np.asarray(a), -3, -1)


def _load(name: str) -> dict:
    z = dict(np.load(OFFICIAL / f"{name}.npz"))
    meta = json.loads((OFFICIAL / f"{name}.json").read_text())
    algo = meta["config"]["algo"]
    shape = (32, 32, 3)
    if name.startswith("reddiff_in2"):
        op = operators.make("inpaint", shape, mask=jnp.asarray(_nhwc(z["mask"])[0]))
        y = _nhwc(z["y"].reshape(-1, 3, 32, 32))  # flattened NCHW, full size
    elif name.startswith("reddiff_sr4"):
        op = operators.make("sr", shape, factor=4)
        y = _nhwc(z["y_img"])  # the flat channel-major y, as an image
    elif name.startswith("reddiff_hdr"):
        op = operators.make("hdr", shape)
        y = _nhwc(z["y"])
    else:
        op = operators.make("phase_retrieval", shape, pad=64 if name.endswith("pad64") else 8)
        y = _nhwc(z["y"])
    assert algo["sigma_x0"] == 0.0 and algo["denoise_term_weight"] == "linear"
    config = RedDiffConfig(
        num_steps=int(meta["num_steps"]),
        lr=float(algo["lr"]),
        lam=float(algo["grad_term_weight"]),
        obs_weight=float(algo["obs_weight"]),
        weighting=algo["denoise_term_weight"],
        sigma_x0=float(algo["sigma_x0"]),
    )
    return {"z": z, "op": op, "y": jnp.asarray(y), "config": config}


@functools.cache
def _case(name: str) -> dict:
    return _load(name)


def _recorded_eps(table, ts, x_t, t):
    """Teacher forcing: the official UNet output recorded at timestep t (same for the batch)."""
    del x_t
    return table[jnp.argmax(ts == t[0])]


def _teacher(case):
    z = case["z"]
    return functools.partial(
        _recorded_eps, jnp.asarray(_nhwc(z["eps_pred"])), jnp.asarray(z["ts"], jnp.int32)
    )


@pytest.mark.parametrize("name", CASES)
def test_teacher_forced_parity(name):
    case = _case(name)
    z, op, y, config = case["z"], case["op"], case["y"], case["config"]
    np.testing.assert_array_equal(config.timesteps(), z["ts"])
    # official init: mu0 = H_pinv(y)
    mu0 = jax.vmap(op.A_dagger)(y)
    np.testing.assert_allclose(np.asarray(mu0), _nhwc(z["mu0"]), rtol=0, atol=1e-6)
    # the measurement itself: y = A(x) + noise
    y_clean = jax.vmap(op.A)(jnp.asarray(_nhwc(z["x"])))
    if name.startswith("reddiff_in2"):
        y_clean_ref = _nhwc(z["y_clean"].reshape(-1, 3, 32, 32))
    else:
        y_clean_ref = _nhwc(z["y_clean_img"] if "y_clean_img" in z else z["y_clean"])
    np.testing.assert_allclose(np.asarray(y_clean), y_clean_ref, rtol=0, atol=1e-5)

    noise = {"xt": jnp.asarray(_nhwc(z["noise_xt"]))}
    res = solve(config, _teacher(case), op, y, None, noise=noise, trajectory=True)
    mu_after = _nhwc(z["mu_after"])
    err = np.abs(np.asarray(res.trajectory["x"]) - mu_after).max(axis=(1, 2, 3, 4))
    assert err.max() <= 1e-5, f"mu_after max abs error per step: {err}"
    np.testing.assert_allclose(np.asarray(res.x), _nhwc(z["x0_pred"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.state.mu), mu_after[-1], rtol=0, atol=1e-5)
    info = res.info
    np.testing.assert_allclose(np.asarray(info["w_t"]), z["w_t"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(info["v_t"]), z["v_t"], rtol=0)
    np.testing.assert_allclose(np.asarray(info["loss_obs"])[:, 0], z["loss_obs"], rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    np.testing.assert_allclose(np.asarray(info["loss_noise"])[:, 0], z["loss_noise"], rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    np.testing.assert_allclose(np.asarray(info["loss"]), z["loss"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["reddiff_sr4", "reddiff_phase_retrieval"])
def test_teacher_forced_step_pair_gradient(name):
    """The init/step pair driven by hand: d loss/d mu before each Adam step (`grad`)."""
    case = _case(name)
    z = case["z"]
    solver = reddiff(_teacher(case), case["op"], config=case["config"])
    noise = jnp.asarray(_nhwc(z["noise_xt"]))

    inputs = step_inputs(case["config"])
    np.testing.assert_array_equal(np.asarray(inputs.t), z["ts"])

    @jax.jit
    def run(y):
        def body(state, xs):
            inp, n = xs
            state, out = solver.step(state, inp, {"xt": n})
            return state, out.extras["grad_reg"] + out.extras["grad_obs"]

        return jax.lax.scan(body, solver.init(y), (inputs, noise))

    state, grads = run(case["y"])
    ref = _nhwc(z["grad"])
    scale = np.abs(ref).max(axis=(1, 2, 3, 4), keepdims=True)
    rel = np.abs(np.asarray(grads) - ref) / scale
    assert rel.max() <= 1e-5, rel.max(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(np.asarray(state.mu), _nhwc(z["mu_after"])[-1], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    from reddiff_jax.convert import convert_state_dict, read_state_dict
    from reddiff_jax.model import ScoreModel
    from reddiff_jax.unet import UNetConfig

    meta = json.loads((GUIDED / "tiny_imagenet_like.config.json").read_text())
    config = UNetConfig.from_create_model_kwargs(meta)
    params = convert_state_dict(read_state_dict(GUIDED / "tiny_imagenet_like.pt"), config)
    return ScoreModel(config, jax.tree.map(jnp.asarray, params))


@pytest.mark.parametrize("name", CASES)
def test_free_running_parity(name, tiny_model):
    case = _case(name)
    z = case["z"]
    atol = FREE_RUNNING_ATOL.get(name, 5e-4)
    noise = {"xt": jnp.asarray(_nhwc(z["noise_xt"]))}
    with jax.default_matmul_precision("highest"):
        res = solve(case["config"], tiny_model.eps, case["op"], case["y"], None, noise=noise,
                    trajectory=True)  # fmt: skip
    err = np.abs(np.asarray(res.trajectory["x"]) - _nhwc(z["mu_after"])).max(axis=(1, 2, 3, 4))
    assert err.max() <= atol, f"mu_after max abs error per step: {err}"
    np.testing.assert_allclose(np.asarray(res.x), _nhwc(z["x0_pred"]), rtol=0, atol=atol)
