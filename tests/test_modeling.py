import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DynamicCache,
)

from hf_minigpt import (
    MiniGPTForCausalLM,
    MiniGPTForQuestionAnswering,
    MiniGPTForSequenceClassification,
    MiniGPTForTokenClassification,
    MiniGPTModel,
)

from conftest import tiny_config

AUTO_HEADS = [
    (AutoModel, MiniGPTModel, "last_hidden_state"),
    (AutoModelForCausalLM, MiniGPTForCausalLM, "logits"),
    (AutoModelForSequenceClassification, MiniGPTForSequenceClassification, "logits"),
    (AutoModelForTokenClassification, MiniGPTForTokenClassification, "logits"),
    (AutoModelForQuestionAnswering, MiniGPTForQuestionAnswering, "start_logits"),
]


def ids(*rows):
    return torch.tensor(rows)


def test_parameter_names_are_gpt2s_with_q_k_v_apart(model):
    names = set(model.state_dict())
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                 "transformer.h.0.attn.q_proj.weight", "transformer.h.0.attn.k_proj.bias",
                 "transformer.h.0.attn.v_proj.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.1.ln_2.bias",
                 "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight",
                 "lm_head.weight"]:
        assert name in names
    assert model.transformer.h[0].attn.q_proj.weight.shape == (32, 32)  # nn.Linear: (out, in)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (4 * 32, 32)


def test_lm_head_is_tied_to_token_embedding(model):
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_residual_projections_get_gpt2_scaled_init():
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(tiny_config(n_embd=256, n_head=4, n_layer=8))
    c_proj_std = torch.cat([block.attn.c_proj.weight.flatten() for block in model.transformer.h]).std().item()
    q_proj_std = torch.cat([block.attn.q_proj.weight.flatten() for block in model.transformer.h]).std().item()
    assert q_proj_std == pytest.approx(0.02, rel=0.02)
    assert c_proj_std == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.02)


def test_causal_lm_loss_is_next_token_cross_entropy(model):
    input_ids = ids([3, 4, 5, 6, 7])
    out = model(input_ids, labels=input_ids)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], input_ids[0, 1:])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("auto_class, model_class, output_name", AUTO_HEADS)
def test_save_and_load_through_auto_class(tmp_path, auto_class, model_class, output_name):
    torch.manual_seed(0)
    model = model_class(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), type(model.config))
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is model_class
    input_ids = ids([3, 4, 5, 6], [7, 8, 9, 10])
    torch.testing.assert_close(getattr(loaded(input_ids), output_name), getattr(model(input_ids), output_name))


def test_saved_folder_carries_code_and_auto_map(tmp_path, model):
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_minigpt.MiniGPTForSequenceClassification"
    # the model file and the sibling modules it imports, which save_pretrained copies beside it
    for module in ("modeling", "configuration", "compat", "conversion", "loss", "checks"):
        assert (tmp_path / f"{module}_minigpt.py").is_file(), module


