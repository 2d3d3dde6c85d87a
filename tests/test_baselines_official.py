"""DPS and ΠGDM against the recorded official RED-diff trajectories (``dps_sr4``, ``pgdm_sr4``).

Fixture: ``tests/fixtures/reddiff_official`` (README: DPS / PGDM part). Layout there is NCHW;
ours is NHWC. Tolerances are the README's: teacher-forced update arithmetic (recorded eps and
gradient fed in) rtol 1e-6 x max|x|; free-running with the converted ``tiny_imagenet_like`` UNet
2e-5 x max|x| (the trajectories reach |x| ~ 530 because the UNet has random weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reddiff_jax.solvers import dps, pgdm, solve

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL = FIXTURES / "reddiff_official"
UNET = FIXTURES / "guided_diffusion"


def _load(name: str):
    return np.load(OFFICIAL / f"{name}.npz")


def _nhwc(a) -> np.ndarray:
    return np.moveaxis(np.asarray(a), -3, -1)


def _sr4():
    from reddiff_jax.operators import AvgPoolSR

    return AvgPoolSR.create((32, 32, 3), factor=4)


def _block_mean(x: np.ndarray) -> np.ndarray:
    B, H, W, C = x.shape
    return x.reshape(B, H // 4, 4, W // 4, 4, C).mean(axis=(2, 4))


# ------------------------------------------------------------------------------------------------
# Teacher forcing: the update arithmetic alone, on the recorded network outputs.


def test_dps_update_teacher_forced():
    d = _load("dps_sr4")
    x0, eps, grad = (_nhwc(d[k]) for k in ("x0_pred", "eps_pred", "grad_term"))
    z, ref = _nhwc(d["noise_z"]), _nhwc(d["x_next"])
    y = _nhwc(d["y_img"])
    a = np.asarray(d["alpha_t"])
    a_s = np.concatenate([a[1:], [1.0]]).astype(np.float32)
    scale = np.abs(ref).max()
    for k in range(len(a)):
        # Residual norm over all entries of y (layout-free), from the recorded x0.
        r = y - _block_mean(x0[k].astype(np.float64))
        norm = np.sqrt((r**2).reshape(r.shape[0], -1).sum(1))
        got = dps.dps_update(
            jnp.asarray(x0[k]), jnp.asarray(eps[k]), jnp.asarray(grad[k]),
            jnp.asarray(norm, jnp.float32), a[k], a_s[k], jnp.asarray(z[k]), zeta=1.0, eta=1.0,
        )  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), ref[k], rtol=0, atol=1e-6 * scale)


def test_pgdm_update_teacher_forced():
    d = _load("pgdm_sr4")
    x0, eps, grad = (_nhwc(d[k]) for k in ("x0_pred", "eps_pred", "grad_term"))
    z, ref = _nhwc(d["noise_z"]), _nhwc(d["x_next"])
    a = np.asarray(d["alpha_t"])
    a_s = np.concatenate([a[1:], [1.0]]).astype(np.float32)
    scale = np.abs(ref).max()
    for k in range(len(a)):
        got = pgdm.pgdm_update(
            jnp.asarray(x0[k]), jnp.asarray(eps[k]), jnp.asarray(grad[k]), a[k], a_s[k],
            jnp.asarray(z[k]), w=1.0, eta=1.0,
        )  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), ref[k], rtol=0, atol=1e-6 * scale)


# ------------------------------------------------------------------------------------------------
# Free running with the converted UNet and the recorded draws.


@pytest.fixture(scope="module")
def tiny_model():
    from reddiff_jax.convert import convert_state_dict, read_state_dict
    from reddiff_jax.model import ScoreModel
    from reddiff_jax.unet import UNetConfig

    pt, cfg = UNET / "tiny_imagenet_like.pt", UNET / "tiny_imagenet_like.config.json"
    config = UNetConfig.from_create_model_kwargs(json.loads(cfg.read_text()))
    params = convert_state_dict(read_state_dict(pt), config)
    return ScoreModel(config=config, params=jax.tree_util.tree_map(jnp.asarray, params))


@pytest.mark.parametrize(
    "case, config",
    [
        ("dps_sr4", dps.DPSConfig(num_steps=20, zeta=1.0, eta=1.0)),
        ("pgdm_sr4", pgdm.PGDMConfig(num_steps=20, w=1.0, eta=1.0)),
    ],
)
def test_free_running_matches_official_trajectory(tiny_model, case, config):
    d = _load(case)
    y = jnp.asarray(_nhwc(d["y_img"]))
    noise = {"init": jnp.asarray(_nhwc(d["noise_init"])), "z": jnp.asarray(_nhwc(d["noise_z"]))}
    res = solve(config, tiny_model.eps, _sr4(), y, jax.random.key(0), noise=noise, trajectory=True)
    ref = _nhwc(d["x_next"])
    scale = np.abs(ref).max()
    # README: float32 vs float64 official runs differ by <= 4.5e-6 x max|x|; a faithful float32
    # port with its own UNet should agree to about 2e-5 x max|x| at every step.
    tol = 2e-5 * scale
    np.testing.assert_allclose(np.asarray(res.trajectory["x"]), ref, rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(res.trajectory["x0"]), _nhwc(d["x0_pred"]), rtol=0,
                               atol=tol)  # fmt: skip
    np.testing.assert_allclose(np.asarray(res.x), _nhwc(d["x_final"]), rtol=0, atol=tol)
