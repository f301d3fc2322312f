"""What every conversion shares: reading a checkpoint's tensors, fitting them into a model with every mismatch
named, GPT-2's fused `c_attn` split into MiniGPT's q, k, v projections and joined again, and the converted folder
written whole with its tokenizer."""

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..folders import CONFIG, atomic_folder
from ..modeling_minigpt import QKV_PROJECTIONS

# Buffers that older GPT-2 checkpoints carry (the causal mask); MiniGPT builds masks instead.
GPT2_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
# What torch.load / safetensors raise on a file that is truncated, corrupt, or holds more than tensors.
UNREADABLE = (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "encoder.json", "vocab.bpe",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: unreadable, or its tensors do not fit the model."""


def read_config(folder) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no {CONFIG}: is it a Hugging Face checkpoint folder?")
    return json.loads(path.read_text())


def load_state_dict(folder) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: safetensors or .bin, single file or sharded (with an index)."""
    folder = Path(folder)
    for weights_name in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{weights_name}.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / weights_name).is_file():
            files = [weights_name]
        else:
            continue
        state_dict = {}
        for name in files:
            state_dict.update(_load_weights_file(folder / name))
        return state_dict
    raise CheckpointError(f"{folder} holds no model.safetensors or pytorch_model.bin (nor a sharded index).")


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is listed in the shard index but missing.")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except UNREADABLE as error:
        raise CheckpointError(
            f"Cannot read {path}: the file is truncated or corrupt, or holds pickled objects beyond tensors, "
            f"which are refused ({error})."
        ) from error


def split_qkv(state_dict: dict) -> dict:
    """`attn.c_attn` ([q | k | v] along its outputs, nn.Linear's layout) -> `attn.q_proj`, `attn.k_proj`,
    `attn.v_proj`; every other tensor as it is."""
    split = {}
    for name, tensor in state_dict.items():
        prefix, fused, kind = name.rpartition("attn.c_attn.")
        if not fused:
            split[name] = tensor
            continue
        for projection, third in zip(QKV_PROJECTIONS, tensor.chunk(3, dim=0)):
            split[f"{prefix}{projection}.{kind}"] = third.contiguous()
    return split


def fused_qkv(state_dict: dict) -> dict:
    """The inverse of `split_qkv`: GPT-2's (and nanoGPT's, and GGUF's) one `attn.c_attn` per block."""
    fused = {}
    for name, tensor in state_dict.items():
        prefix, query, kind = name.rpartition(f"{QKV_PROJECTIONS[0]}.")
        if query:
            thirds = [state_dict[f"{prefix}{projection}.{kind}"] for projection in QKV_PROJECTIONS]
            fused[f"{prefix}attn.c_attn.{kind}"] = torch.cat(thirds, dim=0)
        elif not any(f"{projection}." in name for projection in QKV_PROJECTIONS[1:]):
            fused[name] = tensor
    return fused


def load_into(model: torch.nn.Module, state_dict: dict, source) -> torch.nn.Module:
    """Load every tensor, or fail naming each one that is missing, unexpected or of the wrong shape."""
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(state_dict) - tied)
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{name}: checkpoint {tuple(state_dict[name].shape)}, model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(state_dict))
        if state_dict[name].shape != expected[name].shape
    ]
    problems = [
        f"{label} ({len(names)}): {', '.join(names)}"
        for label, names in [("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("tensors of the wrong shape", wrong_shape)]
        if names
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=not tied)
    if tied:
        model.tie_weights()
    return model


def copy_tokenizer_files(source, destination):
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(destination) / name)


def write_converted(model, destination, tokenizer_source) -> Path:
    """The converted model, with the tokenizer files found in `tokenizer_source`, as a new folder."""
    with atomic_folder(destination) as scratch:
        model.save_pretrained(scratch)
        copy_tokenizer_files(tokenizer_source, scratch)
    return Path(destination)