def test_trust_remote_code_loads_without_hf_minigpt(tmp_path, model):
    model.save_pretrained(tmp_path)
    input_ids = ids([3, 4, 5, 6])
    expected = model(input_ids).logits
    torch.save(input_ids, tmp_path / "input_ids.pt")
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class BlockHfMinigpt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "hf_minigpt":
                    raise ImportError("hf_minigpt is blocked in this test")
        sys.meta_path.insert(0, BlockHfMinigpt())
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert "hf_minigpt" not in sys.modules and "transformers_modules" in type(model).__module__
        torch.save(model(torch.load({str(tmp_path / "input_ids.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
        classifier = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        print(type(classifier).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "MiniGPTForSequenceClassification"
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.23"),
                    reason="transformers 5.19 (vLLM's) warns in its own pipeline about its generation_config")
def test_loading_the_readmes_way_prints_nothing_but_the_loading_bar(tmp_path, model, tokenizer):
    """As remote code and through pipeline, as the README and the model card load a folder: no warning on stderr,
    only the bar transformers draws while it loads any model's weights."""
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM, pipeline
        AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        pipeline("text-generation", model={str(tmp_path)!r}, trust_remote_code=True)("the cat", max_new_tokens=2)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in printed if not line.startswith("Loading weights")] == []


@pytest.mark.parametrize("padded", [False, True])
def test_eager_and_sdpa_agree(model, padded):
    input_ids = ids([3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14])
    attention_mask = ids([1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1] if padded else [1, 1, 1, 1, 1, 1])
    model.set_attn_implementation("sdpa")
    sdpa = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    model.set_attn_implementation("eager")
    eager = model(input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True)
    real = attention_mask.bool()  # padded positions attend to nothing and hold no meaningful output
    torch.testing.assert_close(sdpa.logits[real], eager.logits[real], atol=1e-5, rtol=1e-5)
    assert len(eager.hidden_states) == 3 and len(eager.attentions) == 2
    assert eager.attentions[0].shape == (2, 4, 6, 6)
    # Causal: no weight above the diagonal; padding: no weight on padded keys.
    assert eager.attentions[0][0, :, 0, 1:].abs().max() == 0
    if padded:
        assert eager.attentions[0][1, :, 2:, :2].abs().max() == 0


@torch.no_grad()  # flex attention has no backward on CPU
def test_flex_attention_agrees_with_sdpa(model):
    input_ids = ids([3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14])
    attention_mask = ids([1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1])
    expected = model(input_ids, attention_mask=attention_mask).logits
    model.set_attn_implementation("flex_attention")
    flex = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(flex[attention_mask.bool()], expected[attention_mask.bool()], atol=1e-5, rtol=1e-5)


def test_incremental_decoding_with_cache_equals_full_forward(model):
    input_ids = ids([3, 4, 5, 6, 7, 8, 9, 10])
    full = model(input_ids).logits
    cache = DynamicCache(config=model.config)
    steps = [model(input_ids[:, :5], cache=cache, use_cache=True).logits]
    for t in range(5, 8):
        steps.append(model(input_ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 8


def test_left_padding_with_position_ids_equals_unpadded(model):
    alone = model(ids([5, 6, 7])).logits[0, -1]
    attention_mask = ids([0, 0, 1, 1, 1])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(ids([1, 1, 5, 6, 7]), attention_mask=attention_mask, position_ids=position_ids).logits[0, -1]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(config):
    input_ids = ids([3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14])

    def gradients(checkpointing):
        torch.manual_seed(0)
        model = MiniGPTForCausalLM(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids, labels=input_ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_return_dict_false_gives_tuples(model):
    input_ids = ids([3, 4, 5])
    loss, logits = model(input_ids, labels=input_ids, return_dict=False, use_cache=False)[:2]
    torch.testing.assert_close(logits, model(input_ids).logits)
    assert loss.ndim == 0


class TestSequenceClassification:
    def test_pools_the_last_non_pad_token_with_right_or_left_padding(self):
        torch.manual_seed(0)
        model = MiniGPTForSequenceClassification(tiny_config(num_labels=3)).eval()
        alone = model(ids([5, 6, 7])).logits[0]
        right = model(ids([5, 6, 7, 1, 1]), attention_mask=ids([1, 1, 1, 0, 0])).logits[0]
        torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
        mask = ids([0, 0, 1, 1, 1])
        left = model(ids([1, 1, 5, 6, 7]), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        torch.testing.assert_close(left.logits[0], alone, atol=1e-5, rtol=1e-5)
        # The pooled logits are the score head applied to the last real token's hidden state.
        hidden = model.transformer(ids([5, 6, 7])).last_hidden_state[0, -1]
        torch.testing.assert_close(alone, model.score(hidden))

    def test_problem_types_pick_the_loss(self):
        input_ids = ids([5, 6, 7], [8, 9, 10])
        torch.manual_seed(0)
        single = MiniGPTForSequenceClassification(tiny_config(num_labels=3)).eval()
        out = single(input_ids, labels=ids(2, 0))
        assert single.config.problem_type == "single_label_classification"
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, ids(2, 0)))

        multi = MiniGPTForSequenceClassification(tiny_config(num_labels=3)).eval()
        targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        out = multi(input_ids, labels=targets)
        assert multi.config.problem_type == "multi_label_classification"
        torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))

        regression = MiniGPTForSequenceClassification(tiny_config(num_labels=1)).eval()
        targets = torch.tensor([0.5, -1.5])
        out = regression(input_ids, labels=targets)
        assert regression.config.problem_type == "regression"
        torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), targets))


def test_token_classification_and_question_answering_shapes():
    torch.manual_seed(0)
    input_ids = ids([5, 6, 7, 8])
    tagger = MiniGPTForTokenClassification(tiny_config(num_labels=5)).eval()
    out = tagger(input_ids, labels=ids([0, 1, 2, 3]))
    assert out.logits.shape == (1, 4, 5)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits[0], ids(0, 1, 2, 3)))
    reader = MiniGPTForQuestionAnswering(tiny_config()).eval()
    out = reader(input_ids, start_positions=ids(1), end_positions=ids(2))
    assert out.start_logits.shape == out.end_logits.shape == (1, 4)
    assert out.loss > 0


