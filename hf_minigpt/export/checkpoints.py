"""What every conversion shares: reading a checkpoint's tensors, fitting them into a model with every mismatch
named, and the converted folder written whole with its tokenizer. (How the tensors map: conversion_minigpt.py.)"""

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..folders import CONFIG, atomic_folder

# What torch.load / safetensors raise on a file that is truncated, corrupt, or holds more than tensors.
UNREADABLE = (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "encoder.json", "vocab.bpe", "chat_template.jinja", "chat_template.json",
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
    if (Path(source) / "additional_chat_templates").is_dir():  # named templates, beside the default one
        shutil.copytree(Path(source) / "additional_chat_templates", Path(destination) / "additional_chat_templates")


def write_converted(model, destination, tokenizer_source) -> Path:
    """The converted model, with the tokenizer files found in `tokenizer_source`, as a new folder."""
    with atomic_folder(destination) as scratch:
        model.save_pretrained(scratch)
        copy_tokenizer_files(tokenizer_source, scratch)
    return Path(destination)
