"""MiniGPT against transformers' GPT2LMHeadModel and a nanoGPT-style minimal model: same config, same weights,
measured interleaved in one run on one machine.

    minigpt-bench                       # the full table (several minutes on 2 CPU cores)
    minigpt-bench --quick               # a smoke run with tiny shapes (CI)
    minigpt-bench --device cuda --json results.json

Measured: training-step tokens/s (forward + backward + AdamW; fp32 and bf16 autocast) at a small shape and at the
GPT-2 124M shape; peak memory of a training step (CUDA max allocated, or the peak RSS of a fresh process per
model on CPU, less the same process's RSS before the model was built); greedy generation tokens/s with a dynamic
and a static cache; MFU against the device's peak (a vendor figure on GPU, measured matmul throughput on CPU).
"""

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .cli import ArgumentParser, quiet_loading
from . import MiniGPTConfig, MiniGPTForCausalLM
from .export import convert, fused_qkv
from .export.gguf import write_gguf
from .export.gpt2 import minigpt_to_gpt2_state_dict
from .export.onnx import greedy_decode, write_onnx
from .folders import RunFolder
from .quantize import cpu_compile_config, quantize_int8

# Dense peak TFLOPS from the vendors' data sheets (no sparsity), for MFU on GPUs.
GPU_PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}

SHAPES = {  # name -> (n_layer, n_head, n_embd, vocab, batch on CPU, batch on GPU, seq len on CPU, on GPU)
    "small": (4, 4, 256, 50304, 8, 8, 256, 256),
    "gpt2-124M": (12, 12, 768, 50257, 2, 16, 256, 1024),
}
QUICK_SHAPES = {"tiny": (2, 2, 64, 512, 2, 2, 32, 32)}
MODELS = ("minigpt", "gpt2", "nanogpt")


# ---------------------------------------------------------------------------------------------------------------------
# The nanoGPT-style reference: fused qkv, SDPA's causal kernel, tied head; module names as in GPT-2, so the same
# state dict loads into it.


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(n_embd, 3 * n_embd), "c_proj": nn.Linear(n_embd, n_embd)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(n_embd, 4 * n_embd), "c_proj": nn.Linear(4 * n_embd, n_embd)})

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "wpe": nn.Embedding(config.n_positions, config.n_embd),
            "h": nn.ModuleList(NanoBlock(config.n_embd, config.n_head) for _ in range(config.n_layer)),
            "ln_f": nn.LayerNorm(config.n_embd),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids, labels=None):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# Building and measuring


def build(name: str, config: MiniGPTConfig, device) -> nn.Module:
    """One of the three models, all holding the weights of MiniGPT seeded with 0."""
    torch.manual_seed(0)
    minigpt = MiniGPTForCausalLM(config)
    if name == "minigpt":
        return minigpt.to(device)
    if name == "gpt2":
        fields = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "resid_pdrop", "embd_pdrop",
                  "attn_pdrop", "bos_token_id", "eos_token_id")
        gpt2 = GPT2LMHeadModel(GPT2Config(**{field: getattr(config, field) for field in fields}))
        gpt2.load_state_dict(minigpt_to_gpt2_state_dict(minigpt.state_dict()), strict=False)
        gpt2.config._attn_implementation = "sdpa"
        gpt2.loss_type = "ForCausalLM"  # what it computes; transformers cannot tell from the name GPT2LMHeadModel
        return gpt2.to(device)
    nano = NanoGPT(config)
    nano.load_state_dict(fused_qkv(minigpt.state_dict()), strict=False)
    return nano.to(device)


def config_for(shape) -> MiniGPTConfig:
    n_layer, n_head, n_embd, vocab, *_ = shape
    return MiniGPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=1024,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def loss_of(model, input_ids):
    if isinstance(model, NanoGPT):
        return model(input_ids, labels=input_ids)
    if isinstance(model, MiniGPTForCausalLM):  # its memory-saving training path, as the training scripts use it
        return model(input_ids, labels=input_ids, skip_logits=True).loss
    return model(input_ids, labels=input_ids).loss


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def adamw(model):
    """The fused AdamW every model trains with here: what transformers' Trainer uses by default (torch >= 2.8)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def train_step(model, optimizer, input_ids, autocast):
    with autocast:
        loss = loss_of(model, input_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def batch_shape(shape, gpu: bool) -> tuple[int, int]:
    """(batch, sequence length) of a training step at `shape`: larger on a GPU."""
    return (shape[5], shape[7]) if gpu else (shape[4], shape[6])


def timer_of(work, device):
    """A function that runs `work` once and returns the seconds it took, the device's queue drained."""

    def timer():
        synchronize(device)
        started = time.perf_counter()
        work()
        synchronize(device)
        return time.perf_counter() - started

    return timer


