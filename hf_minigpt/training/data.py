"""Data: files on disk -> `datasets` rows -> the validation split -> loaders.

Text, json/jsonl, csv/tsv and parquet files (compressed too, globs allowed) and `save_to_disk` folders are read with
`datasets`' own builders, in full (memory-mapped Arrow) or streamed. A file that cannot be trained on is refused
with one line that names it, before the first step.
"""

import codecs
import glob
import re
from pathlib import Path

import datasets
import torch
from torch.utils.data import Subset


class DataError(ValueError):
    """Data that cannot be trained on, found before the first step."""


# File extension -> `datasets` builder (and its options).
BUILDERS = {
    ".txt": ("text", {"sample_by": "paragraph"}),  # as `read_pieces` reads them (compressed files: by paragraph)
    ".text": ("text", {"sample_by": "paragraph"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}
# `datasets` reads these compressed files as they are: `reviews.csv.bz2` is a csv file.
COMPRESSED = (".bz2", ".gz", ".xz", ".zst")
PIECE_CHARS = 2**16  # long documents are read, tokenized and held in pieces of up to this many characters
PIECES = datasets.Features({"text": datasets.Value("string"), "starts_document": datasets.Value("bool")})


def data_suffix(file: str) -> str:
    path = Path(file)
    if path.suffix.lower() in COMPRESSED:
        path = path.with_suffix("")
    return path.suffix.lower()


def expand(patterns: list[str]) -> list[str]:
    return sorted({match for pattern in patterns for match in (glob.glob(pattern) or [pattern])})


def load_files(patterns: list[str], split: str, streaming: bool = False, in_pieces: bool = False):
    """Text/json/jsonl/csv/tsv/parquet files (globs allowed) or a `save_to_disk` folder, as one Dataset, or as an
    IterableDataset read as it is iterated when `streaming`. With `in_pieces`, plain text files come as `pieces`
    of their documents, read a piece at a time: a large file is never held whole."""
    if len(patterns) == 1 and Path(patterns[0]).is_dir():
        loaded = load_saved_dataset(patterns[0], split)
        return loaded.to_iterable_dataset() if streaming else loaded
    files = expand(patterns)
    for file in files:
        if not Path(file).is_file():
            raise DataError(f"{file}: no such file (or the pattern matches nothing).")
        if Path(file).stat().st_size == 0:
            raise DataError(f"{file} is empty.")
    suffixes = {data_suffix(file) for file in files}
    unknown = suffixes - BUILDERS.keys()
    if unknown or len({BUILDERS[suffix][0] for suffix in suffixes - unknown}) > 1:
        raise DataError(
            f"Cannot read {sorted(suffixes)} files together: give files of one kind, one of {sorted(BUILDERS)}, "
            "or a folder written by `Dataset.save_to_disk`."
        )
    builder, options = BUILDERS[suffixes.pop()]
    for file in files:
        if builder != "parquet" and Path(file).suffix.lower() not in COMPRESSED:
            check_utf8(file)
    if in_pieces and builder == "text" and not any(Path(file).suffix.lower() in COMPRESSED for file in files):
        # The files' sizes and times are in the arguments so that `datasets`' cache sees a file that changed.
        versions = [(Path(file).stat().st_size, Path(file).stat().st_mtime_ns) for file in files]
        source = datasets.IterableDataset if streaming else datasets.Dataset
        return source.from_generator(read_pieces, features=PIECES, gen_kwargs={"files": files, "versions": versions})
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming,
                                     **options)
    except Exception as error:  # datasets wraps parser errors in several exception types
        raise DataError(f"Could not read {files}: {error}") from error


def split_documents(batch, column: str) -> dict:
    """Each document as pieces of about PIECE_CHARS characters, cut after a newline where there is one, with a flag
    on each document's first piece: a large file is then tokenized, and held in memory, a piece at a time."""
    pieces, starts = [], []
    for text in batch[column]:
        text, start = text or "", 0
        while start == 0 or start < len(text):
            end = start + PIECE_CHARS
            if end < len(text):
                end = text.rfind("\n", start, end) + 1 or end
            pieces.append(text[start:end])
            starts.append(start == 0)
            start = end
    return {"text": pieces, "starts_document": starts}


def pieces(texts, column: str):
    """`texts` (a Dataset or a streamed IterableDataset) as pieces of documents: columns "text", "starts_document"."""
    if texts.features == PIECES:
        return texts  # read in pieces already
    description = {"desc": "Cutting documents into pieces"} if isinstance(texts, datasets.Dataset) else {}
    return texts.select_columns([column]).map(split_documents, batched=True, batch_size=1,
                                              fn_kwargs={"column": column}, remove_columns=[column], **description)


# How a plain-text file falls into documents: at blank lines, or, in a file with none, at every line break. Prose keeps
# its paragraphs whole and a file of short lines (sentences, names, titles) learns each line from its start.
BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
LINE_BREAK = re.compile(r"\n")


def has_blank_line(file: str) -> bool:
    with open(file, encoding="utf-8") as handle:
        tail = ""  # a blank line may straddle two reads
        while chunk := handle.read(PIECE_CHARS):
            if BLANK_LINES.search(tail + chunk):
                return True
            tail = (tail + chunk)[-256:]
    return False


def read_pieces(files: list[str], versions=None):
    """The documents of plain-text files (split at blank lines, or at every line where a file has none), as pieces
    of up to about PIECE_CHARS characters, cut after a newline where there is one, read a piece at a time: a large
    file is never held whole."""
    for file in files:
        separator = BLANK_LINES if has_blank_line(file) else LINE_BREAK
        with open(file, encoding="utf-8") as handle:
            pending, begun = "", False  # the text of a document not yet ended; whether a piece of it went out
            while chunk := handle.read(PIECE_CHARS):
                *ended, pending = separator.split(pending + chunk)
                for document in ended:
                    yield from piece(document, begun)
                    begun = False
                while len(pending) > PIECE_CHARS:  # a long document: what it holds so far goes out
                    cut = pending.rfind("\n", 0, PIECE_CHARS) + 1 or PIECE_CHARS
                    yield from piece(pending[:cut], begun)
                    pending, begun = pending[cut:], True
            yield from piece(pending.rstrip("\n"), begun)


def piece(text: str, continues_a_document: bool):
    if not continues_a_document:
        text = text.lstrip("\n")  # (the end of a blank line that straddled two reads)
    if text.strip():  # blank "documents" are no documents
        yield {"text": text, "starts_document": not continues_a_document}


def row_location(patterns: list[str], index: int) -> str:
    """Where row `index` of `load_files(patterns)` came from, e.g. "train.csv, row 7" (rows count from 1, after any
    header). Only asked for when reporting a bad row, so it may re-read the files."""
    if len(patterns) == 1 and Path(patterns[0]).is_dir():
        return f"{patterns[0]}, row {index + 1}"
    for file in expand(patterns):
        rows = len(load_files([file], "train"))
        if index < rows:
            return f"{file}, row {index + 1}"
        index -= rows
    raise IndexError(index)


def load_saved_dataset(folder: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(folder)
    except FileNotFoundError:
        raise DataError(f"{folder} is a folder but not one written by `Dataset.save_to_disk`.") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{folder} has the splits {list(loaded)}, not {split!r}.")
        loaded = loaded[split]
    return loaded


def check_utf8(file: str, chunk_size: int = 1 << 20) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as handle:
        while chunk := handle.read(chunk_size):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise DataError(f"{file} is not UTF-8 text (byte {offset + error.start}).") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{file} is not UTF-8 text (it ends inside a character).") from None


def check_columns(dataset, columns: list[str], flag: str) -> None:
    # A stream may not know its columns before it is read: then its first row says.
    names = list(dataset.features) if dataset.features else list(next(iter(dataset), {}))
    missing = [column for column in columns if column not in names]
    if missing:
        plain_text = " (plain text files hold only 'text': use csv, tsv or jsonl for labelled data)"
        hint = plain_text if names == ["text"] else ""
        raise DataError(f"{flag} {missing[0]!r} is not a column of the data; its columns are {names}{hint}.")


def hold_out(train, percentage: int, seed: int):
    """(train, validation): `percentage`% of the training examples, drawn at random from `seed`, held out. Too few
    examples for one gives (train, None)."""
    held_out = len(train) * percentage // 100
    if held_out == 0:
        return train, None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    kept, validation = sorted(order[held_out:]), sorted(order[:held_out])
    if isinstance(train, datasets.Dataset):
        return train.select(kept), train.select(validation)
    return Subset(train, kept), Subset(train, validation)


def train_loader(dataset, batch_size: int, collate_fn=None) -> torch.utils.data.DataLoader:
    """Shuffled batches drawn from a generator of their own, never from the global RNG that dropout uses (a stream
    is read in order)."""
    shuffle = not isinstance(dataset, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(dataset, shuffle=shuffle, batch_size=batch_size, collate_fn=collate_fn,
                                       generator=torch.Generator() if shuffle else None)


def embedded_corpus() -> datasets.Dataset:
    """The Python language reference, one document per topic: about 465 KB of English that ships with Python."""
    from pydoc_data.topics import topics

    return datasets.Dataset.from_dict({"text": list(topics.values())})
