"""Faster fp32 products on the CPUs where they are faster, switched on explicitly:

    model = use_cpu_kernels(MiniGPTForCausalLM.from_pretrained(folder))   # in place; on the CPU

Decoding multiplies one row per sequence by every weight, so its speed is how fast the weights are read. On some CPUs
the BLAS's `x @ W^T` (nn.Linear's layout) reads them slowly for so few rows; on AMD CPUs with AVX-512, MKL multiplies
with AVX2 only, at about half of what the CPU can do for any number of rows. Three products read the same weights, in
the same layout, faster there:
- streamed (one row, inference): a multiply-and-sum that torch.compile turns into one loop over the weight's rows,
  read once at memory speed; compiled on first use (seconds, then cached on disk); nn.Linear's results to a rounding;
- oneDNN's linear, which inductor calls for frozen fp32 weights, and its gradients through oneDNN too (training),
  as are the chunked loss's products with the LM head's weight; nn.Linear's results to a rounding;
- blocks: one batched product over views of W, a block of output features each; nn.Linear's results to a
  rounding.
Which product, for how many rows, is a rule read from the machine (`CPU`): the BLAS, the CPU's vendor (MKL picks
other kernels on AMD CPUs), the vector instructions PyTorch uses, and for streaming a C++ compiler for torch.compile.
Nothing is timed. A rule can be forced by passing a `CPU`; docs/deployment.md gives the measurements behind each.
"""

import os
import shutil
from dataclasses import dataclass, replace
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .loss_minigpt import HeadMatmuls

BLOCK = 128  # output features per block
ANY = 2**62  # as many rows as there are


@dataclass(frozen=True)
class Products:
    """The rows that take each product on a CPU: the first product that applies, in this order, else nn.Linear's."""
    streamed: int = 0  # products of at most this many rows are streamed (outside autograd)
    onednn: tuple[int, int] | None = None  # the fewest and most rows through oneDNN (uncompiled)
    blocked: tuple[int, int] | None = None  # the fewest and the most rows in blocks


# (BLAS, vendor, PyTorch's vector instructions) -> its products. CPUs not listed keep the plain product: each rule
# comes from a CPU of that kind measured (docs/deployment.md); the AMD AVX2 one from an AMD AVX-512 CPU held to AVX2.
RULES = {
    ("mkl", "GenuineIntel", "AVX512"): Products(blocked=(4, 12)),
    ("mkl", "AuthenticAMD", "AVX512"): Products(streamed=1, onednn=(1, ANY), blocked=(2, 16)),
    ("mkl", "AuthenticAMD", "AVX2"): Products(streamed=1, blocked=(1, 16)),
}


