"""How GPT-2's tensors map onto MiniGPT's, declared once and read both ways.

MiniGPT keeps GPT-2's tensor names but for two differences: GPT-2 stores its projections as `Conv1D` weights, (in,
out), where MiniGPT's are `nn.Linear`, (out, in); and GPT-2 fuses q, k and v into one `attn.c_attn`, which MiniGPT
holds as three projections (they shard by heads with plain column-parallel styles). nanoGPT, GGUF and MiniGPT folders
saved before the split store `c_attn` fused but in nn.Linear's layout.

`GPT2_TENSORS` drives transformers' loader (`loading_conversions`, so hub ids, shards, dtypes and device maps work as
for any checkpoint), `minigpt-convert` in both directions, the GGUF export and int8's fused product.

Travels with `modeling_minigpt.py` in every saved folder (`save_pretrained` copies a model file's relative imports).
"""

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import conversion_mapping
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, Transpose, WeightConverter, WeightRenaming


@dataclass(frozen=True)
class TensorMap:
    gpt2: str  # the GPT-2 tensor, within its block
    minigpt: tuple[str, ...]  # the MiniGPT tensors it holds, in order along its output features
    conv1d: bool = True  # stored as GPT-2's Conv1D, (in, out)


QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
GPT2_TENSORS = (
    TensorMap("attn.c_attn.weight", tuple(f"{projection}.weight" for projection in QKV)),
    TensorMap("attn.c_attn.bias", tuple(f"{projection}.bias" for projection in QKV), conv1d=False),
    TensorMap("attn.c_proj.weight", ("attn.c_proj.weight",)),
    TensorMap("mlp.c_fc.weight", ("mlp.c_fc.weight",)),
    TensorMap("mlp.c_proj.weight", ("mlp.c_proj.weight",)),
)
# Heads whose names differ: GPT2ForTokenClassification's `classifier` is MiniGPT's `score`.
GPT2_HEAD_RENAMES = {"classifier.": "score."}
# What GPT-2 checkpoints carry that MiniGPT has no place for: the causal mask of older releases (MiniGPT builds
# masks) and GPT2DoubleHeadsModel's multiple-choice head.
GPT2_ONLY_TENSORS = re.compile(r"\.attn\.(bias|masked_bias)$|^multiple_choice_head\.")
MINIGPT_HEADS = ("lm_head.", "score.", "qa_outputs.")


def loading_conversions(checkpoint_type: str | None) -> list:
    """transformers' weight conversions from a checkpoint of `checkpoint_type` ("gpt2", or a MiniGPT folder, which
    may hold `c_attn` fused) to MiniGPT. GPT-2's Conv1D weights are transposed before any shape check, so a square
    one is never loaded as it is."""
    from_gpt2 = checkpoint_type == "gpt2"
    conversions = []
    for tensor in GPT2_TENSORS:
        operations = [Transpose()] if from_gpt2 and tensor.conv1d else []
        if len(tensor.minigpt) > 1:
            operations.append(Chunk(dim=0))
        if operations:
            conversions.append(WeightConverter(tensor.gpt2, list(tensor.minigpt), operations=operations))
    if from_gpt2:
        conversions += [WeightRenaming(rf"^{re.escape(old)}", new) for old, new in GPT2_HEAD_RENAMES.items()]
    return conversions


_registering = threading.RLock()


@contextmanager
def conversions_registered(class_name: str, checkpoint_type: str | None):
    """`loading_conversions(checkpoint_type)` registered for `class_name` for the time of one load.

    transformers looks conversions up by class or model type, in a registry of its own, while MiniGPT's depend on
    the checkpoint: so loads take turns, and each leaves the registry as it found it. A mapping the user registered
    for the class or for "minigpt" is used instead, and kept."""
    with _registering:
        if get_checkpoint_conversion_mapping(class_name) is not None or get_checkpoint_conversion_mapping("minigpt"):
            yield
            return
        register_checkpoint_conversion_mapping(class_name, loading_conversions(checkpoint_type), overwrite=True)
        try:
            yield
        finally:
            # transformers has no call that removes an entry: its registry is a module-level dict (5.19 to 5.25).
            conversion_mapping._checkpoint_conversion_mapping_cache.pop(class_name, None)
            conversion_mapping.USER_REGISTERED_MAPPINGS.discard(class_name)


def _match(name: str, side: str) -> tuple[TensorMap | None, str]:
    """The map that names `name` on `side` ("gpt2" or "minigpt"), and the prefix before it ("transformer.h.3.")."""
    for tensor in GPT2_TENSORS:
        for known in (tensor.gpt2,) if side == "gpt2" else tensor.minigpt:
            if name == known or name.endswith(f".{known}"):
                return tensor, name.removesuffix(known)
    return None, ""


def split_fused(state_dict: dict, conv1d: bool) -> dict:
    """Tensors with `c_attn` fused (GPT-2's Conv1D layout with `conv1d`, else nn.Linear's) -> MiniGPT's layout;
    every other tensor as it is."""
    split = {}
    for name, tensor in state_dict.items():
        mapped, prefix = _match(name, "gpt2")
        if mapped is None:
            split[name] = tensor
            continue
        if conv1d and mapped.conv1d:
            tensor = tensor.t()
        for target, part in zip(mapped.minigpt, tensor.chunk(len(mapped.minigpt), dim=0)):
            split[prefix + target] = part.contiguous()
    return split


def join_fused(state_dict: dict, conv1d: bool) -> dict:
    """The inverse of `split_fused`: MiniGPT's tensors -> `c_attn` fused, in GPT-2's Conv1D layout with `conv1d`."""
    joined = {}
    for name, tensor in state_dict.items():
        mapped, prefix = _match(name, "minigpt")
        if mapped is None:
            joined[name] = tensor
        elif name == prefix + mapped.minigpt[0]:  # (the others join the first)
            fused = torch.cat([state_dict[prefix + part] for part in mapped.minigpt], dim=0)
            joined[prefix + mapped.gpt2] = fused.t().contiguous() if conv1d and mapped.conv1d else fused
    return joined


def gpt2_to_minigpt(state_dict: dict) -> dict:
    """A GPT-2 checkpoint's tensors (any GPT2* class) under MiniGPT's names and layouts."""
    renamed = {}
    for name, tensor in state_dict.items():
        if GPT2_ONLY_TENSORS.search(name):
            continue
        for old, new in GPT2_HEAD_RENAMES.items():
            if name.startswith(old):
                name = new + name.removeprefix(old)
        if not name.startswith(("transformer.", *MINIGPT_HEADS)):
            name = f"transformer.{name}"  # the original `gpt2` upload was saved from the bare GPT2Model
        renamed[name] = tensor
    return split_fused(renamed, conv1d=True)


def minigpt_to_gpt2(state_dict: dict) -> dict:
    """A MiniGPT causal LM's tensors under GPT2LMHeadModel's names and layouts."""
    return join_fused(state_dict, conv1d=True)
