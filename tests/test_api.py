"""The public API's conventions (as dm-pix's api_test): every name in ``reddiff_jax.__all__`` and
in the subpackages' ``__all__`` exists and has a docstring; options are keyword-only; random
functions take ``key`` (never ``rng`` or ``seed``); configs are keyword-only dataclasses."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import types

import flax.linen as nn
import pytest

import reddiff_jax

PACKAGES = ["reddiff_jax", "reddiff_jax.operators", "reddiff_jax.solvers", "reddiff_jax.convert"]
SOLVER_MODULES = ["base", "driver", "registry", "reddiff", "ddim", "dps", "pgdm", "ddrm", "diffpir"]
MODULES = (
    PACKAGES
    + [f"reddiff_jax.solvers.{m}" for m in SOLVER_MODULES]
    + [
        "reddiff_jax.imageio",
        "reddiff_jax.pipeline",
        "reddiff_jax.restore",
        "reddiff_jax.evaluate",
        "reddiff_jax.grid",
        "reddiff_jax.assets",
        "reddiff_jax.protocol",
        "reddiff_jax.classifier",
        "reddiff_jax.sample_quality",
    ]
)
FORBIDDEN = ("rng", "seed", "prng", "rng_key", "prng_key")


def _public():
    """(module name, name, object) of every public callable, each object once."""
    seen, out = set(), []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        assert hasattr(mod, "__all__"), f"{mod_name} has no __all__"
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod_name}.__all__ lists {name!r}, which is missing"
            obj = getattr(mod, name)
            if isinstance(obj, types.ModuleType) or id(obj) in seen:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                seen.add(id(obj))
                out.append((mod_name, name, obj))
    return out


PUBLIC = _public()


def _is_data_type(cls: type) -> bool:
    """Pytree containers whose fields are positional for unflattening (NamedTuples, flax structs,
    enums, linen modules)."""
    return (
        (issubclass(cls, tuple) and hasattr(cls, "_fields"))
        or getattr(cls, "_flax_dataclass", False)
        or issubclass(cls, enum.Enum | nn.Module)
    )


def test_the_api_is_not_empty():
    names = {n for _, n, _ in PUBLIC}
    for expected in ("solve", "solve_many", "sample", "Solution", "RedDiffConfig", "DPSConfig"):
        assert expected in names
    assert set(reddiff_jax.__all__) >= {"solve", "load_pretrained", "operators", "RedDiffConfig"}


@pytest.mark.parametrize("mod, name, obj", PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_docstring(mod, name, obj):
    assert inspect.getdoc(obj), f"{mod}.{name} has no docstring"


@pytest.mark.parametrize("mod, name, obj", PUBLIC, ids=[f"{m}.{n}" for m, n, _ in PUBLIC])
def test_options_are_keyword_only_and_keys_are_named_key(mod, name, obj):
    if inspect.isclass(obj) and _is_data_type(obj):
        return
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    for p in sig.parameters.values():
        assert p.name not in FORBIDDEN, f"{mod}.{name}: parameter {p.name!r}; name it `key`"
        if p.default is not inspect.Parameter.empty:
            assert p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD, (
                f"{mod}.{name}: option {p.name!r} has a default but is positional; make it "
                "keyword-only"
            )


def test_configs_are_frozen_keyword_only_dataclasses():
    configs = [obj for _, _, obj in PUBLIC if inspect.isclass(obj) and obj.__name__.endswith(
        "Config")]  # fmt: skip
    assert len(configs) >= 7
    for cls in configs:
        assert dataclasses.is_dataclass(cls), cls
        assert cls.__dataclass_params__.frozen, cls
        assert all(f.kw_only for f in dataclasses.fields(cls)), cls


def test_every_algorithm_is_registered_with_its_config():
    from reddiff_jax.solvers import SolverConfig, registry

    for name, algo in registry.ALGORITHMS.items():
        assert algo.name == name and issubclass(algo.config, SolverConfig)
        assert registry.lookup(algo.config()) is algo
        assert set(algo.shown) <= {f.name for f in dataclasses.fields(algo.config)}
        for settings in algo.task_defaults.values():
            assert set(settings) <= {f.name for f in dataclasses.fields(algo.config)}
        assert set(algo.config.HYPER) <= {f.name for f in dataclasses.fields(algo.config)}


def test_task_defaults_go_from_general_to_specific(monkeypatch):
    """``"*"``, then the operator name, then the name with its first argument; official
    aliases resolve to the same entries."""
    from reddiff_jax.solvers import registry

    table = {"*": {"lam": 1.0, "lr": 1.0}, "inpaint": {"lr": 2.0}, "inpaint:random": {"lam": 3.0},
             "sr:4": {"lr": 4.0}}  # fmt: skip
    algo = dataclasses.replace(registry.get("reddiff"), task_defaults=table)
    monkeypatch.setitem(registry.ALGORITHMS, "reddiff", algo)
    assert registry.task_defaults("reddiff", "inpaint:random:0.8") == {"lam": 3.0, "lr": 2.0}
    assert registry.task_defaults("reddiff", "inpaint:box") == {"lam": 1.0, "lr": 2.0}
    assert registry.task_defaults("reddiff", "sr4") == {"lam": 1.0, "lr": 4.0}
    assert registry.task_defaults("reddiff", "sr:2") == {"lam": 1.0, "lr": 1.0}
