"""One CPU device per core (issue 10): ``sharding.use_cpu_cores`` sets JAX's CPU device count
before the backend starts, keeps a count the user chose, refuses a late change, and the command
line calls it first. (That a sharded solve equals the single-device one is test_sharding's.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from reddiff_jax import cli, sharding

_PROBE = (
    "import json, sys, jax\n"
    "from reddiff_jax import sharding\n"
    "n = None if sys.argv[1] == 'none' else int(sys.argv[1])\n"
    "got = sharding.use_cpu_cores(n)\n"
    "print(json.dumps([got, len(jax.devices('cpu'))]))\n"
)


def _probe(n: int | None, **env: str) -> list[int]:
    """``[use_cpu_cores(n), CPU devices]`` in a fresh process with ``env`` added."""
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, "none" if n is None else str(n)],
        env={**base, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_device_per_core_by_default():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _probe(None) == [cores, cores]


def test_explicit_count_and_the_users_choice_win():
    assert _probe(3) == [3, 3]
    assert _probe(None, JAX_NUM_CPU_DEVICES="1") == [1, 1]  # JAX's own setting is kept
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}
    assert _probe(None, **flags) == [5, 5]


def test_after_jax_started_it_changes_nothing_or_says_why():
    jax.numpy.zeros(1).block_until_ready()  # this test process's backend has started
    have = len(jax.devices("cpu"))
    assert sharding.use_cpu_cores() == have
    assert sharding.use_cpu_cores(have) == have
    with pytest.raises(RuntimeError, match="before the first JAX operation"):
        sharding.use_cpu_cores(have + 1)
    with pytest.raises(ValueError, match="positive int"):
        sharding.use_cpu_cores(0)


def test_command_line_calls_it_before_parsing(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sharding, "use_cpu_cores", lambda n=None: calls.append(n) or 1)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and calls == [None]
    assert "reddiff-jax" in capsys.readouterr().out


def test_data_mesh_at_most():
    devs = jax.devices()
    assert sharding.data_mesh(at_most=1).size == 1
    assert sharding.data_mesh(at_most=10_000).size == len(devs)
    assert sharding.data_mesh(at_most=0).size == 1  # never empty
