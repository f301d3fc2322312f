"""`use_cpu_kernels`: streamed, oneDNN and blocked products on the CPUs a rule names, nn.Linear's numbers (to a
rounding). Every rule is forced here, whatever CPU runs the tests."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_minigpt.cpu_kernels as cpu_kernels
import hf_minigpt.loss_minigpt as loss_minigpt
from hf_minigpt import MiniGPTForCausalLM
from hf_minigpt.cpu_kernels import (ANY, BLOCK, CPU, CPULinear, OneDNNHeadMatmuls, Products, linear_in_blocks,
                                    use_cpu_kernels)
from hf_minigpt.loss_minigpt import HeadMatmuls
from hf_minigpt.quantize import cpu_compile_config

from conftest import tiny_config

INTEL_AVX512 = CPU("mkl", "GenuineIntel", "AVX512")
AMD_AVX512 = CPU("mkl", "AuthenticAMD", "AVX512")
AMD_AVX2 = CPU("mkl", "AuthenticAMD", "AVX2")
AMD_AVX2_WITHOUT_COMPILER = CPU("mkl", "AuthenticAMD", "AVX2", compiler=False)
INTEL_AVX2 = CPU("mkl", "GenuineIntel", "AVX2")
WITHOUT_MKL = CPU("other", "GenuineIntel", "AVX512")


def output_and_gradients(product, x, linear: nn.Linear) -> list[torch.Tensor]:
    """`product(x)`, and the gradients of a fixed weighting of it for `x` and `linear`'s parameters, those that
    require one."""
    output = product(x)
    upstream = torch.linspace(-1, 1, output.numel()).view_as(output)
    wanted = [tensor for tensor in (x, *linear.parameters()) if tensor.requires_grad]
    return [output, *torch.autograd.grad(output, wanted, upstream)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 4, 12, 13])
def test_a_product_in_blocks_equals_the_plain_one_with_gradients(rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(32, 2 * BLOCK + 5, bias=bias)  # two whole blocks and a rest
    x = torch.randn(rows, 1, 32, requires_grad=True)
    in_blocks = output_and_gradients(lambda x: linear_in_blocks(x, linear.weight, linear.bias), x, linear)
    for blocked, plain in zip(in_blocks, output_and_gradients(linear, x, linear)):
        torch.testing.assert_close(blocked, plain)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 200), (1, 200), (2, 1, 200), (3, 5, 200), (0, 200), (2, 0, 200)])
@pytest.mark.parametrize("products", [Products(streamed=15), Products(onednn=(1, 15))])
@torch.no_grad()
def test_streamed_and_onednn_products_equal_the_plain_one(products, shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(200, 300, bias=bias)
    x = torch.randn(shape)
    torch.testing.assert_close(CPULinear(linear, products)(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wanted", ["all", "frozen weight", "input without gradient", "a slice of a wider input"])
def test_onednns_product_equals_the_plain_one_with_gradients(bias, wanted):
    torch.manual_seed(0)
    linear = nn.Linear(200, 300, bias=bias)
    x = torch.randn(3, 5, 400 if wanted == "a slice of a wider input" else 200)[..., :200]
    x.requires_grad_(wanted != "input without gradient")
    linear.weight.requires_grad_(wanted != "frozen weight")
    through_onednn = output_and_gradients(CPULinear(linear, Products(onednn=(1, ANY))), x, linear)
    for onednn, plain in zip(through_onednn, output_and_gradients(linear, x, linear)):
        torch.testing.assert_close(onednn, plain, rtol=1e-5, atol=1e-5)


def test_a_second_derivative_through_onednns_product_is_refused():
    linear = CPULinear(nn.Linear(8, 8), Products(onednn=(1, ANY)))
    x = torch.randn(2, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(linear(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_projections_with_hooks_keep_nn_linear():
    model = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300))
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, inputs, output: None)
    use_cpu_kernels(model, AMD_AVX512)
    assert type(model.transformer.h[0].mlp.c_fc) is nn.Linear
    assert isinstance(model.transformer.h[1].mlp.c_fc, CPULinear)


def test_training_takes_onednns_products_forward_and_backward_and_learns_the_same(monkeypatch):
    """Each step: 12 products forward (2 x 6 projections) and for each a gradient of its input and of its weight,
    then the chunked loss's 3 products with the head's weight for each of its 3 chunks. The evaluation after the
    steps takes the forward products and the chunks' logits."""
    monkeypatch.setattr(loss_minigpt, "LOSS_CHUNK_ELEMENTS", 300 * 12)  # 3 chunks of the 32 rows
    torch.manual_seed(0)
    plain = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300))
    fast = use_cpu_kernels(copy.deepcopy(plain), AMD_AVX512)
    counter = counted(monkeypatch, fast, "oneDNN")
    batch = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (plain, fast):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            loss = model(batch, labels=batch, skip_logits=True).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            losses.append([loss.item(), model(batch, labels=batch, skip_logits=True).loss.item()])
    assert len(counter) == 3 * (12 + 2 * 12 + 3 * 3) + (12 + 3)
    assert losses[0][1] < losses[0][0] - 0.1  # it learns
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_chunked_loss_multiplies_by_the_head_through_onednn_in_fp32(monkeypatch, autocast):
    """`skip_logits=True` with the head's products through oneDNN: the loss and both gradients of a plain
    cross-entropy, over several chunks, with ignored labels; under bf16 autocast, PyTorch's products, exactly."""
    monkeypatch.setattr(loss_minigpt, "LOSS_CHUNK_ELEMENTS", 1000 * 12)  # chunks of 10, 11 and 11 rows
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=False)
    hidden = torch.randn(2, 16, 64, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 16))
    labels[0, :5] = -100

    def loss_and_gradients(loss_of_hidden):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of_hidden(hidden)
        return [loss, *torch.autograd.grad(loss, [hidden, head.weight])]

    if autocast:  # the chunked loss with the plain head
        expected = loss_and_gradients(lambda hidden: loss_minigpt.chunked_lm_loss(hidden, head, labels))
    else:
        expected = loss_and_gradients(lambda hidden: F.cross_entropy(head(hidden)[:, :-1].flatten(0, 1),
                                                                     labels[:, 1:].flatten()))
    counter = counted(monkeypatch, None, "oneDNN")
    fast_head = CPULinear(head, Products(onednn=(1, ANY)))
    through_onednn = loss_and_gradients(lambda hidden: loss_minigpt.chunked_lm_loss(hidden, fast_head, labels))
    assert len(counter) == (0 if autocast else 3 * 3)
    for onednn, plain in zip(through_onednn, expected):
        torch.testing.assert_close(onednn, plain, rtol=0 if autocast else 1e-5, atol=0 if autocast else 1e-5)


