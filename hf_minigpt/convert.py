"""Deprecated: the conversions moved to `hf_minigpt.export` (one module per format). Importing from here still
works, with a warning, until hf_minigpt 0.4."""

import warnings

from . import export
from .export import gpt2 as _gpt2

_MOVED = {name: getattr(export, name) for name in export.__all__}
_MOVED.update({name: getattr(_gpt2, name) for name in ("convert_gpt2_to_minigpt", "convert_minigpt_to_gpt2")})


def __getattr__(name: str):
    if name in export.RENAMED:
        return getattr(export, name)  # (renamed since: its own warning)
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"hf_minigpt.convert.{name} moved to hf_minigpt.export", FutureWarning, stacklevel=2)
    return _MOVED[name]
