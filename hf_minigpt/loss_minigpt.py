"""The causal-LM loss without the (tokens, vocab) logits: training a GPT spends most of its memory on them and their
fp32 copies, so `MiniGPTForCausalLM(..., skip_logits=True)` computes the loss a chunk of rows at a time.

Travels with `modeling_minigpt.py` in every saved folder (`save_pretrained` copies a model file's relative imports).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

IGNORE_INDEX = -100
LOSS_CHUNK_ELEMENTS = 2**25  # logits computed at once: 128 MB in fp32


class HeadMatmuls:
    """The loss's three products of a chunk of rows with the head's weight, through PyTorch's matmul. A head that
    computes nn.Linear's product with other kernels (`computes_nn_linear`) may name faster ones for the same products
    (`head.loss_matmuls(rows, dtype)`). Each returns its product: `out` is a buffer it may write it into."""

    @staticmethod
    def logits(rows, weight, out):
        """(rows, vocab): `rows @ weight.T`."""
        return torch.mm(rows, weight.T, out=out)

    @staticmethod
    def grad_rows(grad_logits, weight, out):
        """(rows, n_embd): `grad_logits @ weight`."""
        return torch.mm(grad_logits, weight, out=out)

    @staticmethod
    def add_grad_weight(grad_weight_sum, grad_logits, scaled_rows):
        """The sum over chunks of `grad_logits.T @ scaled_rows`, in fp32 and in any layout `grad_weight` reads; the
        first chunk's product (`grad_weight_sum` None) starts it, so no (vocab, n_embd) zeros are filled."""
        if grad_weight_sum is None:
            return (grad_logits.T @ scaled_rows).float()
        if grad_logits.dtype == torch.float32:
            return grad_weight_sum.addmm_(grad_logits.T, scaled_rows)
        return grad_weight_sum.add_(grad_logits.T @ scaled_rows)  # a low-precision product, summed in fp32

    @staticmethod
    def grad_weight(grad_weight_sum):
        """The weight's gradient, (vocab, n_embd), from the sum `add_grad_weight` kept."""
        return grad_weight_sum


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` against `targets`, summed over rows and divided by `num_items`,
    computed a chunk of rows at a time.

    Training a GPT spends most of its memory on the (tokens, vocab) logits and their fp32 copies. Here one
    chunk's logits exist at a time: its loss and both gradients are computed in the forward pass (the idea of
    Liger-Kernel's fused linear cross-entropy), and backward only hands them over, scaled. Without
    `with_grads` (evaluation) only the loss is computed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, num_items, chunks: int, with_grads: bool, dtype, matmuls):
        # Under autocast the matmuls run in its dtype: cast once here, not once per chunk and matmul.
        matmul_hidden, matmul_weight = hidden.to(dtype), weight.to(dtype)
        kept = targets != IGNORE_INDEX
        picked = targets.clamp(min=0)
        # d loss / d logits = (softmax - one_hot(target)) * row_weight; ignored rows weigh 0. The weight multiplies
        # the (chunk, n_embd) operands and results, never the (chunk, vocab) gradient.
        row_weight = (kept / num_items)[:, None]
        # Every chunk writes its logits and probabilities into the same two buffers: a new (chunk, vocab) tensor per
        # chunk costs as much in fresh pages as a pass over it.
        chunk_shape = (math.ceil(len(hidden) / chunks), weight.shape[0])  # the most rows a chunk has
        logits_buffer = torch.empty(chunk_shape, dtype=dtype, device=hidden.device)
        probs_buffer = torch.empty(chunk_shape, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        if with_grads:
            grad_hidden, grad_weight = torch.empty_like(matmul_hidden), None
        for index in range(chunks):  # chunks of equal rows, give or take one
            chunk = slice(index * len(hidden) // chunks, (index + 1) * len(hidden) // chunks)
            rows = matmul_hidden[chunk]
            logits = matmuls.logits(rows, matmul_weight, logits_buffer[: len(rows)])
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32, out=probs_buffer[: len(rows)])
            # log p = logit - max - log(sum): the largest logit's probability is 1 / sum, which cannot underflow (it
            # is at least 1 / vocab). One pass of exponentials serves the loss and its gradient.
            log_sum = logits.amax(dim=-1).float() - probs.amax(dim=-1).log()
            target_log_probs = logits.gather(1, picked[chunk, None]).squeeze(1).float() - log_sum
            loss -= (target_log_probs * kept[chunk]).sum()
            if not with_grads:
                continue
            grad_logits = probs
            grad_logits[torch.arange(len(rows), device=rows.device), picked[chunk]] -= 1
            grad_logits = grad_logits.to(dtype)
            grad_rows = matmuls.grad_rows(grad_logits, matmul_weight, grad_hidden[chunk])
            torch.mul(grad_rows, row_weight[chunk], out=grad_hidden[chunk])
            grad_weight = matmuls.add_grad_weight(grad_weight, grad_logits, (rows * row_weight[chunk]).to(dtype))
        if with_grads:
            # Kept on ctx rather than saved, so that backward can hand them over: autograd then adds the tied
            # embedding's gradient into them in place instead of into a new (vocab, n_embd) tensor.
            ctx.grads = grad_hidden.to(hidden.dtype), matmuls.grad_weight(grad_weight).to(weight.dtype)
        return loss / num_items

    @staticmethod
    def backward(ctx, grad_loss):
        if not hasattr(ctx, "grads"):
            raise RuntimeError("The loss of `skip_logits=True` hands its gradients over once: it cannot backward "
                               "twice (retain_graph=True); compute the loss again, or use the plain loss.")
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # loss.backward() passes 1: nothing to scale
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_lm_loss(hidden_states, head, labels, num_items_in_batch=None, shift_labels=None, **kwargs):
    """The causal-LM loss of `transformers`' ForCausalLMLoss (labels shifted inside, -100 ignored, mean or
    sum / num_items_in_batch) of `head`'s logits, without materializing the (B, T, vocab) logits."""
    weight = plain_linear_weight(head, "lm_head")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    num_items = torch.as_tensor(num_items_in_batch, device=hidden_states.device, dtype=torch.float32)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    # The fewest chunks of at most LOSS_CHUNK_ELEMENTS logits, with the rows shared out evenly (2048 rows of a
    # 50,304-word vocabulary: 4 chunks of 512, not 3 of 667 and a last one of 47 multiplied apart).
    chunks = max(1, math.ceil(len(hidden) / max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])))
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    rows = math.ceil(len(hidden) / chunks)  # the most that one product multiplies
    matmuls = head.loss_matmuls(rows, dtype) if hasattr(head, "loss_matmuls") else HeadMatmuls
    return LinearCrossEntropy.apply(hidden, weight, targets, num_items, chunks, with_grads, dtype, matmuls)


def plain_linear_weight(head: nn.Module, name: str) -> torch.Tensor:
    """`head`'s weight, which the chunked loss multiplies by in place of calling `head`: refused where `head`'s forward
    computes more than `x @ weight.T` (an adapter such as LoRA, hooks such as a tensor-parallel plan's, a weight
    that is a shard or quantized). FSDP2's wrapper (a subclass whose hooks gather the weight around forward) is
    nn.Linear's computation, as is a subclass that says so (`computes_nn_linear`: another kernel for the same
    product); its weight is checked as any other."""
    kind = type(head)
    sharded = issubclass(kind, FSDPModule)
    if sharded:
        kind = next(base for base in kind.__mro__ if not issubclass(base, FSDPModule))
    linear = kind is nn.Linear or (issubclass(kind, nn.Linear) and getattr(kind, "computes_nn_linear", False))
    if not linear or (not sharded and (head._forward_hooks or head._forward_pre_hooks)):
        attached = "nn.Linear with forward hooks" if kind is nn.Linear else f"{kind.__module__}.{kind.__qualname__}"
        raise ValueError(f"skip_logits=True computes the loss from {name}'s weight without calling {name}, which is a "
                         f"{attached} here: train with skip_logits=False, or merge what is attached first.")
    if head.bias is not None:
        raise ValueError(f"skip_logits=True computes the loss from {name}'s weight alone, and {name} has a bias here: "
                         "train with skip_logits=False.")
    if type(head.weight) is not nn.Parameter:
        raise ValueError(f"skip_logits=True computes the loss from {name}'s weight, which is a "
                         f"{type(head.weight).__name__} here (sharded or quantized): train with skip_logits=False.")
    return head.weight
