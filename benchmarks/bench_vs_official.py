"""reddiff-jax against the official RED-Diff and DPS loops in torch: solve time at batch 1, 8, 32.

The torch side is the official algorithms' loops (NVlabs/RED-diff ``algos/reddiff.py`` and
``algos/dps.py``, as described in ``reference/reddiff_official.md``), written here over a
functional torch port of guided-diffusion's UNet forward (``bench_unet.torch_unet_forward``,
checked against the fixture's golden output), on the same random-weight fixture network
``tiny_imagenet_like`` (32 px), the same sr4 operator (4x4 block average, nearest-neighbour
pseudo-inverse) and the same number of steps. Like the official RED-Diff, the torch loop calls
the network with autograd on (the graph is built, then ``et.detach()``); DPS differentiates the
data loss through the network.

reddiff-jax is timed as users run it: :func:`reddiff_jax.sharding.use_cpu_cores` (one CPU
device per core, as the command line does) and the batch sharded over ``min(batch, devices)``
devices ("ours"); and, as before that change, in a child process with JAX's default single
CPU device ("1 device"). Each figure
is the median of ``--repeats`` warm calls, the first (compiling) call excluded. Ours and the
official loop are timed *interleaved*, one call of each per round with a pause between
(``PAUSE_S``: XLA's worker threads and torch's OpenMP threads spin for a while after a call),
so that the shared machine's slow drifts hit both sides alike; the ratio printed is the median
of the rounds' official time / ours (> 1: reddiff-jax is faster). The one-device column comes
from a child process, timed alone. Usage::

    python benchmarks/bench_vs_official.py [--batch 1,8,32] [--steps 20] [--repeats 3]
        [--torch-threads 2] [--chunk-rows 2,8] [--json out.json]

``--chunk-rows`` adds ours at those micro-batch sizes (images per device per network call,
where they divide a device's share) to the same interleaved rounds, printed after the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from reddiff_jax import sharding

if __name__ == "__main__":  # before any JAX work: one CPU device per core, as the CLI does
    sharding.use_cpu_cores()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_unet  # noqa: E402
import common  # noqa: E402

from reddiff_jax import diffusion, operators  # noqa: E402
from reddiff_jax.solvers import DPSConfig, RedDiffConfig, _microbatch, registry, solve  # noqa: E402

FACTOR = 4  # sr4
PAUSE_S = 0.3  # between timed calls: lets the other runtime's worker threads stop spinning
LAM, LR, ZETA = 0.25, 0.1, 1.0  # official RED-Diff defaults; DPS's sr4 script value


# --------------------------------------------------------------------------------------
# reddiff-jax
# --------------------------------------------------------------------------------------


def jax_solver(
    algo: str, steps: int, devices: int, micro_batch: int | None = None
) -> Callable[[Any, Any, Any, Any], Any]:
    """``run(model, op, y, key)``: the reddiff-jax solve, sharded over ``devices`` devices
    (``micro_batch``: that of :func:`reddiff_jax.solvers.solve`; None: its default)."""
    config = (
        RedDiffConfig(num_steps=steps, lam=LAM, lr=LR)
        if algo == "reddiff"
        else DPSConfig(num_steps=steps, zeta=ZETA)
    )
    mesh = sharding.data_mesh(devices) if devices > 1 else None

    def run(model, op, y, key):
        return solve(config, model.eps, op, y, key, mesh=mesh, micro_batch=micro_batch).x

    return run


# --------------------------------------------------------------------------------------
# the official loops, in torch (NCHW)
# --------------------------------------------------------------------------------------


def torch_solvers(fwd: Callable[..., Any], steps: int) -> dict[str, Callable[[Any], Any]]:
    """The official RED-Diff and DPS sample loops over the network ``fwd(x, t)`` for sr4."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    ac = torch.from_numpy(np.asarray(diffusion.alphas_cumprod("linear", 1000), np.float64))
    ts = [int(t) for t in diffusion.timesteps(steps, 1000)]  # descending

    def H(x):  # noqa: N802 - the official name
        return F.avg_pool2d(x, FACTOR)

    def H_pinv(y):  # noqa: N802
        return y.repeat_interleave(FACTOR, 2).repeat_interleave(FACTOR, 3)

    def eps(x, t):
        return fwd(x, torch.full((x.shape[0],), t))[:, : x.shape[1]]

    def reddiff(y):
        mu = H_pinv(y).detach().requires_grad_(True)
        opt = torch.optim.Adam([mu], lr=LR, betas=(0.9, 0.99))
        for t in ts:
            a = float(ac[t])
            noise = torch.randn_like(mu)
            xt = a**0.5 * mu + (1 - a) ** 0.5 * noise
            et = eps(xt, t).detach()  # autograd on, as upstream: the graph is built
            loss_obs = ((y - H(mu)) ** 2).mean() / 2
            loss_noise = ((et - noise).detach() * mu).mean()
            loss = LAM * ((1 - a) / a) ** 0.5 * loss_noise + loss_obs
            opt.zero_grad()
            loss.backward()
            opt.step()
        return mu.detach()

    def dps(y):
        a_T = float(ac[ts[0]])  # noqa: N806
        x = a_T**0.5 * H_pinv(y) + (1 - a_T) ** 0.5 * torch.randn_like(H_pinv(y))
        for i, t in enumerate(ts):
            a = float(ac[t])
            a_s = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            x = x.detach().requires_grad_(True)
            et = eps(x, t)
            x0 = (x - (1 - a) ** 0.5 * et) / a**0.5
            norm = torch.linalg.vector_norm((y - H(x0)).flatten(1), dim=1)
            (grad,) = torch.autograd.grad(norm.sum(), x)  # d||r||/dx = grad||r||^2 / (2||r||)
            with torch.no_grad():
                x = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * et - ZETA * grad
        return x.detach()

    return {"reddiff": reddiff, "dps": dps}


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------


