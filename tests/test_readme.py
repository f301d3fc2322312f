"""The README's and the guides' examples run as written: their Python blocks in order, as one script, in a fresh
process and a scratch folder (hub ids served by the local Hub-API test server), and the toy GPT end to end."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from hub_server import FakeHub

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The guides in the order the README lists them: later blocks may use what earlier ones made.
GUIDES = [ROOT / "docs" / f"{name}.md" for name in
          ("pretraining", "finetuning", "hub", "gpt2", "serving", "deployment", "speed", "design")]
TOY_FOLDER = "runs/lang"


def blocks(language: str, text: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def section(title: str) -> str:
    return README.read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]


COUNT_SENTENCES = """
import contextlib, io, json, sys
import hf_minigpt
from hf_minigpt import generate_cli
from transformers import pipeline

folder, sentences = sys.argv[1], json.loads(sys.argv[2])
generator = pipeline("text-generation", model=folder)
through_pipeline = through_cli = 0
for sentence in sentences:
    word = sentence.split()[0]
    through_pipeline += generator(word, max_new_tokens=32, do_sample=False)[0]["generated_text"] == sentence
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate_cli.main([folder, "--prompt", word, "--greedy", "--max_new_tokens", "32"])
    through_cli += printed.getvalue().strip() == sentence
print(json.dumps([through_pipeline, through_cli]))
"""


def test_the_readme_is_read_in_five_minutes_and_links_every_guide():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert all(f"(docs/{guide.name})" in text for guide in GUIDES)


def test_readme_python_blocks_run(tmp_path):
    # (The toy's block needs the toy's training run: its own test below runs both.)
    python = [block for page in (README, *GUIDES) for block in blocks("python", page.read_text())
              if TOY_FOLDER not in block]
    assert python, "README.md has no python blocks"
    script = "\n".join(python) + "\nprint('CHECK', type(model).__name__, tuple(logits.shape))\n"
    # The GPT-2 the README loads by hub id: a tiny random one in the real checkpoint format.
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with FakeHub() as hub:
        hub.publish("openai-community/gpt2", tmp_path / "gpt2")
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CHECK MiniGPTForCausalLM (1, 3)" in result.stdout


@pytest.mark.slow
def test_the_toy_gpt_continues_a_sentence_as_the_readme_says(tmp_path):
    toy = section("First try")
    (shell,), (python,) = blocks("bash", toy), blocks("python", toy)
    shell = shell.replace(".venv/bin/minigpt-pretrain", f"{sys.executable} -m hf_minigpt.pretrain")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    trained = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "No validation: 2 block(s) are too few to hold out 5%" in trained.stdout
    assert "500 steps" in trained.stdout and "a context of 128 tokens" in trained.stdout
    generated = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-3000:]
    expected = python.strip().splitlines()[-1].removeprefix("# ")
    assert generated.stdout.strip().splitlines()[-1] == expected
    # Quiet: no warning from either command, no progress bar of transformers'.
    said = trained.stdout + trained.stderr + generated.stdout + generated.stderr
    assert "warn" not in said.lower(), said[max(said.lower().find("warn") - 300, 0):][:600]
    assert "Loading weights" not in trained.stdout + trained.stderr
    # Every sentence from a plain prompt of its first word, through `pipeline` and through minigpt-generate.
    sentences = (tmp_path / "runs" / "lang.txt").read_text().splitlines()
    counted = subprocess.run([sys.executable, "-c", COUNT_SENTENCES, TOY_FOLDER, json.dumps(sentences)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert counted.returncode == 0, counted.stderr[-3000:]
    through_pipeline, through_cli = json.loads(counted.stdout.splitlines()[-1])
    assert through_pipeline == through_cli == 20, (through_pipeline, through_cli)
    # The card says what happened: the vocabulary the tokenizer has, and that nothing was held out.
    card = (tmp_path / TOY_FOLDER / "README.md").read_text()
    vocab_size = json.loads((tmp_path / TOY_FOLDER / "config.json").read_text())["vocab_size"]
    assert f"a byte-level BPE of {vocab_size} tokens" in card and "No validation set" in card
