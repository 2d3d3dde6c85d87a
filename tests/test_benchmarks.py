"""Smoke tests of the benchmark scripts at tiny sizes on the CPU (no timing is asserted).

Speed is measured by the benchmarks themselves; these tests only check that they run end to
end and write what they promise (the JSON keys of gpu_suite, the rows of bench_unet).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_tiny_writes_every_key(tmp_path):
    suite = _load("gpu_suite")
    out = tmp_path / "suite.json"
    suite.main(["--size", "tiny", "--out", str(out)])
    got = json.loads(out.read_text())
    assert {"size", "config", "backend", "device", "part_seconds", "total_seconds"} <= set(got)
    assert set(suite.PARTS) <= set(got["part_seconds"])
    assert set(got["peak_matmul"]) == {"bfloat16", "tf32", "float32"}
    assert {(r["precision"], r["batch"]) for r in got["forward"]} == {
        (p, 1) for p in suite.PRECISIONS
    }
    for r in got["forward"]:
        assert r["ms"] > 0 and r["gflop"] > 0 and r["mfu_vs_bf16_matmul"] > 0
    assert {"eps_ms", "step_ms", "step_over_eps", "compile_s"} <= set(got["reddiff_step"])
    dps = got["dps"]
    assert {"reddiff", "dps", "dps_over_reddiff_step_time", "dps_over_reddiff_temp_memory"} <= set(
        dps
    )
    assert dps["dps"]["temp_bytes"] > dps["reddiff"]["temp_bytes"] > 0
    many = got["many"]
    assert many["measurements"] == 4 and many["vmapped_ms"] > 0 and many["looped_ms"] > 0


def test_bench_unet_tiny_compares_old_and_new(tmp_path):
    bench = _load("bench_unet")
    out = tmp_path / "unet.json"
    result = bench.main(
        ["--model", "tiny", "--batch", "1", "--repeats", "1", "--no-torch", "--compare-old",
         "--json", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["rows"]
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {
        "conv3x3", "gn_silu", "gn_silu+vjp", "attention", "attention+vjp", "forward", "forward+vjp"
    }  # fmt: skip
    for r in result["rows"]:
        assert r["new_ms"] > 0 and r["mflop"] > 0 and r["matmul_gflops"] > 0
        if r["kind"] == "attention+vjp":
            assert r["query_major_ms"] > 0  # the derivative without the key-major rule
        elif r["kind"] not in ("conv3x3", "gn_silu+vjp"):
            assert r["old_ms"] > 0  # the old formulation was compiled and timed


def test_bench_vs_official_times_both_sides(tmp_path):
    bench = _load("bench_vs_official")
    out = tmp_path / "vs.json"
    rows = bench.main(["--batch", "2", "--steps", "2", "--repeats", "1", "--json", str(out)])
    assert [(r["algo"], r["batch"]) for r in rows] == [("reddiff", 2), ("dps", 2)]
    assert json.loads(out.read_text()) == rows
    for r in rows:
        assert r["ours_s"] > 0 and r["official_s"] > 0 and r["ours_1dev_s"] > 0


def test_bench_vs_official_times_extra_chunk_sizes():
    bench = _load("bench_vs_official")
    rows = bench.main(["--algos", "dps", "--batch", "4", "--steps", "2", "--repeats", "1",
                       "--chunk-rows", "1"])  # fmt: skip
    (row,) = rows  # 1 image a call: 4 or 2 a device on 1 or 2 devices
    assert row["ours_rows1_s"] > 0 and row["official_s"] > 0


def test_bench_bf16_reports_the_error(tmp_path):
    bench = _load("bench_bf16")
    (row,) = bench.main(["--n", "2", "--steps", "3", "--tasks", "sr:4"])
    assert row["task"] == "sr:4"
    # bf16 moves the restoration, but by far less than the restoration's own error
    assert 0 < row["max_abs"] < 1 and row["psnr_bf16_vs_f32"] > row["psnr_f32"] > 5


def test_bench_reddiff_times_solve_many_against_the_batch():
    bench = _load("bench_reddiff")
    got = bench.main(["--steps", "2", "--many", "4", "--repeats", "1", "--algo", "dps"])
    want = {"eps_call_s", "step_s", "step_over_eps", "many_s", "many_whole_s", "seq_s", "batch_s",
            "many_over_batch"}  # fmt: skip
    assert set(got) == want and all(v > 0 and v < float("inf") for v in got.values()), got
