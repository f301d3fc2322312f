"""Instruction tuning with TRL and chat: a tiny MiniGPT learns 20 made-up facts as questions and answers through
`SFTTrainer` and answers them through `apply_chat_template` + `generate()`, `pipeline("text-generation")`,
`minigpt-generate --chat` and the OpenAI-compatible server's chat route; `DPOTrainer` then prefers the right answers
more; LoRA adapters in both trainers merge back into a plain MiniGPT folder."""

import io
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import launches
from hf_minigpt import MiniGPTConfig, MiniGPTForCausalLM, generate_cli
from hf_minigpt.chat import CHAT_TEMPLATE, chat_ready
from hf_minigpt.export import convert
from hf_minigpt.export.gpt2 import gpt2_tokenizer
from hf_minigpt.training.tokens import train_tokenizer
from lm_eval_tasks import CITIES, NAMES

trl = pytest.importorskip("trl", reason="the chat extra: pip install -e '.[chat]'")

FACTS = [(f"Where does {name} live?", f"{name} lives in {city}.") for name, city in zip(NAMES, CITIES)]
# The CPU settings: TRL's configs default to bf16, which stops on a CPU ("doesn't support bf16/gpu").
ON_CPU = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0, disable_tqdm=True)


def asked(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def conversations() -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"messages": [asked(question) + [{"role": "assistant", "content": answer}] for question, answer in FACTS]})


def preferences() -> datasets.Dataset:
    """The right city chosen over the next person's."""
    wrong = [answer.replace(city, CITIES[(i + 1) % len(CITIES)]) for i, ((_, answer), city) in
             enumerate(zip(FACTS, CITIES))]
    return datasets.Dataset.from_dict({
        "prompt": [asked(question) for question, _ in FACTS],
        "chosen": [[{"role": "assistant", "content": answer}] for _, answer in FACTS],
        "rejected": [[{"role": "assistant", "content": answer}] for answer in wrong],
    })


