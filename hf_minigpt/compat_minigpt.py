"""What lets the model file run on every transformers release it travels to: the declared range (pyproject.toml) and
the older release vLLM pins. Each name says when it can go.

Travels with `modeling_minigpt.py` in every saved folder (`save_pretrained` copies a model file's relative imports).
"""

import functools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

# The KV cache is `cache` from transformers 5.24 on, as a forward argument and as an output field, and
# `past_key_values` before. MiniGPT takes `cache` and returns it under the field name generate() reads.
# Remove, with the fallback below, once the range and vLLM's transformers both start at 5.24.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

if CACHE_FIELD == "cache":
    accepts_past_key_values = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
else:  # generate() itself passes `past_key_values` there: accept it without a warning

    def accepts_past_key_values(forward):
        @functools.wraps(forward)
        def renamed(*args, past_key_values=None, **kwargs):
            if past_key_values is not None:
                kwargs.setdefault("cache", past_key_values)
            return forward(*args, **kwargs)

        return renamed


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers 5.19, vLLM 0.32's pin; remove once vLLM's transformers reaches 5.20

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, positions, :]


__all__ = ["CACHE_FIELD", "accepts_past_key_values", "slice_logits_to_keep"]
