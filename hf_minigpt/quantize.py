"""Int8 weight-only quantization for a fast CPU decode.

Decoding one token at a time reads every weight once per token, so its speed is set by how many bytes the weights
take: int8 weights read a quarter of fp32's. Each output channel keeps its own scale (`weight ≈ int8 * scale`), which
is how GPT-fast and torchao's `int8_weight_only` do it.

    model = quantize_int8(MiniGPTForCausalLM.from_pretrained(folder))   # in place; for inference
    model.generate(ids, max_new_tokens=64, cache_implementation="static", compile_config=cpu_compile_config())

On a CPU the product runs through PyTorch's int8 x bf16 kernel (`_weight_int8pack_mm`, vectorized for AVX2 and
AVX-512; its fp32 variant is not): activations are rounded to bf16 on the way in, the result returns in the
model's dtype. Elsewhere the weight is widened to the activations' dtype and multiplied as usual.
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers import CompileConfig


class Int8Linear(nn.Module):
    """An `nn.Linear` whose weight is stored as int8 with one fp32 scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the kernel's dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise ValueError("An int8-quantized MiniGPT is for inference only and cannot be saved: save the model "
                         "before quantize_int8, and quantize again after loading it.")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replaces the transformer blocks' projections and the LM head by `Int8Linear`, in place, and returns the
    model. Embeddings, LayerNorms and small task heads stay as they are. The LM head gets its own int8 copy of the
    token embedding it is tied to; the embedding itself stays exact for the lookup."""
    model.eval()
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (".h." in f".{name}" or name == "lm_head")]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no transformer-block projections to quantize.")
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, Int8Linear(getattr(owner, child)))
    return model


def cpu_compile_config() -> CompileConfig:
    """What makes `generate(..., cache_implementation="static")` compile the decode step on a CPU too (transformers
    compiles it automatically on GPUs only)."""
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True
    return config
