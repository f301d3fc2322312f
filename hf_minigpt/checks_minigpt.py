"""What MiniGPT checks of its inputs, to turn the mistakes users make into messages instead of an error deep inside
torch. Shapes are checked on every call, compiled or not. Values (token ids and positions in range) cost a host sync
on a GPU, so they are read where the ids come from the user: a forward pass without a cache (outside torch.compile,
where reading them would break the graph), and once per generate() call, on the prompt, before any step, compiled or
not. Decode steps read only ids the model chose.

Travels with `modeling_minigpt.py` in every saved folder (`save_pretrained` copies a model file's relative imports).
"""

import torch


def check_shapes(config, input_ids, inputs_embeds, attention_mask, position_ids, past_length):
    """The shapes of a forward pass's inputs, checked on every call."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.n_embd):
        raise ValueError(f"`inputs_embeds` must have shape (batch, seq_len, {config.n_embd}), "
                         f"got {tuple(inputs_embeds.shape)}.")
    if input_ids is not None and input_ids.ndim != 2:
        raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
    batch_size, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
    if batch_size == 0 or seq_len == 0:
        raise ValueError(f"The input holds no tokens (batch {batch_size}, sequence length {seq_len}): pass at "
                         "least one token per sequence.")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:  # (not a prepared BlockMask)
        if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < past_length + seq_len:
            raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}, but the batch holds "
                             f"{batch_size} sequences of {past_length + seq_len} tokens (cached + new): expected "
                             f"({batch_size}, {past_length + seq_len}).")
    if past_length + seq_len > config.n_positions and position_ids is None:
        raise ValueError(f"Sequence length {past_length + seq_len} (cached {past_length} + new {seq_len}) "
                         f"exceeds n_positions={config.n_positions}, the longest sequence this model has "
                         "positions for.")


def check_values(config, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None = None):
    """Token ids and positions in range (where the ids come from the user: see above)."""
    if outside(input_ids, config.vocab_size):
        raise ValueError(f"Token ids must lie in [0, vocab_size={config.vocab_size}), got values in "
                         f"[{input_ids.min().item()}, {input_ids.max().item()}]. Does the tokenizer match the "
                         "model?")
    if outside(position_ids, config.n_positions):
        raise ValueError(f"`position_ids` must lie in [0, {config.n_positions}), got values in "
                         f"[{position_ids.min().item()}, {position_ids.max().item()}].")


def outside(indices: torch.Tensor | None, size: int) -> bool:
    """Whether any index would fall outside an embedding table of `size` rows."""
    return indices is not None and indices.numel() > 0 and not (indices.min() >= 0 and indices.max() < size)
