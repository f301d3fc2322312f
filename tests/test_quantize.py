"""Int8 decoding: its products, what it costs in perplexity, that generate() runs it eagerly and compiled with a
static cache, and the sampling CLI."""

import copy
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import WORDS, tiny_config

from hf_minigpt import MiniGPTForCausalLM
from hf_minigpt.generate_cli import text_perplexity
from hf_minigpt.quantize import Int8Linear, cpu_compile_config, quantize_int8


def sentences(count: int, seed: int) -> torch.Tensor:
    """Token ids of short sentences of a small grammar ("the big cat sat on the red mat"), EOS before each."""
    rng = random.Random(seed)
    ids = {word: i + 3 for i, word in enumerate(WORDS)}
    out = []
    for _ in range(count):
        words = ["the", rng.choice(["big", "small"]), rng.choice(["cat", "dog"]), rng.choice(["sat", "ran"]), "on",
                 "the", rng.choice(["red", "blue"]), rng.choice(["mat", "log"])]
        out += [0, *(ids[word] for word in words)]
    return torch.tensor(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MiniGPT that has learned the grammar (300 AdamW steps, a few seconds), saved with its tokenizer."""
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(n_embd=64, n_positions=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = sentences(400, seed=0)
    for step in range(300):
        starts = torch.randint(0, len(data) - 33, (16,))
        batch = torch.stack([data[s: s + 33] for s in starts])
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_int8_changes_perplexity_by_less_than_one_percent(trained):
    held_out = sentences(100, seed=1)
    before = text_perplexity(trained, held_out, block_size=64)
    assert before < 2.5  # learned: a perfect model scores 2 ** (5/9) = 1.47 (5 coin flips in 9 tokens), chance 21
    int8 = quantize_int8(copy.deepcopy(trained))
    after = text_perplexity(int8, held_out, block_size=64)
    assert abs(after / before - 1) < 0.01
    assert isinstance(int8.lm_head, Int8Linear) and isinstance(int8.transformer.h[0].mlp.c_fc, Int8Linear)
    assert int8.transformer.wte.weight.dtype == torch.float32  # the embedding lookup stays exact


def test_an_int8_product_is_integer_arithmetic_row_by_row():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    rows = torch.randn(5, 32) * torch.tensor([[0.01], [1], [3], [100], [1e4]])  # tokens of very different scales
    int8 = Int8Linear(weight, bias)
    row_scale = rows.abs().amax(1, keepdim=True) / 63  # 7-bit activations, one scale per row
    weight_scale = weight.abs().amax(1) / 127  # int8 weights, one scale per output channel
    integers = torch.round(rows / row_scale).double() @ torch.round(weight / weight_scale[:, None]).double().T
    expected = integers * row_scale.double() * weight_scale.double() + bias.double()
    torch.testing.assert_close(int8(rows).double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    assert all(torch.equal(int8(rows[i:i + 1]), int8(rows)[i:i + 1]) for i in range(5))  # alone as in a batch
    exact = torch.nn.functional.linear(rows, weight, bias)
    assert ((int8(rows) - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.02


def test_quantize_int8_refuses_what_it_cannot_run(model):
    with pytest.raises(ValueError, match="has no MiniGPT transformer blocks to quantize"):
        quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="runs on the CPU, and this model is on meta: quantize it on the CPU"):
        quantize_int8(model.to("meta"))


def test_int8_generate_eager_and_compiled_with_a_static_cache(model):
    quantize_int8(model)
    prompt = torch.tensor([[0, 3, 4], [0, 5, 6]])
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=1)
    eager = model.generate(prompt, **options)
    compiled = model.generate(prompt, cache_implementation="static", compile_config=cpu_compile_config(), **options)
    assert torch.equal(eager, compiled)
    with torch.no_grad():  # greedy: each new token is the argmax of a full forward of the int8 model
        expected = model(eager[:, :-1]).logits[:, prompt.shape[1] - 1:].argmax(-1)
    assert torch.equal(eager[:, prompt.shape[1]:], expected)


def test_an_int8_model_refuses_to_be_saved(model, tmp_path):
    with pytest.raises(ValueError, match="for inference only and cannot be saved: save the model before"):
        quantize_int8(model).save_pretrained(tmp_path / "int8")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hf_minigpt.generate_cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_generate_cli_int8_compiled_and_perplexity(trained, tokenizer, tmp_path):
    folder = tmp_path / "model"
    trained.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = run_cli(folder, "--prompt", "the big", "--greedy", "--max_new_tokens", "7", "--int8", "--compile")
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    assert words[:2] == ["the", "big"] and words[2] in ("cat", "dog") and words[4:6] == ["on", "the"]

    (tmp_path / "held_out.txt").write_text(" <eos> ".join(["the small dog ran on the blue log"] * 20))
    result = run_cli(folder, "--int8", "--perplexity", tmp_path / "held_out.txt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout and "with int8 weights" in result.stdout

    result = run_cli(tmp_path / "missing", "--prompt", "the")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "error" in result.stderr


def test_a_mistyped_model_folder_is_named_at_once_without_asking_the_hub(tmp_path):
    (tmp_path / "runs" / "lang").mkdir(parents=True)
    # A hub the test cannot reach: asked, it would be named in the message ("the hub could not give it").
    result = subprocess.run([sys.executable, "-m", "hf_minigpt.generate_cli", "runs/lnag", "--prompt", "Python"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 2 and result.stderr == "minigpt-generate: error: MODEL runs/lnag: no such folder\n"
