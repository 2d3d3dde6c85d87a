"""Settings tuned for a checkpoint, shipped beside it: ``<checkpoint>/tuned.json``.

The file is what :func:`reddiff_jax.protocol.tune_all` writes (``out/tuned.json``): a JSON
object ``{"algo@task spec": {setting: value}}``, e.g. ``{"reddiff@sr:4": {"lam": 0.05, "lr":
0.1}}``. The main job (:func:`reddiff_jax.restore.restore`) starts from these for the model it
runs, over the algorithm's official task defaults and under anything the user passes. A task
matches the most specific entry: the same operator with the same arguments, else the same
operator and first argument (``inpaint:random:0.5`` takes ``inpaint:random:0.8``'s settings),
else the same operator.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["FILE", "lookup", "read", "for_model"]

FILE = "tuned.json"


def read(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """The table in ``path`` (a tuned.json file), checked: ``{"algo@spec": {name: number}}``."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"tuned settings: cannot read {path}: {err}") from None
    ok = isinstance(table, dict) and all(
        isinstance(k, str) and "@" in k and isinstance(v, dict)
        and all(isinstance(n, str) and isinstance(x, int | float) and not isinstance(x, bool)
                for n, x in v.items())
        for k, v in table.items()
    )  # fmt: skip
    if not ok:
        raise ValueError(
            f'tuned settings: {path} must map "algo@task" to {{setting: number}} objects'
        )
    return table


def lookup(table: dict[str, dict[str, float]], algo: str, task: str) -> dict[str, float]:
    """The settings of the entry of ``table`` that matches ``algo`` on ``task`` best ({} if
    none): same operator and arguments > same operator and first argument > same operator."""
    from reddiff_jax import operators

    name, kwargs = operators.parse_spec(task)
    first = next(iter(kwargs.values()), None)
    best, rank = {}, 0
    for key, settings in table.items():
        key_algo, _, spec = key.partition("@")
        if key_algo != algo:
            continue
        k_name, k_kwargs = operators.parse_spec(spec)
        if k_name != name:
            continue
        r = 3 if k_kwargs == kwargs else 2 if next(iter(k_kwargs.values()), None) == first else 1
        if r > rank:
            best, rank = dict(settings), r
    return best


def for_model(model_name: str, algo: str, task: str) -> dict[str, float]:
    """The tuned settings of ``algo`` on ``task`` for the checkpoint folder ``model_name``
    (``{}`` when it is not a folder or holds no tuned.json)."""
    path = Path(model_name) / FILE
    if not path.is_file():
        return {}
    return lookup(read(path), algo, task)
