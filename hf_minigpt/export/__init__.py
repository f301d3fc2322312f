"""Conversions and exports, one module per format, each registering itself with `registry`:

    gpt2      GPT-2 (Hugging Face format) <-> MiniGPT, and GPT-2's tokenizer offline
    nanogpt   nanoGPT's ckpt.pt -> MiniGPT
    gguf      MiniGPT -> GGUF, for llama.cpp
    onnx      MiniGPT -> ONNX with a KV cache, for onnxruntime

`checkpoints` holds what they share. Nothing here imports the training side.
"""

from . import gguf, gpt2, nanogpt, onnx  # noqa: F401  (each registers its conversions)
from .checkpoints import CheckpointError
from .gpt2 import gpt2_tokenizer
from .registry import CONVERSIONS, convert, targets

__all__ = ["CONVERSIONS", "CheckpointError", "convert", "gpt2_tokenizer", "targets"]
