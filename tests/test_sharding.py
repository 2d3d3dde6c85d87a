"""Scale-out (issue 11): per-image keys make a result independent of its batch; a solve sharded
over 8 simulated devices equals the single-device one; the main job's --batch changes no PNG.

The 8-device checks run in a subprocess (``--xla_force_host_platform_device_count=8`` must be
set before JAX starts); the rest runs here on one device, on a toy problem (4x4x2 images).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from reddiff_jax import restore as R
from reddiff_jax import sharding
from reddiff_jax.solvers import DPSConfig, RedDiffConfig, solve, solve_many

SHAPE = (4, 4, 2)
ROOT = Path(__file__).resolve().parents[1]


class Mask(flax.struct.PyTreeNode):
    mask: jax.Array

    @property
    def image_shape(self):
        return tuple(self.mask.shape)

    def A(self, x):
        return x * self.mask

    def A_dagger(self, y):
        return y * self.mask


def toy_eps(x_t, t):
    return 0.3 * jnp.tanh(x_t) + (t / 1000.0)[:, None, None, None] * jnp.sin(x_t)


OP = Mask(jnp.asarray((np.arange(np.prod(SHAPE)) % 3 > 0).reshape(SHAPE), jnp.float32))
X = np.random.default_rng(0).uniform(-1, 1, (5, *SHAPE)).astype(np.float32)
Y = jnp.asarray(X) * OP.mask
KEYS = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(5))


@pytest.mark.parametrize(
    "cfg",
    [RedDiffConfig(num_steps=5, lr=0.2, reduction="image_mean"), DPSConfig(num_steps=5, zeta=0.02)],
    ids=["reddiff", "dps"],
)
def test_per_image_keys_make_an_image_independent_of_its_batch(cfg):
    full = solve(cfg, toy_eps, OP, Y, KEYS)
    for lo, hi in ((0, 1), (1, 4), (4, 5)):
        part = solve(cfg, toy_eps, OP, Y[lo:hi], KEYS[lo:hi])
        np.testing.assert_allclose(np.asarray(part.x), np.asarray(full.x[lo:hi]), atol=1e-6)
    # raw uint32 [B, 2] keys are the same keys; solve_many draws each measurement alike
    raw = solve(cfg, toy_eps, OP, Y, jax.random.key_data(KEYS))
    np.testing.assert_array_equal(np.asarray(raw.x), np.asarray(full.x))
    many = solve_many(cfg, toy_eps, OP, Y, KEYS, op_axis=None)
    np.testing.assert_allclose(np.asarray(many.x), np.asarray(full.x), atol=1e-6)


def test_one_key_keeps_the_batch_stream_and_a_one_device_mesh_changes_nothing():
    cfg = DPSConfig(num_steps=5, zeta=0.02)
    key = jax.random.key(3)
    one = solve(cfg, toy_eps, OP, Y, key)
    assert not np.allclose(np.asarray(one.x), np.asarray(solve(cfg, toy_eps, OP, Y, KEYS).x))
    mesh = sharding.data_mesh(1)
    on_mesh = solve(cfg, toy_eps, OP, Y, key, mesh=mesh)
    np.testing.assert_allclose(np.asarray(on_mesh.x), np.asarray(one.x), atol=1e-6)


def test_argument_errors_name_the_argument():
    cfg = DPSConfig(num_steps=5)
    with pytest.raises(ValueError, match=r"key: expected one key, or 5 keys .* got 3 keys"):
        solve(cfg, toy_eps, OP, Y, KEYS[:3])
    with pytest.raises(TypeError, match=r"key: .* or 5 keys \(one per image"):
        solve(cfg, toy_eps, OP, Y, jnp.zeros((5, 3), jnp.uint32))
    bad = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match=r"mesh: expected a mesh with a 'data' axis.*'batch'"):
        solve(cfg, toy_eps, OP, Y, KEYS, mesh=bad)
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
        solve_many(cfg, toy_eps, OP, Y, KEYS, op_axis=None, mesh="data")
    with pytest.raises(ValueError, match="devices: expected 'all' or an int in 1 .. "):
        sharding.data_mesh(len(jax.local_devices()) + 1)
    assert sharding.pad_rows(np.arange(3), 5).tolist() == [0, 1, 2, 2, 2]
    spans = [list(sharding.process_span(10, index=p, count=3)) for p in range(3)]
    assert spans == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


# ------------------------------------------------------------------------------------------------
# the main job: --batch 1, 3 and 12 give the same PNGs


@pytest.mark.parametrize("algo", ["reddiff", "ddrm"])
def test_restore_pngs_do_not_depend_on_the_batch(tiny_model, tmp_path, algo):
    pngs = {}
    for batch in (1, 3, 12):
        out = tmp_path / f"b{batch}"
        res = R.restore(jax.random.key(5), out=out, model=tiny_model, demo=True, n=12, steps=2,
                        task="sr:4", algo=algo, batch=batch, progress=False)  # fmt: skip
        assert res.solved == 12
        pngs[batch] = np.stack([np.asarray(Image.open(p), np.int16) for p in res.restored])
    for batch in (3, 12):
        assert np.abs(pngs[batch] - pngs[1]).max() <= 1, batch
    # a rerun into the same folder with another batch resumes (batch is not a setting)
    again = R.restore(jax.random.key(5), out=tmp_path / "b3", model=tiny_model, demo=True, n=12,
                      steps=2, task="sr:4", algo=algo, batch=5, progress=False)  # fmt: skip
    assert again.solved == 0 and again.skipped == 12


# ------------------------------------------------------------------------------------------------
# 8 simulated devices (a subprocess)

_EIGHT = textwrap.dedent(
    r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_sharding import OP, SHAPE, toy_eps
    from reddiff_jax import sharding
    from reddiff_jax.solvers import DPSConfig, RedDiffConfig, driver, solve, solve_many

    assert jax.device_count() == 8
    mesh = sharding.data_mesh()
    X = np.random.default_rng(1).uniform(-1, 1, (16, *SHAPE)).astype(np.float32)
    Y = jnp.asarray(X) * OP.mask
    key = jax.random.key(3)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(16))
    out = {}

    def err(a, b):  # max |a - b| over leaves, relative to the scale of a (at least 1)
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert [v.shape for v in la] == [v.shape for v in lb]
        return max(float(jnp.max(jnp.abs(u - v)) / max(1.0, float(jnp.max(jnp.abs(u)))))
                   for u, v in zip(la, lb))

    # 12 images on 8 devices: padded to 16; the compiled scan program is kept for a look
    calls, real = [], driver._chunk_jit
    driver._chunk_jit = lambda *args: calls.append(args) or real(*args)
    cases = {
        "reddiff_batch_mean": (RedDiffConfig(num_steps=20, lr=0.2), keys[:12]),
        "reddiff_image_mean": (RedDiffConfig(num_steps=20, lr=0.2, reduction="image_mean"), key),
        "dps": (DPSConfig(num_steps=10, zeta=0.02, eta=0.5), keys[:12]),
    }
    for name, (cfg, k) in cases.items():
        a = solve(cfg, toy_eps, OP, Y[:12], k)
        b = solve(cfg, toy_eps, OP, Y[:12], k, mesh=mesh)
        out[name] = {"x": err(a.x, b.x), "info": err(a.info, b.info),
                     "state": err(a.state, b.state), "shape": list(b.x.shape)}
    driver._chunk_jit = real

    # 64 images, 8 a device: the default micro-batching (CPU) runs 2 strided chunks of 4 a device
    X64 = np.random.default_rng(3).uniform(-1, 1, (64, *SHAPE)).astype(np.float32)
    Y64 = jnp.asarray(X64) * OP.mask
    cfg = RedDiffConfig(num_steps=10, lr=0.2, reduction="image_mean")
    a = solve(cfg, toy_eps, OP, Y64, key, micro_batch=0)
    seen = []
    b = solve(cfg, lambda x, t: seen.append(x.shape[0]) or toy_eps(x, t), OP, Y64, key, mesh=mesh)
    out["micro"] = {"x": err(a.x, b.x), "info": err(a.info, b.info), "calls": sorted(set(seen)),
                    "spec": str(b.x.sharding.spec)}
    # DPS, 32 images, 4 a device: its forward + VJP in 2 strided chunks of 2 a device
    cfg = DPSConfig(num_steps=5, zeta=0.02)
    a = solve(cfg, toy_eps, OP, Y64[:32], key, micro_batch=0)
    seen = []
    b = solve(cfg, lambda x, t: seen.append(x.shape[0]) or toy_eps(x, t), OP, Y64[:32], key,
              mesh=mesh)
    out["micro_dps"] = {"x": err(a.x, b.x), "info": err(a.info, b.info),
                        "calls": sorted(set(seen))}

    # solve_many over 16 measurements: own masks (per-image operator leaves) and a lam sweep
    masks = jnp.asarray(np.random.default_rng(2).uniform(size=(16, *SHAPE)) > 0.3, jnp.float32)
    ops = type(OP)(masks)
    cfg = RedDiffConfig(num_steps=10, lr=0.2)
    lams = jnp.linspace(0.1, 0.5, 16)
    a = solve_many(cfg, toy_eps, ops, Y * masks, keys, hyper={"lam": lams})
    for m in (16, 13):  # 13: padded to 16; a measurement's result does not depend on M
        sub = type(OP)(masks[:m])
        b = solve_many(cfg, toy_eps, sub, Y[:m] * masks[:m], keys[:m], hyper={"lam": lams[:m]},
                       mesh=mesh)
        a_m = jax.tree.map(lambda v: v[:m], a)
        out[f"many{m}"] = {"x": err(a_m.x, b.x), "info": err(a_m.info, b.info),
                           "shape": list(b.x.shape), "spec": str(b.x.sharding.spec)}
    # micro-batched over the mesh: 13 padded to 16, 2 strided chunks of 1 a device
    b = solve_many(cfg, toy_eps, type(OP)(masks[:13]), Y[:13] * masks[:13], keys[:13],
                   hyper={"lam": lams[:13]}, mesh=mesh, micro_batch=1)
    a_m = jax.tree.map(lambda v: v[:13], a)
    out["many_micro"] = {"x": err(a_m.x, b.x), "info": err(a_m.info, b.info),
                         "shape": list(b.x.shape), "spec": str(b.x.sharding.spec)}

    # the compiled scan program of a sharded solve: a while loop with no host callback
    hlo = real.lower(*calls[-1]).compile().as_text()
    out["hlo"] = {"while": hlo.count(" while("), "callback": hlo.lower().count("callback"),
                  "partitions": hlo.count("num_partitions=8")}
    probe = jax.jit(lambda v: jax.debug.callback(print, v) or v).lower(1.0).compile().as_text()
    out["probe_callback"] = probe.lower().count("callback")
    print("RESULT " + json.dumps(out))
    """
)