def interleaved_runs(work: dict, repeats: int) -> dict[str, list]:
    """Run each piece of work once per round, round after round, so that machine noise hits all of them alike; the
    order rotates, so that none always runs first. What each run returned, by name."""
    names = list(work)
    results = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            results[name].append(work[name]())
    return results


def interleaved(timers: dict, repeats: int) -> dict:
    """The median and best seconds of each timer, run interleaved."""
    return {name: {"median": statistics.median(values), "min": min(values)}
            for name, values in interleaved_runs(timers, repeats).items()}


def measure_training(shape, device, dtype: str, repeats: int, gpu: bool) -> dict:
    config = config_for(shape)
    batch, seq = batch_shape(shape, gpu)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    timers = {}
    for name in MODELS:
        model = build(name, config, device).train()
        optimizer = adamw(model)
        train_step(model, optimizer, input_ids, autocast)  # warm-up: allocations, kernels
        timers[name] = timer_of(lambda model=model, optimizer=optimizer: train_step(model, optimizer, input_ids,
                                                                                    autocast), device)
    times = interleaved(timers, repeats)
    tokens = batch * seq
    flops_per_token = training_flops_per_token(config, seq)
    return {name: {"tokens_per_second": tokens / t["median"], "best_tokens_per_second": tokens / t["min"],
                   "flops_per_second": flops_per_token * tokens / t["median"]} for name, t in times.items()}


def measure_generation(shape, device, batch: int, new_tokens: int, cache: str, repeats: int, compile_: bool) -> dict:
    config = config_for(shape)
    prompt = torch.randint(0, config.vocab_size, (batch, 32), device=device)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   attention_mask=torch.ones_like(prompt), pad_token_id=0)
    if cache == "static":
        options["cache_implementation"] = "static"
        if compile_:
            options["compile_config"] = cpu_compile_config()  # on GPUs too: generate() would compile there anyway
    timers = {}
    for name in ("minigpt", "gpt2"):
        model = build(name, config, device).eval()
        model.generate(prompt, **options)  # warm-up (and compilation)
        timers[name] = timer_of(lambda model=model: model.generate(prompt, **options), device)
    times = interleaved(timers, repeats)
    return {name: {"tokens_per_second": batch * new_tokens / t["median"],
                   "best_tokens_per_second": batch * new_tokens / t["min"]} for name, t in times.items()}


def two_training_steps(name: str, shape, device) -> None:
    """What the memory figure measures: a model built, then two fp32 training steps (AdamW state included)."""
    model = build(name, config_for(shape), device).train()
    optimizer = adamw(model)
    input_ids = torch.randint(0, shape[3], batch_shape(shape, device.type == "cuda"), device=device)
    for _ in range(2):
        train_step(model, optimizer, input_ids, nullcontext())
    synchronize(device)


def peak_memory(shape, device, name: str) -> float:
    """Bytes a training step adds at its peak: CUDA max allocated, or peak RSS of a fresh process on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        two_training_steps(name, shape, device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    child = [sys.executable, "-m", "hf_minigpt.benchmark", "--_memory_child", name, json.dumps(shape)]
    return float(json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout)["bytes"])


def peak_rss() -> int:
    """This process's peak resident set, in bytes. Linux's VmHWM belongs to this program image; ru_maxrss
    would carry over the parent's peak through fork + exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_child(name: str, shape) -> None:
    """In a fresh process: the peak RSS over two training steps, less the RSS before the model was built."""
    before = peak_rss()
    two_training_steps(name, shape, torch.device("cpu"))
    print(json.dumps({"bytes": peak_rss() - before}))


def training_flops_per_token(config: MiniGPTConfig, seq: int) -> float:
    """6 per parameter (forward and backward), plus attention's 12 * layers * width * seq (PaLM, appendix B)."""
    with torch.device("meta"):
        n_params = MiniGPTForCausalLM(config).num_parameters()
    return 6 * n_params + 12 * config.n_layer * config.n_embd * seq


@functools.cache  # measured once per run: the training and end-to-end rows share it
def device_peak_flops(device, dtype: str) -> tuple[float, str]:
    """FLOP/s the device can do: the vendor's dense figure on a known GPU, else a measured large matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if all(word in name for word in key.split()):
                return peaks[dtype] * 1e12, f"{key} data sheet"
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=torch_dtype), torch.randn(n, n, device=device, dtype=torch_dtype)
    a @ b
    best = math.inf
    for _ in range(5):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best, f"measured {n}x{n} matmul"


# ---------------------------------------------------------------------------------------------------------------------
# Deployment: greedy decoding on a CPU, by every way this project offers to run a model there


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of the 256 bytes, one merge (llama.cpp refuses a BPE without any) and EOS: all that the
    exports need, with no training."""
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"Ġt": len(vocab), "<|endoftext|>": len(vocab) + 1})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package in packages)


