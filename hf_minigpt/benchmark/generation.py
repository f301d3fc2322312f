"""generate() at the small shape: MiniGPT against GPT2LMHeadModel, dynamic and static cache, batch 1 and 8."""


import torch

from ..quantize import cpu_compile_config
from .runner import Bench, build, config_for, interleaved, ratio, timer_of


def measure_generation(bench: Bench, shape, batch: int, cache: str, compile_: bool) -> dict:
    """Greedy tokens/s; MiniGPT with the CPU's faster products (`bench.decoder`) where the step is not compiled."""
    device, new_tokens = bench.device, bench.new_tokens
    config = config_for(shape)
    prompt = torch.randint(0, config.vocab_size, (batch, 32), device=device)
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   attention_mask=torch.ones_like(prompt), pad_token_id=0)
    if cache == "static":
        options["cache_implementation"] = "static"
        if compile_ and device.type == "cpu":  # GPUs: generate() compiles a static cache by itself
            options["compile_config"] = cpu_compile_config()
    timers = {}
    for name in ("minigpt", "gpt2"):
        model = bench.decoder(config) if name == "minigpt" and not compile_ else build(name, config, device).eval()
        model.generate(prompt, **options)  # warm-up (and compilation)
        timers[name] = timer_of(lambda model=model: model.generate(prompt, **options), device)
    times = interleaved(timers, bench.repeats)
    return {name: {"tokens_per_second": batch * new_tokens / t["median"],
                   "best_tokens_per_second": batch * new_tokens / t["min"]} for name, t in times.items()}


def generate_table(bench: Bench, shape_name: str, shape) -> None:
    if shape_name not in ("small", "tiny"):
        return
    for cache in ("dynamic", "static"):
        for batch in (1, 8):
            compiled = "+compile" if cache == "static" and bench.compile_ else ""
            key = f"generate {shape_name} {cache}{compiled} b={batch}"
            bench.report.say(key)
            results = measure_generation(bench, shape, batch, cache, bench.compile_ and cache == "static")
            bench.report.record(key, results, (f"{key} tokens/s", f"{results['minigpt']['tokens_per_second']:,.0f}",
                                               f"{results['gpt2']['tokens_per_second']:,.0f}", "n/a",
                                               ratio(results, "tokens_per_second", "gpt2"), "n/a"))
