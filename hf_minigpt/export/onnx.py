"""MiniGPT -> ONNX with a KV cache, inputs and outputs named as optimum names them (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values.N.key/value` -> `logits`, `present.N.key/value`), exported by `torch.onnx.export`
(dynamo) and run by onnxruntime. Needs `pip install onnx onnxscript` (and onnxruntime to run it)."""

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import DynamicCache

from ..folders import atomic_folder
from ..modeling_minigpt import MiniGPTForCausalLM
from .checkpoints import copy_tokenizer_files
from .registry import register


class WithFlatCache(torch.nn.Module):
    """The model with its cache as flat tensors, one key and one value (B, nh, past, hs) per layer, as ONNX needs."""

    def __init__(self, model: MiniGPTForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.model.config.n_layer):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                            use_cache=True).logits
        return logits, *(tensor for layer in cache.layers for tensor in (layer.keys, layer.values))


def cache_names(prefix: str, n_layer: int) -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(n_layer) for kind in ("key", "value")]


@register("minigpt", "onnx")
def write_onnx(source, destination) -> Path:
    """A MiniGPT causal-LM folder -> `destination/model.onnx`, with the config and tokenizer beside it."""
    model = MiniGPTForCausalLM.from_pretrained(source).eval()
    config = model.config
    heads, head_dim = config.n_head, config.n_embd // config.n_head
    # Example inputs of the general case (a cache already holding tokens, several new ones), so that the trace
    # specializes on neither; every size is then declared dynamic.
    batch, new, cached = 2, 3, 4
    example = (
        torch.ones(batch, new, dtype=torch.long),
        torch.ones(batch, cached + new, dtype=torch.long),
        torch.arange(cached, cached + new).expand(batch, new),
        tuple(torch.zeros(batch, heads, cached, head_dim) for _ in range(2 * config.n_layer)),
    )
    batch_dim, new_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    cached_dim, total_dim = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    dynamic_shapes = ({0: batch_dim, 1: new_dim}, {0: batch_dim, 1: total_dim}, {0: batch_dim, 1: new_dim},
                      tuple({0: batch_dim, 2: cached_dim} for _ in range(2 * config.n_layer)))
    inputs = ["input_ids", "attention_mask", "position_ids", *cache_names("past_key_values", config.n_layer)]
    with atomic_folder(destination) as scratch, quiet_exporter():
        torch.onnx.export(
            WithFlatCache(model).eval(), example, scratch / "model.onnx", dynamo=True, dynamic_shapes=dynamic_shapes,
            input_names=inputs, output_names=["logits", *cache_names("present", config.n_layer)], verbose=False,
        )
        config.save_pretrained(scratch)
        copy_tokenizer_files(source, scratch)
    return Path(destination)


@contextmanager
def quiet_exporter():
    """Without the exporter's notes on what it skips (torchvision's operators, when torchvision is absent) and on
    dynamic axes it merges: none of them is about this model's export, which the tests check against the model."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        exporter_log.setLevel(level)


def greedy_decode(session, prompt, new_tokens: int):
    """Greedy decoding of `prompt` (int64 array, batch x length, no padding) by an onnxruntime session of the
    export, the cache returned by each step fed to the next: the prompt followed by `new_tokens` tokens."""
    import numpy as np

    names = [item.name for item in session.get_inputs()][3:]
    heads, head_dim = session.get_inputs()[3].shape[1], session.get_inputs()[3].shape[3]
    batch, length = prompt.shape
    past = {name: np.zeros((batch, heads, 0, head_dim), np.float32) for name in names}
    tokens, positions = prompt, np.arange(length)[None].repeat(batch, 0)
    out = [prompt]
    for _ in range(new_tokens):
        logits, *present = session.run(None, {"input_ids": tokens, "position_ids": positions, **past,
                                              "attention_mask": np.ones((batch, positions[0, -1] + 1), np.int64)})
        tokens = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        past = dict(zip(names, present))
        out.append(tokens)
    return np.concatenate(out, axis=1)
