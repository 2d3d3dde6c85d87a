"""Multi-host on one machine (issue 11): 2 processes x 2 CPU devices on a loopback coordinator
(gloo collectives) run ``reddiff-jax restore --demo --n 10 --distributed``.

One process is killed midway (it exits abruptly after its third finished image) and the other
is stopped; a rerun completes the job. Over both runs every image's PNG and record are written
exactly once (finished outputs are never redone, none is lost or partial), and the result equals
a single-process run: the same PNGs (<= 1 grey level) and metrics.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

from reddiff_jax import cli
from reddiff_jax.model import save_pretrained

N, STEPS, BATCH = 10, "2", "4"  # 4 = 2 processes x 2 devices: two images per process a batch

# The worker: logs every output it writes (after the write) and, with DIE_AFTER=k, exits
# abruptly (os._exit, as a host that dies) after its k-th finished image (its record).
_WORKER = textwrap.dedent(
    r"""
    import os, signal, sys

    def stop(signum, frame):
        raise KeyboardInterrupt  # a clean stop: a write in flight removes its temporary file

    signal.signal(signal.SIGTERM, stop)
    from reddiff_jax import cli, imageio

    log = open(os.environ["WRITE_LOG"], "a")
    die_after = int(os.environ.get("DIE_AFTER", "0"))
    records = [0]

    def logged(write):
        def wrapper(path, *args, **kw):
            out = write(path, *args, **kw)
            log.write(f"{path}\n")
            log.flush()
            if "records" in str(path):
                records[0] += 1
                if die_after and records[0] >= die_after:
                    os._exit(17)
            return out
        return wrapper

    imageio.atomic_write_bytes = logged(imageio.atomic_write_bytes)  # atomic_write_json too
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(ckpt: Path, out: Path, logs: Path, tag: str, die: dict[int, int]):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")  # fmt: skip
    procs = []
    for pid in range(2):
        argv = ["restore", "--demo", "--n", str(N), "--steps", STEPS, "--batch", BATCH,
                "--task", "inpaint:box", "--model", str(ckpt), "--out", str(out),
                "--no-progress", "--distributed", "--coordinator", f"127.0.0.1:{port}",
                "--num-processes", "2", "--process-id", str(pid)]  # fmt: skip
        penv = {**env, "WRITE_LOG": str(logs / f"{tag}-p{pid}.log"),
                "DIE_AFTER": str(die.get(pid, 0))}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, *argv], env=penv,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    return procs


def _stop(procs, grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # blocked in a collective with its dead peer: no write is in flight
            p.wait()


def _wait(procs, timeout: float) -> list[tuple[int, str]]:
    out, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, text))
    finally:
        _stop(procs, grace=1.0)
    return out


def _written(logs: Path, tag: str) -> list[str]:
    """The outputs a run wrote, over its processes: ``restored/x.png``, ``records/x.json``, or
    the file name of run.json, grid.png and metrics.json."""
    lines = []
    for f in sorted(logs.glob(f"{tag}-p*.log")):
        for path in map(Path, f.read_text().split()):
            per_image = path.parent.name in ("restored", "records")
            lines.append(f"{path.parent.name}/{path.name}" if per_image else path.name)
    return lines


def _pngs(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / "restored" / f"heldout_{i:04d}.png"), np.int16)
                     for i in range(N)])  # fmt: skip


def test_two_processes_resume_after_a_kill_and_match_one_process(tiny_model, tmp_path):
    ckpt = save_pretrained(tiny_model, tmp_path / "ckpt")
    ref = tmp_path / "single"
    argv = [
        "restore",
        "--demo",
        "--n",
        str(N),
        "--steps",
        STEPS,
        "--batch",
        "3",
        "--task",
        "inpaint:box",
        "--model",
        str(ckpt),
        "--out",
        str(ref),
        "--no-progress",
    ]
    assert cli.main(argv) == 0  # fmt: skip

    out, logs = tmp_path / "multi", tmp_path / "logs"
    logs.mkdir()
    # run 1: process 1 dies after its 3rd finished image (midway through its 2nd batch)
    procs = _start(ckpt, out, logs, "run1", die={1: 3})
    try:
        procs[1].wait(timeout=600)
        assert procs[1].returncode == 17, procs[1].communicate()[0][-3000:]
    finally:
        time.sleep(2.0)
        _stop(procs)
    first = _written(logs, "run1")
    done1 = {p for p in first if p.startswith("records/")}
    assert 3 <= len(done1) < N and not (out / "metrics.json").exists()
    assert {f"records/heldout_{i:04d}.json" for i in (5, 6, 7)} <= done1  # process 1's block
    kept = {p: (out / p).read_bytes() for p in first if "/" in p}

    # run 2: both processes; the finished images are kept, the rest is completed
    results = _wait(_start(ckpt, out, logs, "run2", die={}), timeout=600)
    for rc, text in results:
        assert rc == 0, text[-3000:]
    assert "restored" in results[0][1]
    second = _written(logs, "run2")
    per_image = [p for p in first + second if "/" in p]
    assert sorted(per_image) == sorted(set(per_image)), "an output was written twice"
    assert {p for p in per_image if p.startswith("restored/")} == {
        f"restored/heldout_{i:04d}.png" for i in range(N)
    }
    assert {p for p in per_image if p.startswith("records/")} == {
        f"records/heldout_{i:04d}.json" for i in range(N)
    }
    assert second.count("metrics.json") == 1 and second.count("grid.png") == 1
    assert all((out / p).read_bytes() == b for p, b in kept.items())  # untouched by run 2
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    # the same result as one process
    assert np.abs(_pngs(out) - _pngs(ref)).max() <= 1
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert got["images"] == want["images"] and got["failed"] == want["failed"]
    for which in ("restored", "pinv"):
        for m in ("psnr", "ssim"):
            np.testing.assert_allclose(got[which][m]["per_image"], want[which][m]["per_image"],
                                       rtol=1e-3)  # fmt: skip