def jax_cases(args: argparse.Namespace) -> list[tuple[dict[str, Any], dict[str, Callable]]]:
    """One (row, runs) per (algo, batch): ``runs["ours"]`` is reddiff-jax's solve sharded over
    min(batch, local devices), ``runs["ours_whole"]`` (where ``solve`` micro-batches by default)
    the same without micro-batching; each is called once here, so it is compiled and warm."""
    model, label = common.bench_model()
    size, ch = model.config.image_size, model.config.in_channels
    op = operators.make("sr", (size, size, ch), factor=FACTOR)
    ndev = len(jax.local_devices())
    print(f"model: {label}; sr{FACTOR}; {args.steps} steps; backend {jax.default_backend()}, "
          f"{ndev} device(s)")  # fmt: skip
    cases = []
    for algo in args.algos.split(","):
        for b in _batches(args.batch):
            devices = min(b, ndev)
            y = jnp.asarray(measurements(op, b, size, ch))
            backprop = registry.get(algo).backprop
            micro = _microbatch.auto_rows(b, devices, jax.default_backend(), backprop)
            row = {"algo": algo, "batch": b, "steps": args.steps,
                   "ours_devices": devices, "ours_micro": micro}  # fmt: skip
            variants = {"ours": None, "ours_whole": 0} if micro else {"ours": None}
            share = b // devices
            for r in _batches(args.chunk_rows) if args.chunk_rows else ():
                if r != micro and 0 < r < share and share % r == 0:
                    variants[f"ours_rows{r}"] = r  # more chunk sizes (--chunk-rows)
            runs = {}
            for name, mb in variants.items():
                solver = jax_solver(algo, args.steps, devices, micro_batch=mb)
                runs[name] = lambda s=solver, y=y: s(model, op, y, jax.random.key(0))
                jax.block_until_ready(runs[name]())  # compile (solve caches it) and warm up
            cases.append((row, runs))
    return cases


def _time_once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each of ``runs`` (warm), ``repeats`` rounds of one call each in
    turn, ``PAUSE_S`` of idle time before every call."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            time.sleep(PAUSE_S)
            times[name].append(_time_once(fn))
    return times


def jax_only_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """reddiff-jax's times alone (the one-device child): medians of ``--repeats`` rounds."""
    rows = []
    for row, runs in jax_cases(args):
        times = interleaved(runs, args.repeats)
        rows.append({**row, **{f"{k}_s": statistics.median(v) for k, v in times.items()}})
    return rows


