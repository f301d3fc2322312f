"""Token shards: a tokenized corpus as a flat file of token ids, read through `np.memmap`, so that training reads
only the blocks it draws and memory stays flat however large the corpus.

The file format is llm.c's `.bin` shard (also modded-nanogpt's): a header of 256 int32 (magic, version, token count,
zeros), then the tokens, uint16 (magic 20240520, version 1) when the vocabulary fits, else uint32 (20240801, 7).
Shards written by llm.c's data scripts train here as they are, and the other way round.
"""

import os
from pathlib import Path

import numpy as np
import torch

HEADER_INTS = 256
FORMATS = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}  # dtype -> (magic, version)


class ShardError(ValueError):
    pass


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_shard(path: Path, batches, vocab_size: int) -> Path:
    """Writes the token ids of `batches` (an iterable of int sequences) to `path`, one batch at a time; the file
    appears, through a rename, only once complete."""
    dtype = token_dtype(vocab_size)
    magic, version = FORMATS[dtype]
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    count = 0
    with open(partial, "wb") as handle:
        handle.write(np.zeros(HEADER_INTS, np.int32).tobytes())  # the count is known at the end
        for batch in batches:
            tokens = np.asarray(batch, dtype=dtype)
            tokens.tofile(handle)
            count += len(tokens)
        header = np.zeros(HEADER_INTS, np.int32)
        header[:3] = magic, version, count
        handle.seek(0)
        handle.write(header.tobytes())
    os.replace(partial, path)
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
        if self.eos_token_id is None:
            return {"input_ids": input_ids}
        return {"input_ids": input_ids, "position_ids": document_positions(input_ids, self.eos_token_id)}


def document_positions(block: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Position ids that restart at every EOS (each document's first token), so packed documents do not attend to
    each other. Tokens before the block's first EOS count on from 1, as the rest of a document."""
    index = torch.arange(len(block))
    last_eos = torch.cummax(torch.where(block == eos_token_id, index, -1), dim=0).values
    return index - last_eos
