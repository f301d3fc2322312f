"""The benchmark's smoke run (CI runs --quick only; speed targets live in the README, never in tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from hf_minigpt.benchmark.runner import keep_capped_kernels_apart, native_bf16
from hf_minigpt.cpu_kernels import CPU
from hf_minigpt.cpu_memory import malloc_keeps_large_blocks

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_quick_benchmark_measures_every_model(tmp_path):
    # (vLLM's serving rows take a minute even here, and are left out: tests/test_vllm.py runs vLLM's engine.)
    command = [sys.executable, str(SCRIPT), "--quick", "--end_to_end", "--data_scale", "--vllm", "none",
               "--reuse_freed_memory", "--json", str(tmp_path / "b.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "b.json").read_text())["results"]
    # It says what it measures as it goes, on which CPU (instruction sets named), and skips emulated bf16.
    assert "--quick: tiny shapes and one repetition" in result.stdout and "not a measurement" in result.stdout
    # Freed memory reused where malloc can be told to (glibc 2.35 or newer), and said so; else said why not.
    reused = malloc_keeps_large_blocks()
    assert ("every model's large tensors reuse" if reused else "malloc keeps its own ways") in result.stdout
    settings = json.loads((tmp_path / "b.json").read_text())["settings"]
    assert settings == {"plain_kernels": False, "reuse_freed_memory": reused}
    assert ("Skipping the bf16 rows: PyTorch has no native bf16 here" in result.stdout) == (not native_bf16())
    assert "measuring train tiny fp32 ..." in result.stdout
    assert "threads" in next(line for line in result.stdout.splitlines() if line.startswith("device: "))
    assert "Warning" not in result.stdout + result.stderr and "torchvision" not in result.stdout + result.stderr
    for dtype in ("fp32", "bf16") if native_bf16() else ("fp32",):
        training = report[f"train tiny {dtype}"]
        assert all(training[model]["tokens_per_second"] > 0 and 0 < training[model]["mfu"] for model in
                   ("minigpt", "gpt2", "nanogpt"))
    assert all(report["memory tiny"][model]["bytes"] >= 0 for model in ("minigpt", "gpt2", "nanogpt"))
    assert report["generate tiny dynamic b=8"]["minigpt"]["tokens_per_second"] > 0
    serving = report["serve tiny"]  # 4 prompts, 8 new tokens each
    assert set(serving) == {"continuous batching", "continuous batching, int8", "generate() one by one"}
    assert all(0 < engine["p50_seconds"] <= engine["p99_seconds"] and engine["tokens_per_second"] > 0
               for engine in serving.values())
    assert "serving 4 prompts of 8-64 tokens" in result.stdout and "p99 latency s" in result.stdout
    assert "MiniGPT/GPT2" in result.stdout and "train tiny fp32 tokens/s" in result.stdout
    # The deployment table: every engine this machine has, at batch 1 and 8 (llama.cpp decodes one sequence).
    assert "greedy decode on the CPU" in result.stdout
    engines = {"MiniGPT eager", "MiniGPT static+compile", "MiniGPT int8 static+compile", "GPT2LMHeadModel",
               "onnxruntime"}
    if CPU.this_machine().products:  # the CPU's faster products, beside the plain ones, where a rule names it
        engines |= {"MiniGPT eager, cpu_kernels", "MiniGPT static+compile, cpu_kernels"}
    assert engines <= set(report["deploy tiny b=1"]) and engines <= set(report["deploy tiny b=8"])
    assert all(speed["tokens_per_second"] > 0 for speed in report["deploy tiny b=1"].values())
    # ... each against its ceiling: a read's bandwidth measured in the same run over the weight bytes per token.
    assert report["read bandwidth tiny"]["bytes_per_second"] > 1e9 and "b=1 share of ceiling" in result.stdout
    engines = report["deploy tiny b=1"]
    fp32, int8 = engines["MiniGPT eager"]["weight_bytes"], engines["MiniGPT int8 static+compile"]["weight_bytes"]
    assert 3 < fp32 / int8 < 4  # int8 matrices (and fp32 biases, norms and scales)
    # Script against script: minigpt-pretrain and transformers' Trainer on the same token shard.
    end_to_end = report["end to end tiny"]
    assert all(end_to_end[side]["tokens_per_second"] > 0 and end_to_end[side]["peak_rss"] > 2**20
               for side in ("minigpt", "gpt2"))
    # Data scale: minigpt-pretrain on two sizes of text, each in a fresh process.
    assert set(report["data scale"]) == {"0.2 MB", "2 MB"} and "MB/s (whole run)" in result.stdout
    assert all(run["peak_rss"] > 2**20 and run["mb_per_second"] > 0 for run in report["data scale"].values())


def test_a_capped_run_compiles_into_a_cache_of_its_own(monkeypatch):
    # torch 2.13's inductor cache would serve kernels generated for one vector width to a process using another.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as importing transformers leaves it
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    keep_capped_kernels_apart()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()  # uncapped: the shared default cache
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    keep_capped_kernels_apart()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("minigpt-bench-inductor-avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen")
    keep_capped_kernels_apart()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen"  # the user's choice stands


def test_the_decode_ceiling_is_what_a_read_of_memory_reaches(monkeypatch):
    # A decode step reads its weights and writes next to nothing: its ceiling is a read's bandwidth, not a copy's.
    from hf_minigpt.benchmark import deployment

    measured = []

    def one_hundredth_of_a_second(work, device):
        measured.append(work())
        return 0.01

    monkeypatch.setattr(deployment, "best_seconds", one_hundredth_of_a_second)
    assert deployment.memory_bandwidth() == 2**28 / 0.01  # 256 MB read in 0.01 s
    assert measured == [64 * 2**20]  # the sum of 64 Mi ones: every float read once
