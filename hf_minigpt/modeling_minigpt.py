"""MiniGPT: the GPT-2 decoder (Radford et al., 2019) as a native `transformers` model.

Reads top to bottom like the paper: attention -> MLP -> block -> model -> heads. Parameter names are
GPT-2's own (`wte`, `wpe`, `h.N.attn.c_proj`, ...) with two differences, which the loader converts: the
projections are `nn.Linear` rather than GPT-2's transposed `Conv1D`, and q, k and v are three projections
(`q_proj`, `k_proj`, `v_proj`) rather than GPT-2's fused `c_attn`.

This file imports nothing from `hf_minigpt` but its configuration: `save_pretrained` copies both files
next to the weights, and the folder then loads with `trust_remote_code=True` where `hf_minigpt` is absent.
"""

import functools
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, Transpose, WeightConverter, WeightRenaming
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_minigpt import MiniGPTConfig

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, as a forward argument and as an output
# field. MiniGPT takes `cache` (the old name still works, deprecated, as in transformers' own models) and returns it
# under the field name of the installed release, where generate() looks for it.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
if CACHE_FIELD == "cache":
    accepts_past_key_values = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
else:  # before the rename, generate() itself passes `past_key_values`: no warning for that

    def accepts_past_key_values(forward):
        @functools.wraps(forward)
        def renamed(*args, past_key_values=None, **kwargs):
            if past_key_values is not None:
                kwargs.setdefault("cache", past_key_values)
            return forward(*args, **kwargs)

        return renamed

try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers 5.19 (what vLLM 0.32 pins) slices inline, as its Llama does

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, positions, :]


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v, written out; the reference the fused kernels must match."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask  # 0 where allowed, dtype-min where masked
    attn_weights = F.softmax(attn_weights, dim=-1).to(value.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)  # (B, T, nh, hs)
    return attn_output, attn_weights


def linear_in_blocks(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: int) -> torch.Tensor:
    """`F.linear(input, weight, bias)` as one batched product over views of `block` output features each (and the
    last features, if they do not fill a block, in one plain product)."""
    out_features, in_features = weight.shape
    n_blocks = out_features // block
    blocked = n_blocks * block  # the output features in whole blocks
    rows = input.reshape(-1, in_features)
    weight_blocks = weight[:blocked].view(n_blocks, block, in_features).transpose(1, 2)
    if bias is None:
        output = torch.bmm(rows.expand(n_blocks, -1, -1), weight_blocks)
    else:
        output = torch.baddbmm(bias[:blocked].view(n_blocks, 1, block), rows.expand(n_blocks, -1, -1), weight_blocks)
    output = output.transpose(0, 1).reshape(len(rows), blocked)  # (blocks, rows, block) -> (rows, features)
    if blocked < out_features:
        rest = F.linear(rows, weight[blocked:], None if bias is None else bias[blocked:])
        output = torch.cat([output, rest], dim=-1)
    return output.view(*input.shape[:-1], out_features)


@functools.cache
def few_rows_run_faster_in_blocks(block: int) -> bool:
    """Whether this CPU's BLAS multiplies 8 rows by a GPT-2-sized weight clearly faster in blocks, timed once per
    process (about 10 ms). It depends on the kernels the BLAS picks, not on the model: MKL's AVX-512 kernels are
    faster in blocks (1.5x on an Intel Xeon), its AVX2 kernels slower (0.85x, the same Xeon held to AVX2)."""
    weight = torch.full((24 * block, 768), 0.01, dtype=torch.float32, device="cpu")
    rows = torch.full((8, 768), 0.01, dtype=torch.float32, device="cpu")
    products = {"plain": lambda: F.linear(rows, weight), "blocks": lambda: linear_in_blocks(rows, weight, None, block)}
    fastest = dict.fromkeys(products, math.inf)
    with torch.no_grad():
        for _ in range(6):  # interleaved, best of 6 (the first, cold, round does not win)
            for name, product in products.items():
                start = time.perf_counter()
                product()
                fastest[name] = min(fastest[name], time.perf_counter() - start)
    return fastest["blocks"] < 0.9 * fastest["plain"]


