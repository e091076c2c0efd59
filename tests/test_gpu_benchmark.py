"""benchmarks/gpu_benchmark.py runs end to end on a CPU with tiny shapes (its check before an accelerator run)."""

from __future__ import annotations

import json
import math

from benchmarks import gpu_benchmark


def test_gpu_benchmark_runs_with_tiny_shapes_on_cpu(tmp_path):
    output = tmp_path / "gpu.md"
    gpu_benchmark.main(["--tiny", "--device", "cpu", "--backbones", "vit-s16,efficientnet-lite0", "--tasks", "1,3",
                        "--repeats", "1", "--episodes", "2", "--ft-episodes", "1", "--memory-episodes", "1",
                        "--output", str(output)])
    results = json.loads(output.with_suffix(".json").read_text())
    assert set(results["backbones"]) == {"vit-s16", "efficientnet-lite0"}
    for row in results["backbones"].values():
        assert set(row["methods"]) == {"dt", "hyperflow", "ft-full"}
        hyperflow = row["methods"]["hyperflow"]
        for ratio in ("latency_vs_dt", "latency_vs_ft_full", "memory_vs_ft_full"):
            assert math.isfinite(hyperflow[ratio]) and hyperflow[ratio] > 0
        assert set(row["throughput"]) == {"1", "3"}
        assert all(values["speedup"] > 0 for values in row["throughput"].values())
    text = output.read_text()
    assert "| vit-s16 | hyperflow |" in text and "| efficientnet-lite0 | 3 |" in text