def base_model(tokenizer) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    return MiniGPTForCausalLM(MiniGPTConfig(
        vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def supervised(model, tokenizer, output_dir, steps: int, **options):
    config = trl.SFTConfig(output_dir=str(output_dir), assistant_only_loss=True, per_device_train_batch_size=20,
                           max_steps=steps, learning_rate=5e-3, lr_scheduler_type="cosine", max_length=64,
                           **ON_CPU)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=conversations(), processing_class=tokenizer,
                             **options)
    trainer.train()
    return trainer.model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    """The byte-level BPE `minigpt-pretrain` trains, here on the facts, made chat-ready the documented way."""
    texts = datasets.Dataset.from_dict({"text": [f"{question} {answer}" for question, answer in FACTS]})
    return chat_ready(train_tokenizer(texts, vocab_size=300, eos="<|endoftext|>"))


@pytest.fixture(scope="module")
def chat_folder(tokenizer, tmp_path_factory):
    """A MiniGPT folder trained on the 20 facts with SFTTrainer (300 steps, 7 s on 2 cores), its tokenizer beside."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    model = supervised(base_model(tokenizer), tokenizer, folder.with_name("sft"), steps=300)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def answer(model, tokenizer, question: str) -> str:
    inputs = tokenizer.apply_chat_template(asked(question), add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_template_renders_turns_and_marks_the_assistants_tokens_end_of_text_included(tokenizer):
    messages = asked("Where does Anna live?") + [{"role": "assistant", "content": "Anna lives in Paris."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == ("<|endoftext|><|user|>\nWhere does Anna live?<|endoftext|>"
                        "<|assistant|>\nAnna lives in Paris.<|endoftext|>")
    encoded = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    trained = [token for token, mask in zip(encoded["input_ids"], encoded["assistant_masks"]) if mask]
    assert tokenizer.decode(trained) == "Anna lives in Paris.<|endoftext|>"  # what assistant_only_loss trains on
    prompt = tokenizer.apply_chat_template(asked("Where does Anna live?"), add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|endoftext|><|assistant|>\n")


def test_chat_ready_keeps_what_a_tokenizer_has_and_takes_gpt2s_tokenizer(tokenizer):
    gpt2 = chat_ready(gpt2_tokenizer())
    assert gpt2.pad_token == gpt2.eos_token == "<|endoftext|>" and gpt2.chat_template == CHAT_TEMPLATE
    ids = gpt2.apply_chat_template(asked("Hello"), add_generation_prompt=True)["input_ids"]
    assert ids[:2] == [50256, 27] and ids[-1] == 198  # <|endoftext|> "<" ... "\n"
    gpt2.chat_template, gpt2.pad_token = "{{ messages[0]['content'] }}", "<pad>"
    assert chat_ready(gpt2).chat_template == "{{ messages[0]['content'] }}" and gpt2.pad_token == "<pad>"


def test_sft_teaches_the_facts_answered_through_generate_and_the_pipeline(chat_folder):
    """Loaded the README's way from the saved folder: no remote code, the template from the folder's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(chat_folder)
    model = AutoModelForCausalLM.from_pretrained(chat_folder)
    assert isinstance(model, MiniGPTForCausalLM) and tokenizer.chat_template == CHAT_TEMPLATE
    by_generate = [answer(model, tokenizer, question) for question, _ in FACTS]
    assert sum(got == expected for got, (_, expected) in zip(by_generate, FACTS)) >= 18, by_generate
    chat = pipeline("text-generation", model=str(chat_folder))
    replies = chat([asked(question) for question, _ in FACTS], max_new_tokens=24, do_sample=False)
    by_pipeline = [reply[0]["generated_text"][-1]["content"] for reply in replies]
    assert sum(got == expected for got, (_, expected) in zip(by_pipeline, FACTS)) >= 18, by_pipeline


def answer_log_likelihoods(model, tokenizer, rows: datasets.Dataset, column: str) -> torch.Tensor:
    """log p(answer + end of text | question) under `model`, one per row, computed here from the logits."""
    scores = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        whole = tokenizer.apply_chat_template(row["prompt"] + row[column])["input_ids"]
        assert whole[:len(prompt)] == prompt
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        scores.append(logits.gather(1, torch.tensor(whole[len(prompt):])[:, None]).sum())
    return torch.stack(scores)


def margin(model, tokenizer) -> float:
    rows = preferences()
    chosen = answer_log_likelihoods(model, tokenizer, rows, "chosen")
    rejected = answer_log_likelihoods(model, tokenizer, rows, "rejected")
    return (chosen - rejected).mean().item()


def preferred(model, tokenizer, output_dir, **options):
    config = trl.DPOConfig(output_dir=str(output_dir), per_device_train_batch_size=10, max_steps=10, learning_rate=1e-3,
                           beta=0.1, **ON_CPU)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=preferences(), processing_class=tokenizer,
                             **options)
    trainer.train()
    return trainer.model.eval()


def test_dpo_raises_the_chosen_over_rejected_margin(chat_folder, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(chat_folder)
    model = AutoModelForCausalLM.from_pretrained(chat_folder)
    before = margin(model, tokenizer)
    after = margin(preferred(model, tokenizer, tmp_path), tokenizer)
    assert after > before + 1.0, (before, after)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "c_fc"], task_type="CAUSAL_LM")


