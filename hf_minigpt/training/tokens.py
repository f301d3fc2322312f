"""Tokens: text -> a tokenizer -> token ids on disk -> blocks of `block_size` tokens, at any corpus size.

Documents are cut into pieces (a large file is never held whole), tokenized by `datasets.map` (cached, on
--preprocessing_num_workers processes), and written batch by batch to a token shard: a flat file of token ids, read
back through `np.memmap`, so that training reads only the blocks it draws and memory stays flat however large the
corpus. With `--streaming` nothing is written: documents are tokenized and packed as they are read.

The shard format is llm.c's `.bin` shard (also modded-nanogpt's): a header of 256 int32 (magic, version, token count,
zeros), then the tokens, uint16 (magic 20240520, version 1) when the vocabulary fits, else uint32 (20240801, 7).
Shards written by llm.c's data scripts train here as they are, and the other way round.
"""

import tempfile
from contextlib import nullcontext
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..chat import chat_ready
from ..folders import atomic_file
from .data import DataError, expand, pieces

HEADER_INTS = 256
FORMATS = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}  # dtype -> (magic, version)


class ShardError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# Text -> tokenizer -> token ids


def train_tokenizer(texts, vocab_size: int, eos: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE like GPT-2's, trained on the "text" of `texts` (`pieces` of the documents): every byte is in
    the alphabet, so any text encodes. It carries a chat template and a pad token (hf_minigpt.chat), ready for
    instruction tuning."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = ([text for text in batch["text"] if text] for batch in texts.iter(batch_size=64))
    backend.train_from_iterator(batches, trainer, length=len(texts))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eos, eos_token=eos, unk_token=eos)
    return chat_ready(starting_documents(tokenizer))


def starting_documents(tokenizer):
    """`tokenizer`, made to start every text with EOS, as every training document starts (GPT-2's <|endoftext|>
    between texts). A plain `tokenizer(text)`, and with it `pipeline("text-generation")`, then gives a prompt that
    starts a text the position it had in training, as Llama's tokenizers add their BOS. Saved with the tokenizer."""
    tokenizer.bos_token = tokenizer.eos_token
    tokenizer.add_bos_token = True
    return tokenizer


def fit_embeddings(model, tokenizer) -> None:
    """A tokenizer with more tokens than the model has embeddings (e.g. a new --tokenizer_name) gets new rows."""
    if len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """How many bytes of text each token id stands for (0 for special tokens and ids the tokenizer lacks): what turns
    a loss per token into bits per byte, which compares models whatever their tokenizers. A byte-level BPE token is
    one character per byte; other tokenizers' are measured by decoding them alone."""
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # (a slow tokenizer has none)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    special = set(tokenizer.all_special_ids)
    for token_id in range(min(len(tokenizer), vocab_size)):
        if token_id not in special:
            text = tokenizer.convert_ids_to_tokens(token_id) if byte_level else tokenizer.decode([token_id])
            lengths[token_id] = len(text) if byte_level else len(text.encode("utf-8"))
    return lengths


def token_ids(texts, tokenizer, column: str, workers: int | None = None):
    """The documents' token ids, in pieces ("input_ids"), each document after an EOS (see `starting_documents`)."""
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        starts = batch["starts_document"]
        return {"input_ids": [[eos, *piece] if first else piece for piece, first in zip(ids, starts)]}

    options = {"num_proc": workers, "desc": "Tokenizing"} if isinstance(texts, datasets.Dataset) else {}
    return pieces(texts, column).map(encode, batched=True, batch_size=64, remove_columns=["text", "starts_document"],
                                     **options)


def tokenize_to_shard(texts: datasets.Dataset, tokenizer, column: str, split: str, folder: str | None = None,
                      workers: int | None = None) -> np.memmap:
    """The token ids of `texts` as the shard `folder/split.bin`, written batch by batch and mapped back. Without a
    folder, the shard lives in a temporary folder that goes at once: Linux keeps its pages until the mapping goes."""
    tokenized = token_ids(texts, tokenizer, column, workers)
    batches = (pyarrow.compute.list_flatten(table["input_ids"]).to_numpy()
               for table in tokenized.with_format("arrow").iter(batch_size=64))
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    with nullcontext(folder) if folder else tempfile.TemporaryDirectory(prefix="minigpt-tokens-") as where:
        return read_shard(write_shard(Path(where) / f"{split}.bin", batches, len(tokenizer)))


def token_shards(patterns: list[str] | None) -> list[str]:
    """The files of `patterns` when they are token shards (.bin), else []."""
    files = expand(patterns or [])
    return files if files and all(file.endswith(".bin") for file in files) else []


