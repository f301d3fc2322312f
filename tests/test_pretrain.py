"""minigpt-pretrain: packing, bad input, and whole runs (resume, signals, divergence, two processes)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_minigpt.cpu_memory import malloc_keeps_large_blocks
from hf_minigpt.folders import RunFolder
from hf_minigpt.pretrain import main, parse_args
from hf_minigpt.training.checkpoint import WEIGHTS_AND_OPTIMIZER, list_checkpoints
from hf_minigpt.training.loop import Stopped
from hf_minigpt.training.report import read_log
from hf_minigpt.training.tokens import TokenBlocks, document_positions, tokenize_to_shard

import launches
from conftest import tiny_config

# A small model on the embedded corpus: a step takes milliseconds.
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--vocab_size", "512",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--prompts", "The", "--max_new_tokens", "8"]


LAUNCHED = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # what each launch here runs with


def pretrain(*args: str, processes: int = 1, check: bool = True, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hf_minigpt.pretrain", *TINY, *args]
    env = {**(env or os.environ), **LAUNCHED}
    if processes > 1:  # data parallel on CPU: gloo, two ranks on this machine
        env["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "hf_minigpt.pretrain", *TINY, *args]
    return launches.run(command, env, check=check)


def losses(output_dir) -> list[float]:
    return [entry["loss"] for entry in read_log(output_dir) if "loss" in entry]


def checkpoint_weights(checkpoint: Path) -> dict:
    """The model's weights in a checkpoint, read as torch.distributed.checkpoint wrote them."""
    torch_file = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / WEIGHTS_AND_OPTIMIZER, torch_file)
    return torch.load(torch_file)["model"]


def refused(argv, capsys) -> str:
    """The one line a usage mistake prints (exit status 2), before the pointer to --help."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    error, see_help = capsys.readouterr().err.strip().splitlines()  # not the whole usage first
    assert see_help == "See 'minigpt-pretrain --help'."
    return error


# ---------------------------------------------------------------------------------------------------------------------
# Packing


def test_documents_are_joined_with_eos_and_packed(tokenizer):
    texts = Dataset.from_dict({"text": ["the cat sat", "a dog ran away fast", "big red mat"]})
    blocks = TokenBlocks([tokenize_to_shard(texts, tokenizer, "text", "train")], 4, tokenizer.eos_token_id)
    # Each document starts with EOS; the tail ("red mat") ends one more block, overlapping the one before.
    expected = "<eos> the cat sat | <eos> a dog ran | away fast <eos> big | <eos> big red mat"
    assert [tokenizer.convert_ids_to_tokens(block["input_ids"].tolist()) for block in blocks] == [
        block.split() for block in expected.split(" | ")
    ]
    # Positions restart at each EOS, counted from 0 at the start of the block.
    assert [block["position_ids"].tolist() for block in blocks] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1],
                                                                    [0, 1, 2, 3]]


def test_document_positions_restart_at_each_eos():
    assert document_positions(torch.tensor([5, 6, 0, 7, 0, 0, 8]), eos_token_id=0).tolist() == [0, 1, 0, 1, 0, 0, 1]
    assert document_positions(torch.tensor([5, 6, 7]), eos_token_id=0).tolist() == [0, 1, 2]  # within the block


def test_document_masking_keeps_packed_documents_apart(model):
    first, second = torch.tensor([[0, 3, 5, 7]]), torch.tensor([[0, 4, 6, 8, 9, 10]])
    packed = torch.cat([first, second], dim=1)
    positions = document_positions(packed[0], eos_token_id=0)[None]
    with torch.no_grad():
        # Packed documents are recognised from restarting positions when there is no cache (training).
        logits = model(packed, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
        leaking = model(packed).logits
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaking[:, 4:], alone[:, 4:], atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear message before any training


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer):
    from hf_minigpt import MiniGPTForCausalLM

    folder = tmp_path / "tiny"
    MiniGPTForCausalLM(tiny_config()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write(path: Path, content) -> str:
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "name, content, extra, message",
    [
        ("missing.txt", None, [], r"missing\.txt: no such file"),
        ("empty.txt", "", [], r"empty\.txt is empty"),
        ("latin1.txt", "café crème".encode("latin-1"), [], r"latin1\.txt is not UTF-8 text \(byte 3\)"),
        ("rows.jsonl", '{"body": "the cat"}\n', [], r"--text_column 'text' is not a column .* \['body'\]"),
        ("numbers.csv", "text\n1\n2\n", [], r"--text_column 'text' holds Value\('int64'\), not text"),
        ("blank.jsonl", '{"text": ""}\n{"text": ""}\n', [], r"every 'text' value is empty"),
        ("mixed.txt", "the cat", ["--train_file", "x.parquet"], r"Cannot read \['\.parquet', '\.txt'\] files"),
    ],
)
def test_bad_data_is_refused_before_training(tmp_path, tiny_checkpoint, name, content, extra, message):
    file = tmp_path / name
    if content is not None:
        write(file, content)
    if "x.parquet" in extra:
        write(tmp_path / "x.parquet", b"PAR1")
        extra = ["--train_file", str(file), str(tmp_path / "x.parquet")]
    with pytest.raises(SystemExit, match=message):
        main(["--train_file", str(file), "--model_name_or_path", str(tiny_checkpoint), "--output_dir",
              str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()  # a refused run leaves nothing behind


def test_a_mistyped_model_folder_is_named_at_once(tmp_path, capsys, monkeypatch):
    """A path is not a hub id: the hub is not asked (it may retry for a minute)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "model_info", lambda *args, **kwargs: pytest.fail("the hub was asked"))
    (tmp_path / "runs" / "pydoc").mkdir(parents=True)
    message = refused(["--model_name_or_path", str(tmp_path / "runs" / "pydocs"), "--output_dir",
                       str(tmp_path / "out")], capsys)
    assert re.search(r"--model_name_or_path .*runs/pydocs: no such folder\.$", message)
    assert not (tmp_path / "out").exists()