def test_lora_in_both_trainers_merges_into_a_plain_minigpt_folder(chat_folder, tmp_path):
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(chat_folder)
    adapted = supervised(AutoModelForCausalLM.from_pretrained(chat_folder), tokenizer, tmp_path / "sft", steps=5,
                         peft_config=lora())
    assert isinstance(adapted, PeftModel)
    adapted = preferred(adapted, tokenizer, tmp_path / "dpo")  # DPO trains the same adapters; its reference is
    before = margin(adapted, tokenizer)                         # the model with the adapters off
    merged = adapted.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(plain) is MiniGPTForCausalLM
    assert not any("lora" in name for name in plain.state_dict())
    ids = tokenizer.apply_chat_template(asked("Where does Anna live?"), add_generation_prompt=True,
                                        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
    assert margin(plain, tokenizer) == pytest.approx(before, abs=1e-3)
    base = AutoModelForCausalLM.from_pretrained(chat_folder)
    assert not torch.equal(plain.transformer.h[0].attn.q_proj.weight, base.transformer.h[0].attn.q_proj.weight)


def test_minigpt_generate_chat_answers_each_turn_until_end_of_input(chat_folder):
    turns = "Where does Anna live?\nWhere does Boris live?\n"
    command = [os.path.join(os.path.dirname(sys.executable), "minigpt-generate"), str(chat_folder), "--chat",
               "--greedy", "--max_new_tokens", "24"]
    run = subprocess.run(command, input=turns, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["Anna lives in Paris.", "Boris lives in Oslo."]


def test_a_chat_prompt_is_the_conversation_so_far_less_the_oldest_turns_that_leave_no_room(tokenizer, monkeypatch,
                                                                                           capsys):
    prompts = []

    def continuation(prompt):
        prompts.append(tokenizer.decode(prompt))
        return tokenizer("Fine.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    turns = ["Hi", "x" * 200, "And you?", "x" * 40]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{turn}\n" for turn in turns)))
    generate_cli.chat(tokenizer, continuation, room=80)
    # The turn that does not fit even alone is refused, in a line, and the conversation goes on without it.
    assert len(prompts) == 3 and capsys.readouterr().err.startswith("minigpt-generate: that turn is ")
    turn = "<|endoftext|><|{}|>\n{}"
    assert prompts[1] == "".join([turn.format("user", "Hi"), turn.format("assistant", "Fine."),
                                  turn.format("user", "And you?"), "<|endoftext|><|assistant|>\n"])
    assert prompts[2].startswith("<|endoftext|><|user|>\nxxx")  # the first two turns no longer fit beside it


def test_minigpt_generate_chat_refuses_a_tokenizer_without_a_template_and_a_prompt(chat_folder, tmp_path, capsys):
    folder = tmp_path / "plain"
    shutil.copytree(chat_folder, folder)
    (folder / "chat_template.jinja").unlink()
    for argv, said in [([str(folder), "--chat"], "tokenizer has no chat template: add one with hf_minigpt.chat"),
                       ([str(chat_folder), "--chat", "--prompt", "Hi"], "--chat reads its turns from standard input")]:
        with pytest.raises(SystemExit) as stop:
            generate_cli.main(argv)
        assert stop.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.slow
def test_transformers_serve_of_the_gpt2_export_answers_chats_and_completions_through_openai(chat_folder, tmp_path):
    """`transformers serve` (it loads built-in classes only: the GPT-2 export) asked through the `openai` client: the
    chat route with the folder's template, and the completions route with MiniGPT's own greedy continuation."""
    from openai import OpenAI

    export = convert(chat_folder, tmp_path / "gpt2", to="gpt2")
    assert AutoTokenizer.from_pretrained(export).chat_template == CHAT_TEMPLATE
    with launches.transformers_serve(export, tmp_path / "server.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        replies = [client.chat.completions.create(model=str(export), messages=asked(question), max_tokens=24,
                                                  temperature=0).choices[0].message.content
                   for question, _ in FACTS[:4]]
        completion = client.completions.create(model=str(export), prompt="Where does", max_tokens=6, temperature=0)
    assert replies == [expected for _, expected in FACTS[:4]]
    tokenizer, model = AutoTokenizer.from_pretrained(chat_folder), MiniGPTForCausalLM.from_pretrained(chat_folder)
    prompt = tokenizer("Where does", return_tensors="pt").input_ids
    expected = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, prompt.shape[1]:]
    assert completion.choices[0].text == tokenizer.decode(expected) and completion.choices[0].text.strip()
