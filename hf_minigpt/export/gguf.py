"""MiniGPT -> GGUF, the file format of llama.cpp, in llama.cpp's GPT-2 layout (what its `convert_hf_to_gguf.py` writes
for `GPT2LMHeadModel`): the weights in nn.Linear's (out, in) order, which is MiniGPT's own, and the byte-level BPE
tokenizer in the metadata. Written with `gguf`, the llama.cpp project's Python package (`pip install gguf`).
"""

import json
from pathlib import Path

import numpy as np

from ..conversion_minigpt import join_fused
from ..folders import atomic_file
from ..modeling_minigpt import MiniGPTForCausalLM
from .registry import register

# MiniGPT parameter -> GGUF tensor, as llama.cpp names GPT-2's.
BLOCK_TENSORS = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
TRUNK_TENSORS = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
                 "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
DTYPES = ("f32", "f16", "q8_0")


def gguf_name(name: str) -> str:
    name = name.removeprefix("transformer.")
    if name in TRUNK_TENSORS:
        return TRUNK_TENSORS[name]
    _, block, rest = name.split(".", 2)  # "h", "3", "attn.c_attn.weight"
    layer, kind = rest.rsplit(".", 1)
    return f"blk.{block}.{BLOCK_TENSORS[layer]}.{kind}"


@register("minigpt", "gguf", options=("dtype",))
def write_gguf(source, destination, dtype: str = "f16") -> Path:
    """A MiniGPT causal-LM folder -> one GGUF file. Matrices are stored in `dtype` (f32, f16 or q8_0); norms, biases
    and position embeddings stay f32, as llama.cpp's converter keeps them."""
    from transformers import AutoTokenizer

    gguf_package()  # before any work: it is an optional dependency, only this export needs it
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}.")
    with atomic_file(destination, replace=False) as scratch:
        model = MiniGPTForCausalLM.from_pretrained(source)
        write_file(scratch, model, AutoTokenizer.from_pretrained(source), dtype, name=Path(source).name)
    return Path(destination)


def gguf_package():
    try:
        import gguf
    except ImportError:
        raise ImportError("Writing GGUF needs llama.cpp's Python package: pip install gguf") from None
    return gguf


def write_file(path: Path, model, tokenizer, dtype: str, name: str) -> None:
    gguf, config = gguf_package(), model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name(name)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    add_tokenizer(writer, tokenizer, config.vocab_size)

    # llama.cpp's GPT-2 reads q, k and v fused
    for name, tensor in join_fused(model.state_dict(), conv1d=False).items():
        if name == "lm_head.weight":
            continue  # tied to the token embedding, which llama.cpp reads as the output matrix too
        data = tensor.float().numpy()
        matrix = data.ndim == 2 and name != "transformer.wpe.weight"
        if matrix and dtype == "f16":
            writer.add_tensor(gguf_name(name), data.astype(np.float16))
        elif matrix and dtype == "q8_0":
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """GPT-2's tokenizer keys: byte-level BPE tokens and merges, padded with unused tokens to the embedding's rows
    (as llama.cpp's converter pads them), and the end-of-text id."""
    gguf = gguf_package()

    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if backend.get("type") != "BPE":
        raise ValueError("GGUF's GPT-2 layout needs a byte-level BPE tokenizer (as minigpt-pretrain trains).")
    by_id = {index: token for token, index in backend["vocab"].items()}
    for index, added in tokenizer.added_tokens_decoder.items():
        by_id[index] = added.content
    if len(by_id) > vocab_size:
        raise ValueError(f"The tokenizer has {len(by_id)} tokens, the embedding only {vocab_size} rows.")
    special = {added.content for added in tokenizer.added_tokens_decoder.values() if added.special}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        types.append(gguf.TokenType.UNUSED if token is None else
                     gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split of text into words; without it llama.cpp splits differently
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
