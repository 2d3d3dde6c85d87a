"""Settings tuned for a checkpoint (``<checkpoint>/tuned.json``): the most specific entry wins,
a bad file is a clear error, and the main job starts from them under the user's settings."""

from __future__ import annotations

import json

import jax
import pytest

from reddiff_jax import restore as R
from reddiff_jax import tuned_defaults as T
from reddiff_jax.assets import default_model_path
from reddiff_jax.model import save_pretrained

TABLE = {
    "reddiff@inpaint:box": {"lam": 0.1, "lr": 0.2},
    "reddiff@inpaint:random:0.8": {"lam": 0.3},
    "reddiff@sr:4": {"lr": 0.4},
    "dps@sr:4": {"zeta": 2.0},
}


def test_the_most_specific_entry_wins():
    assert T.lookup(TABLE, "reddiff", "inpaint:box") == {"lam": 0.1, "lr": 0.2}
    assert T.lookup(TABLE, "reddiff", "in2_box") == {"lam": 0.1, "lr": 0.2}  # official alias
    assert T.lookup(TABLE, "reddiff", "inpaint:random:0.5") == {"lam": 0.3}  # same mask kind
    assert T.lookup(TABLE, "reddiff", "inpaint:freeform") in ({"lam": 0.1, "lr": 0.2}, {"lam": 0.3})
    assert T.lookup(TABLE, "reddiff", "sr4") == {"lr": 0.4}
    assert T.lookup(TABLE, "reddiff", "sr:2") == {"lr": 0.4}  # the operator alone
    assert T.lookup(TABLE, "dps", "sr:4") == {"zeta": 2.0}
    assert T.lookup(TABLE, "reddiff", "hdr") == {} and T.lookup(TABLE, "pgdm", "sr:4") == {}


def test_a_bad_file_is_named(tmp_path):
    (tmp_path / "tuned.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        T.for_model(str(tmp_path), "reddiff", "sr:4")
    (tmp_path / "tuned.json").write_text(json.dumps({"sr:4": {"lam": "x"}}))
    with pytest.raises(ValueError, match='"algo@task"'):
        T.for_model(str(tmp_path), "reddiff", "sr:4")
    assert T.for_model(str(tmp_path / "nothing"), "reddiff", "sr:4") == {}


def test_the_shipped_prior_carries_its_tuned_settings():
    table = T.read(default_model_path() / T.FILE)
    for task in (
        "inpaint:box",
        "inpaint:random:0.8",
        "sr:4",
        "blur:gaussian",
        "phase_retrieval",
        "hdr",
    ):
        assert set(T.lookup(table, "reddiff", task)) == {"lam", "lr"}, task


def test_restore_starts_from_them_under_the_users_settings(tiny_model, tmp_path):
    ckpt = save_pretrained(tiny_model, tmp_path / "ckpt")
    (ckpt / T.FILE).write_text(json.dumps(TABLE))
    common = dict(demo=True, n=1, task="inpaint:box", steps=2, model=str(ckpt), progress=False)
    R.restore(jax.random.key(0), out=tmp_path / "a", **common)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["config"]["lam"] == 0.1 and run["config"]["lr"] == 0.2
    assert run["tuned_defaults"] == {"lam": 0.1, "lr": 0.2}
    R.restore(jax.random.key(0), out=tmp_path / "b", params={"lr": 0.05}, **common)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["config"]["lam"] == 0.1 and run["config"]["lr"] == 0.05
