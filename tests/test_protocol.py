"""The comparison protocol on 4 test digits with a tiny random UNet: tuning on the validation
split picks each sweep's best cell, the test table uses those settings at the NFE budget, and
a rerun resumes everything without solving. (That the same key gives the same table in a fresh
folder is `test_evaluate.py`'s and `test_sweep.py`'s check of the two stages.)"""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from reddiff_jax import cli, pipeline, protocol
from reddiff_jax import sweep as sweep_lib
from reddiff_jax.model import save_pretrained

TINY = dataclasses.replace(
    protocol.PROTOCOL,
    tasks=(("inpaint:box", 0.05),),
    algos=("reddiff", "ddrm"),
    nfe=2,
    grids={"reddiff": {"lam": (0.1, 1.0), "lr": (0.1, 0.5)}, "ddrm": {"eta": (0.5, 1.0)}},
    n_tune=2,
    n_test=4,
)


def test_protocol_tunes_on_validation_and_scores_on_test(tiny_model, tmp_path, monkeypatch):
    res = protocol.run(jax.random.key(5), protocol=TINY, out=tmp_path / "a", model=tiny_model,
                       batch=2, lpips=False, progress=False)  # fmt: skip
    tuned = json.loads((tmp_path / "a" / "tuned.json").read_text())
    assert set(tuned) == {"reddiff@inpaint:box", "ddrm@inpaint:box"}
    for pair, params in tuned.items():
        algo, task = pair.split("@")
        sweep_file = tmp_path / "a" / "sweeps" / f"inpaint_box__{algo}" / "sweep.json"
        sweep = json.loads(sweep_file.read_text())
        assert sweep["settings"]["split"] == "validation" and len(sweep["images"]) == 2
        assert sweep["settings"]["sigma_y"] == 0.05
        best = max(sweep["cells"], key=lambda c: c["psnr"]["mean"])
        assert params == best["params"] == sweep["best"]["params"]
        row = res["tasks"][task]["algos"][algo]
        assert all(row["config"][k] == v for k, v in params.items())
        assert row["nfe"] == TINY.nfe
    table = (tmp_path / "a" / "tuning.md").read_text()
    assert table == protocol.tuning_markdown(tmp_path / "a", protocol=TINY)
    rows = [line for line in table.splitlines() if line.startswith("| inpaint:box")]
    assert [r.split(" | ")[2] for r in rows] == ["reddiff", "ddrm"]
    reddiff = json.loads(
        (tmp_path / "a" / "sweeps" / "inpaint_box__reddiff" / "sweep.json").read_text()
    )
    assert reddiff["metric"] == "accuracy"  # box inpainting is tuned by digit accuracy
    means = [c["accuracy"]["mean"] for c in reddiff["cells"]]
    assert rows[0].split(" | ")[8:10] == [f"{min(means):.3f}", "4"]  # the worst cell; 4 cells
    assert "Tuning on 2 validation digits at 2 NFE" in table
    assert res["settings"]["n"] == 4 and res["settings"]["images"] == "held-out test digits"
    assert res["tasks"]["inpaint:box"]["sigma_y"] == 0.05
    assert (tmp_path / "a" / "test" / "eval.png").is_file()

    # a rerun into the same folder resumes every sweep cell and every pair: nothing is solved
    def no_solve(*args, **kw):
        raise AssertionError("a finished protocol must not solve again")

    monkeypatch.setattr(pipeline.solvers, "solve", no_solve)
    monkeypatch.setattr(sweep_lib, "solve_many", no_solve)
    again = protocol.run(jax.random.key(5), protocol=TINY, out=tmp_path / "a", model=tiny_model,
                         batch=2, lpips=False, progress=False)  # fmt: skip
    assert again["tasks"] == res["tasks"]


def test_protocol_settings_are_checked(tiny_model, tmp_path, capsys):
    with pytest.raises(ValueError, match="grids: no grid"):
        dataclasses.replace(TINY, algos=("dps",))
    with pytest.raises(ValueError, match="nfe: expected a positive int"):
        dataclasses.replace(TINY, nfe=0)
    with pytest.raises(ValueError, match="spec: unknown operator"):
        dataclasses.replace(TINY, tasks=(("nonsense", 0.0),))
    path = save_pretrained(tiny_model, tmp_path / "ckpt")
    argv = ["eval", "--protocol", "--out", str(tmp_path / "o"), "--model", str(path)]
    assert cli.main(argv + ["--tasks", "sr:4"]) == 2
    assert "--protocol fixes the tasks" in capsys.readouterr().err
    assert cli.main(argv + ["--tuned-settings", str(tmp_path / "missing.json")]) == 2
    assert "--tuned-settings: cannot read" in capsys.readouterr().err
    assert cli.main(["eval", "--out", str(tmp_path / "p"), "--tune-n", "3"]) == 2
    assert "belong to --protocol" in capsys.readouterr().err
