"""Conversions and exports, one module per format, each registering itself with `registry`:

    gpt2      GPT-2 (Hugging Face format) <-> MiniGPT, and GPT-2's tokenizer offline
    nanogpt   nanoGPT's ckpt.pt -> MiniGPT
    gguf      MiniGPT -> GGUF, for llama.cpp
    onnx      MiniGPT -> ONNX with a KV cache, for onnxruntime

`checkpoints` holds what they share. Nothing here imports the training side.
"""

import functools
import warnings

from ..conversion_minigpt import join_fused, split_fused
from . import gguf, gpt2, nanogpt, onnx  # noqa: F401  (each registers its conversions)
from .checkpoints import CheckpointError
from .gpt2 import gpt2_tokenizer
from .registry import CONVERSIONS, convert, targets

__all__ = ["CONVERSIONS", "CheckpointError", "convert", "gpt2_tokenizer", "targets"]

RENAMED = {"fused_qkv": join_fused, "split_qkv": split_fused}  # with conv1d=False; the old names go in hf_minigpt 0.4


def __getattr__(name: str):
    if name not in RENAMED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    new = RENAMED[name].__name__
    warnings.warn(f"hf_minigpt.export.{name} is hf_minigpt.conversion_minigpt.{new}(state_dict, conv1d=False)",
                  FutureWarning, stacklevel=2)
    return functools.partial(RENAMED[name], conv1d=False)