class TestBadInput:
    def test_token_id_outside_vocabulary(self, model):
        with pytest.raises(ValueError, match=r"Token ids must lie in \[0, vocab_size=21\), got values in \[3, 21\]"):
            model(ids([3, 21]))
        with pytest.raises(ValueError, match="Token ids must lie"):
            model(ids([-1, 3]))

    def test_sequence_longer_than_n_positions(self, model):
        with pytest.raises(ValueError, match="Sequence length 33 .* exceeds n_positions=32"):
            model(torch.full((1, 33), 3))

    def test_cache_plus_new_tokens_longer_than_n_positions(self, model):
        cache = DynamicCache(config=model.config)
        model(torch.full((1, 30), 3), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"Sequence length 33 \(cached 30 \+ new 3\)"):
            model(torch.full((1, 3), 3), cache=cache, use_cache=True)

    def test_no_tokens(self, model):
        with pytest.raises(ValueError, match=r"holds no tokens \(batch 1, sequence length 0\)"):
            model(torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(ValueError, match=r"holds no tokens \(batch 0, sequence length 4\)"):
            model(inputs_embeds=torch.zeros(0, 4, 32))

    def test_attention_mask_of_the_wrong_shape(self, model):
        with pytest.raises(ValueError, match=r"`attention_mask` has shape \(1, 3\).* expected \(2, 4\)"):
            model(ids([3, 4, 5, 6], [3, 4, 5, 6]), attention_mask=ids([1, 1, 1]))

    def test_both_or_neither_of_input_ids_and_inputs_embeds(self, model):
        with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
            model()
        with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
            model(ids([3]), inputs_embeds=torch.zeros(1, 1, 32))

    def test_inputs_embeds_of_the_wrong_width(self, model):
        with pytest.raises(ValueError, match=r"`inputs_embeds` must have shape \(batch, seq_len, 32\)"):
            model(inputs_embeds=torch.zeros(1, 3, 16))

    def test_position_ids_outside_the_table(self, model):
        with pytest.raises(ValueError, match=r"`position_ids` must lie in \[0, 32\)"):
            model(ids([3, 4]), position_ids=ids([31, 32]))

    @pytest.mark.parametrize("compiled", [False, True])
    def test_generate_refuses_a_prompt_outside_the_vocabulary_before_any_step(self, model, compiled):
        """Checked once on the prompt, so a compiled decode says the same as an eager one."""
        from hf_minigpt.quantize import cpu_compile_config

        options = dict(cache_implementation="static", compile_config=cpu_compile_config()) if compiled else {}
        with pytest.raises(ValueError, match=r"Token ids must lie in \[0, vocab_size=21\), got values in \[3, 25\]"):
            model.generate(ids([3, 25]), max_new_tokens=3, do_sample=False, **options)


class TestSkipLogits:
    """`skip_logits=True`: the loss comes from the hidden states a chunk at a time; it must equal the plain one."""

    @pytest.fixture
    def five_row_chunks(self, model, monkeypatch):
        """Losses computed 5 rows at a time, so that the tests' few rows pass through several chunks."""
        import hf_minigpt.loss_minigpt as loss_module

        monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS", 5 * model.config.vocab_size)

    def reference(self, model, input_ids, labels, **kwargs):
        hidden = model.transformer(input_ids).last_hidden_state
        return model.loss_function(model.lm_head(hidden), labels, vocab_size=model.config.vocab_size, **kwargs)

    @pytest.mark.parametrize("loss_scale", [1.0, 0.25])  # 0.25: gradient accumulation divides the loss
    @pytest.mark.parametrize("num_items_in_batch", [None, 37])
    def test_loss_and_gradients_equal_the_full_logits_ones(self, model, five_row_chunks, num_items_in_batch,
                                                           loss_scale):
        model.train()
        input_ids = torch.randint(3, 21, (3, 9), generator=torch.Generator().manual_seed(0))
        labels = input_ids.clone()
        labels[0, :4] = -100  # ignored positions
        out = model(input_ids, labels=labels, num_items_in_batch=num_items_in_batch, skip_logits=True)
        assert out.logits is None
        (out.loss * loss_scale).backward()
        chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        reference = self.reference(model, input_ids, labels, num_items_in_batch=num_items_in_batch)
        (reference * loss_scale).backward()
        torch.testing.assert_close(out.loss, reference, atol=1e-6, rtol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(chunked[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)

    def test_bf16_autocast_stays_close(self, model, five_row_chunks):
        model.train()
        input_ids = torch.randint(3, 21, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids, labels=input_ids, skip_logits=True).loss
        loss.backward()
        embedding_grad = model.transformer.wte.weight.grad.clone()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = self.reference(model, input_ids, input_ids)
        reference.backward()
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, reference.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(embedding_grad, model.transformer.wte.weight.grad, atol=2e-3, rtol=5e-2)

    @pytest.mark.parametrize("rows, most_rows, chunk_rows", [(2048, 667, [512] * 4), (27, 5, [4, 5, 4, 5, 4, 5]),
                                                             (4, 5, [4])])
    def test_the_rows_are_shared_out_evenly_among_the_fewest_chunks(self, monkeypatch, rows, most_rows, chunk_rows):
        """Chunks of at most `most_rows`: 2048 rows go as 4 x 512, not 3 x 667 and a last chunk of 47 rows."""
        import hf_minigpt.loss_minigpt as loss_module

        head = torch.nn.Linear(4, 21, bias=False)
        monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS", most_rows * 21 + 20)  # not quite one more row
        multiplied = []

        def logits(rows, weight, out):
            multiplied.append(len(rows))
            return torch.mm(rows, weight.T, out=out)

        monkeypatch.setattr(loss_module.HeadMatmuls, "logits", staticmethod(logits))
        labels = torch.randint(0, 21, (1, rows), generator=torch.Generator().manual_seed(0))
        hidden = torch.randn(1, rows, 4, generator=torch.Generator().manual_seed(1))
        loss = loss_module.chunked_lm_loss(hidden, head, labels)
        assert multiplied == chunk_rows
        expected = torch.nn.functional.cross_entropy(head(hidden)[0, :-1], labels[0, 1:])
        torch.testing.assert_close(loss, expected)

    def test_a_target_far_below_the_best_logit_keeps_its_exact_loss(self):
        """A probability of e^-150 is 0 in fp32; the loss (and its gradient) must still be cross-entropy's."""
        import hf_minigpt.loss_minigpt as loss_module

        head = torch.nn.Linear(1, 3, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.tensor([[150.0], [0.0], [-20.0]]))
        hidden = torch.ones(1, 2, 1, requires_grad=True)
        labels = torch.tensor([[0, 1]])  # the second position is ignored; the first's target is word 1
        loss = loss_module.chunked_lm_loss(hidden, head, labels)
        expected = torch.nn.functional.cross_entropy(head(hidden)[0, :1], labels[0, 1:])
        assert expected.item() == pytest.approx(150.0)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0],
                                   torch.autograd.grad(expected, hidden)[0])

    def test_without_it_a_training_forward_with_labels_returns_logits(self, model):
        """transformers' contract (its GPT-2 tests read `logits` from a train-mode forward with labels)."""
        input_ids = torch.tensor([[3, 4, 5, 6]])
        out = model.train()(input_ids, labels=input_ids)
        assert out.logits.shape == (1, 4, 21)
        expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], input_ids[0, 1:])
        torch.testing.assert_close(out.loss, expected)

    def test_without_gradients_it_gives_the_same_loss(self, model):
        input_ids = torch.tensor([[3, 4, 5, 6, 7]])
        with torch.no_grad():
            skipped = model(input_ids, labels=input_ids, skip_logits=True)
            full = model(input_ids, labels=input_ids)
        assert skipped.logits is None
        torch.testing.assert_close(skipped.loss, full.loss, atol=1e-6, rtol=1e-6)

    def test_a_second_backward_is_refused_in_words(self, model):
        input_ids = torch.tensor([[3, 4, 5, 6]])
        loss = model.train()(input_ids, labels=input_ids, skip_logits=True).loss
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="cannot backward twice"):
            loss.backward()

    def test_a_lora_adapter_on_lm_head_is_refused_in_one_line(self, model):
        peft = pytest.importorskip("peft")  # (not in vLLM's environment, which runs these tests too)

        adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"]))
        input_ids = torch.tensor([[3, 4, 5, 6]])
        with pytest.raises(ValueError, match=r"^skip_logits=True .* lm_head.* is a peft\.tuners\.lora\..*Linear here: "
                                             r"train with skip_logits=False, or merge what is attached first\.$"):
            adapted(input_ids=input_ids, labels=input_ids, skip_logits=True)
        assert adapted(input_ids=input_ids, labels=input_ids).loss.isfinite()  # the plain loss goes through lm_head

    def test_hooks_on_lm_head_are_refused(self, model):
        """As a tensor-parallel plan attaches them: its gather would be skipped."""
        model.lm_head.register_forward_hook(lambda module, inputs, output: output)
        with pytest.raises(ValueError, match="nn.Linear with forward hooks"):
            model(torch.tensor([[3, 4]]), labels=torch.tensor([[3, 4]]), skip_logits=True)

    def test_a_head_with_a_bias_is_refused(self, model):
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        with pytest.raises(ValueError, match=r"^skip_logits=True .* lm_head has a bias here: train with "):
            model(torch.tensor([[3, 4]]), labels=torch.tensor([[3, 4]]), skip_logits=True)

    def test_it_needs_labels(self, model):
        with pytest.raises(ValueError, match="pass `labels` too"):
            model(torch.tensor([[3, 4]]), skip_logits=True)


