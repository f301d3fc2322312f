"""MiniGPT: the GPT-2 decoder (Radford et al., 2019) as a native `transformers` model.

Reads top to bottom like the paper: attention -> MLP -> block -> model -> heads. Parameter names are GPT-2's own
(`wte`, `wpe`, `h.N.attn.c_proj`, ...), with two differences that the loader converts (conversion_minigpt.py): the
projections are `nn.Linear` rather than GPT-2's transposed `Conv1D`, and q, k and v are three projections rather than
GPT-2's fused `c_attn`.

This file imports nothing from `hf_minigpt` but its sibling modules, which `save_pretrained` copies next to the
weights: the folder then loads with `trust_remote_code=True` where `hf_minigpt` is absent.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
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
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .checks_minigpt import check_shapes, check_values
from .compat_minigpt import CACHE_FIELD, accepts_past_key_values, slice_logits_to_keep
from .configuration_minigpt import MiniGPTConfig
from .conversion_minigpt import GPT2_ONLY_TENSORS, conversions_registered
from .loss_minigpt import chunked_lm_loss


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v, written out; the reference the fused kernels must match."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask  # 0 where allowed, dtype-min where masked
    attn_weights = F.softmax(attn_weights, dim=-1).to(value.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)  # (B, T, nh, hs)
    return attn_output, attn_weights


class MiniGPTAttention(nn.Module):
    """Masked multi-head self-attention."""

    def __init__(self, config: MiniGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.n_embd // config.n_head
        self.is_causal = True  # lets SDPA use its causal kernel when there is no padding mask
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= layer_idx + 1

        # GPT-2 computes q, k and v in one fused projection, `c_attn`. Three projections shard by heads with plain
        # column-parallel styles, in transformers' tensor parallelism and in serving engines alike; checkpoints that
        # store `c_attn` are split on load (conversion_minigpt.py).
        self.q_proj = nn.Linear(config.n_embd, config.n_embd)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
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
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
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
        self.c_fc = nn.Linear(config.n_embd, inner_dim)
        self.act = ACT2FN[FUSED_ACTIVATIONS.get(config.activation_function, config.activation_function)]
        self.c_proj = nn.Linear(inner_dim, config.n_embd)
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


# What says where a checkpoint's config.json is, among from_pretrained's keyword arguments.
LOCATION_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


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
    # What GPT-2 checkpoints hold that MiniGPT has no place for (the causal mask of older releases, a second head).
    _keys_to_ignore_on_load_unexpected = [GPT2_ONLY_TENSORS.pattern]

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
        # A GPT-2 checkpoint, or a MiniGPT folder saved before q, k and v were split, holds the same weights in
        # another layout, which transformers' loader converts (revisions, shards, dtypes and device maps included).
        checkpoint_type = cls.config_class.model_type
        if pretrained_model_name_or_path is not None and kwargs.get("gguf_file") is None:
            where = {key: kwargs[key] for key in LOCATION_KWARGS if key in kwargs}  # (not what the loader alone takes)
            checkpoint_type = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **where)[0].get(
                "model_type"
            )
        with conversions_registered(cls.__name__, checkpoint_type):
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        # transformers reverts the conversions a model was loaded with when it saves; MiniGPT saves its own layout.
        model._weight_conversions = []
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Name every head in `auto_map`, not only this one: a checkpoint loaded as remote code can then be
        # re-headed, e.g. a pre-trained language model fine-tuned as a classifier, without hf_minigpt installed.
        if self._auto_class is not None:
            self.config.auto_map = {**REMOTE_CODE_AUTO_MAP, **getattr(self.config, "auto_map", {})}
        return super().save_pretrained(save_directory, *args, **kwargs)


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
        # Without position ids, new tokens follow the cached ones. (With them, as in generate() and continuous
        # batching, whose paged cache has no single length, the cache is not asked.)
        past_length = cache.get_seq_length() if cache is not None and position_ids is None else 0
        check_shapes(self.config, input_ids, inputs_embeds, attention_mask, position_ids, past_length)
        if cache is None and not torch.compiler.is_compiling():  # (checks_minigpt.py: what is checked where)
            check_values(self.config, input_ids, position_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        if position_ids is None:  # new tokens follow the cached ones
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0)  # (1, T)

        # One mask for all layers, built by transformers for the active attention backend: None where SDPA's
        # causal kernel suffices, additive for eager, a BlockMask for flex. Restarting `position_ids` marks
        # packed documents, which then do not attend to each other. (The cache goes in by position: its keyword
        # differs between transformers releases.)
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)

        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states, causal_mask, cache, position_ids=position_ids, **kwargs)
        hidden_states = self.ln_f(hidden_states)

        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache if use_cache else None})


class MiniGPTForCausalLM(MiniGPTPreTrainedModel, GenerationMixin):
    """MiniGPT with a language-modelling head whose weight is the token embedding (tied, as in GPT-2)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # each rank scores a slice of the vocabulary; logits gathered

    def __init__(self, config: MiniGPTConfig):
        super().__init__(config)
        self.transformer = MiniGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
            transformers): the loss against `labels` comes from the hidden states and `lm_head`'s weight a chunk of
            rows at a time, and `logits` is None. The (B, T, vocab) logits and their fp32 copies, the largest tensors
            of a small GPT's training step, never exist whole. The training scripts and the benchmark turn it on.
            Refused where `lm_head` is more than a plain nn.Linear (an adapter, a tensor-parallel plan).
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
            loss = chunked_lm_loss(hidden_states, self.lm_head, labels, **kwargs)
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

    def _prepare_model_inputs(self, *args, **kwargs):
        inputs, input_name, model_kwargs = super()._prepare_model_inputs(*args, **kwargs)
        if input_name == "input_ids":
            check_values(self.config, inputs)  # the prompt, once per call
        return inputs, input_name, model_kwargs

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
