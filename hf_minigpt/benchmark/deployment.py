"""Deployment: greedy decoding on a CPU, by every way this project offers to run a model there, each against its
ceiling (what a read of memory moves per second, measured in the same run, over the weight bytes read per token)."""

import tempfile
from itertools import islice
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from ..cpu_kernels import CPU, use_cpu_kernels
from ..export.gguf import write_gguf
from ..export.onnx import greedy_decode, write_onnx
from ..quantize import Int8Linear, cpu_compile_config, quantize_int8
from .runner import Bench, best_seconds, build, config_for, installed, interleaved, timer_of


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of the 256 bytes, one merge (llama.cpp refuses a BPE without any) and EOS: all that the
    exports need, with no training."""
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"Ġt": len(vocab), "<|endoftext|>": len(vocab) + 1})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


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


def measure_deployment(shape, folder: Path, batch: int, new_tokens: int, repeats: int, cpu_kernels: bool) -> dict:
    """Greedy decode tokens/s (a 32-token prompt, then `new_tokens`) on the CPU: MiniGPT eager, with a static cache +
    torch.compile, the same with int8 weights; GPT2LMHeadModel; onnxruntime on the ONNX export; llama.cpp on the
    q8_0 GGUF (batch 1: llama-cpp-python decodes one sequence); each runtime where it is installed. With
    `cpu_kernels`, also MiniGPT eager and static+compile with hf_minigpt.cpu_kernels, where its rule names this CPU."""
    cpu = torch.device("cpu")
    config = config_for(shape)
    prompt = torch.randint(0, 256, (batch, 32), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    compiled = dict(options, cache_implementation="static", compile_config=cpu_compile_config())
    engines = {
        "MiniGPT eager": (build("minigpt", config, cpu).eval(), options),
        "MiniGPT static+compile": (build("minigpt", config, cpu).eval(), compiled),
        "MiniGPT int8 static+compile": (quantize_int8(build("minigpt", config, cpu)), compiled),
        "GPT2LMHeadModel": (build("gpt2", config, cpu).eval(), options),
    }
    if cpu_kernels and CPU.this_machine().products:
        engines["MiniGPT eager, cpu_kernels"] = (use_cpu_kernels(build("minigpt", config, cpu).eval()), options)
        engines["MiniGPT static+compile, cpu_kernels"] = (use_cpu_kernels(build("minigpt", config, cpu).eval()),
                                                          compiled)
    for model, _ in engines.values():  # every token asked for, no end-of-text check: as onnxruntime's and llama.cpp's
        model.generation_config.eos_token_id = None
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
    """The bytes of weights one decode step reads: every parameter, buffer and packed int8 weight once, but the
    position embedding and an untied token embedding only serve lookups of a few rows (a tied one is also the LM head,
    read whole)."""
    lookups = {model.get_input_embeddings().weight.data_ptr()} | {
        module.weight.data_ptr() for name, module in model.named_modules() if name.endswith("wpe")}
    output = model.get_output_embeddings()
    output_weight = getattr(output, "weight", None)  # an Int8Linear head holds packed weights instead
    lookups -= {output_weight.data_ptr()} if isinstance(output_weight, torch.Tensor) else set()
    tensors = {tensor.data_ptr(): tensor for tensor in [*model.parameters(), *model.buffers()]}
    packed = sum(module.weight_bytes for module in model.modules() if isinstance(module, Int8Linear))
    return packed + sum(tensor.numel() * tensor.element_size() for pointer, tensor in tensors.items()
                        if pointer not in lookups)


def gguf_weight_bytes(path: Path) -> int:
    """The same for llama.cpp's file: every tensor but the position embedding (its token embedding is the output)."""
    import gguf

    return sum(int(tensor.n_bytes) for tensor in gguf.GGUFReader(str(path)).tensors
               if tensor.name != "position_embd.weight")


def memory_bandwidth() -> float:
    """Bytes per second that a read of a large tensor moves on this CPU (a sum over 256 MB, far beyond any cache), with
    torch's threads: best of 5. A decode step reads its weights and writes next to nothing, so reading, not copying,
    is what bounds it."""
    source = torch.ones(64 * 2**20)
    best = best_seconds(source.sum, torch.device("cpu"))
    return source.numel() * source.element_size() / best


def measure_deployments(report, shape_name: str, shape, repeats: int, new_tokens: int,
                        cpu_kernels: bool) -> list[tuple]:
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
            results[batch] = measure_deployment(shape, Path(folder), batch, new_tokens, repeats, cpu_kernels)
            report.record(key, results[batch])
            print("    " + " | ".join(f"{engine} {speed['tokens_per_second']:,.0f}"
                                      for engine, speed in results[batch].items()), flush=True)
    bandwidth = memory_bandwidth()
    report.record(f"read bandwidth {shape_name}", {"bytes_per_second": bandwidth})
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


DEPLOYMENT = ("greedy decode on the CPU", "b=1 tokens/s", "b=8 tokens/s", "b=1 vs GPT2LMHeadModel",
              "b=8 vs GPT2LMHeadModel", "weights MB/token", "b=1 ceiling tokens/s", "b=1 share of ceiling")


def deploy_table(bench: Bench, shape_name: str, shape) -> None:
    if shape_name == "small" or bench.gpu:  # the CPU runtimes, at the shape people deploy
        return
    new_tokens = 8 if bench.quick else 32
    rows, bandwidth = measure_deployments(bench.report, shape_name, shape, bench.repeats, new_tokens,
                                          bench.cpu_kernels)
    bench.report.add_table(f"{shape_name}: a 32-token prompt, then {new_tokens} new tokens; int8: int8 weights, "
                           "activations rounded to integers per token (hf_minigpt.quantize); ceiling: what a read "
                           f"of memory moves per second here ({bandwidth / 1e9:.1f} GB/s) / the weight bytes read per "
                           "token", DEPLOYMENT, rows)