def test_the_loss_takes_onednns_products_only_in_fp32_within_the_rule_and_uncompiled(monkeypatch):
    head = CPULinear(nn.Linear(8, 16, bias=False), Products(onednn=(1, 12)))
    assert head.loss_matmuls(12, torch.float32) is OneDNNHeadMatmuls
    assert head.loss_matmuls(13, torch.float32) is HeadMatmuls
    assert head.loss_matmuls(12, torch.bfloat16) is HeadMatmuls
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert head.loss_matmuls(12, torch.float32) is HeadMatmuls


@torch.no_grad()
def test_the_loss_asks_the_rule_for_its_largest_chunk(monkeypatch):
    """2048 rows at most 667 a chunk go as 4 x 512: a rule taking up to 512 rows through oneDNN takes every chunk."""
    monkeypatch.setattr(loss_minigpt, "LOSS_CHUNK_ELEMENTS", 667 * 21 + 20)
    head = CPULinear(nn.Linear(4, 21, bias=False), Products(onednn=(1, 512)))
    counter = counted(monkeypatch, None, "oneDNN")
    loss_minigpt.chunked_lm_loss(torch.randn(1, 2048, 4), head, torch.randint(0, 21, (1, 2048)))
    assert len(counter) == 4


@torch.no_grad()
def test_past_the_shapes_torch_compile_keeps_a_streamed_product_is_nn_linears():
    torch._dynamo.reset()
    x = torch.randn(1, 200)
    with torch._dynamo.config.patch(recompile_limit=1):
        for out_features in (300, 301):  # a compiled product for the first shape; the second is one past the limit
            linear = nn.Linear(200, out_features, bias=False)  # (the BLAS may round mm + bias otherwise than addmm)
            output = CPULinear(linear, Products(streamed=1))(x)
    torch._dynamo.reset()
    assert torch.equal(output, linear(x))


