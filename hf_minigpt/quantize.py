"""Int8 quantization for a fast CPU decode.

Decoding one token at a time reads every weight once per token, so its speed is set by how many bytes the weights
take: int8 weights read a quarter of fp32's. Each output channel keeps its own scale (`weight ≈ int8 * scale`), as
in GPT-fast and torchao; each row of activations (each token) is rounded to 7-bit integers with its own scale, as
llama.cpp rounds its activations to 8 bits, and the product runs in integers through fbgemm, PyTorch's x86 int8 GEMM.

    model = quantize_int8(MiniGPTForCausalLM.from_pretrained(folder))   # in place; for inference on an x86 CPU
    model.generate(ids, max_new_tokens=64, cache_implementation="static", compile_config=cpu_compile_config())

fbgemm quantizes its input itself, with one scale for the whole tensor. Two more input columns, -64 and 63, against
zero weights, make that scale exactly 1 (zero point 64): the integers pass through unchanged and every row keeps its
own scale, so a token's logits do not depend on the other tokens in the batch and a decode step computes exactly
what a full forward does. 7 bits (fbgemm's `reduce_range`) keep x86 CPUs without VNNI, whose int8 instructions add
pairs of products in 16 bits, from saturating.
"""

import warnings
import weakref

import torch
from torch import nn
from transformers import CompileConfig

from .conversion_minigpt import join_fused
from .modeling_minigpt import MiniGPTAttention

# torch.compile cannot trace fbgemm's packed weights (a TorchScript object), so the product is an operator of our
# own, which finds its layer's weights by number: the compiled graph holds the number.
_LAYERS: "weakref.WeakValueDictionary[int, Int8Linear]" = weakref.WeakValueDictionary()
_library = torch.library.Library("hf_minigpt", "DEF")
_library.define("int8_linear(Tensor integers, int layer, int out_features) -> Tensor")


def _int8_linear(integers: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(integers, _LAYERS[layer].packed_weight, True)  # True: 7 bits


_library.impl("int8_linear", _int8_linear, "CPU")


@torch.library.register_fake("hf_minigpt::int8_linear")
def _int8_linear_shape(integers, layer, out_features):
    return integers.new_empty(*integers.shape[:-1], out_features)


PIN_COLUMNS = (-64.0, 63.0)  # the 7-bit range fbgemm's dynamic quantization then maps onto itself


class Int8Linear(nn.Module):
    """An `nn.Linear` whose weight is int8 with one scale per output channel, packed for fbgemm; activations are
    rounded to integers per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        integers = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        pinned = torch.cat([integers, integers.new_zeros(len(integers), len(PIN_COLUMNS))], dim=1)
        engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "fbgemm"
        try:
            with warnings.catch_warnings():  # fbgemm packs only a qint8 tensor, a dtype deprecated in torch 2.13
                warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel")
                quantized = torch._make_per_channel_quantized_tensor(pinned, scale.double(),
                                                                     torch.zeros_like(scale).long(), 0)
            self.packed_weight = torch.ops.quantized.linear_prepack(quantized, None)
        finally:
            torch.backends.quantized.engine = engine
        self.register_buffer("pin", torch.tensor(PIN_COLUMNS), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self._register()

    def _register(self):
        self.layer = id(self)
        _LAYERS[self.layer] = self

    def __setstate__(self, state):  # a copy (deepcopy, pickle) is a layer of its own
        super().__setstate__(state)
        self._register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.float()
        row_scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / PIN_COLUMNS[1]
        integers = torch.cat([torch.round(rows / row_scale), self.pin.expand(*rows.shape[:-1], -1)], dim=-1)
        y = torch.ops.hf_minigpt.int8_linear(integers, self.layer, self.out_features) * row_scale
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    @property
    def weight_bytes(self) -> int:
        """What one product reads: an int8 per weight and an fp32 scale per output channel."""
        return self.out_features * (self.in_features + 4)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise ValueError("An int8-quantized MiniGPT is for inference only and cannot be saved: save the model "
                         "before quantize_int8, and quantize again after loading it.")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Attention(MiniGPTAttention):
    """MiniGPT's attention with q, k and v from one int8 product (`qkv_proj`): the same numbers in a third of the
    calls. The attention receives the fused product, and its q, k and v projections each take their third."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(self.qkv_proj(hidden_states), *args, **kwargs)


class ThirdOf(nn.Module):
    """q, k or v (`index` 0, 1, 2) of a fused [q | k | v] product."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv.chunk(3, dim=-1)[self.index]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replaces the transformer blocks' projections and the LM head by `Int8Linear`, in place, and returns the
    model; each attention's q, k and v become one product (`qkv_proj`), which computes the same numbers in a third of
    the calls. Embeddings, LayerNorms and small task heads stay as they are. The LM head gets its own int8 copy of the
    token embedding it is tied to; the embedding itself stays exact for the lookup."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("int8 decoding runs on x86 CPUs (PyTorch's fbgemm kernels), which this PyTorch build "
                         f"lacks (it has: {', '.join(torch.backends.quantized.supported_engines)}).")
    attentions = [module for module in model.modules() if isinstance(module, MiniGPTAttention)]
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no MiniGPT transformer blocks to quantize.")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 decoding runs on the CPU, and this model is on {device}: quantize it on the CPU.")
    model.eval()
    for attention in attentions:
        fused = join_fused(attention.state_dict(prefix="attn."), conv1d=False)  # GPT-2's c_attn, nn.Linear's layout
        attention.qkv_proj = Int8Linear(fused["attn.c_attn.weight"], fused["attn.c_attn.bias"])
        attention.q_proj, attention.k_proj, attention.v_proj = ThirdOf(0), ThirdOf(1), ThirdOf(2)
        attention.__class__ = Int8Attention
    for name in [name for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and (".h." in f".{name}" or name == "lm_head")]:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, Int8Linear(linear.weight, linear.bias))
    return model


def cpu_compile_config() -> CompileConfig:
    """What makes `generate(..., cache_implementation="static")` compile the decode step on a CPU too (transformers
    compiles it automatically on GPUs only). Inductor's C++ wrapper calls the step's kernels from C++ rather than
    Python, which at batch 1 is where a compiled step spends a third of its time (GPUs replay CUDA graphs instead)."""
    config = CompileConfig(fullgraph=True, mode=None, options={"cpp_wrapper": True})
    config._compile_all_devices = True
    return config