ONNX_PACKAGES, LLAMA_CPP_PACKAGES = ("onnx", "onnxscript", "onnxruntime"), ("gguf", "llama_cpp")


def export_for_deployment(shape, folder: Path) -> None:
    """The benchmark's MiniGPT weights as a folder, then exported for the runtimes that are installed: ONNX (for
    onnxruntime) and a q8_0 GGUF (for llama.cpp, through llama-cpp-python)."""
    build("minigpt", config_for(shape), "cpu").save_pretrained(folder / "minigpt")
    byte_tokenizer().save_pretrained(folder / "minigpt")
    if installed(*ONNX_PACKAGES):
        write_onnx(folder / "minigpt", folder / "onnx")
    if installed(*LLAMA_CPP_PACKAGES):
        write_gguf(folder / "minigpt", folder / "model.gguf", dtype="q8_0")


def measure_deployment(shape, folder: Path, batch: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decode tokens/s (a 32-token prompt, then `new_tokens`) on the CPU: MiniGPT eager, with a static cache +
    torch.compile, the same with int8 weights; GPT2LMHeadModel; onnxruntime on the ONNX export; llama.cpp on the
    q8_0 GGUF (batch 1: llama-cpp-python decodes one sequence); each runtime where it is installed."""
    cpu = torch.device("cpu")
    config = config_for(shape)
    prompt = torch.randint(0, 256, (batch, 32), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   attention_mask=torch.ones_like(prompt), pad_token_id=0)
    compiled = dict(options, cache_implementation="static", compile_config=cpu_compile_config())
    engines = {
        "MiniGPT eager": (build("minigpt", config, cpu).eval(), options),
        "MiniGPT static+compile": (build("minigpt", config, cpu).eval(), compiled),
        "MiniGPT int8 static+compile": (quantize_int8(build("minigpt", config, cpu)), compiled),
        "GPT2LMHeadModel": (build("gpt2", config, cpu).eval(), options),
    }
    timers = {}
    for name, (model, kwargs) in engines.items():
        model.generate(prompt, **kwargs)  # warm-up (and compilation)
        timers[name] = timer_of(lambda model=model, kwargs=kwargs: model.generate(prompt, **kwargs), cpu)
    if (folder / "onnx").exists():
        import onnxruntime

        session = onnxruntime.InferenceSession(str(folder / "onnx" / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
        greedy_decode(session, prompt.numpy(), new_tokens)
        timers["onnxruntime"] = timer_of(lambda: greedy_decode(session, prompt.numpy(), new_tokens), cpu)
    if (folder / "model.gguf").exists() and batch == 1:
        import llama_cpp

        llama = llama_cpp.Llama(str(folder / "model.gguf"), n_ctx=256, n_threads=torch.get_num_threads(),
                                verbose=False)

        def llama_decode():
            list(islice(llama.generate(prompt[0].tolist(), top_k=1, temp=0.0), new_tokens))

        llama_decode()
        timers["llama.cpp q8_0"] = timer_of(llama_decode, cpu)
    times = interleaved(timers, repeats)
    weights = {name: weight_bytes_per_step(model) for name, (model, _) in engines.items()}
    weights["onnxruntime"] = weights["MiniGPT eager"]  # the same fp32 weights
    if (folder / "model.gguf").exists():
        weights["llama.cpp q8_0"] = gguf_weight_bytes(folder / "model.gguf")
    return {name: {"tokens_per_second": batch * new_tokens / t["median"],
                   "best_tokens_per_second": batch * new_tokens / t["min"], "weight_bytes": weights[name]}
            for name, t in times.items()}


def weight_bytes_per_step(model: nn.Module) -> int:
    """The bytes of weights one decode step reads: every parameter and buffer once, but the position embedding and an
    untied token embedding only serve lookups of a few rows (a tied one is also the LM head, read whole)."""
    lookups = {model.get_input_embeddings().weight.data_ptr()} | {
        module.weight.data_ptr() for name, module in model.named_modules() if name.endswith("wpe")}
    output = model.get_output_embeddings()
    lookups -= {output.weight.data_ptr()} if isinstance(output.weight, torch.Tensor) else set()
    tensors = {tensor.data_ptr(): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return sum(tensor.numel() * tensor.element_size() for pointer, tensor in tensors.items() if pointer not in lookups)


def gguf_weight_bytes(path: Path) -> int:
    """The same for llama.cpp's file: every tensor but the position embedding (its token embedding is the output)."""
    import gguf

    return sum(int(tensor.n_bytes) for tensor in gguf.GGUFReader(str(path)).tensors
               if tensor.name != "position_embd.weight")


def memory_bandwidth() -> float:
    """Bytes per second that a large copy moves on this CPU, reading and writing, with torch's threads: best of 5."""
    source = torch.ones(64 * 2**20)  # 256 MB of fp32, far beyond any cache
    target = torch.empty_like(source)
    target.copy_(source)
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / best


def measure_deployments(report, shape_name: str, shape, repeats: int, new_tokens: int) -> list[tuple]:
    """The deployment table's rows at `shape`: every engine at batch 1 and 8, each batch recorded as measured."""
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        missing = [name for name, packages in (("onnxruntime", ONNX_PACKAGES), ("llama.cpp", LLAMA_CPP_PACKAGES))
                   if not installed(*packages)]
        report.say(f"deploy {shape_name}: exporting" + (f" (not installed, so not measured: {', '.join(missing)})"
                                                        if missing else ""))
        export_for_deployment(shape, Path(folder))
        for batch in (1, 8):
            key = f"deploy {shape_name} b={batch}"
            report.say(f"{key}, greedy decoding")
            results[batch] = measure_deployment(shape, Path(folder), batch, new_tokens, repeats)
            report.record(key, results[batch])
            print("    " + " | ".join(f"{engine} {speed['tokens_per_second']:,.0f}"
                                      for engine, speed in results[batch].items()), flush=True)
    bandwidth = memory_bandwidth()
    report.record(f"memory bandwidth {shape_name}", {"bytes_per_second": bandwidth})
    rows = []
    for engine in results[1]:
        speeds = [results[batch].get(engine, {}).get("tokens_per_second") for batch in (1, 8)]
        baselines = [results[batch]["GPT2LMHeadModel"]["tokens_per_second"] for batch in (1, 8)]
        # Decoding one sequence reads every weight once per token: bandwidth / weight bytes bounds its speed.
        ceiling = bandwidth / results[1][engine]["weight_bytes"]
        rows.append((engine, *(f"{speed:,.0f}" if speed else "n/a" for speed in speeds),
                     *(f"{speed / baseline:.2f}x" if speed else "n/a" for speed, baseline in zip(speeds, baselines)),
                     f"{results[1][engine]['weight_bytes'] / 1e6:.3g}", f"{ceiling:,.0f}",
                     f"{speeds[0] / ceiling:.0%}"))
    return rows, bandwidth


# ---------------------------------------------------------------------------------------------------------------------
# Serving: the same mixed prompts, all arriving at once, through every engine that serves MiniGPT here.

SERVING = ("engine", "tokens/s", "p50 latency s", "p99 latency s")
VLLM_GREEDY = Path(__file__).with_name("vllm_greedy.py")


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
    batching (`generate_batch`, a paged KV cache) and `generate()` one prompt after another, interleaved; then, where
    vLLM's CPU build is installed (`vllm_python`), vLLM on MiniGPT's GPT-2 export and on the MiniGPT folder itself
    (its Transformers backend), each in a process of its own. A request's latency runs from the arrival of all
    prompts to its last token."""
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

    def continuous_batching() -> list[float]:
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

    engines = {"continuous batching": continuous_batching, "generate() one by one": one_by_one}
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


# ---------------------------------------------------------------------------------------------------------------------
# End to end: minigpt-pretrain against transformers' Trainer training GPT2LMHeadModel, script against script, on the
# same token shard (the embedded corpus), model shape, batch, schedule and steps; each in a fresh process.

END_TO_END_STEPS = 20


def end_to_end_flags(shape) -> list[str]:
    n_layer, n_head, n_embd, _, batch, _, block, _ = shape
    return ["--n_layer", str(n_layer), "--n_head", str(n_head), "--n_embd", str(n_embd), "--block_size", str(block),
            "--per_device_train_batch_size", str(batch), "--learning_rate", "6e-4", "--weight_decay", "0.1",
            "--lr_scheduler_type", "cosine", "--num_warmup_steps", "2"]


# The peak RSS that wait4 reports for a process includes the peak of the process that started it (the kernel carries
# the high-water mark across exec), and by the end-to-end rows this one holds 124M-parameter models. A launcher of a
# few MB starts the command and reports its child's peak instead.
LAUNCHER = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[2:]); "
            "_, status, usage = os.wait4(child.pid, 0); open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); "
            "sys.exit(os.waitstatus_to_exitcode(status))")


def run_measured(command: list[str], log: Path) -> dict:
    """Runs `command` in its own process, its output into `log`; its wall time and its own peak RSS (from wait4)."""
    started = time.perf_counter()
    peak_file = log.with_suffix(".peak_rss")
    with open(log, "w") as output:
        status = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak_file), *command], stdout=output,
                                stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss": int(peak_file.read_text()) * 1024}


def measure_end_to_end(shape, folder: Path, steps: int) -> dict:
    """Training tokens/s as each script reports it, and each process's peak RSS."""
    tokens, tokenizer = folder / "tokens", folder / "tokenizer"
    flags = end_to_end_flags(shape)
    # The tokenizer and the shard both scripts read.
    run_measured([sys.executable, "-m", "hf_minigpt.pretrain", "--max_train_steps", "1", "--vocab_size",
                  str(shape[3]), "--save_tokens", str(tokens), "--output_dir", str(tokenizer), "--max_new_tokens", "0",
                  *flags],
                 folder / "prepare.log")
    pad_vocabulary(tokenizer, shape[3])
    minigpt = run_measured([sys.executable, "-m", "hf_minigpt.pretrain", "--train_file", str(tokens / "train.bin"),
                            "--tokenizer_name", str(tokenizer), "--max_train_steps", str(steps), "--output_dir",
                            str(folder / "minigpt"), "--max_new_tokens", "0", *flags], folder / "minigpt.log")
    minigpt["tokens_per_second"] = json.loads(RunFolder(folder / "minigpt").results.read_text())[
        "train_tokens_per_second"]
    trainer = run_measured([sys.executable, "-m", "hf_minigpt.benchmark", "--_trainer_child", json.dumps(shape),
                            str(folder), str(steps)], folder / "trainer.log")
    trainer["tokens_per_second"] = json.loads((folder / "trainer.log").read_text().splitlines()[-1])[
        "tokens_per_second"]
    return {"minigpt-pretrain": minigpt, "Trainer": trainer}


def pad_vocabulary(folder: Path, size: int) -> None:
    """Unused tokens up to the shape's vocabulary, so that both scripts build models of the shape measured: a BPE
    trained on the embedded corpus stops at about 9,000 tokens, and the LM head is where the models differ most."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<unused{i}>" for i in range(len(tokenizer), size)])
    tokenizer.save_pretrained(folder)


def trainer_child(shape, folder: Path, steps: int) -> None:
    """transformers' Trainer training GPT2LMHeadModel on the shard, as a transformers user would."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from .training.tokens import TokenBlocks, read_shard

    class LabelledBlocks(TokenBlocks):  # a causal LM's labels are its inputs; GPT-2 shifts them
        def __getitem__(self, index):
            block = super().__getitem__(index)
            return {**block, "labels": block["input_ids"]}

    flags = end_to_end_flags(shape)
    options = dict(zip(flags[::2], flags[1::2]))
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    block_size = int(options["--block_size"])
    data = LabelledBlocks([read_shard(folder / "tokens" / "train.bin")], block_size)
    # minigpt-pretrain's defaults: no dropout (GPT2Config's 0.1 would also keep SDPA off its fused CPU kernel).
    config = GPT2Config(n_layer=shape[0], n_head=shape[1], n_embd=shape[2], vocab_size=len(tokenizer),
                        n_positions=block_size, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    arguments = TrainingArguments(
        output_dir=str(folder / "trainer"), per_device_train_batch_size=int(options["--per_device_train_batch_size"]),
        max_steps=steps, learning_rate=float(options["--learning_rate"]), weight_decay=0.1,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=steps, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True,
    )
    metrics = Trainer(model=GPT2LMHeadModel(config), args=arguments, train_dataset=data).train().metrics
    print(json.dumps({"tokens_per_second": metrics["train_samples_per_second"] * block_size}))


# ---------------------------------------------------------------------------------------------------------------------
# Data scale: minigpt-pretrain's peak memory and speed as the corpus grows (a .txt file = one document).


def measure_data_scale(sizes_mb: tuple, folder: Path) -> dict:
    """For each size: peak RSS and wall time of `minigpt-pretrain`, as a user runs it, training a new tokenizer on,
    tokenizing and taking 5 steps over one text file of that many MB (the embedded corpus, repeated)."""
    from .pretrain import embedded_corpus

    text = "\n\n".join(embedded_corpus()["text"])
    results = {}
    for size in sizes_mb:
        corpus = folder / f"corpus_{size}MB.txt"
        with open(corpus, "w") as handle:
            for _ in range(math.ceil(size * 2**20 / len(text))):
                handle.write(text)
        command = [sys.executable, "-m", "hf_minigpt.pretrain", "--train_file", str(corpus), "--max_train_steps",
                   "5", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "128", "--output_dir",
                   str(folder / f"run_{size}MB"), "--max_new_tokens", "0"]
        run = run_measured(command, folder / f"run_{size}MB.log")
        results[f"{size} MB"] = {**run, "mb_per_second": corpus.stat().st_size / 2**20 / run["seconds"]}
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report


def ratio(results: dict, key: str, other: str) -> str:
    if other not in results or not results[other].get(key):
        return "n/a"
    return f"{results['minigpt'][key] / results[other][key]:.2f}x"


COMPARISON = ("measurement", "MiniGPT", "GPT2LMHeadModel", "nanoGPT-style", "MiniGPT/GPT2", "MiniGPT/nanoGPT")
DEPLOYMENT = ("greedy decode on the CPU", "b=1 tokens/s", "b=8 tokens/s", "b=1 vs GPT2LMHeadModel",
              "b=8 vs GPT2LMHeadModel", "weights MB/token", "b=1 ceiling tokens/s", "b=1 share of ceiling")


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


TABLES = ("train", "memory", "end_to_end", "deploy", "generate", "serve", "data_scale")
DEFAULT_TABLES = ("train", "memory", "deploy", "generate", "serve")


def main(argv=None) -> None:
    parser = ArgumentParser(prog="minigpt-bench", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="Tiny shapes, one repetition: checks the script runs.")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(DEFAULT_TABLES),
                        help="What to measure (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="Also static cache + torch.compile (default on GPU).")
    parser.add_argument("--json", help="Write every figure to this file (updated after each measurement).")
    parser.add_argument("--bf16", action="store_true", help="Measure bf16 even on a CPU without native bf16.")
    parser.add_argument("--end_to_end", action="store_true", help="Also minigpt-pretrain against transformers' "
                        f"Trainer (GPT2LMHeadModel), {END_TO_END_STEPS} steps each at every shape (minutes at 124M).")
    parser.add_argument("--data_scale", action="store_true", help="Also minigpt-pretrain's peak memory and speed on "
                        "a 10 MB and a 100 MB text file (about 2 minutes).")
    parser.add_argument("--vllm", default=".venv-vllm/bin/python", help="The Python of a virtual environment with "
                        "vllm-cpu (vLLM pins its own torch and transformers), for the serving rows; "
                        "default: %(default)s; 'none' leaves vLLM out.")
    parser.add_argument("--_memory_child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_trainer_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_loading()
    if args._memory_child:
        return memory_child(args._memory_child[0], json.loads(args._memory_child[1]))
    if args._trainer_child:
        shape, folder, steps = args._trainer_child
        return trainer_child(json.loads(shape), Path(folder), int(steps))

    keep_capped_kernels_apart()
    bench = Bench.from_args(args)
    tables = [table for table in TABLES if table in args.tables or getattr(args, table, False)]
    shapes = QUICK_SHAPES if args.quick else {name: SHAPES[name] for name in args.shapes}
    for shape_name, shape in shapes.items():
        for table in tables:
            if table != "data_scale":
                MEASURE[table](bench, shape_name, shape)
    if "data_scale" in tables:
        data_scale_table(bench)
    bench.report.print_tables()


@dataclass
class Bench:
    """The choices every table measures with, and the report it adds to."""

    device: torch.device
    report: "Report"
    quick: bool
    repeats: int
    new_tokens: int
    compile_: bool
    dtypes: list[str]
    vllm_python: Path | None

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def from_args(cls, args) -> "Bench":
        device = torch.device(args.device)
        gpu = device.type == "cuda"
        machine = torch.cuda.get_device_name(device) if gpu else cpu_description()
        repeats = 1 if args.quick else args.repeats
        dtypes = ["fp32", "bf16"]
        if not gpu and not native_bf16() and not args.bf16:
            dtypes = ["fp32"]
            print("Skipping the bf16 rows: PyTorch has no native bf16 here (AVX-512 BF16 or AMX, absent or held off "
                  "by ATEN_CPU_CAPABILITY), where bf16 matmuls are emulated and slow; --bf16 measures them anyway.")
        vllm_python = Path(args.vllm) if args.vllm != "none" and Path(args.vllm).is_file() and not gpu else None
        if vllm_python is None and args.vllm != "none" and not gpu:
            print(f"Skipping the vLLM serving rows: no vllm-cpu environment at {args.vllm} (see --vllm).")
        if args.quick:
            print("--quick: tiny shapes and one repetition, to check that every part runs. Its figures and ratios "
                  "are not a measurement.")
        return cls(device, Report(machine, repeats, args.json), args.quick, repeats,
                   8 if args.quick else args.new_tokens, args.compile or gpu, dtypes, vllm_python)


def train_table(bench: Bench, shape_name: str, shape) -> None:
    for dtype in bench.dtypes:
        key = f"train {shape_name} {dtype}"
        bench.report.say(key)
        results = measure_training(shape, bench.device, dtype, bench.repeats, bench.gpu)
        peak, source = device_peak_flops(bench.device, dtype)
        for name in results:
            results[name]["mfu"] = results[name]["flops_per_second"] / peak
        speeds = (f"{key} tokens/s", *(f"{results[m]['tokens_per_second']:,.0f}" for m in MODELS),
                  ratio(results, "tokens_per_second", "gpt2"), ratio(results, "tokens_per_second", "nanogpt"))
        bench.report.record(key, {**results, "peak_flops": peak, "peak_source": source}, speeds,
                            (f"{key} MFU", *(f"{results[m]['mfu']:.1%}" for m in MODELS), "", ""))


def memory_table(bench: Bench, shape_name: str, shape) -> None:
    bench.report.say(f"memory {shape_name}")
    memory = {name: {"bytes": peak_memory(shape, bench.device, name)} for name in MODELS}
    bench.report.record(f"memory {shape_name}", memory,
                        (f"train {shape_name} peak memory MB",
                         *(f"{memory[m]['bytes'] / 2**20:,.0f}" for m in MODELS),
                         ratio(memory, "bytes", "gpt2"), ratio(memory, "bytes", "nanogpt")))


def end_to_end_table(bench: Bench, shape_name: str, shape) -> None:
    bench.report.say(f"end to end {shape_name}: minigpt-pretrain, then Trainer, {END_TO_END_STEPS} steps each")
    with tempfile.TemporaryDirectory() as folder:
        scripts = measure_end_to_end(shape, Path(folder), END_TO_END_STEPS)
    scripts = {"minigpt": scripts["minigpt-pretrain"], "gpt2": scripts["Trainer"]}
    # Both scripts do the same arithmetic: how close each comes to the matmul peak bounds the ratio. Against the fp32
    # peak the training rows use, so that both kinds of MFU compare.
    flops_per_token = training_flops_per_token(config_for(shape), shape[6])  # the scripts' block size
    for side in scripts.values():
        side["mfu"] = side["tokens_per_second"] * flops_per_token / device_peak_flops(bench.device, "fp32")[0]
    label = f"end to end {shape_name}, minigpt-pretrain | Trainer"
    bench.report.record(f"end to end {shape_name}", scripts,
                        (f"{label} tokens/s", *(f"{scripts[m]['tokens_per_second']:,.0f}" for m in MODELS[:2]),
                         "n/a", ratio(scripts, "tokens_per_second", "gpt2"), "n/a"),
                        (f"{label} MFU", *(f"{scripts[m]['mfu']:.1%}" for m in MODELS[:2]), "n/a", "", ""),
                        (f"{label} peak RSS MB", *(f"{scripts[m]['peak_rss'] / 2**20:,.0f}" for m in MODELS[:2]),
                         "n/a", ratio(scripts, "peak_rss", "gpt2"), "n/a"))


def deploy_table(bench: Bench, shape_name: str, shape) -> None:
    if shape_name == "small" or bench.gpu:  # the CPU runtimes, at the shape people deploy
        return
    new_tokens = 8 if bench.quick else 32
    rows, bandwidth = measure_deployments(bench.report, shape_name, shape, bench.repeats, new_tokens)
    bench.report.add_table(f"{shape_name}: a 32-token prompt, then {new_tokens} new tokens; int8: int8 weights, bf16 "
                           "activations (hf_minigpt.quantize); ceiling: the memory bandwidth a copy reaches here "
                           f"({bandwidth / 1e9:.1f} GB/s) / the weight bytes read per token", DEPLOYMENT, rows)


def generate_table(bench: Bench, shape_name: str, shape) -> None:
    if shape_name not in ("small", "tiny"):
        return
    for cache in ("dynamic", "static"):
        for batch in (1, 8):
            key = f"generate {shape_name} {cache}{'+compile' if cache == 'static' and bench.compile_ else ''} b={batch}"
            bench.report.say(key)
            results = measure_generation(shape, bench.device, batch, bench.new_tokens, cache, bench.repeats,
                                         bench.compile_ and cache == "static")
            bench.report.record(key, results, (f"{key} tokens/s", f"{results['minigpt']['tokens_per_second']:,.0f}",
                                               f"{results['gpt2']['tokens_per_second']:,.0f}", "n/a",
                                               ratio(results, "tokens_per_second", "gpt2"), "n/a"))


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


def data_scale_table(bench: Bench) -> None:
    sizes = (0.2, 2) if bench.quick else (10, 100)
    bench.report.say(f"data scale: minigpt-pretrain on {sizes[0]} MB and {sizes[1]} MB of text")
    with tempfile.TemporaryDirectory() as folder:
        scale = measure_data_scale(sizes, Path(folder))
    bench.report.record("data scale", scale)
    small, large = scale.values()
    print(f"    peak RSS {large['peak_rss'] / small['peak_rss']:.2f}x from {sizes[0]} MB to {sizes[1]} MB", flush=True)
    bench.report.add_table("minigpt-pretrain, new tokenizer, 5 steps of a 2x64 model, block 128; one .txt file of:",
                           ("text", "peak RSS MB", "seconds", "MB/s (whole run)"),
                           [(size, f"{figures['peak_rss'] / 2**20:,.0f}", f"{figures['seconds']:.0f}",
                             f"{figures['mb_per_second']:.2f}") for size, figures in scale.items()])


MEASURE = {"train": train_table, "memory": memory_table, "end_to_end": end_to_end_table, "deploy": deploy_table,
           "generate": generate_table, "serve": serve_table}


class Report:
    """Says what is being measured, prints each row as soon as it is measured, and keeps `--json` up to date, so
    that an interrupted run still leaves every figure it got."""

    def __init__(self, machine: str, repeats: int, path: str | None):
        self.data = {"device": machine, "torch": torch.__version__, "repeats": repeats, "results": {}}
        self.rows, self.tables, self.path, self.started = [], [], path, time.perf_counter()
        self.machine, self.repeats = machine, repeats
        print(f"device: {machine}; torch {torch.__version__}", flush=True)
        print("each row as measured: MiniGPT | GPT2LMHeadModel | nanoGPT-style | MiniGPT/GPT2 | MiniGPT/nanoGPT "
              "(the models a row measures)", flush=True)

    def add_table(self, title: str, header: tuple, rows: list[tuple]) -> None:
        """A table of its own, printed after the comparison."""
        self.tables.append((title, header, rows))

    def print_tables(self) -> None:
        print(f"\ndevice: {self.machine}; torch {torch.__version__}; median of {self.repeats} interleaved repetitions")
        if self.rows:
            print_table(COMPARISON, self.rows)
        for title, header, rows in self.tables:
            print(f"\n{title}")
            print_table(header, rows)

    def say(self, what: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f} s] measuring {what} ...", flush=True)

    def record(self, key: str, results: dict, *rows: tuple) -> None:
        self.data["results"][key] = results
        for row in rows:
            self.rows.append(row)
            print("    " + row[0] + ": " + " | ".join(cell for cell in row[1:] if cell not in ("", "n/a")), flush=True)
        if self.path:
            with open(self.path, "w") as handle:
                json.dump(self.data, handle, indent=2)


def cpuinfo(field: str) -> str:
    """A field of the first CPU in Linux's /proc/cpuinfo ("" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as lines:
            return next(line for line in lines if line.startswith(field)).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return ""


def keep_capped_kernels_apart() -> None:
    """A run held to fewer instruction sets (ATEN_CPU_CAPABILITY) compiles into an inductor cache of its own.

    torch 2.13's inductor picks its vector width from ATEN_CPU_CAPABILITY but leaves it out of the key of its graph
    cache. A graph compiled under `avx2` (8 floats per vector) and served to an uncapped process is built for 16:
    its kernels write past the end of their buffers, and glibc aborts on the corrupted heap (here in the compiled
    static-cache decode at 124M). Served the other way it stalled. Keeping the capped kernels apart avoids both."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    # (Importing transformers already set the variable to the default: only a user's own choice is kept.)
    if capability and os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir(), f"minigpt-bench-inductor-{capability}"))


def native_bf16() -> bool:
    held_to_avx2 = torch.backends.cpu.get_cpu_capability() == "AVX2"  # e.g. ATEN_CPU_CAPABILITY=avx2
    return bool(set(cpuinfo("flags").split()) & {"avx512_bf16", "amx_bf16"}) and not held_to_avx2


def cpu_description() -> str:
    """The CPU model, the vector instruction sets that decide matmul speed, and the threads torch uses."""
    model = cpuinfo("model name") or platform.processor() or platform.machine()
    names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX"}
    flags = set(cpuinfo("flags").split())
    sets = ", ".join(name for flag, name in names.items() if flag in flags) or "no AVX2"
    # ATEN_CPU_CAPABILITY (with ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS) can hold PyTorch to fewer of them.
    kernels = torch.backends.cpu.get_cpu_capability()
    return f"{model} ({sets}; PyTorch kernels: {kernels}), {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
