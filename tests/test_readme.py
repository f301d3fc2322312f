"""The README's Python blocks run as written (in order, in one namespace, in a scratch folder)."""

import re
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python blocks"
    monkeypatch.chdir(tmp_path)
    # The folder the GPT-2 snippet loads: a tiny random GPT-2 in the real checkpoint format.
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).save_pretrained("path/to/gpt2")
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert type(namespace["model"]).__name__ == "MiniGPTForCausalLM"
    assert namespace["logits"].shape == (1, 3)