@pytest.mark.parametrize("cpu, products", [
    (INTEL_AVX512, Products(blocked=(4, 12))),
    (AMD_AVX512, Products(streamed=1, onednn=(1, ANY), blocked=(2, 16))),
    (AMD_AVX2, Products(streamed=1, blocked=(1, 16))),
    (AMD_AVX2_WITHOUT_COMPILER, Products(blocked=(1, 16))),
    (INTEL_AVX2, None),
    (WITHOUT_MKL, None),
])
def test_the_rule_names_the_products_of_each_cpu(cpu, products):
    assert cpu.products == products
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300))
    use_cpu_kernels(model, cpu)
    replaced = {name: module.products for name, module in model.named_modules() if isinstance(module, CPULinear)}
    projections = {f"transformer.h.{i}.{name}" for i in range(2)
                   for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert replaced == ({name: products for name in projections | {"lm_head"}} if products else {})


def test_this_machine_reads_mkl_held_to_avx2_and_a_missing_compiler(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert CPU.this_machine() == AMD_AVX2
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    assert CPU.this_machine() == AMD_AVX2_WITHOUT_COMPILER


def counted(monkeypatch, model, product):
    """Calls of the CPU's `product` ("streamed", "oneDNN" or "in blocks") in `model`'s projections, counted."""
    calls = []
    if product == "streamed":
        for module in model.modules():
            if isinstance(module, CPULinear):
                streamed = module.streamed_product
                module.streamed_product = lambda *args, streamed=streamed: calls.append(1) or streamed(*args)
    else:
        name = {"oneDNN": "onednn_linear", "in blocks": "linear_in_blocks"}[product]
        function = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *args: calls.append(1) or function(*args))
    return calls


def greedy_with_margins(model, prompt, steps):
    """Greedy tokens, after checking that every step's best logit leads the next by more than rounding could move."""
    out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=1,
                         output_logits=True, return_dict_in_generate=True)
    top2 = torch.stack(out.logits).topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-3
    return out.sequences


# A 5-token prompt, then 5 one-token steps. Each step multiplies `batch` rows by the 2 x 6 projections and the head;
# the prompt's forward 5 x `batch` rows by the projections, and the last position's `batch` rows by the head.
@pytest.mark.parametrize("batch, cpu, product, calls", [
    (4, INTEL_AVX512, "in blocks", 5 * 3 + 1),  # 4-12 rows; of 256 features or more: each c_fc, the head
    (1, AMD_AVX512, "streamed", 5 * 13 + 1),  # one row
    (4, AMD_AVX512, "oneDNN", 5 * 13 + 13),  # any rows, where not streamed
])
def test_greedy_decoding_takes_the_rules_product_and_gives_the_same_tokens(monkeypatch, batch, cpu, product, calls):
    torch.manual_seed(0)
    plain = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300, initializer_range=0.2)).eval()
    prompt = torch.randint(2, 300, (batch, 5), generator=torch.Generator().manual_seed(0))
    expected = greedy_with_margins(plain, prompt, 6)
    fast = use_cpu_kernels(plain, cpu)
    counter = counted(monkeypatch, fast, product)
    torch._dynamo.reset()  # forget the graphs earlier tests compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(greedy_with_margins(fast, prompt, 6), expected)
    assert len(counter) == calls
    # Streamed products are compiled, one graph for each of the 4 weight shapes; none when nothing streams.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == (4 if product == "streamed" else 0)


@pytest.mark.parametrize("batch", [1, 4])
def test_a_compiled_decode_step_with_the_rules_products_gives_the_same_tokens(batch):
    """A static cache compiles the step, the streamed product inside it; oneDNN's product gives way to inductor's."""
    torch.manual_seed(0)
    plain = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300, initializer_range=0.2)).eval()
    prompt = torch.randint(2, 300, (batch, 5), generator=torch.Generator().manual_seed(0))
    expected = greedy_with_margins(plain, prompt, 6)
    fast = use_cpu_kernels(plain, AMD_AVX512)
    compiled = fast.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1,
                             cache_implementation="static", compile_config=cpu_compile_config())
    assert torch.equal(compiled, expected)


def test_the_weights_stay_tied_and_save_as_before(tmp_path):
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(n_embd=64, vocab_size=300))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    use_cpu_kernels(model, AMD_AVX512)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = MiniGPTForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(module, CPULinear) for module in loaded.modules())
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in before.items())
