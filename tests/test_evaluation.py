"""Evaluation with lm-evaluation-harness: a tiny MiniGPT that memorized 20 made-up facts, and its GPT-2 export, scored
on local task files of lm-eval's three request kinds (multiple choice, rolling loglikelihood, generation), through
`minigpt-eval`, through plain `lm_eval --model hf` with remote code, and in-process at batch sizes 1 and 8."""

import math
import os
import sys

import datasets
import pytest
import torch

from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM, eval_cli
from hf_minigpt.export import convert
from hf_minigpt.training.tokens import train_tokenizer
from lm_eval_tasks import FACTS, assert_same_answers, evaluator, per_document, run_lm_eval, scores, write_tasks

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The memorizing model (300 full-batch steps, about a second on 2 cores) with the tokenizer `minigpt-pretrain`
    trains, saved as a MiniGPT folder and exported to GPT-2."""
    root = tmp_path_factory.mktemp("evaluation")
    tokenizer = train_tokenizer(datasets.Dataset.from_dict({"text": FACTS}), vocab_size=300, eos="<|endoftext|>")
    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig(
        vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    batch = tokenizer(FACTS, padding=True, return_tensors="pt")  # each fact after the start token, as trained texts
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "minigpt")
    tokenizer.save_pretrained(root / "minigpt")
    convert(root / "minigpt", root / "gpt2", to="gpt2")
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def evaluate(tasks):
    return evaluator(tasks)


def command(name: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), name)]


def test_minigpt_eval_scores_the_memorized_facts_at_one(folders, tasks, tmp_path):
    """The documented route: the folder's own tokenizer, its start token included."""
    got = scores(run_lm_eval(command("minigpt-eval"), ["--model_args", f"pretrained={folders / 'minigpt'}"], tasks,
                             tmp_path))
    assert got["facts_choice"]["acc,none"] == 1.0
    assert got["facts_generation"]["exact_match,none"] == 1.0
    assert got["facts_bits_per_byte"]["bits_per_byte,none"] < 0.5  # most of it is the names, which nothing predicts


def test_plain_lm_eval_with_remote_code_answers_as_the_minigpt_model(folders, tasks, evaluate, tmp_path):
    """lm-eval without hf_minigpt: its `hf` model on the folder's saved model code (trust_remote_code). Its rolling
    loglikelihoods differ (the start token twice, see the bits-per-byte test), the choices and texts do not."""
    got = run_lm_eval(command("lm_eval"), ["--model", "hf", "--model_args",
                                           f"pretrained={folders / 'minigpt'},trust_remote_code=True"], tasks, tmp_path)
    expected = per_document(evaluate(folders / "minigpt")["samples"])
    del expected["facts_bits_per_byte"]
    assert_same_answers({task: answers for task, answers in per_document(got["samples"]).items()
                         if task in expected}, expected, tolerance=1e-4)


@pytest.mark.parametrize("argv, expected", [
    (["--model_args", "pretrained=F", "--tasks", "t"], ["run", "--model", "minigpt", "--model_args", "pretrained=F",
                                                        "--tasks", "t"]),
    (["run", "--tasks", "t"], ["run", "--model", "minigpt", "--tasks", "t"]),
    (["-M", "hf", "--tasks", "t"], ["run", "-M", "hf", "--tasks", "t"]),
    (["--model=vllm"], ["run", "--model=vllm"]),
    (["--config", "c.yaml"], ["run", "--config", "c.yaml"]),
    (["ls", "tasks"], ["ls", "tasks"]),
])
def test_minigpt_eval_passes_lm_evals_arguments_with_its_model_where_none_is_named(argv, expected):
    assert eval_cli.lm_eval_arguments(argv) == expected


def test_minigpt_eval_answers_a_task_it_cannot_find_in_one_line(folders, capsys):
    with pytest.raises(SystemExit) as stop:
        eval_cli.main(["--model_args", f"pretrained={folders / 'minigpt'}", "--tasks", "no_such_task"])
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and error.startswith("minigpt-eval: error: ") and "no_such_task" in error
    assert "Traceback" not in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("kind", ["minigpt", "gpt2"])
def test_batch_sizes_one_and_eight_give_the_same_scores(folders, evaluate, kind):
    """Batches of 8 pad the shorter requests (left for generation, right for loglikelihoods): the masks keep them
    apart. Every document's loglikelihoods to 1e-4, the generated texts exactly."""
    one, eight = evaluate(folders / kind, 1), evaluate(folders / kind, 8)
    assert_same_answers(per_document(one["samples"]), per_document(eight["samples"]), tolerance=1e-4)
    for task, values in scores(one).items():
        assert scores(eight)[task] == pytest.approx(values, abs=1e-4)
    assert scores(one)["facts_choice"]["acc,none"] == 1.0


def test_the_gpt2_export_scores_as_the_minigpt_folder(folders, evaluate):
    assert_same_answers(per_document(evaluate(folders / "minigpt", 8)["samples"]),
                        per_document(evaluate(folders / "gpt2", 8)["samples"]), tolerance=1e-4)


def test_bits_per_byte_is_the_texts_loss_in_bits_over_its_bytes(folders, evaluate):
    """By hand: each fact as the tokenizer starts it (after the end-of-text token), its tokens' loss in nats summed
    over the facts, over their UTF-8 bytes, in bits."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders / "minigpt")
    model = MiniGPTForCausalLM.from_pretrained(folders / "minigpt").eval()
    nats = 0.0
    for fact in FACTS:
        ids = torch.tensor([tokenizer(fact).input_ids])
        assert ids[0, 0] == tokenizer.eos_token_id
        with torch.no_grad():
            nats += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    by_hand = nats / (math.log(2) * sum(len(fact.encode()) for fact in FACTS))
    got = scores(evaluate(folders / "minigpt", 8))["facts_bits_per_byte"]["bits_per_byte,none"]
    assert got == pytest.approx(by_hand, rel=1e-4)
    # lm-eval's own `hf` model puts its start token before the tokenizer's: a second end-of-text token to predict,
    # and the text a position late. The day lm-eval stops doing so, this fails, and the `minigpt` model can go.
    upstream = scores(evaluate(folders / "minigpt", 8, model="hf"))["facts_bits_per_byte"]["bits_per_byte,none"]
    assert upstream > by_hand + 0.5
