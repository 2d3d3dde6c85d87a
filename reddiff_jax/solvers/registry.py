"""The registry of algorithms: name -> :class:`~reddiff_jax.solvers.base.Algorithm`.

The main job, the evaluation and the CLI read it for configs, per-task defaults, capability
checks and what a table shows; nothing else keeps a copy of those facts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from reddiff_jax.solvers import ddim, ddrm, diffpir, dps, pgdm, reddiff
from reddiff_jax.solvers.base import Algorithm, SolverConfig

__all__ = [
    "ALGORITHMS",
    "applicable",
    "conditional_names",
    "config_for",
    "get",
    "lookup",
    "task_defaults",
]

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        reddiff.ALGORITHM,
        dps.ALGORITHM,
        pgdm.ALGORITHM,
        ddrm.ALGORITHM,
        diffpir.ALGORITHM,
        ddim.ALGORITHM,
    )
}


def conditional_names() -> tuple[str, ...]:
    """The algorithms that solve an inverse problem (all but unconditional DDIM)."""
    return tuple(n for n, a in ALGORITHMS.items() if a.conditional)


def get(name: str) -> Algorithm:
    """The algorithm called ``name``, or a ValueError listing the valid names."""
    if name not in ALGORITHMS:
        raise ValueError(f"algo: expected one of {tuple(ALGORITHMS)}, got {name!r}")
    return ALGORITHMS[name]


def lookup(config: SolverConfig | type) -> Algorithm:
    """The algorithm whose config class is ``type(config)`` (or ``config`` itself)."""
    cls = config if isinstance(config, type) else type(config)
    for a in ALGORITHMS.values():
        if cls is a.config:
            return a
    return Algorithm(name=cls.__name__, title=cls.__name__, config=cls)


def task_defaults(name: str, task: str) -> dict[str, Any]:
    """The settings the main job uses for ``name`` on ``task`` (an operator name or spec).

    Entries of the algorithm's ``task_defaults`` apply from the general to the specific:
    ``"*"``, then the operator name (``"inpaint"``), then the name with its first argument
    (``"inpaint:random"`` for ``inpaint:random:0.8``, ``"sr:4"`` for ``sr4``)."""
    from reddiff_jax import operators

    table = get(name).task_defaults
    op_name, kwargs = operators.parse_spec(task)
    keys = ["*", op_name]
    if kwargs:
        keys.append(f"{op_name}:{next(iter(kwargs.values()))}")
    out: dict[str, Any] = {}
    for k in keys:
        out.update(table.get(k, {}))
    return out


def _coerce(field: dataclasses.Field, value: Any, name: str) -> Any:
    """A command-line string converted to the type of ``field``'s default."""
    if not isinstance(value, str):
        return value
    default = field.default
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ValueError(
            f"{name}: expected a {type(default).__name__} for {field.name}, got {value!r}"
        ) from None
    return value


def config_for(
    name: str,
    task: str,
    *,
    steps: int | None = None,
    sigma_y: float = 0.0,
    overrides: dict[str, Any] | None = None,
) -> SolverConfig:
    """The config of ``name`` on ``task``: task defaults, then ``steps``, then ``overrides``.

    Args:
      name: an algorithm name (:data:`ALGORITHMS`).
      task: operator spec (e.g. ``"sr:4"``); its operator name selects the task defaults.
      steps: ``num_steps`` (default: the config class's).
      sigma_y: the measurement noise level, copied into configs with a ``sigma_y`` field
        (DDRM, DiffPIR) unless ``overrides`` sets it.
      overrides: field -> value (strings are converted to the field's type).

    Raises:
      ValueError: an unknown algorithm or field, or a value the config rejects (named).
    """
    cls = get(name).config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = task_defaults(name, task)
    if steps is not None:
        values["num_steps"] = steps
    if "sigma_y" in fields:
        values["sigma_y"] = float(sigma_y)
    for k, v in (overrides or {}).items():
        if k not in fields:
            valid = sorted(f for f in fields if f not in ("optimizer", "init"))
            raise ValueError(f"param: {name} has no setting {k!r}; valid settings: {valid}")
        values[k] = _coerce(fields[k], v, "param")
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"param: invalid {name} setting: {err}") from err


def applicable(name: str, op: Any) -> str | None:
    """None when algorithm ``name`` can solve with ``op``, else the reason (a sentence)."""
    algo = get(name)
    if "A_dagger" in algo.needs and not callable(getattr(op, "A_dagger", None)):
        return f"{name} starts from the pseudo-inverse and the operator has no A_dagger"
    if "svd" in algo.needs and getattr(op, "svd", None) is None:
        return f"{name} needs an operator with an SVD (op.svd), which this operator has not"
    return None
