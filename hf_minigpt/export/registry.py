"""The conversions `minigpt-convert` offers. Each format's module registers what it reads and what it writes; a new
format is one module (and its test)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoints import CheckpointError, read_config


@dataclass(frozen=True)
class Conversion:
    source: str  # a folder's `model_type` ("gpt2", "minigpt"), or "nanogpt" for a ckpt.pt file
    target: str
    write: Callable[..., Path]  # (source, destination, **options) -> what it wrote
    options: tuple[str, ...] = ()  # the keyword arguments it takes, e.g. ("dtype",)


CONVERSIONS: dict[tuple[str, str], Conversion] = {}


def register(source: str, target: str, options: tuple[str, ...] = ()):
    def add(write):
        CONVERSIONS[source, target] = Conversion(source, target, write, options)
        return write

    return add


def targets() -> list[str]:
    return sorted({target for _, target in CONVERSIONS})


def convert(source, destination, to: str | None = None, **options) -> Path:
    """Detect what `source` is and write it as `to`: by default MiniGPT, or GPT-2 for a MiniGPT folder. `options`
    go to the conversions that take them (`dtype` for GGUF: f32, f16 or q8_0)."""
    source = Path(source)
    kind = source_kind(source)
    target = to or ("gpt2" if kind == "minigpt" else "minigpt")
    offered = sorted(target for known, target in CONVERSIONS if known == kind)
    if (kind, target) not in CONVERSIONS:
        raise CheckpointError(f"Cannot convert a '{kind}' checkpoint in {source} to {target}: "
                              f"{'it converts to ' + ', '.join(offered) if offered else 'no conversion reads it'}.")
    conversion = CONVERSIONS[kind, target]
    return conversion.write(source, destination, **{name: options[name] for name in conversion.options
                                                    if name in options})


def source_kind(source: Path) -> str:
    if source.is_file():
        return "nanogpt"
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such folder or file.")
    return read_config(source).get("model_type")