def measurements(op: Any, batch: int, size: int, ch: int) -> np.ndarray:
    """sr4 measurements [B, h, w, C] of uniform random images (the same in every process)."""
    x = np.random.default_rng(batch).uniform(-1, 1, (batch, size, size, ch)).astype(np.float32)
    return np.asarray(jax.vmap(op.A)(jnp.asarray(x)))


def one_device_rows(argv: Sequence[str]) -> list[dict[str, Any]]:
    """The JAX rows re-measured in a child process with one CPU device (JAX's default)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
        cmd = [sys.executable, __file__, *argv, "--jax-only", "--json", str(out)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def _batches(spec: str) -> list[int]:
    return [int(b) for b in spec.split(",")]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--algos", default="reddiff,dps")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--chunk-rows", default="", help="also time these images/device/call, e.g. 2,8")
    p.add_argument("--jax-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.jax_only:
        rows = jax_only_rows(args)
        if args.json:
            args.json.write_text(json.dumps(rows))
        return rows
    ndev = len(jax.local_devices())
    base = one_device_rows(argv) if jax.default_backend() == "cpu" and ndev > 1 else None
    cases = jax_cases(args)

    import torch

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    try:
        fwd, kw = bench_unet.checked_torch_forward()
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    loops = torch_solvers(fwd, args.steps)
    size = kw["create_model_kwargs"]["image_size"]
    op = operators.make("sr", (size, size, 3), factor=FACTOR)
    rows = []
    for row, runs in cases:
        y = torch.from_numpy(measurements(op, row["batch"], size, 3).transpose(0, 3, 1, 2).copy())
        runs = {**runs, "official": lambda y=y, run=loops[row["algo"]]: run(y)}
        runs["official"]()  # warm-up
        times = interleaved(runs, args.repeats)
        row.update({f"{k}_s": statistics.median(v) for k, v in times.items()})
        row["official_over_ours"] = statistics.median(
            o / u for o, u in zip(times["official"], times["ours"], strict=True)
        )
        row["ours_1dev_s"] = row["ours_s"] if base is None else base[len(rows)]["ours_s"]
        row["official_over_ours_1dev"] = row["official_s"] / row["ours_1dev_s"]
        rows.append(row)

    print(f"torch {torch.__version__}, {args.torch_threads} threads; times per solve "
          f"({args.steps} steps), medians of {args.repeats} interleaved rounds")  # fmt: skip
    print(f"\n{'algo':8} {'batch':>5} {'official s':>11} {'ours s':>8} {'devices':>7} "
          f"{'official/ours':>13} {'1 device s':>11} {'official/1dev':>13}")  # fmt: skip
    for r in rows:
        print(f"{r['algo']:8} {r['batch']:5d} {r['official_s']:11.3f} {r['ours_s']:8.3f} "
              f"{r['ours_devices']:7d} {r['official_over_ours']:13.2f} {r['ours_1dev_s']:11.3f} "
              f"{r['official_over_ours_1dev']:13.2f}")  # fmt: skip
    chunked = [r for r in rows if r["ours_micro"]]
    if chunked:
        print("\nmicro-batching (solve's default on CPU): ours with it / without it")
        for r in chunked:
            print(f"{r['algo']:8} {r['batch']:5d}  {r['ours_micro']} images/device/call: "
                  f"{r['ours_s']:.3f} s vs {r['ours_whole_s']:.3f} s whole batch "
                  f"(x{r['ours_whole_s'] / r['ours_s']:.2f})")  # fmt: skip
    for r in rows:
        sizes = sorted(int(k[9:-2]) for k in r if k.startswith("ours_rows") and k.endswith("_s"))
        if sizes:
            default = f"{r['ours_micro'] or 'whole'} (default) {r['ours_s']:.3f} s"
            extra = ", ".join(f"{n} {r[f'ours_rows{n}_s']:.3f} s" for n in sizes)
            print(f"chunk sizes, {r['algo']} batch {r['batch']}: images/device/call {default}, "
                  f"{extra}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