DECODE_124M = """
import sys, torch
from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM
torch.manual_seed(0)
model = MiniGPTForCausalLM(MiniGPTConfig(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
prompt = torch.randint(0, 50257, (8, 8), generator=torch.Generator().manual_seed(0))
out = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                     return_dict_in_generate=True)
torch.save({"tokens": out.sequences, "logits": torch.stack(out.logits)}, sys.argv[1])
"""
BUSY = "import torch\nx = torch.randn(1500, 1500)\nwhile True:\n    x @ x"


@pytest.mark.slow
def test_two_processes_decode_bit_identical_logits_one_beside_a_busy_neighbour(tmp_path):
    """What the model computes depends on nothing timed: the 124M model at batch 8, in a quiet process and in one
    beside a process keeping both cores busy."""
    from launches import end, run, start

    env = dict(os.environ)
    run([sys.executable, "-c", DECODE_124M, str(tmp_path / "quiet.pt")], env, timeout=300)
    neighbour = start([sys.executable, "-c", BUSY], env)
    try:
        run([sys.executable, "-c", DECODE_124M, str(tmp_path / "busy.pt")], env, timeout=300)
    finally:
        end(neighbour)
    quiet, busy = torch.load(tmp_path / "quiet.pt"), torch.load(tmp_path / "busy.pt")
    assert quiet["logits"].shape == (3, 8, 50257)
    assert torch.equal(quiet["logits"], busy["logits"]) and torch.equal(quiet["tokens"], busy["tokens"])
