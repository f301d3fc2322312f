"""The README's Python blocks run as written (in order, as one script, in a fresh process and a scratch folder),
with the hub ids they name served by the local Hub-API test server."""

import os
import re
import subprocess
import sys
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from hub_server import FakeHub

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python blocks"
    script = "\n".join(blocks) + "\nprint('CHECK', type(model).__name__, tuple(logits.shape))\n"
    # The GPT-2 the README loads by hub id: a tiny random one in the real checkpoint format.
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with FakeHub() as hub:
        hub.publish("openai-community/gpt2", tmp_path / "gpt2")
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CHECK MiniGPTForCausalLM (1, 3)" in result.stdout
