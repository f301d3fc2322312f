"""MiniGPT configuration: GPT-2's hyper-parameters, under GPT-2's names."""

from transformers import PretrainedConfig

# GPT-2 config fields with no MiniGPT meaning: the double-heads summary, a mixed-precision attention tweak, ...
GPT2_ONLY_FIELDS = {
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "reorder_and_upcast_attn", "add_cross_attention", "n_ctx", "model_type", "architectures", "auto_map",
    "transformers_version",
}


class MiniGPTConfig(PretrainedConfig):
    r"""
    Configuration of a MiniGPT model. Field names and defaults are GPT-2's (`GPT2Config`), so a GPT-2
    `config.json` reads as a MiniGPT one and the defaults build the 124M-parameter GPT-2.

    Args:
        vocab_size: number of token ids the embedding knows.
        n_positions: longest sequence the learned position embedding covers.
        n_embd: width of the residual stream.
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide `n_embd`.
        n_inner: hidden width of the MLP; `None` means `4 * n_embd`.
        activation_function: MLP non-linearity, any key of `transformers.activations.ACT2FN`.
        resid_pdrop, embd_pdrop, attn_pdrop: dropout on residual branches, embeddings and attention weights.
        layer_norm_epsilon: epsilon of every LayerNorm.
        initializer_range: standard deviation of the normal weight init.
        scale_attn_weights: divide attention scores by `sqrt(head_dim)`.
        scale_attn_by_inverse_layer_idx: further divide attention scores of layer `i` by `i + 1`.

    Example:

    ```python
    >>> from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM
    >>> model = MiniGPTForCausalLM(MiniGPTConfig(n_layer=2, n_head=2, n_embd=64))
    ```
    """

    model_type = "minigpt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun): every rank holds whole heads of q,
    # k and v and a slice of the MLP; the projections back into the residual stream sum over ranks. The token
    # embedding, and with it the tied LM head, is split over the vocabulary (logits are gathered); positions stay
    # whole.
    base_model_tp_plan = {
        "wte": "embedding_rowwise",
        "h.*.attn.q_proj": "colwise",
        "h.*.attn.k_proj": "colwise",
        "h.*.attn.v_proj": "colwise",
        "h.*.attn.c_proj": "rowwise",
        "h.*.mlp.c_fc": "colwise",
        "h.*.mlp.c_proj": "rowwise",
    }
    base_model_pp_plan = {
        "wte": (["input_ids"], ["inputs_embeds"]),
        "h": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "ln_f": (["hidden_states"], ["hidden_states"]),
    }
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        # A GPT-2 config.json (a folder or a hub id) reads as a MiniGPT one: same fields, some of them unused.
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "gpt2":
            config_dict = cls.dict_from_gpt2(config_dict)
        return config_dict, kwargs

    @classmethod
    def dict_from_gpt2(cls, gpt2_config: dict) -> dict:
        if gpt2_config.get("add_cross_attention"):
            raise ValueError("This GPT-2 checkpoint has cross-attention layers; MiniGPT is a decoder-only model.")
        fields = {key: value for key, value in gpt2_config.items() if key not in GPT2_ONLY_FIELDS}
        return {**fields, "model_type": cls.model_type}

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_sizes()

    def _check_sizes(self):
        # Checked here, where the user typed them, rather than as a shape error deep inside the model.
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"MiniGPTConfig.{name} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"MiniGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd // n_head channels."
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"MiniGPTConfig.{name} is a dropout probability, in [0, 1); got {value!r}.")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"MiniGPTConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}.")


__all__ = ["MiniGPTConfig", "GPT2_ONLY_FIELDS"]
