"""Tiny models and a tiny tokenizer, built in-process: the suite needs no download."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM

WORDS = "the a cat dog sat ran on mat log and then away fast slow big small red blue".split()


def tiny_config(**overrides) -> MiniGPTConfig:
    values = dict(
        vocab_size=len(WORDS) + 3, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    return MiniGPTConfig(**{**values, **overrides})


@pytest.fixture
def config() -> MiniGPTConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    return MiniGPTForCausalLM(config).eval()


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: <eos>=0, <pad>=1, <unk>=2, then WORDS."""
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", bos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
