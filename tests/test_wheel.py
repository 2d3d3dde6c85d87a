"""The wheel a user installs: built from this tree, installed into a fresh venv, used elsewhere.

The venv has ``--system-site-packages`` so jax and the other dependencies come from the running
interpreter and nothing is downloaded (``--no-index`` throughout). The editable install of the
source tree lives in that system site too; its finder sits after the normal path finder, so the
venv's copy must win, which the first checks assert. Every command runs from an empty folder
without ``PYTHONPATH``, so the source tree is not importable by accident.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pytest

from reddiff_jax.assets import CLASSIFIER, EMBEDDED
from reddiff_jax.model import load_pretrained

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 300  # build, venv, install: ~15 s on the 2-core CI machine
RUN_TIMEOUT_S = 600  # the restore run compiles the UNet once (~1 min on CPU)
# Not part of the wheel and possibly large or stale: not copied into the build folder.
_TOP_LEVEL_SKIP = {".git", "tests", "notebooks", "benchmarks", "scripts", "build", "dist"}
_TOP_LEVEL_SKIP |= {"outputs", "out", "data"}
_SKIP_ANYWHERE = ("__pycache__", "*.egg-info", ".*_cache", ".ipynb_checkpoints")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    source: Path  # the copy of the tree the wheel was built from
    venv: Path
    python: Path
    scripts: Path
    empty: Path  # an empty working folder
    env: dict[str, str]


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Runs `cmd`; returns its stdout, or fails with the exit status and both streams' tails."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n"
            f"--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def _ignore_junk(directory: str, names: list[str]) -> set[str]:
    skip = shutil.ignore_patterns(*_SKIP_ANYWHERE)(directory, names)
    if Path(directory).resolve() == REPO:
        skip |= _TOP_LEVEL_SKIP.intersection(names)
    return skip


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    root = Path(tempfile.mkdtemp(prefix="reddiff-wheel-"))
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
        source, dist, venv, empty = root / "src", root / "dist", root / "venv", root / "empty"
        empty.mkdir()
        # A clean copy: an in-tree build would write build/ into the shared working tree, and a
        # stale build/lib there can leak deleted modules into the wheel.
        shutil.copytree(REPO, source, ignore=_ignore_junk)
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        _run(
            [*pip_wheel, "--no-index", "-w", dist, source],
            cwd=empty,
            env=env,
            timeout=BUILD_TIMEOUT_S,
        )
        (wheel,) = dist.glob("reddiff_jax-*.whl")
        _run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
            cwd=empty,
            env=env,
            timeout=BUILD_TIMEOUT_S,
        )
        scripts = venv / ("Scripts" if os.name == "nt" else "bin")
        python = scripts / ("python.exe" if os.name == "nt" else "python")
        if sys.prefix != sys.base_prefix:
            # Running inside a venv: --system-site-packages would reach the base interpreter's
            # site, not this one's, so add this interpreter's site dirs after the new venv's.
            purelib = _run(
                [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=empty,
                env=env,
                timeout=60,
            ).strip()
            lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
            Path(purelib, "_outer_site.pth").write_text("\n".join(lines) + "\n")
        # pip from the system site, run by the venv's python, installs into the venv;
        # --ignore-installed: never touch the editable install of the same version outside it.
        _run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-index",
                "--ignore-installed",
                wheel,
            ],
            cwd=empty,
            env=env,
            timeout=BUILD_TIMEOUT_S,
        )
        yield Installed(wheel, source, venv, python, scripts, empty, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_wheel_holds_every_module_and_every_embedded_file(installed):
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        src = installed.source
        modules = {f"reddiff_jax/{f}" for f in _files(src / "reddiff_jax") if f.endswith(".py")}
        assert modules - names == set(), "modules missing from the wheel (pyproject packages?)"
        for name in (*EMBEDDED, CLASSIFIER):
            files = _files(src / "checkpoints" / name)
            meta = "reddiff_classifier.json" if name == CLASSIFIER else "reddiff_model.json"
            assert {meta, "params/_METADATA", "params/manifest.ocdbt"} <= files
            want = {f"reddiff_jax/checkpoints/{name}/{f}" for f in files}
            assert want - names == set(), f"files of the embedded checkpoint {name!r} missing"
            for member in sorted(want):  # byte-identical, extension-less orbax files included
                rel = member.removeprefix("reddiff_jax/checkpoints/")
                assert z.read(member) == (src / "checkpoints" / rel).read_bytes(), member
    dist_info = "-".join(installed.wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/", 1)[0] for n in names} == {"reddiff_jax", dist_info}  # no tests/, no ...
    assert not any(n.startswith("checkpoints/") for n in names)  # ... top-level checkpoints/


def test_venv_imports_the_wheel_not_the_source_tree(installed):
    code = (
        "import json, reddiff_jax, reddiff_jax.assets as a; "
        "print(json.dumps({'file': reddiff_jax.__file__, 'model': str(a.default_model_path()), "
        "'heldout': str(a.default_heldout_path()), "
        "'classifier': str(a.embedded_classifier_path())}))"
    )
    out = _run([installed.python, "-c", code], cwd=installed.empty, env=installed.env, timeout=120)
    got = {k: Path(v).resolve() for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    venv = installed.venv.resolve()
    for what, path in got.items():
        assert path.is_relative_to(venv), f"{what}: {path} is not inside the venv {venv}"
        assert not path.is_relative_to(REPO), f"{what}: {path} comes from the source tree"
    assert got["model"].name == "mnist32" and got["heldout"].name == "heldout.npz"
    assert got["classifier"].name == CLASSIFIER


def test_venv_loads_the_embedded_prior_by_name(installed):
    """The venv's load_pretrained('mnist32') gives the source tree's prior, bit for bit."""
    code = (
        "import json, jax, numpy as np; from reddiff_jax import load_pretrained; "
        "m = load_pretrained('mnist32'); leaves = jax.tree.leaves(m.params); "
        "print(json.dumps({'config': m.config.to_dict(), 'n': int(sum(x.size for x in leaves)), "
        "'abs_sum': float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))}))"
    )
    out = _run([installed.python, "-c", code], cwd=installed.empty, env=installed.env, timeout=300)
    got = json.loads(out.strip().splitlines()[-1])
    ref = load_pretrained(installed.source / "checkpoints" / "mnist32")
    leaves = jax.tree.leaves(ref.params)
    want = {
        "config": json.loads(json.dumps(ref.config.to_dict())),  # tuples -> lists, as in `got`
        "n": int(sum(x.size for x in leaves)),
        "abs_sum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves)),
    }
    assert got["config"]["image_size"] == 32 and got["config"]["in_channels"] == 1
    assert got == want  # same config, same parameter count, same float64 sum of |params|


def test_venv_restore_demo_runs_from_an_empty_folder(installed):
    out = installed.empty / "out"
    cli = installed.scripts / ("reddiff-jax.exe" if os.name == "nt" else "reddiff-jax")
    cmd = [cli, "restore", "--demo", "--n", "2", "--steps", "2", "--task", "sr:4", "--out", out]
    _run(cmd, cwd=installed.empty, env=installed.env, timeout=RUN_TIMEOUT_S)
    assert len(sorted((out / "restored").glob("*.png"))) == 2
