"""Serving: the same mixed prompts, all arriving at once, through every engine that serves MiniGPT here:
transformers' continuous batching, generate() one by one, and vLLM (its CPU build, in its own environment)."""

import copy
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import torch

from ..export import convert
from ..quantize import quantize_int8
from .runner import Bench, build, config_for, interleaved_runs

SERVING = ("engine", "tokens/s", "p50 latency s", "p99 latency s")


VLLM_GREEDY = Path(__file__).parents[1] / "vllm_greedy.py"


def serving_prompts(vocab_size: int, count: int) -> list[list[int]]:
    """`count` prompts of 8 to 64 tokens, the same for every engine."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 65, (count,), generator=generator)
    return [torch.randint(1, vocab_size, (int(length),), generator=generator).tolist() for length in lengths]


def serving_summary(runs: list[list[float]], tokens: int) -> dict:
    """From each run's request latencies: tokens/s until the last request of the median run was answered (an
    engine's start-up and shutdown stay out), and the median and 99th percentile of every latency over all runs."""
    latencies = sorted(latency for run in runs for latency in run)
    return {"tokens_per_second": tokens / statistics.median(max(run) for run in runs),
            "p50_seconds": statistics.median(latencies),
            "p99_seconds": statistics.quantiles(latencies, n=100, method="inclusive")[98]}


def measure_serving(shape, device, new_tokens: int, repeats: int, prompts: int, vllm_python: Path | None) -> dict:
    """Greedy decoding of `prompts` mixed prompts that all arrive at once, `new_tokens` each: transformers' continuous
    batching (`generate_batch`, a paged KV cache), the same with int8 weights (`hf_minigpt.quantize`) and `generate()`
    one prompt after another, interleaved; then, where vLLM's CPU build is installed (`vllm_python`), vLLM on
    MiniGPT's GPT-2 export and on the MiniGPT folder itself (its Transformers backend), each in a process of its own.
    A request's latency runs from the arrival of all prompts to its last token."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = config_for(shape)
    inputs = serving_prompts(config.vocab_size, prompts)
    model = build("minigpt", config, device).eval()
    generation = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0, eos_token_id=config.eos_token_id)
    # A KV cache sized for these requests: left to itself, continuous batching sizes it from free memory, which on a
    # CPU means most of the machine's RAM, set up again on every call.
    pages = sum(math.ceil((len(prompt) + new_tokens) / 256) for prompt in inputs)
    paged_cache = ContinuousBatchingConfig(num_blocks=pages, max_batch_tokens=512)

    def continuous_batching(model) -> list[float]:
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=inputs, generation_config=generation,
                                       continuous_batching_config=paged_cache, progress_bar=False)
        assert sum(len(output.generated_tokens) for output in outputs.values()) == prompts * new_tokens
        return [output.lifespan[1] - started for output in outputs.values()]  # stamped on the same clock

    def one_by_one() -> list[float]:
        started, latencies = time.perf_counter(), []
        for prompt in inputs:
            model.generate(torch.tensor([prompt], device=device), generation_config=generation)
            latencies.append(time.perf_counter() - started)
        return latencies

    engines = {"continuous batching": functools.partial(continuous_batching, model),
               "continuous batching, int8": functools.partial(continuous_batching,
                                                              quantize_int8(copy.deepcopy(model))),
               "generate() one by one": one_by_one}
    for run in engines.values():
        run()  # warm-up: the paged cache is set up on the first call
    runs = interleaved_runs(engines, repeats)
    if vllm_python is not None:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(Path(folder, "minigpt"))
            convert(Path(folder, "minigpt"), Path(folder, "gpt2"), to="gpt2")
            runs["vLLM, GPT-2 export"] = vllm_greedy(vllm_python, Path(folder, "gpt2"), inputs, new_tokens,
                                                     repeats)["runs"]
            runs["vLLM, MiniGPT folder"] = vllm_greedy(vllm_python, Path(folder, "minigpt"), inputs, new_tokens,
                                                       repeats, model_impl="transformers",
                                                       trust_remote_code=True)["runs"]
    return {engine: serving_summary(engine_runs, prompts * new_tokens) for engine, engine_runs in runs.items()}


def vllm_environment(**extra) -> dict:
    """This process's environment for vLLM's own Python: without this venv's variables, and 1 GiB of KV cache (vLLM's
    CPU default takes far more)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHON"))}
    return {**environment, "VLLM_CPU_KVCACHE_SPACE": "1", **extra}


def vllm_greedy(vllm_python: Path, folder: Path, prompts: list, new_tokens: int, repeats: int = 0,
                env: dict | None = None, **options) -> dict:
    """`vllm_greedy.py` in vLLM's own environment: its greedy tokens, `repeats` timed runs after a warm-up, and vLLM's
    log. The whole process group (vLLM's engine core and workers) ends with it."""
    environment = vllm_environment(**(env or {}))
    options = {"skip_tokenizer_init": True, **options}  # token ids in, token ids out
    command = [str(vllm_python), str(VLLM_GREEDY), str(folder), json.dumps(prompts), str(new_tokens),
               json.dumps(options), str(repeats)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=1200)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of vLLM's engine core and workers
    answer = next((line for line in log.splitlines() if line.startswith("RESULT ")), None)
    if process.returncode != 0 or answer is None:
        raise RuntimeError(f"vLLM on {folder} failed (exit {process.returncode}):\n{log[-3000:]}")
    return {**json.loads(answer.removeprefix("RESULT ")), "log": log}


def serve_table(bench: Bench, shape_name: str, shape) -> None:
    prompts, new_tokens = (4, 8) if bench.quick else (16, 64)
    with_vllm = ", vLLM too" if bench.vllm_python else ""
    bench.report.say(f"serve {shape_name}: {prompts} mixed prompts at once{with_vllm}")
    results = measure_serving(shape, bench.device, new_tokens, 1 if bench.quick else 3, prompts, bench.vllm_python)
    bench.report.record(f"serve {shape_name}", results)
    rows = [(engine, f"{figures['tokens_per_second']:,.0f}", f"{figures['p50_seconds']:.3g}",
             f"{figures['p99_seconds']:.3g}") for engine, figures in results.items()]
    for row in rows:
        print(f"    {row[0]}: {row[1]} tokens/s, p50 {row[2]} s, p99 {row[3]} s", flush=True)
    bench.report.add_table(f"{shape_name}: serving {prompts} prompts of 8-64 tokens that arrive at once, {new_tokens} "
                           "new tokens each (greedy); latency: from their arrival to a request's last token",
                           SERVING, rows)