class MiniGPTLinear(nn.Linear):
    """`nn.Linear`, with the product of a few fp32 rows on the CPU taken in blocks of output features where that is
    faster.

    Decoding a batch multiplies one row per sequence by every weight. For 4 to 12 rows, MKL's AVX-512 `x @ W^T`
    (nn.Linear's layout) runs at about 0.7x the speed of `x @ W` (GPT-2's Conv1D layout), and at 0.55-0.7x the speed
    of one batched product over views of W, 128 output features each (Intel Xeon, docs/deployment.md). Other
    kernels differ (MKL's AVX2 ones are faster without blocks), so each process times the two once. The weight, its
    layout and its checkpoints stay nn.Linear's; only the kernel differs.
    """

    BLOCK = 128
    BLOCKED_ROWS = (4, 12)  # the fewest and the most; outside, the plain product is as fast or faster (1 to 64 tried)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.faster_in_blocks = few_rows_run_faster_in_blocks(self.BLOCK)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.takes_blocks(input):
            return linear_in_blocks(input, self.weight, self.bias, self.BLOCK)
        return super().forward(input)

    def takes_blocks(self, input: torch.Tensor) -> bool:
        # (cheapest test first: this runs for every projection of every decoding step)
        fewest, most = self.BLOCKED_ROWS
        return (
            self.faster_in_blocks
            and fewest <= input.numel() // input.shape[-1] <= most
            and input.is_cpu
            and input.dtype == torch.float32  # in bf16 the plain product is faster at every row count
            and type(self.weight) is nn.Parameter  # not a tensor subclass (a DTensor shard, a quantized weight)
            and self.weight.shape[0] >= 2 * self.BLOCK
        )


