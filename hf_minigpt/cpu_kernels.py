"""A faster fp32 product for decoding on the CPUs where it is faster, switched on explicitly:

    model = use_cpu_kernels(MiniGPTForCausalLM.from_pretrained(folder))   # in place; inference on the CPU

Decoding multiplies one row per sequence by every weight. On some CPUs the BLAS's `x @ W^T` (nn.Linear's layout) is
slow for so few rows, and one batched product over views of W, a block of output features each, is faster: same
weights, same layout, results equal to a rounding. Which CPUs is a rule read from the machine (`CPU`): the BLAS, the
CPU's vendor (MKL picks other kernels on AMD CPUs) and the vector instructions PyTorch uses. Nothing is timed. A rule
can be forced by passing a `CPU`; docs/deployment.md gives the measurements behind each rule.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 128  # output features per block

# (BLAS, vendor, PyTorch's vector instructions) -> the fewest and the most rows a product takes in blocks. CPUs not
# listed keep the plain product: each rule comes from a CPU of that kind measured (docs/deployment.md).
BLOCKED_ROWS = {
    ("mkl", "GenuineIntel", "AVX512"): (4, 12),
    ("mkl", "AuthenticAMD", "AVX512"): (1, 16),
}


@dataclass(frozen=True)
class CPU:
    blas: str  # "mkl" where PyTorch multiplies through MKL
    vendor: str  # Linux's /proc/cpuinfo vendor_id: GenuineIntel, AuthenticAMD, ...
    vector: str  # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, DEFAULT, ...

    @classmethod
    def this_machine(cls) -> "CPU":
        vector = torch.backends.cpu.get_cpu_capability()
        held = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper()
        if held and not held.startswith("AVX512"):
            vector = held.split("_E")[0]  # MKL held to fewer instructions (AVX2, AVX2_E1, AVX, SSE4_2)
        return cls("mkl" if torch.backends.mkl.is_available() else "other", cpu_vendor(), vector)

    @property
    def blocked_rows(self) -> tuple[int, int] | None:
        return BLOCKED_ROWS.get((self.blas, self.vendor, self.vector))


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as lines:
            return next(line for line in lines if line.startswith("vendor_id")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "unknown"


def linear_in_blocks(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(input, weight, bias)` as one batched product over views of `BLOCK` output features each (and the
    last features, if they do not fill a block, in one plain product)."""
    out_features, in_features = weight.shape
    n_blocks = out_features // BLOCK
    blocked = n_blocks * BLOCK  # the output features in whole blocks
    rows = input.reshape(-1, in_features)
    weight_blocks = weight[:blocked].view(n_blocks, BLOCK, in_features).transpose(1, 2)
    if bias is None:
        output = torch.bmm(rows.expand(n_blocks, -1, -1), weight_blocks)
    else:
        output = torch.baddbmm(bias[:blocked].view(n_blocks, 1, BLOCK), rows.expand(n_blocks, -1, -1), weight_blocks)
    output = output.transpose(0, 1).reshape(len(rows), blocked)  # (blocks, rows, block) -> (rows, features)
    if blocked < out_features:
        rest = F.linear(rows, weight[blocked:], None if bias is None else bias[blocked:])
        output = torch.cat([output, rest], dim=-1)
    return output.view(*input.shape[:-1], out_features)


class BlockedLinear(nn.Linear):
    """An `nn.Linear` (its own weight and bias, shared) whose fp32 products of `rows` rows on the CPU run in blocks."""

    def __init__(self, linear: nn.Linear, rows: tuple[int, int]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters: ties and optimizers still hold
        self.rows = rows

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fewest, most = self.rows
        if fewest <= input.numel() // input.shape[-1] <= most and input.is_cpu and input.dtype == torch.float32:
            return linear_in_blocks(input, self.weight, self.bias)
        return super().forward(input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocked_rows={self.rows}"


def use_cpu_kernels(model: nn.Module, cpu: CPU | None = None) -> nn.Module:
    """Gives the transformer blocks' projections and the LM head the products that are faster on `cpu` (by default
    this machine's), in place, and returns the model. On CPUs without a rule, and for a model off the CPU or not in
    fp32, it changes nothing. The weights and what the model saves stay as they were."""
    rows = (cpu or CPU.this_machine()).blocked_rows
    if rows is None:
        return model
    for name, module in list(model.named_modules()):
        is_projection = ".h." in f".{name}." or name.rpartition(".")[2] == "lm_head"
        if (type(module) is nn.Linear and is_projection and module.out_features >= 2 * BLOCK
                and type(module.weight) is nn.Parameter and module.weight.is_cpu
                and module.weight.dtype == torch.float32):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, BlockedLinear(module, rows))
    return model