def test_eight_devices_equal_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _EIGHT, str(Path(__file__).parent)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    for name in ("reddiff_batch_mean", "reddiff_image_mean", "dps"):
        got = out[name]
        assert got["shape"] == [12, *SHAPE]
        for part in ("x", "info", "state"):
            assert got[part] <= 1e-6, (name, part, got)
    for m in (16, 13):
        assert out[f"many{m}"]["shape"] == [m, *SHAPE]
        assert out[f"many{m}"]["x"] <= 1e-6 and out[f"many{m}"]["info"] <= 1e-6, out
    assert out["many16"]["spec"] == "P('data',)"  # the result stays sharded
    many = out["many_micro"]
    assert many["shape"] == [13, *SHAPE] and many["x"] <= 1e-6 and many["info"] <= 1e-6, many
    micro = out["micro"]  # network calls on 32 images (4 of each device's 8) at a time
    assert micro["x"] <= 1e-6 and micro["info"] <= 1e-6 and micro["calls"] == [32], micro
    assert micro["spec"] == "P('data',)"
    micro = out["micro_dps"]  # network VJPs on 16 images (2 of each device's 4) at a time
    assert micro["x"] <= 1e-5 and micro["info"] <= 1e-5 and micro["calls"] == [16], micro
    hlo = out["hlo"]
    assert hlo["while"] >= 1 and hlo["callback"] == 0 and hlo["partitions"] >= 1, hlo
    assert out["probe_callback"] > 0  # the check would see a host callback