class MiniGPTAttention(nn.Module):
    """Masked multi-head self-attention."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.is_causal = True  # lets SDPA use its causal kernel when there is no padding mask
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= layer_idx + 1

        # GPT-2 computes q, k and v in one fused projection, `c_attn`. Three projections shard by heads with plain
        # column-parallel styles, in transformers' tensor parallelism and in serving engines alike; checkpoints that
        # store `c_attn` are split on load (see `checkpoint_conversions`).
        self.q_proj = MiniGPTLinear(config.n_embd, config.n_embd)
        self.k_proj = MiniGPTLinear(config.n_embd, config.n_embd)
        self.v_proj = MiniGPTLinear(config.n_embd, config.n_embd)
        self.qkv_proj: nn.Module | None = None  # int8 decoding puts them back into one product (hf_minigpt.quantize)
        self.c_proj = MiniGPTLinear(config.n_embd, config.n_embd)
        self.c_proj.writes_to_residual = True  # scaled init, see MiniGPTPreTrainedModel._init_weights
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        head_shape = (batch_size, seq_len, -1, self.head_dim)  # -1: the heads this rank holds
        if self.qkv_proj is None:
            query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        else:
            query, key, value = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        query, key, value = (states.view(head_shape).transpose(1, 2) for states in (query, key, value))  # B, nh, T, hs

        if cache is not None:
            # (B, nh, S, hs): cached keys, then these. A paged cache (continuous batching) also fills in `kwargs`
            # what its attention function needs.
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attn_pdrop if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


# GPT-2's "gelu_new" is the tanh approximation of GELU, which PyTorch computes in one kernel instead of seven.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


class MiniGPTMLP(nn.Module):
    """Position-wise feed-forward network: expand, non-linearity, project back."""

    def __init__(self, config: MiniGPTConfig):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = MiniGPTLinear(config.n_embd, inner_dim)
        self.act = ACT2FN[FUSED_ACTIVATIONS.get(config.activation_function, config.activation_function)]
        self.c_proj = MiniGPTLinear(inner_dim, config.n_embd)
        self.c_proj.writes_to_residual = True
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class MiniGPTBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = MiniGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MiniGPTMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask, cache, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


# GPT-2 stores its projections as Conv1D weights, (in, out); nn.Linear's are (out, in).
CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
QKV_PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


def checkpoint_conversions(model_type: str | None) -> list:
    """How a checkpoint of `model_type` becomes MiniGPT's layout, in transformers' conversion API. GPT-2's fused
    `c_attn` holds [q | k | v] along its outputs; older MiniGPT folders hold the same as an nn.Linear. GPT-2's
    Conv1D weights are transposed before any shape check, so a square one is never loaded as it is."""
    split_qkv = [Transpose(), Chunk(dim=0)] if model_type == "gpt2" else [Chunk(dim=0)]
    conversions = [
        WeightConverter("attn.c_attn.weight", [f"{name}.weight" for name in QKV_PROJECTIONS], operations=split_qkv),
        WeightConverter("attn.c_attn.bias", [f"{name}.bias" for name in QKV_PROJECTIONS], operations=[Chunk(dim=0)]),
    ]
    if model_type == "gpt2":
        conversions += [WeightConverter(f"{layer}.weight", f"{layer}.weight", operations=[Transpose()])
                        for layer in CONV1D_LAYERS[1:]]
        conversions.append(WeightRenaming(r"^classifier\.", "score."))  # GPT2ForTokenClassification's head
    return conversions


class MiniGPTPreTrainedModel(PreTrainedModel):
    config: MiniGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniGPTBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": MiniGPTBlock,
        "attentions": OutputRecorder(MiniGPTAttention, index=1),
    }
    # GPT-2 checkpoints from older transformers versions store the causal mask as a buffer; we build masks instead.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$", r"\.attn\.masked_bias$"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # N(0, initializer_range) weights, zero biases, unit LayerNorms
        # GPT-2: every block adds two residual branches, so the variance of the residual stream grows with
        # depth; scaling the projections that write into it by 1/sqrt(2 * n_layer) keeps it constant.
        # (Flagged on the nn.Linear itself: transformers skips init hooks on modules without own parameters.)
        if getattr(module, "writes_to_residual", False):
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        # A GPT-2 checkpoint (a folder or a hub id), or a MiniGPT folder saved before q, k and v were split, holds the
        # same weights in another layout. It is declared as weight conversions for transformers' loader, so
        # revisions, shards, dtypes, device maps and new heads work as for any checkpoint.
        source_type = cls.config_class.model_type
        if pretrained_model_name_or_path is not None and kwargs.get("gguf_file") is None:
            source_config = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **kwargs)[0]
            source_type = source_config.get("model_type")
        # (registered for this load only: saving reverts a model's conversions, and MiniGPT saves its own layout)
        register_checkpoint_conversion_mapping(cls.__name__, checkpoint_conversions(source_type), overwrite=True)
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        finally:
            register_checkpoint_conversion_mapping(cls.__name__, [], overwrite=True)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        model._weight_conversions = None
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Name every head in `auto_map`, not only this one: a checkpoint loaded as remote code can then be
        # re-headed, e.g. a pre-trained language model fine-tuned as a classifier, without hf_minigpt installed.
        if self._auto_class is not None:
            self.config.auto_map = {**REMOTE_CODE_AUTO_MAP, **getattr(self.config, "auto_map", {})}
        return super().save_pretrained(save_directory, *args, **kwargs)


def outside_range(indices: torch.Tensor | None, size: int) -> bool:
    """Whether any index would fall outside an embedding table of `size` rows."""
    return indices is not None and indices.numel() > 0 and not (indices.min() >= 0 and indices.max() < size)


class MiniGPTModel(MiniGPTPreTrainedModel):
    """The decoder trunk: token + position embeddings, `n_layer` blocks, a final LayerNorm."""

    _input_embed_layer = "wte"

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([MiniGPTBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # Without position ids, new tokens follow the cached ones. (With them, as in generate() and continuous
        # batching, whose paged cache has no single length, the cache is not asked.)
        past_length = cache.get_seq_length() if cache is not None and position_ids is None else 0
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_length)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0)  # (1, T)

        # One mask for all layers, built by transformers for the active attention backend: None where SDPA's
        # causal kernel suffices, additive for eager, a BlockMask for flex. Restarting `position_ids` marks
        # packed documents, which then do not attend to each other. (The cache goes in by position: its keyword
        # is `past_key_values` before transformers 5.24 and `cache` from then on.)
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)

        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states, causal_mask, cache, position_ids=position_ids, **kwargs)
        hidden_states = self.ln_f(hidden_states)

        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache if use_cache else None})

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_length):
        """Turn the mistakes users make into messages, instead of an index error deep inside torch."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.n_embd):
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, seq_len, {self.config.n_embd}), "
                f"got {tuple(inputs_embeds.shape)}."
            )
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
        batch_size, seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if batch_size == 0 or seq_len == 0:
            raise ValueError(f"The input holds no tokens (batch {batch_size}, sequence length {seq_len}): pass at "
                             "least one token per sequence.")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:  # (not a prepared BlockMask)
            if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < past_length + seq_len:
                raise ValueError(
                    f"`attention_mask` has shape {tuple(attention_mask.shape)}, but the batch holds {batch_size} "
                    f"sequences of {past_length + seq_len} tokens (cached + new): expected "
                    f"({batch_size}, {past_length + seq_len})."
                )
        # The checks below read tensor values: skip them under torch.compile, where they would break the graph.
        if torch.compiler.is_compiling():
            return
        if position_ids is None and past_length + seq_len > self.config.n_positions:
            raise ValueError(
                f"Sequence length {past_length + seq_len} (cached {past_length} + new {seq_len}) exceeds "
                f"n_positions={self.config.n_positions}, the longest sequence this model has positions for."
            )
        if outside_range(position_ids, self.config.n_positions):
            raise ValueError(
                f"`position_ids` must lie in [0, {self.config.n_positions}), got values in "
                f"[{position_ids.min().item()}, {position_ids.max().item()}]."
            )
        if outside_range(input_ids, self.config.vocab_size):
            raise ValueError(
                f"Token ids must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                f"[{input_ids.min().item()}, {input_ids.max().item()}]. Does the tokenizer match the model?"
            )