def read_shards(patterns: list[str], tokenizer) -> list[np.memmap]:
    """Pre-tokenized shards, checked against the tokenizer they must have been made with."""
    shards = []
    for file in token_shards(patterns):
        try:
            shard = read_shard(file)
        except (OSError, ShardError) as error:
            raise DataError(str(error)) from None
        if len(shard) and int(shard.max()) >= len(tokenizer):
            raise DataError(f"{file} holds token id {int(shard.max())}, but the tokenizer has {len(tokenizer)} "
                            "tokens: pass the tokenizer the shards were made with (--tokenizer_name).")
        shards.append(shard)
    return shards


# ---------------------------------------------------------------------------------------------------------------------
# Token shards on disk


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_shard(path: Path, batches, vocab_size: int) -> Path:
    """Writes the token ids of `batches` (an iterable of int sequences) to `path`, one batch at a time; the file
    appears only once complete."""
    dtype = token_dtype(vocab_size)
    magic, version = FORMATS[dtype]
    count = 0
    with atomic_file(path) as scratch, open(scratch, "wb") as handle:
        handle.write(np.zeros(HEADER_INTS, np.int32).tobytes())  # the count is known at the end
        for batch in batches:
            tokens = np.asarray(batch, dtype=dtype)
            tokens.tofile(handle)
            count += len(tokens)
        header = np.zeros(HEADER_INTS, np.int32)
        header[:3] = magic, version, count
        handle.seek(0)
        handle.write(header.tobytes())
    return path


def read_shard(path) -> np.memmap:
    """The tokens of a shard, mapped, not read: pages load as blocks are drawn."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    dtype = next((dtype for dtype, format_ in FORMATS.items() if tuple(header[:2]) == format_), None)
    if len(header) < HEADER_INTS or dtype is None:
        raise ShardError(f"{path} is not a token shard (llm.c's .bin format: a 256-int32 header with magic "
                         f"{FORMATS[np.dtype(np.uint16)][0]} or {FORMATS[np.dtype(np.uint32)][0]}).")
    count = int(header[2])
    expected = HEADER_INTS * 4 + count * dtype.itemsize
    if Path(path).stat().st_size != expected:
        raise ShardError(f"{path}: the header says {count} tokens, but the file has {Path(path).stat().st_size} "
                         f"bytes, not {expected}: it is truncated or not a token shard.")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(count,))


# ---------------------------------------------------------------------------------------------------------------------
# Blocks


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of `block_size` tokens over shards, as `{"input_ids"}` (and `"position_ids"` restarting at
    every EOS when `eos_token_id` is given). A shard's tail that does not fill a block ends one more block,
    overlapping the one before; blocks never span two shards."""

    def __init__(self, shards: list, block_size: int, eos_token_id: int | None = None):
        self.shards, self.block_size, self.eos_token_id = shards, block_size, eos_token_id
        self.starts = []  # (shard, offset) of every block
        for index, tokens in enumerate(shards):
            offsets = list(range(0, len(tokens) - block_size + 1, block_size))
            if offsets and len(tokens) % block_size:
                offsets.append(len(tokens) - block_size)
            self.starts += [(index, offset) for offset in offsets]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict:
        shard, offset = self.starts[index]
        input_ids = torch.from_numpy(self.shards[shard][offset: offset + self.block_size].astype(np.int64))
        return block_item(input_ids, self.eos_token_id)


class StreamedBlocks(torch.utils.data.IterableDataset):
    """Consecutive blocks of `block_size` tokens from a stream of documents, tokenized as they are read (a tail that
    does not fill a block is dropped). Items as `TokenBlocks`'s."""

    def __init__(self, texts: datasets.IterableDataset, tokenizer, column: str, block_size: int,
                 eos_token_id: int | None = None):
        self.tokenized = token_ids(texts, tokenizer, column)
        self.block_size, self.eos_token_id = block_size, eos_token_id

    def set_epoch(self, epoch: int) -> None:
        self.tokenized.set_epoch(epoch)

    def __iter__(self):
        pending = np.empty(0, np.int64)
        for piece in self.tokenized:
            pending = np.concatenate([pending, piece["input_ids"]])
            whole = len(pending) // self.block_size * self.block_size
            for block in torch.from_numpy(pending[:whole]).view(-1, self.block_size):
                yield block_item(block, self.eos_token_id)
            pending = pending[whole:]


def block_item(input_ids: torch.Tensor, eos_token_id: int | None) -> dict:
    if eos_token_id is None:
        return {"input_ids": input_ids}
    return {"input_ids": input_ids, "position_ids": document_positions(input_ids, eos_token_id)}


def document_positions(block: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Position ids that restart at every EOS (each document's first token), so packed documents do not attend to
    each other. Tokens before the block's first EOS (the rest of a document begun in an earlier block) count from 0,
    so that a block without an EOS stays within the model's positions."""
    index = torch.arange(len(block))
    last_eos = torch.cummax(torch.where(block == eos_token_id, index, 0), dim=0).values
    return index - last_eos