def test_every_usage_mistake_is_listed_in_one_line(tmp_path, capsys):
    message = refused(["--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "0",
                       "--push_to_hub", "--checkpointing_steps", "often", "--streaming"], capsys)
    assert message.startswith("minigpt-pretrain: error: ")
    for problem in ("--per_device_train_batch_size must be at least 1, got 0; ",
                    "--checkpointing_steps takes a number of steps or 'epoch', not 'often'",
                    "--push_to_hub needs --hub_model_id", "--streaming needs --max_train_steps"):
        assert problem in message
    assert not (tmp_path / "out").exists()


def test_a_hub_id_the_hub_does_not_know_is_named(tmp_path):
    from hub_server import FakeHub

    with FakeHub() as hub:
        result = pretrain("--model_name_or_path", "nobody/no-such-model", "--output_dir", str(tmp_path / "out"),
                          check=False, env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "minigpt-pretrain: error: --model_name_or_path nobody/no-such-model: no such folder here, and no such model "
        "on the hub.", "See 'minigpt-pretrain --help'."]


def test_help_shows_defaults_and_schedule_names(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "scaled to the model's size). (default: 0.002)" in shown  # the learning rate: pre-training's own default
    assert "(default: 500)" in shown
    assert "one of: linear, cosine," in shown and "SchedulerType" not in shown


def test_each_prompt_draws_its_own_sample(tokenizer):
    from hf_minigpt import MiniGPTForCausalLM
    from hf_minigpt.pretrain import generate_samples

    model = MiniGPTForCausalLM(tiny_config()).eval()
    for parameter in model.parameters():  # uniform next-token probabilities: only the random draws differ
        torch.nn.init.zeros_(parameter)
    samples = generate_samples(model, tokenizer, ["the cat", "a dog"], max_new_tokens=12, seed=0)
    continuations = [text.split(maxsplit=2)[2] for text in samples.values()]
    assert continuations[0] != continuations[1]


def test_signals_exit_with_the_shells_codes():
    assert (Stopped(signal.SIGINT).exit_code, Stopped(signal.SIGTERM).exit_code) == (130, 143)


def test_block_size_beyond_the_context_is_refused(tmp_path, tiny_checkpoint):
    text = write(tmp_path / "t.txt", "the cat sat on the mat " * 50)
    with pytest.raises(SystemExit, match=r"--block_size 64 must be between 2 and the model's n_positions \(32\)"):
        main(["--train_file", text, "--model_name_or_path", str(tiny_checkpoint), "--block_size", "64",
              "--output_dir", str(tmp_path / "out")])


def test_a_new_model_is_as_long_as_its_blocks_and_never_shorter_than_generation_needs(tmp_path, tiny_checkpoint):
    from hf_minigpt.pretrain import new_model_positions, pick_block_size

    for flags, block_size, positions in (([], 128, 128), (["--block_size", "256"], 256, 256),
                                         (["--block_size", "64"], 64, 128)):
        settings = parse_args(["--output_dir", str(tmp_path / "out"), *flags])
        assert (pick_block_size(settings, resume=None), new_model_positions(settings)) == (block_size, positions)
    continued = parse_args(["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tiny_checkpoint)])
    assert pick_block_size(continued, resume=None) == 32  # the checkpoint's n_positions


def test_a_corpus_shorter_than_one_block_trains_on_one_shorter_block(tmp_path):
    sentences = "".join(f"Sentence {i} is short.\n" for i in range(10))
    result = pretrain("--train_file", write(tmp_path / "ten.txt", sentences), "--output_dir", str(tmp_path / "out"),
                      "--block_size", "128", "--max_train_steps", "4")
    tokens = re.search(r"The train text holds (\d+) tokens, fewer than a block of 128: blocks of \1 tokens",
                       result.stdout)
    assert tokens and f"1 training blocks of {tokens[1]} tokens" in result.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_positions"] == 128


def test_a_previous_run_is_not_overwritten_and_the_advice_works(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    message = refused(["--output_dir", str(tmp_path)], capsys)
    assert "already holds a run. It has no checkpoint to continue from: start over with --overwrite_output_dir, " \
           "or pick another --output_dir" in message
    assert "holds no checkpoint" in refused(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"],
                                            capsys)
    assert (tmp_path / "config.json").read_text() == "{}"
    parse_args(["--output_dir", str(tmp_path), "--overwrite_output_dir"])  # the advice, followed, is accepted

    checkpoint = tmp_path / "step_3"
    (checkpoint / WEIGHTS_AND_OPTIMIZER).mkdir(parents=True)
    (checkpoint / "training_state.json").write_text("{}")
    assert "already holds a run. Continue it with --resume_from_checkpoint latest, start over with " \
           "--overwrite_output_dir" in refused(["--output_dir", str(tmp_path)], capsys)
    assert parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"]).run.checkpoint_to_resume \
        == checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs, as subprocesses (as a user or `accelerate launch` starts them)

# Dropout and gradient accumulation on, so that a resumed run must restore RNG states and the step phase.
RUN = ["--max_train_steps", "120", "--gradient_accumulation_steps", "2", "--dropout", "0.1", "--eval_steps", "40",
       "--learning_rate", "3e-3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pretrain") / "run"
    result = pretrain(*RUN, "--output_dir", str(output_dir))
    return output_dir, result


def test_output_folder_loads_and_reports(uninterrupted):
    output_dir, result = uninterrupted
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["train_steps"] == 120
    assert {"train_loss", "eval_loss", "perplexity", "train_tokens_per_second"} <= results.keys()
    assert results["perplexity"] == pytest.approx(torch.tensor(results["eval_loss"]).exp().item(), rel=1e-5)
    # It learned: the validation loss is well below that of guessing among 512 tokens (ln 512 = 6.24).
    assert results["eval_loss"] < 5.5
    assert (output_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    modes = {path.name: path.stat().st_mode & 0o777 for path in output_dir.iterdir() if path.is_file()}
    assert modes["model.safetensors"] == modes["config.json"]  # not transformers' private 0600 scratch file

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert type(model).__name__ == "MiniGPTForCausalLM" and len(tokenizer) == model.config.vocab_size == 512
    # A text starts after EOS, as every training document does; decoded, it is the text again.
    ids = tokenizer("def f(x):\n    return x").input_ids
    assert ids[0] == tokenizer.eos_token_id and tokenizer.decode(ids[1:]) == "def f(x):\n    return x"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    index = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert index["perplexity"] == pytest.approx(results["perplexity"], abs=1e-4)
    assert "![Loss curve](loss.png)" in card.text
    # The samples printed at the end come from the saved folder.
    assert result.stdout.count("The") >= 1 and "Saved to" in result.stdout


def test_interrupted_and_resumed_run_repeats_the_same_losses(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    output_dir = tmp_path / "run"
    args = [*RUN, "--output_dir", str(output_dir), "--checkpointing_steps", "20", "--save_total_limit", "2"]
    process = subprocess.Popen([sys.executable, "-m", "hf_minigpt.pretrain", *TINY, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    # Checkpoints come and go (--save_total_limit 2) faster than a poll: wait for any.
    while not list_checkpoints(output_dir) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]  # the shell's code for SIGINT: `train && publish` stops
    assert "Stopped by a signal at step" in stdout and "--resume_from_checkpoint latest" in stdout
    stopped_at = list_checkpoints(output_dir)[-1]
    assert 20 <= int(stopped_at.name[5:]) < 120
    assert len(list_checkpoints(output_dir)) <= 2  # --save_total_limit
    assert not (output_dir / "model.safetensors").exists()  # stopped runs leave only checkpoints

    pretrain(*args, "--resume_from_checkpoint", "latest")
    assert losses(output_dir) == losses(reference)  # exactly, step for step
    history, reference_history = read_log(output_dir), read_log(reference)
    assert [e for e in history if "eval_loss" in e] == [e for e in reference_history if "eval_loss" in e]


def test_a_saved_run_runs_again_from_its_settings(uninterrupted, tmp_path, capsys):
    reference, _ = uninterrupted
    saved = RunFolder(reference).settings
    settings = json.loads(saved.read_text())
    assert settings["max_train_steps"] == 120 and settings["dropout"] == 0.1 and "hub_token" not in settings
    rerun = tmp_path / "rerun"
    launches.run([sys.executable, "-m", "hf_minigpt.pretrain", "--config", str(saved), "--output_dir", str(rerun)],
                 {**os.environ, "OMP_NUM_THREADS": "1"})
    assert losses(rerun) == losses(reference)  # exactly, step for step

    (tmp_path / "other.json").write_text(json.dumps({**settings, "label_column": "label"}))
    assert "holds settings minigpt-pretrain does not take: label_column" in refused(
        ["--config", str(tmp_path / "other.json")], capsys)


def test_resuming_a_finished_run_changes_nothing_unless_asked_to_train_further(tmp_path):
    output_dir = tmp_path / "run"
    args = ["--max_train_steps", "12", "--checkpointing_steps", "5", "--output_dir", str(output_dir)]
    pretrain(*args)
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_10", "step_12"]  # the end, too
    weights = (output_dir / "model.safetensors").read_bytes()
    result = pretrain(*args, "--resume_from_checkpoint", "latest")
    assert "already holds the finished run (12 steps); nothing changed" in result.stdout
    assert (output_dir / "model.safetensors").read_bytes() == weights
    pretrain("--max_train_steps", "15", "--checkpointing_steps", "5", "--output_dir", str(output_dir),
             "--resume_from_checkpoint", "latest")
    assert [entry["step"] for entry in read_log(output_dir) if "loss" in entry] == list(range(1, 16))
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 15


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = pretrain("--max_train_steps", "50", "--learning_rate", "1e9", "--num_warmup_steps", "0",
                      "--checkpointing_steps", "1", "--output_dir", str(tmp_path), check=False)
    assert result.returncode == 1
    assert "minigpt-pretrain: The training loss is nan at step" in result.stderr
    assert "Traceback" not in result.stderr
    last = list_checkpoints(tmp_path)[-1]
    assert f"the last good checkpoint is {last}" in result.stderr
    weights = checkpoint_weights(last)
    assert weights and all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    common = ["--max_train_steps", "12", "--validation_split_percentage", "10", "--gradient_accumulation_steps", "1"]
    pretrain(*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one"))
    two = pretrain(*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two"), processes=2)
    assert "12 steps" in two.stdout and "2 process(es)" in two.stdout
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    one_eval = json.loads((tmp_path / "one" / "all_results.json").read_text())["eval_loss"]
    two_eval = json.loads((tmp_path / "two" / "all_results.json").read_text())["eval_loss"]
    assert two_eval == pytest.approx(one_eval, rel=1e-4)


def test_torch_compile_run_saves_plain_weights(tmp_path):
    pretrain("--max_train_steps", "3", "--torch_compile", "--validation_split_percentage", "0",
             "--output_dir", str(tmp_path))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no `_orig_mod.` names


def test_the_samples_continue_the_users_own_text(tmp_path):
    """Without --prompts, the samples start from the first words of the user's documents, not from words of a
    corpus they did not train on."""
    animals = [("Otters", "gather"), ("Herons", "watch"), ("Beavers", "move"), ("Otters", "carry")]
    text = "".join(f"{animal} {verb} the rocks by the river.\n" for animal, verb in animals)
    tiny = [arg for arg in TINY if arg not in ("--prompts", "The")]
    result = launches.run([sys.executable, "-m", "hf_minigpt.pretrain", *tiny, "--train_file",
                           write(tmp_path / "animals.txt", text), "--output_dir", str(tmp_path / "out"),
                           "--max_train_steps", "2"], {**os.environ, "OMP_NUM_THREADS": "1"})
    for word in ("Otters", "Herons", "Beavers"):
        assert re.search(f"^{word}", result.stdout, re.MULTILINE), word
    assert not re.search(r"^(Python|A class)\b", result.stdout, re.MULTILINE)
    assert 'tokenizer("Otters", return_tensors="pt")' in (tmp_path / "out" / "README.md").read_text()


def test_data_files_by_glob_saved_folder_and_compression(tmp_path):
    import bz2

    from datasets import Dataset

    from hf_minigpt.training.data import load_files

    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"document {name}\nsecond line")
    texts = load_files([str(tmp_path / "*.txt")], "train")
    assert texts["text"] == ["document a\nsecond line", "document b\nsecond line"]  # one row per file

    Dataset.from_dict({"text": ["saved"]}).save_to_disk(tmp_path / "saved")
    assert load_files([str(tmp_path / "saved")], "train")["text"] == ["saved"]

    (tmp_path / "rows.csv.bz2").write_bytes(bz2.compress(b"text,label\nthe cat,1\n"))
    assert load_files([str(tmp_path / "rows.csv.bz2")], "train")["text"] == ["the cat"]


# ---------------------------------------------------------------------------------------------------------------------
# Token shards


def test_token_shards_are_llm_c_bin_files(tmp_path):
    from hf_minigpt.training.tokens import read_shard, write_shard

    small = write_shard(tmp_path / "small.bin", [[50256, 1, 2], [3]], vocab_size=50257)
    header = np.fromfile(small, dtype=np.int32, count=256)
    assert header[:3].tolist() == [20240520, 1, 4] and not header[3:].any()  # llm.c's GPT-2 header
    assert np.fromfile(small, dtype=np.uint16, offset=1024).tolist() == [50256, 1, 2, 3]
    large = write_shard(tmp_path / "large.bin", [[128000, 7]], vocab_size=128256)  # uint32, as llm.c's Llama 3
    assert np.fromfile(large, dtype=np.int32, count=3).tolist() == [20240801, 7, 2]
    assert read_shard(large).tolist() == [128000, 7] and read_shard(small).dtype == np.uint16
    (tmp_path / "text.bin").write_bytes(b"not tokens" * 200)
    with pytest.raises(ValueError, match="text.bin is not a token shard"):
        read_shard(tmp_path / "text.bin")
    (tmp_path / "cut.bin").write_bytes(small.read_bytes()[:-2])
    with pytest.raises(ValueError, match="the header says 4 tokens, but the file has 1030 bytes"):
        read_shard(tmp_path / "cut.bin")


def test_training_on_saved_token_shards_repeats_the_text_run(tmp_path):
    """--save_tokens keeps the tokenized corpus; training on it (memory-mapped) repeats the text run's losses."""
    common = ["--max_train_steps", "6", "--validation_split_percentage", "10"]
    pretrain(*common, "--save_tokens", str(tmp_path / "tokens"), "--output_dir", str(tmp_path / "text"))
    assert sorted(path.name for path in (tmp_path / "tokens").iterdir()) == ["train.bin"]
    again = pretrain(*common, "--train_file", str(tmp_path / "tokens" / "train.bin"),
                     "--tokenizer_name", str(tmp_path / "text"), "--output_dir", str(tmp_path / "shards"))
    assert losses(tmp_path / "shards") == losses(tmp_path / "text")
    assert "Token shards from `train.bin`" in (tmp_path / "shards" / "README.md").read_text()
    assert "training blocks" in again.stdout

    result = pretrain(*common, "--train_file", str(tmp_path / "tokens" / "train.bin"),
                      "--output_dir", str(tmp_path / "no_tokenizer"), check=False)
    assert result.returncode == 2 and "pass the tokenizer that made them" in result.stderr
    assert not (tmp_path / "no_tokenizer").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Streaming


def test_streamed_blocks_are_the_packed_blocks_in_order(tmp_path, tokenizer):
    from hf_minigpt.training.data import load_files
    from hf_minigpt.training.tokens import StreamedBlocks

    lines = [{"text": f"the cat sat on mat {i} " * (i % 4 + 1)} for i in range(41)]  # 647 tokens
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    packed = TokenBlocks([tokenize_to_shard(load_files([str(tmp_path / "docs.jsonl")], "train"), tokenizer, "text",
                                            "train")], 8, tokenizer.eos_token_id)
    streamed = list(StreamedBlocks(load_files([str(tmp_path / "docs.jsonl")], "train", streaming=True), tokenizer,
                                   "text", 8, tokenizer.eos_token_id))
    assert len(streamed) == len(packed) - 1  # the stream drops the tail, which the shard packs as one more block
    for streamed_block, packed_block in zip(streamed, packed):
        assert streamed_block["input_ids"].tolist() == packed_block["input_ids"].tolist()
        assert streamed_block["position_ids"].tolist() == packed_block["position_ids"].tolist()


def test_a_streamed_run_resumes_exactly(tmp_path, tiny_checkpoint):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"the cat sat on the mat {i}\n" for i in range(400)))
    common = ["--train_file", str(text), "--streaming", "--tokenizer_name", str(tiny_checkpoint),
              "--lr_scheduler_type", "constant", "--num_warmup_steps", "0", "--checkpointing_steps", "4"]
    pretrain(*common, "--max_train_steps", "8", "--output_dir", str(tmp_path / "whole"))
    first = pretrain(*common, "--max_train_steps", "4", "--output_dir", str(tmp_path / "parts"))
    assert "Streamed blocks of 32 tokens" in first.stdout and "No validation set (streamed)" in first.stdout
    pretrain(*common, "--max_train_steps", "8", "--output_dir", str(tmp_path / "parts"), "--resume_from_checkpoint",
             "latest")
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 8


def test_text_files_fall_into_documents_at_blank_lines_or_else_at_every_line(tmp_path, monkeypatch):
    from hf_minigpt.training import data

    monkeypatch.setattr(data, "PIECE_CHARS", 16)  # long documents come in pieces
    (tmp_path / "a_prose.txt").write_text("A first paragraph\nthat wraps.\n\n \t\n\nThen " + "x" * 40 + "\nends.\n")
    (tmp_path / "b_lines.txt").write_text("Python reads like English.\nRust is safe.\r\nGo builds fast.")
    (tmp_path / "c_tiny.txt").write_text("tiny")
    expected = ["A first paragraph\nthat wraps.", "Then " + "x" * 40 + "\nends.",
                "Python reads like English.", "Rust is safe.", "Go builds fast.", "tiny"]
    files = sorted(str(path) for path in tmp_path.glob("*.txt"))
    for pieces in (list(data.read_pieces(files)),
                   data.load_files([str(tmp_path / "*.txt")], "train", in_pieces=True).to_list()):
        documents = []
        for piece in pieces:
            if piece["starts_document"]:
                documents.append(piece["text"])
            else:
                documents[-1] += piece["text"]
        assert documents == expected and len(pieces) > len(documents)


def test_bits_per_byte_is_the_validation_texts_loss_in_bits_over_its_bytes(tmp_path):
    """Comparable across tokenizers: the loss summed over the text's tokens, in bits, over the text's UTF-8 bytes.
    Here computed by hand from the saved model, on a one-line validation text with a two-byte character."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    colours = ("red", "blue", "green", "black", "white")
    train = write(tmp_path / "train.txt", "".join(f"the {colour} cat sat on the mat.\n" for colour in colours) * 8)
    line = "the blue cat sat on the naïve mat."
    output_dir = tmp_path / "out"
    pretrain("--train_file", train, "--validation_file", write(tmp_path / "validation.txt", line + "\n"),
             "--output_dir", str(output_dir), "--max_train_steps", "20")
    results = json.loads((output_dir / "all_results.json").read_text())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(output_dir), AutoTokenizer.from_pretrained(output_dir)
    ids = tokenizer(line).input_ids  # after the end-of-text token, as every document was read
    assert ids[0] == tokenizer.eos_token_id and len(ids) <= 32 and len(line.encode()) == len(line) + 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    nats = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    assert results["bits_per_byte"] == pytest.approx(nats / (math.log(2) * len(line.encode())), rel=1e-4)
    assert results["eval_loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-4)
    card = ModelCard.load(output_dir / "README.md")
    index = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert index["bits_per_byte"] == pytest.approx(results["bits_per_byte"], abs=1e-4)


# minigpt-pretrain with the rule of an AMD CPU with AVX-512 forced, whatever CPU runs the test, counting oneDNN's
# products and their backward passes.
ON_AMD_AVX512 = """
import atexit, sys
import hf_minigpt.cpu_kernels as kernels
kernels.CPU.this_machine = classmethod(lambda cls: kernels.CPU("mkl", "AuthenticAMD", "AVX512"))
calls, backwards, reused = [], [], []
product, backward = kernels.onednn_linear, kernels.OneDNNLinear.backward
kernels.onednn_linear = lambda *args: calls.append(1) or product(*args)
kernels.OneDNNLinear.backward = staticmethod(lambda *args: backwards.append(1) or backward(*args))
import hf_minigpt.training.loop as loop
reuse = loop.reuse_freed_memory
loop.reuse_freed_memory = lambda: reused.append(reuse()) or reused[-1]
atexit.register(lambda: print(f"oneDNN products: {len(calls)}, backward passes: {len(backwards)}, "
                              f"freed memory reused: {reused}"))
from hf_minigpt.pretrain import main
main(sys.argv[1:])
"""


def test_pretraining_takes_the_cpus_products_and_learns_what_nn_linears_learn(tmp_path):
    """Each of the 6 steps passes back through 2 x 6 projections, each with its input's and weight's gradients (run
    side by side, the first also keeping freed memory for reuse, as --reuse_freed_memory asks)."""
    env = {**os.environ, **LAUNCHED}
    started = {name: launches.start([sys.executable, "-c", ON_AMD_AVX512, *TINY, "--max_train_steps", "6",
                                     "--output_dir", str(tmp_path / name), "--gradient_accumulation_steps", "1",
                                     *flags], env)
               for name, flags in (("cpu_kernels", ["--reuse_freed_memory"]), ("plain", ["--plain_kernels"]))}
    try:
        runs = {name: launches.finish(process, timeout=300) for name, process in started.items()}
    finally:  # a time-out in the first leaves nothing of the second either
        for process in started.values():
            launches.end(process)
    assert all(run.returncode == 0 for run in runs.values()), [run.stderr[-2000:] for run in runs.values()]
    assert "oneDNN products: 0, backward passes: 0, freed memory reused: []" in runs["plain"].stdout
    # (asked for once, and it takes where malloc can be told to)
    assert f"freed memory reused: [{malloc_keeps_large_blocks()}]" in runs["cpu_kernels"].stdout
    assert ("keeps its own ways" in runs["cpu_kernels"].stdout) == (not malloc_keeps_large_blocks())
    products, backwards = map(int, re.search(r"oneDNN products: (\d+), backward passes: (\d+)",
                                             runs["cpu_kernels"].stdout).groups())
    assert backwards == 6 * 12
    assert products >= 6 * 12 * 3  # and the evaluations' forward products
    assert losses(tmp_path / "cpu_kernels") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert len(losses(tmp_path / "plain")) >= 2
