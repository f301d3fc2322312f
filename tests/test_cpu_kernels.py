"""`use_cpu_kernels`: products in blocks on the CPUs a rule names, the same numbers as nn.Linear's. Every rule is
forced here, whatever CPU runs the tests."""

import pytest
import torch
from torch import nn

import hf_minigpt.cpu_kernels as cpu_kernels
from hf_minigpt import MiniGPTForCausalLM
from hf_minigpt.cpu_kernels import BLOCK, CPU, BlockedLinear, linear_in_blocks, use_cpu_kernels

from conftest import tiny_config

INTEL_AVX512 = CPU("mkl", "GenuineIntel", "AVX512")
AMD_AVX512 = CPU("mkl", "AuthenticAMD", "AVX512")
AMD_AVX2 = CPU("mkl", "AuthenticAMD", "AVX2")
WITHOUT_MKL = CPU("other", "GenuineIntel", "AVX512")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 12, 13])
def test_a_product_in_blocks_equals_the_plain_one_with_gradients(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(32, 2 * BLOCK + 5, bias=bias)  # two whole blocks and a rest
    x = torch.randn(rows, 1, 32, requires_grad=True)
    results = []
    for product in (lambda x: linear_in_blocks(x, linear.weight, linear.bias), linear):
        output = product(x)
        upstream = torch.linspace(-1, 1, output.numel()).view_as(output)
        results.append([output, *torch.autograd.grad(output, [x, *linear.parameters()], upstream)])
    for blocked, plain in zip(*results):
        torch.testing.assert_close(blocked, plain)


@pytest.mark.parametrize("cpu, rows", [(INTEL_AVX512, (4, 12)), (AMD_AVX512, (1, 16)), (AMD_AVX2, None),
                                       (WITHOUT_MKL, None)])
def test_the_rule_names_the_cpus_that_take_blocks(cpu, rows):
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300))  # c_fc 256 features, lm_head 300
    use_cpu_kernels(model, cpu)
    blocked = {name for name, module in model.named_modules() if isinstance(module, BlockedLinear)}
    if rows is None:
        assert not blocked
        return
    # Projections of at least two blocks' features: each block's c_fc (256) and the LM head (300).
    assert blocked == {f"transformer.h.{i}.mlp.c_fc" for i in range(2)} | {"lm_head"}
    assert {model.get_submodule(name).rows for name in blocked} == {rows}


def test_mkl_held_to_avx2_reads_as_avx2(monkeypatch):
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert CPU.this_machine().vector == "AVX2"
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "AuthenticAMD")
    assert CPU.this_machine().blocked_rows is None


def test_greedy_decoding_of_a_batch_in_blocks_gives_the_same_tokens(monkeypatch):
    torch.manual_seed(0)
    plain = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300)).eval()
    prompt = torch.randint(2, 300, (4, 5), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)
    expected = plain.generate(prompt, **options)
    blocked_calls = []
    monkeypatch.setattr(cpu_kernels, "linear_in_blocks",
                        lambda *args: blocked_calls.append(1) or linear_in_blocks(*args))
    fast = use_cpu_kernels(plain, INTEL_AVX512)
    assert torch.equal(fast.generate(prompt, **options), expected)
    # Each of the 5 one-token steps at 4 rows: every c_fc (256 features) and the head (300); the prompt's forward:
    # the head, which scores the last position only.
    assert len(blocked_calls) == 5 * (fast.config.n_layer + 1) + 1


def test_the_weights_stay_tied_and_save_as_before(tmp_path):
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    use_cpu_kernels(model, AMD_AVX512)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = MiniGPTForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(module, BlockedLinear) for module in loaded.modules())
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in before.items())
