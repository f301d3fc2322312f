"""nanoGPT's `ckpt.pt` -> MiniGPT: nanoGPT is GPT-2's architecture with nn.Linear weights, so its tensors need only
the split of `c_attn` (and zeros where it was trained without biases)."""

from pathlib import Path

import torch

from ..configuration_minigpt import MiniGPTConfig
from ..conversion_minigpt import GPT2_ONLY_TENSORS, split_fused
from ..modeling_minigpt import MiniGPTForCausalLM
from .checkpoints import UNREADABLE, CheckpointError, load_into, write_converted
from .registry import register


@register("nanogpt", "minigpt")
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
    state_dict = {name: tensor for name, tensor in state_dict.items() if not GPT2_ONLY_TENSORS.search(name)}
    state_dict = split_fused(state_dict, conv1d=False)
    model = MiniGPTForCausalLM(config)
    if not args.get("bias", True):
        # nanoGPT's bias=False: no Linear or LayerNorm biases, which is exactly MiniGPT with zero biases.
        for name, tensor in model.state_dict().items():
            if name.endswith(".bias") and name not in state_dict:
                state_dict[name] = torch.zeros_like(tensor)
    load_into(model, state_dict, checkpoint_path)
    return write_converted(model, destination, Path(checkpoint_path).parent)
