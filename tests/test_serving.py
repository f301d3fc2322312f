"""What serving engines rely on: a tensor-parallel plan that shards over processes, keyword arguments that reach
every attention call (vLLM's and SGLang's Transformers backend) and continuous batching. (The OpenAI-compatible
endpoints are in test_chat.py, `transformers serve`, and test_vllm.py.)"""

import json
import os
import sys
import textwrap

import pytest
import torch
from transformers import AttentionInterface, GenerationConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_minigpt import MiniGPTForCausalLM
from hf_minigpt.quantize import quantize_int8

import launches
from conftest import tiny_config

PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [13]]


@pytest.fixture
def lively_model():
    """A tiny random model whose greedy continuations vary (a larger init than GPT-2's)."""
    torch.manual_seed(0)
    return MiniGPTForCausalLM(tiny_config(initializer_range=0.5)).eval()


@torch.no_grad()
def greedy(model, prompt, steps):
    """The argmax continuation by full forward passes: no cache, no generate(), no end-of-text rule."""
    input_ids = torch.tensor([prompt])
    for _ in range(steps):
        input_ids = torch.cat([input_ids, model(input_ids).logits[:, -1:].argmax(-1)], dim=-1)
    return input_ids[0, len(prompt):].tolist()


TP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    import hf_minigpt
    from transformers import AutoModelForCausalLM, DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], distributed_config=DistributedConfig(tp_plan="auto"))
    model.eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids[:1, :4], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    shapes = {name: list(local(p).shape) for name, p in model.named_parameters() if "h.0." in name or "wte" in name}
    if os.environ["RANK"] == "0":
        print("RESULT", json.dumps({"logits": logits.tolist(), "tokens": tokens.tolist(), "shapes": shapes}))
""")


def test_tensor_parallel_over_two_processes_matches_one_process(lively_model, tmp_path):
    lively_model.save_pretrained(tmp_path / "model")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
    (tmp_path / "tp.py").write_text(TP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(tmp_path / "tp.py"),
               str(tmp_path / "model"), json.dumps(ids.tolist())]
    result = launches.run(command, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    sharded = json.loads(result.stdout.split("RESULT", 1)[1])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(sharded["logits"]), lively_model(ids).logits, atol=1e-4, rtol=0)
    expected = lively_model.generate(ids[:1, :4], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert sharded["tokens"] == expected.tolist()
    n_embd = lively_model.config.n_embd  # 32: each of the two ranks holds half of every projection
    assert sharded["shapes"] == {
        "transformer.wte.weight": [11, n_embd],  # 21 tokens: 11 on rank 0, 10 on rank 1 (and the tied head alike)
        "transformer.h.0.ln_1.weight": [n_embd], "transformer.h.0.ln_1.bias": [n_embd],
        "transformer.h.0.attn.q_proj.weight": [n_embd // 2, n_embd], "transformer.h.0.attn.q_proj.bias": [16],
        "transformer.h.0.attn.k_proj.weight": [n_embd // 2, n_embd], "transformer.h.0.attn.k_proj.bias": [16],
        "transformer.h.0.attn.v_proj.weight": [n_embd // 2, n_embd], "transformer.h.0.attn.v_proj.bias": [16],
        "transformer.h.0.attn.c_proj.weight": [n_embd, n_embd // 2], "transformer.h.0.attn.c_proj.bias": [n_embd],
        "transformer.h.0.ln_2.weight": [n_embd], "transformer.h.0.ln_2.bias": [n_embd],
        "transformer.h.0.mlp.c_fc.weight": [2 * n_embd, n_embd], "transformer.h.0.mlp.c_fc.bias": [2 * n_embd],
        "transformer.h.0.mlp.c_proj.weight": [n_embd, 2 * n_embd], "transformer.h.0.mlp.c_proj.bias": [n_embd],
    }


def test_forward_keyword_arguments_reach_every_layers_attention(model):
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs.get("engine_metadata")))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_engine", recording)
    AttentionMaskInterface.register("recording_engine", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation("recording_engine")
    model(torch.tensor([[3, 4, 5]]), engine_metadata={"slot": 7})
    assert seen == [(layer, {"slot": 7}) for layer in range(model.config.n_layer)]


def test_the_flags_and_auto_map_engines_read(model, tmp_path):
    assert model._supports_attention_backend and model._can_compile_fullgraph
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_minigpt.MiniGPTModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_continuous_batching_gives_the_greedy_tokens_of_each_prompt(lively_model, weights):
    if weights == "int8":  # the int8 model's own full forwards are the reference
        quantize_int8(lively_model)
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=1)
    outputs = lively_model.generate_batch(inputs=PROMPTS, generation_config=config)
    by_prompt = {tuple(output.prompt_ids): output.generated_tokens for output in outputs.values()}
    assert by_prompt == {tuple(prompt): greedy(lively_model, prompt, 6) for prompt in PROMPTS}