@dataclass(frozen=True)
class CPU:
    blas: str  # "mkl" where PyTorch multiplies through MKL
    vendor: str  # Linux's /proc/cpuinfo vendor_id: GenuineIntel, AuthenticAMD, ...
    vector: str  # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, DEFAULT, ...
    compiler: bool = True  # torch.compile finds the C++ compiler it builds CPU kernels with

    @classmethod
    def this_machine(cls) -> "CPU":
        vector = torch.backends.cpu.get_cpu_capability()
        held = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper()
        if held and not held.startswith("AVX512"):
            vector = held.split("_E")[0]  # MKL held to fewer instructions (AVX2, AVX2_E1, AVX, SSE4_2)
        compiler = (torch._dynamo.is_dynamo_supported()  # and the compiler inductor runs on Linux
                    and shutil.which(os.environ.get("CXX", "g++")) is not None)
        return cls("mkl" if torch.backends.mkl.is_available() else "other", cpu_vendor(), vector, compiler)

    @property
    def products(self) -> Products | None:
        rule = RULES.get((self.blas, self.vendor, self.vector))
        return replace(rule, streamed=0) if rule and not self.compiler else rule  # the next product takes those rows


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as lines:
            return next(line for line in lines if line.startswith("vendor_id")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "unknown"


def multiply_and_sum(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_dynamo_compiling():  # run as Python: torch.compile is off, or gave up (too many shapes)
        return rows @ weight.T
    return (rows.unsqueeze(-2) * weight).sum(-1)


@cache
def compiled_streamed_product():
    """`rows @ weight.T` for a few rows, compiled for each weight shape: inductor fuses the multiply into the sum, so
    no product of a row and the weight is ever stored, and each weight row is read once. Inductor's C++ wrapper calls
    the kernel from C++ rather than Python: a few microseconds less for each of a step's products."""
    return torch.compile(multiply_and_sum, dynamic=False, options={"cpp_wrapper": True})


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


def onednn_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's fp32 linear, the one inductor calls where it freezes weights; here with the weight in nn.Linear's
    layout, not packed (a packed copy would double the memory)."""
    return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """`onednn_linear` with its gradients as oneDNN products too, each a linear over transposed views (which oneDNN
    may copy): `dx = g @ W` and `dW = g^T @ x`. Saves only what the gradients asked for need."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        needs_input, needs_weight, _ = ctx.needs_input_grad
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        return onednn_linear(input, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = onednn_linear(grad_output, weight.T, None) if needs_input else None
        grad_weight = onednn_linear(grad_rows.T, input.reshape(-1, input.shape[-1]).T, None) if needs_weight else None
        grad_bias = grad_rows.sum(0) if needs_bias else None
        return grad_input, grad_weight, grad_bias


class OneDNNHeadMatmuls(HeadMatmuls):
    """The chunked loss's products of the head (`skip_logits=True`) through oneDNN, in fp32. The weight's gradient
    is summed transposed, (n_embd, vocab): oneDNN writes that layout faster than nn.Linear's."""

    @staticmethod
    def logits(rows, weight, out):
        return onednn_linear(rows, weight, None)  # a new tensor: oneDNN's linear writes no `out`

    @staticmethod
    def grad_rows(grad_logits, weight, out):
        return onednn_linear(grad_logits, weight.T, None)

    @staticmethod
    def add_grad_weight(grad_weight_sum, grad_logits, scaled_rows):
        product = onednn_linear(scaled_rows.T, grad_logits.T, None)
        return product if grad_weight_sum is None else grad_weight_sum.add_(product)

    @staticmethod
    def grad_weight(grad_weight_sum):
        return grad_weight_sum.T.contiguous()


def within(rows: int, span: tuple[int, int] | None) -> bool:
    return span is not None and span[0] <= rows <= span[1]


class CPULinear(nn.Linear):
    """An `nn.Linear` (its own weight and bias, shared) whose fp32 products on the CPU take the product `products`
    names for their number of rows (streamed ones outside autograd only; oneDNN's with its own gradients)."""

    computes_nn_linear = True  # nn.Linear's numbers to a rounding: the chunked loss may multiply by the weight itself

    def __init__(self, linear: nn.Linear, products: Products):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters: ties and optimizers still hold
        self.products = products
        self.streamed_product = compiled_streamed_product() if products.streamed else None  # compiles at first call

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # What nn.Linear would compute in fp32 (not under autocast), and not for an export, which keeps nn.Linear's.
        if (input.is_cpu and input.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_exporting()):
            rows = input.numel() // self.in_features
            inference = not torch.is_grad_enabled()
            if inference and 0 < rows <= self.products.streamed:
                # Reshaped to two dimensions, so that one compiled product serves each weight shape.
                output = self.streamed_product(input.reshape(rows, self.in_features), self.weight)
                output = output.view(*input.shape[:-1], self.out_features)
                return output if self.bias is None else output + self.bias
            # Inductor lowers oneDNN's linear only with weights it packed itself: compiled, it takes the product.
            if within(rows, self.products.onednn) and not torch.compiler.is_dynamo_compiling():
                return OneDNNLinear.apply(input, self.weight, self.bias)
            if within(rows, self.products.blocked) and self.out_features >= 2 * BLOCK:
                return linear_in_blocks(input, self.weight, self.bias)
        return super().forward(input)

    def loss_matmuls(self, rows: int, dtype: torch.dtype):
        """The products the chunked loss (`skip_logits=True`) multiplies up to `rows` rows by this head's weight with:
        oneDNN's where `products` sends them there, in fp32 and not while torch.compile traces (as `forward`)."""
        onednn = (self.weight.is_cpu and dtype == torch.float32 and within(rows, self.products.onednn)
                  and not torch.compiler.is_compiling())
        return OneDNNHeadMatmuls if onednn else HeadMatmuls

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.products}"


def use_cpu_kernels(model: nn.Module, cpu: CPU | None = None, compile: bool = True) -> nn.Module:
    """Gives the transformer blocks' projections and the LM head the products that are faster on `cpu` (by default
    this machine's), in place, and returns the model. `compile=False` leaves out the products torch.compile builds
    (streaming, whose first use compiles for seconds), as a machine without a compiler does. On CPUs without a rule,
    for a model off the CPU or not in fp32, and for projections with hooks (written for nn.Linear), it changes
    nothing. The weights and what the model saves stay as they were."""
    cpu = cpu or CPU.this_machine()
    products = (cpu if compile else replace(cpu, compiler=False)).products
    if products is None:
        return model
    for name, module in list(model.named_modules()):
        is_projection = ".h." in f".{name}." or name.rpartition(".")[2] == "lm_head"
        hooked = module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        if (type(module) is nn.Linear and is_projection and type(module.weight) is nn.Parameter and not hooked
                and module.weight.is_cpu and module.weight.dtype == torch.float32):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, CPULinear(module, products))
    return model
