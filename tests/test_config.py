import pytest

from hf_minigpt import MiniGPTConfig


def test_defaults_are_gpt2_124m():
    config = MiniGPTConfig()
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (
        50257, 1024, 768, 12, 12
    )
    assert config.activation_function == "gelu_new" and config.tie_word_embeddings


def test_attribute_map_aliases_gpt2_names():
    config = MiniGPTConfig(n_embd=64, n_layer=3, n_head=4, n_positions=128)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 3, 4)
    assert config.max_position_embeddings == 128


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=10, n_head=3), r"n_embd \(10\) must be divisible by n_head \(3\)"),
        (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer, got -5"),
        (dict(n_inner=0), "n_inner must be a positive integer, got 0"),
        (dict(attn_pdrop=1.0), r"attn_pdrop .* \[0, 1\); got 1.0"),
        (dict(resid_pdrop=-0.1), r"resid_pdrop .* \[0, 1\); got -0.1"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiniGPTConfig(**kwargs)


def test_round_trips_through_json(tmp_path):
    MiniGPTConfig(n_layer=3, n_inner=100, scale_attn_by_inverse_layer_idx=True).save_pretrained(tmp_path)
    loaded = MiniGPTConfig.from_pretrained(tmp_path)
    assert (loaded.n_layer, loaded.n_inner, loaded.scale_attn_by_inverse_layer_idx) == (3, 100, True)
