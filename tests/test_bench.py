"""The benchmark runs end to end and reports coherent numbers (speed itself is not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from fmnist.core.precision import native_bf16
from fmnist.speed import executed_training_flops
from fmnist.bench import BenchResult, format_table, notebook_step
from fmnist.models.summary import training_flops
from fmnist.models.registry import create_model

from .conftest import run_cli


@pytest.mark.slow
def test_training_flops_match_the_hand_count():
    # forward 5.26 MFLOP; backward = 2x forward minus conv1's never-computed input gradient
    notebook = create_model("notebook")
    assert training_flops(notebook) == 3 * 5_262_080 - 389_376
    # fmnist's fast step runs on the 26x26 pixels that reach the output
    assert training_flops(notebook, image_shape=(1, 26, 26)) == 3 * 4_430_336 - 331_776
    # ... and conv2 (3,686,400 FLOPs forward) backpropagates through the pooling winners
    # only: a quarter of its two backward convolutions
    conv2 = 2 * 10 * 10 * 64 * 32 * 9
    executed = 3 * 4_430_336 - 331_776 - 2 * conv2 * 3 // 4
    assert training_flops(notebook, winners_only=(1,), image_shape=(1, 26, 26)) == executed
    assert executed_training_flops(notebook_step("cpu")) == executed
    assert executed_training_flops(notebook_step("cpu", speedups=False)) == 3 * 5_262_080 - 389_376


@pytest.fixture(scope="module")
def quick_bench(data_dir) -> dict:
    """One smoke run of `fmnist bench --quick --json`, for the JSON and the table tests."""
    result = run_cli("bench", "--quick", "--json", "--data", data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_bench_quick_json(quick_bench):
    report = quick_bench
    assert report["gemm_gflops"] > 0
    assert report["data"]["release"] and report["data"]["content_sha256"]  # real images, not noise
    loops = {(row["loop"], row["batch"]) for row in report["training"]}
    assert {("fmnist fp32", 32), ("textbook fp32", 32), ("fmnist fp32", 128), ("textbook fp32", 128)} <= loops
    # bf16 is measured where it is native; emulated, the bf16 GEMMs alone would take minutes
    native = native_bf16(torch.device(report["environment"]["device"]))
    assert (report["gemm_gflops_bf16"] is not None) == native
    assert ({("fmnist bf16", 32), ("fmnist bf16", 128)} <= loops) == native
    assert all((row["of_bf16_gemm"] is not None) == native for row in report["presets"])
    for row in report["training"]:
        assert row["images_per_second"] > 0
        if row["loop"] == "textbook fp32":
            assert row["vs_textbook"] == 1.0
    # the ceiling counts the notebook network; hardware use what fmnist executes
    assert report["train_flops_per_image"] == 3 * 5_262_080 - 389_376
    routed = 3 * 4_430_336 - 331_776 - 2 * 3_686_400 * 3 // 4
    assert report["executed_train_flops_per_image"] == routed
    executed = {row["loop"]: row["executed_flops_per_image"] for row in report["training"]}
    assert executed["fmnist fp32"] == routed and executed["textbook fp32"] == report["train_flops_per_image"]
    assert {row["batch"] for row in report["inference"]} == {16, 256, 1024}
    assert all(lat["p50"] <= lat["p99"] for lat in report["latency_ms"].values())
    presets = {row["preset"]: row for row in report["presets"]}
    assert set(presets) == {"fast", "best-cpu"}  # `best` is for GPUs
    assert presets["fast"]["step"] == presets["best-cpu"]["step"] == "autograd"
    # fast is best-cpu's design, narrower: less work per image, more images per second
    assert presets["fast"]["executed_flops_per_image"] < presets["best-cpu"]["executed_flops_per_image"]
    assert all(row["images_per_second"] > 0 and row["hardware_use"] > 0 for row in presets.values())
    quantized = {row["model"]: row for row in report["quantized"]}
    assert set(quantized) == {"fp32", "int8"} and quantized["int8"]["bytes"] < quantized["fp32"]["bytes"]
    assert quantized["fp32"]["test_accuracy"] is None  # the untrained CNN: speed and size only


@pytest.mark.slow
def test_bench_table(quick_bench):
    table = format_table(BenchResult(**quick_bench))  # what `fmnist bench` prints without --json
    assert "vs textbook" in table and "single-image latency" in table
    assert "preset (train)" in table and "best-cpu" in table
    assert "ONNX Runtime" in table and "int8" in table
    emulated = dict(quick_bench, gemm_gflops_bf16=None,  # as on a CPU without AVX512-BF16 or AMX, a GPU before Ampere
                    presets=[dict(row, of_bf16_gemm=None) for row in quick_bench["presets"]])
    table = format_table(BenchResult(**emulated))
    assert "bf16 GEMM ceiling: emulated on this device: not measured, no bf16 rows" in table
    fast = next(line for line in table.splitlines() if line.startswith("fast "))
    assert fast.split()[-3:] == ["-", "autograd", quick_bench["presets"][0]["precision"]]


@pytest.mark.slow
def test_bench_int8_against_fp32_on_a_trained_run(trained_run, dataset):
    from fmnist.bench import BenchConfig, _quantized

    rows = _quantized(dataset, BenchConfig(rounds=1, warmup_steps=1, inference_images=256, run_dir=trained_run[0]))
    fp32, int8 = rows
    metrics = json.loads((trained_run[0] / "metrics.json").read_text())
    assert fp32["test_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert int8["agreement_with_fp32"] >= 0.99 and int8["bytes"] < 0.6 * fp32["bytes"]
    assert all(row["images_per_second"] > 0 for row in rows)


@pytest.mark.slow
def test_bench_without_data_is_a_one_line_error(tmp_path):
    result = run_cli("bench", "--quick", "--data", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "data folder does not exist" in result.stderr and "Traceback" not in result.stderr