IGNORE_INDEX = -100
LOSS_CHUNK_ELEMENTS = 2**25  # logits computed at once: 128 MB in fp32


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` against `targets`, summed over rows and divided by `num_items`,
    computed a chunk of rows at a time.

    Training a GPT spends most of its memory on the (tokens, vocab) logits and their fp32 copies. Here one
    chunk's logits exist at a time: its loss and both gradients are computed in the forward pass (the idea of
    Liger-Kernel's fused linear cross-entropy), and backward only hands them over, scaled. Without
    `with_grads` (evaluation) only the loss is computed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, num_items, chunk_rows: int, with_grads: bool):
        # Under autocast the matmuls run in its dtype: cast once here, not once per chunk and matmul.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        matmul_hidden, matmul_weight = hidden.to(dtype), weight.to(dtype)
        kept = targets != IGNORE_INDEX
        picked = targets.clamp(min=0)
        # d loss / d logits = (softmax - one_hot(target)) * row_weight; ignored rows weigh 0. The weight multiplies
        # the (chunk, n_embd) operands and results, never the (chunk, vocab) gradient.
        row_weight = (kept / num_items)[:, None]
        # Every chunk writes its logits and log-probabilities into the same two buffers: a new (chunk, vocab)
        # tensor per chunk costs as much in fresh pages as a pass over it.
        chunk_shape = (min(chunk_rows, hidden.shape[0]), weight.shape[0])
        logits_buffer = torch.empty(chunk_shape, dtype=dtype, device=hidden.device)
        log_probs_buffer = torch.empty(chunk_shape, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        if with_grads:
            grad_hidden, grad_weight = torch.empty_like(matmul_hidden), None
        for start in range(0, hidden.shape[0], chunk_rows):
            chunk = slice(start, start + chunk_rows)
            rows = matmul_hidden[chunk]
            logits = torch.mm(rows, matmul_weight.T, out=logits_buffer[: len(rows)])
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=log_probs_buffer[: len(rows)])
            target_log_probs = log_probs.gather(1, picked[chunk, None]).squeeze(1)
            loss -= (target_log_probs * kept[chunk]).sum()
            if not with_grads:
                continue
            grad_logits = log_probs.exp_()
            grad_logits[torch.arange(len(rows), device=rows.device), picked[chunk]] -= 1
            grad_logits = grad_logits.to(dtype)
            torch.mm(grad_logits, matmul_weight, out=grad_hidden[chunk]).mul_(row_weight[chunk])
            scaled_rows = (rows * row_weight[chunk]).to(dtype)
            if grad_weight is None:  # the first chunk's product starts the sum: no (vocab, n_embd) zeros to fill
                grad_weight = (grad_logits.T @ scaled_rows).float()
            elif dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, scaled_rows)
            else:  # a low-precision product, summed over the chunks in fp32
                grad_weight += grad_logits.T @ scaled_rows
        if with_grads:
            # Kept on ctx rather than saved, so that backward can hand them over: autograd then adds the tied
            # embedding's gradient into them in place instead of into a new (vocab, n_embd) tensor.
            ctx.grads = grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype)
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
        return grad_hidden, grad_weight, None, None, None, None


def chunked_lm_loss(hidden_states, weight, labels, num_items_in_batch=None, shift_labels=None, **kwargs):
    """The causal-LM loss of `transformers`' ForCausalLMLoss (labels shifted inside, -100 ignored, mean or
    sum / num_items_in_batch), without materializing the (B, T, vocab) logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    num_items = torch.as_tensor(num_items_in_batch, device=hidden_states.device, dtype=torch.float32)
    chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, targets, num_items, chunk_rows, with_grads)


class MiniGPTForCausalLM(MiniGPTPreTrainedModel, GenerationMixin):
    """MiniGPT with a language-modelling head whose weight is the token embedding (tied, as in GPT-2)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # each rank scores a slice of the vocabulary; logits gathered

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.transformer = MiniGPTModel(config)
        self.lm_head = MiniGPTLinear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels: token ids to predict, aligned with `input_ids` (the shift happens inside); -100 is ignored.
        logits_to_keep: compute logits for the last `logits_to_keep` positions only (0 keeps all); generation
            needs just the last one, which saves a (B, T, vocab) matmul per step.
        skip_logits: the memory-saving training path (as `skip_logits` of Liger-Kernel's integration in
            transformers): the loss against `labels` comes from the hidden states a chunk of rows at a time and
            `logits` is None. The (B, T, vocab) logits and their fp32 copies, the largest tensors of a small GPT's
            training step, never exist whole. The training scripts and the benchmark turn it on.
        """
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True computes only the loss, without logits: pass `labels` too.")
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = loss = None
        if skip_logits:
            loss = chunked_lm_loss(hidden_states, self.lm_head.weight, labels, **kwargs)
        else:
            logits = self.lm_head(hidden_states)  # (B, T, vocab)
            if labels is not None:
                loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        # Refuse in one line before the first step, not with an error at the step that runs past the positions.
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        if generation_config.max_length > self.config.n_positions:
            raise ValueError(
                f"generate() would run to {generation_config.max_length} tokens (prompt + new tokens), but this model "
                f"has positions for {self.config.n_positions}: lower max_new_tokens (or max_length)."
            )


# The task heads reuse transformers' generic forward passes (GPT-2's semantics: sequence classification pools
# the last non-pad token, so left and right padding both work). Each builds its trunk directly rather than
# through `AutoModel`, which has no entry for "minigpt" when the checkpoint is loaded as remote code.
class MiniGPTForSequenceClassification(GenericForSequenceClassification, MiniGPTPreTrainedModel):
    base_model_prefix = "transformer"

    def __init__(self, config: MiniGPTConfig):
        MiniGPTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.transformer = MiniGPTModel(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)
        self.post_init()


class MiniGPTForTokenClassification(GenericForTokenClassification, MiniGPTPreTrainedModel):
    base_model_prefix = "transformer"

    def __init__(self, config: MiniGPTConfig):
        MiniGPTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.transformer = MiniGPTModel(config)
        classifier_dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.resid_pdrop if classifier_dropout is None else classifier_dropout)
        self.score = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()


class MiniGPTForQuestionAnswering(GenericForQuestionAnswering, MiniGPTPreTrainedModel):
    base_model_prefix = "transformer"

    def __init__(self, config: MiniGPTConfig):
        MiniGPTPreTrainedModel.__init__(self, config)
        self.transformer = MiniGPTModel(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value


REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_minigpt.MiniGPTConfig",
    "AutoModel": "modeling_minigpt.MiniGPTModel",
    "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minigpt.MiniGPTForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_minigpt.MiniGPTForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_minigpt.MiniGPTForQuestionAnswering",
}

__all__ = [
    "MiniGPTPreTrainedModel",
    "MiniGPTModel",
    "MiniGPTForCausalLM",
    "MiniGPTForSequenceClassification",
    "MiniGPTForTokenClassification",
    "MiniGPTForQuestionAnswering",
]
