"""Data scale: minigpt-pretrain's peak memory and speed as the corpus grows (one .txt file of several sizes)."""

import math
import sys
import tempfile
from pathlib import Path

from .runner import Bench, run_measured


def measure_data_scale(sizes_mb: tuple, folder: Path) -> dict:
    """For each size: peak RSS and wall time of `minigpt-pretrain`, as a user runs it, training a new tokenizer on,
    tokenizing and taking 5 steps over one text file of that many MB (the embedded corpus, repeated)."""
    from ..training.data import embedded_corpus

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
