"""Training steps: tokens/s and MFU (forward + backward + AdamW, fp32 and bf16 autocast), and the peak memory of a
step, for the three models."""

import functools
import json
import subprocess
import sys
from contextlib import nullcontext

import torch

from .. import MiniGPTConfig, MiniGPTForCausalLM
from ..cpu_kernels import onednn_linear, use_cpu_kernels
from .runner import (
    MODELS,
    Bench,
    adamw,
    batch_shape,
    best_seconds,
    build,
    config_for,
    interleaved,
    peak_rss,
    ratio,
    synchronize,
    timer_of,
    train_step,
)

# Dense peak TFLOPS from the vendors' data sheets (no sparsity), for MFU on GPUs.
GPU_PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}


def measure_training(shape, device, dtype: str, repeats: int, gpu: bool, cpu_kernels: bool) -> dict:
    """Training tokens/s of the three models; with `cpu_kernels`, MiniGPT's products are the CPU's faster ones
    (hf_minigpt.cpu_kernels), where its rule names this CPU."""
    config = config_for(shape)
    batch, seq = batch_shape(shape, gpu)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    timers = {}
    for name in MODELS:
        model = model_to_train(name, config, device, cpu_kernels)
        optimizer = adamw(model)
        train_step(model, optimizer, input_ids, autocast)  # warm-up: allocations, kernels
        timers[name] = timer_of(lambda model=model, optimizer=optimizer: train_step(model, optimizer, input_ids,
                                                                                    autocast), device)
    times = interleaved(timers, repeats)
    tokens = batch * seq
    flops_per_token = training_flops_per_token(config, seq)
    return {name: {"tokens_per_second": tokens / t["median"], "best_tokens_per_second": tokens / t["min"],
                   "flops_per_second": flops_per_token * tokens / t["median"]} for name, t in times.items()}


def model_to_train(name: str, config: MiniGPTConfig, device, cpu_kernels: bool):
    """One of the three models, in train mode; MiniGPT with the CPU's faster products where `cpu_kernels` is on and
    its rule names this CPU, as minigpt-pretrain trains."""
    model = build(name, config, device).train()
    return use_cpu_kernels(model, compile=False) if name == "minigpt" and cpu_kernels else model


def two_training_steps(name: str, shape, device, cpu_kernels: bool) -> None:
    """What the memory figure measures: a model built, then two fp32 training steps (AdamW state included)."""
    model = model_to_train(name, config_for(shape), device, cpu_kernels)
    optimizer = adamw(model)
    input_ids = torch.randint(0, shape[3], batch_shape(shape, device.type == "cuda"), device=device)
    for _ in range(2):
        train_step(model, optimizer, input_ids, nullcontext())
    synchronize(device)


def peak_memory(shape, device, name: str, cpu_kernels: bool) -> float:
    """Bytes a training step adds at its peak: CUDA max allocated, or peak RSS of a fresh process on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        two_training_steps(name, shape, device, cpu_kernels)
        return float(torch.cuda.max_memory_allocated(device) - before)
    child = [sys.executable, "-m", "hf_minigpt.benchmark", "--_memory_child", name, json.dumps(shape),
             *([] if cpu_kernels else ["--plain_kernels"])]
    return float(json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)["bytes"])


def memory_child(name: str, shape, cpu_kernels: bool) -> None:
    """In a fresh process: the peak RSS over two training steps, less the RSS before the model was built."""
    before = peak_rss()
    two_training_steps(name, shape, torch.device("cpu"), cpu_kernels)
    print(json.dumps({"bytes": peak_rss() - before}))


def training_flops_per_token(config: MiniGPTConfig, seq: int) -> float:
    """6 per parameter (forward and backward), plus attention's 12 * layers * width * seq (PaLM, appendix B)."""
    with torch.device("meta"):
        n_params = MiniGPTForCausalLM(config).num_parameters()
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq


@functools.cache  # measured once per run: the training and end-to-end rows share it
def device_peak_flops(device, dtype: str) -> tuple[float, str]:
    """FLOP/s the device can do: the vendor's dense figure on a known GPU, else a measured large matmul, the faster of
    PyTorch's (MKL's, on x86) and oneDNN's in fp32: on AMD CPUs with AVX-512, MKL's runs on AVX2 at about half."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if all(word in name for word in key.split()):
                return peaks[dtype] * 1e12, f"{key} data sheet"
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=torch_dtype), torch.randn(n, n, device=device, dtype=torch_dtype)
    seconds = {"matmul": best_seconds(lambda: a @ b, device)}
    if device.type == "cpu" and dtype == "fp32" and torch.backends.mkldnn.is_available():
        seconds["oneDNN's matmul"] = best_seconds(lambda: onednn_linear(a, b, None), device)
    fastest = min(seconds, key=seconds.get)
    return 2 * n**3 / seconds[fastest], f"measured {n}x{n} {fastest}"


def train_table(bench: Bench, shape_name: str, shape) -> None:
    for dtype in bench.dtypes:
        key = f"train {shape_name} {dtype}"
        bench.report.say(key)
        results = measure_training(shape, bench.device, dtype, bench.repeats, bench.gpu, bench.cpu_kernels)
        peak, source = device_peak_flops(bench.device, dtype)
        for name in results:
            results[name]["mfu"] = results[name]["flops_per_second"] / peak
        speeds = (f"{key} tokens/s", *(f"{results[m]['tokens_per_second']:,.0f}" for m in MODELS),
                  ratio(results, "tokens_per_second", "gpt2"), ratio(results, "tokens_per_second", "nanogpt"))
        bench.report.record(key, {**results, "peak_flops": peak, "peak_source": source}, speeds,
                            (f"{key} MFU", *(f"{results[m]['mfu']:.1%}" for m in MODELS), "", ""))


def memory_table(bench: Bench, shape_name: str, shape) -> None:
    bench.report.say(f"memory {shape_name}")
    memory = {name: {"bytes": peak_memory(shape, bench.device, name, bench.cpu_kernels)} for name in MODELS}
    bench.report.record(f"memory {shape_name}", memory,
                        (f"train {shape_name} peak memory MB",
                         *(f"{memory[m]['bytes'] / 2**20:,.0f}" for m in MODELS),
                         ratio(memory, "bytes", "gpt2"), ratio(memory, "bytes", "nanogpt")))
