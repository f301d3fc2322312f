"""minigpt-finetune: problem types, metrics, bad input, resume, two processes; Trainer and PEFT LoRA."""

import csv
import json
import os
import re
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

import launches
from conftest import WORDS, tiny_config
from hf_minigpt import MiniGPTForCausalLM, MiniGPTForSequenceClassification
from hf_minigpt.finetune import main
from hf_minigpt.tasks import MultiLabel, Regression, SingleLabel
from hf_minigpt.folders import RunFolder
from hf_minigpt.training.checkpoint import WEIGHTS_AND_OPTIMIZER
from hf_minigpt.training.report import read_log

PLAIN = [word for word in WORDS if word not in ("red", "blue")]


def sentences(n: int, seed: int, colours=1) -> list[tuple[str, list[str]]]:
    """Random sentences with colour words hidden among the others; the colours are what a model must find."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(PLAIN, k=rng.randint(3, 7))
        chosen = rng.sample(["red", "blue"], colours if isinstance(colours, int) else rng.choice(colours))
        for colour in chosen:
            words.insert(rng.randrange(len(words) + 1), colour)
        rows.append((" ".join(words), chosen))
    return rows


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def colour_rows(n, seed):
    return [{"text": text, "label": "warm" if chosen == ["red"] else "cool"} for text, chosen in sentences(n, seed)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny causal LM and its tokenizer, with no pad token, like GPT-2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("base")
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    MiniGPTForCausalLM(tiny_config(pad_token_id=None)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {
        "train": write_csv(folder / "train.csv", colour_rows(160, seed=1)),
        "validation": write_csv(folder / "dev.csv", colour_rows(37, seed=2)),  # odd: a ragged tail across ranks
        "test": write_csv(folder / "test.csv", colour_rows(20, seed=3)),
    }


def finetune(base, *args, processes: int = 1, config: str | None = None, check: bool = True):
    script = ["-m", "hf_minigpt.finetune", "--model_name_or_path", str(base), "--learning_rate", "2e-3",
              "--num_warmup_steps", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, *script]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    if config:  # its processes find out for themselves that they have no GPU
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *script]
    return launches.run(command, env, check=check)


SINGLE_RUN = ["--num_train_epochs", "3", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "8",
              "--checkpointing_steps", "5", "--save_total_limit", "100"]


@pytest.fixture(scope="module")
def single_label(base, data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("single") / "run"
    finetune(base, *SINGLE_RUN, "--train_file", data["train"], "--validation_file", data["validation"],
             "--test_file", data["test"], "--output_dir", str(output_dir))
    return output_dir


def results(output_dir) -> dict:
    return json.loads(Path(output_dir, "all_results.json").read_text())


def history(output_dir) -> list[dict]:
    return read_log(output_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs


def test_single_label_run_learns_and_writes_everything(single_label, data):
    found = results(single_label)
    assert found["eval_accuracy"] > 0.9 and found["test_accuracy"] > 0.9  # the colour decides the label
    assert {"eval_f1", "eval_loss", "best_epoch", "eval_report"} <= found.keys()
    assert found["eval_report"]["warm"]["support"] + found["eval_report"]["cool"]["support"] == 37
    for picture in ("loss.png", "confusion_matrix.png"):
        assert (single_label / picture).read_bytes().startswith(b"\x89PNG")
    assert not (single_label / "best_model").exists()

    with open(single_label / "predictions.csv") as handle:
        predictions = list(csv.DictReader(handle))
    assert len(predictions) == 20
    assert sum(row["prediction"] == row["label"] for row in predictions) / 20 == found["test_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(single_label).eval()
    tokenizer = AutoTokenizer.from_pretrained(single_label)
    first = model(**tokenizer(predictions[0]["text"], return_tensors="pt")).logits.softmax(-1).max().item()
    assert float(predictions[0]["score"]) == pytest.approx(first, abs=1e-4)  # how sure: the class probability

    model = AutoModelForSequenceClassification.from_pretrained(single_label)
    assert model.config.id2label == {0: "cool", 1: "warm"} and model.config.pad_token_id == 0  # EOS pads
    classifier = pipeline("text-classification", model=str(single_label))
    assert [answer["label"] for answer in classifier(["the red cat sat", "a dog ran on the blue mat"])] == [
        "warm", "cool",
    ]
    card = ModelCard.load(single_label / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    index = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert index == {"accuracy": round(found["eval_accuracy"], 4), "f1": round(found["eval_f1"], 4)}
    assert "![confusion_matrix.png](confusion_matrix.png)" in card.text


def test_resumed_run_equals_the_uninterrupted_one(single_label, base, data, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    # The folder as a run killed after step 15 leaves it: mid-epoch 2, with the best model so far written as a model
    # folder (epoch 1's weights, those of step 10), and a log that went on past the checkpoint (the resumed run drops
    # what came after it).
    shutil.copytree(single_label / "step_15", output_dir / "step_15")
    epoch_1 = AutoModelForSequenceClassification.from_pretrained(single_label)
    dcp_to_torch_save(single_label / "step_10" / WEIGHTS_AND_OPTIMIZER, tmp_path / "step_10.pt")
    epoch_1.load_state_dict(torch.load(tmp_path / "step_10.pt")["model"])
    epoch_1.save_pretrained(output_dir / "best_model")
    AutoTokenizer.from_pretrained(single_label).save_pretrained(output_dir / "best_model")
    shutil.copy(RunFolder(single_label).log, RunFolder(output_dir).log)
    finetune(base, *SINGLE_RUN, "--train_file", data["train"], "--validation_file", data["validation"],
             "--test_file", data["test"], "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest")
    assert history(output_dir) == history(single_label)
    assert results(output_dir)["eval_loss"] == results(single_label)["eval_loss"]
    # The model it saves is the uninterrupted run's best, whichever epoch that was: from before the kill or after.
    inputs = AutoTokenizer.from_pretrained(single_label)(["the red cat sat on the mat"], return_tensors="pt")
    resumed, uninterrupted = (AutoModelForSequenceClassification.from_pretrained(folder).eval()
                              for folder in (output_dir, single_label))
    with torch.no_grad():
        torch.testing.assert_close(resumed(**inputs).logits, uninterrupted(**inputs).logits, atol=1e-6, rtol=0)


def test_two_processes_match_one(single_label, base, data, tmp_path):
    args = [arg if arg != "16" else "8" for arg in SINGLE_RUN]  # 2 x 8 = the same global batch of 16
    finetune(base, *args, "--train_file", data["train"], "--validation_file", data["validation"],
             "--test_file", data["test"], "--output_dir", str(tmp_path), processes=2)
    one, two = history(single_label), history(tmp_path)
    assert [entry["step"] for entry in two] == [entry["step"] for entry in one]
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert results(tmp_path)["eval_report"] == results(single_label)["eval_report"]  # 37 rows, none twice


def test_fsdp2_processes_match_one(single_label, base, data, tmp_path):
    args = [arg if arg != "16" else "8" for arg in SINGLE_RUN]
    finetune(base, *args, "--train_file", data["train"], "--validation_file", data["validation"],
             "--test_file", data["test"], "--output_dir", str(tmp_path),
             config=str(Path(__file__).parents[1] / "scripts" / "accelerate" / "fsdp_cpu.yaml"))
    one, two = history(single_label), history(tmp_path)
    assert [entry["step"] for entry in two] == [entry["step"] for entry in one]
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-6)
    assert len(list((tmp_path / "step_15" / "model_and_optimizer").glob("*.distcp"))) == 2
    assert results(tmp_path)["eval_report"] == results(single_label)["eval_report"]


def test_multi_label_and_regression_runs(base, tmp_path):
    rows = sentences(160, seed=4, colours=[0, 1, 2])
    multi = [{"text": text, "colours": chosen} for text, chosen in rows]
    finetune(base, "--train_file", write_jsonl(tmp_path / "multi.jsonl", multi), "--label_column", "colours",
             "--num_train_epochs", "6", "--output_dir", str(tmp_path / "multi"))
    config = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert config["problem_type"] == MultiLabel.problem_type and config["id2label"] == {"0": "blue", "1": "red"}
    assert results(tmp_path / "multi")["eval_f1"] > 0.9
    with open(tmp_path / "multi" / "predictions.csv") as handle:  # no --test_file: the validation rows
        predictions = list(csv.DictReader(handle))
    assert len(predictions) == 16 and all(len(row["prediction"].split("|")) == len(row["score"].split("|"))
                                          for row in predictions if row["prediction"])

    scores = [{"text": text, "score": float(len(chosen))} for text, chosen in rows]
    finetune(base, "--train_file", write_jsonl(tmp_path / "scores.jsonl", scores), "--label_column", "score",
             "--num_train_epochs", "4", "--output_dir", str(tmp_path / "regression"))
    found = results(tmp_path / "regression")
    assert json.loads((tmp_path / "regression" / "config.json").read_text())["problem_type"] == Regression.problem_type
    assert found["eval_mse"] < np.var([row["score"] for row in scores]) / 2 and found["eval_pearson"] > 0.7


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "validation, extra, message",
    [
        ([{"text": "the red cat", "label": "hot"}], [], r"validation data has label\(s\) \['hot'\] that never occur"),
        ([{"text": "the cat", "label": "warm"}, {"text": "", "label": "warm"}], [],
         r"dev\.csv, row 2 has no text in 'text' \(1 such row\(s\)\)"),
        ([{"text": "the cat", "label": "warm"}, {"text": "a dog", "label": ""}], [],
         r"dev\.csv, row 2 has no label in 'label'"),
        ([{"text": "the red cat", "label": "warm"}], ["--label_column", "colour"],
         r"'colour' is not a column .* \['text', 'label'\]"),
        ([{"text": "the red cat", "label": "warm"}], ["--metric_for_best_model", "mse"], "does not apply to single"),
    ],
)
def test_bad_input_is_refused_before_training(base, data, tmp_path, validation, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(["--model_name_or_path", str(base), "--train_file", data["train"], "--validation_file",
              write_csv(tmp_path / "dev.csv", validation), "--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_an_empty_label_in_the_training_data_names_its_file_and_row(base, tmp_path):
    rows = [{"text": f"the cat {i}", "label": "warm" if i % 2 else "cold"} for i in range(30)]
    rows[17]["label"] = ""
    (tmp_path / "parts").mkdir()
    write_csv(tmp_path / "parts" / "a.csv", rows[:10])
    write_csv(tmp_path / "parts" / "b.csv", rows[10:])
    with pytest.raises(SystemExit, match=r"b\.csv, row 8 has no label in 'label' \(1 such row\(s\)\)"):
        main(["--model_name_or_path", str(base), "--train_file", str(tmp_path / "parts" / "*.csv"),
              "--output_dir", str(tmp_path / "out")])


def test_plain_text_without_labels_is_refused_in_one_line(base, tmp_path):
    (tmp_path / "reviews.txt").write_text("A gripping film.\nA dull film.\n")
    with pytest.raises(SystemExit, match=r"'label' is not a column .* \['text'\] \(plain text files hold only"):
        main(["--model_name_or_path", str(base), "--train_file", str(tmp_path / "reviews.txt"),
              "--output_dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and pooling


def test_metrics_on_a_known_prediction_set():
    labels, predictions = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    metrics = SingleLabel(["a", "b", "c"]).metrics_of(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: a 1/2, b 4/5, c 2/3.
    assert metrics["f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert metrics["report"]["b"] == {"precision": 0.6667, "recall": 1.0, "f1-score": 0.8, "support": 2.0}
    regression = Regression(["score"]).metrics_of(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 3.0]))
    assert regression["mse"] == pytest.approx(2 / 3) and regression["pearson"] == pytest.approx((4 / 7) ** 0.5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_does_not_change_the_pooled_token(base, side):
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, side
    torch.manual_seed(0)  # the new head's weights
    model = MiniGPTForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=tokenizer.pad_token_id)
    texts = ["the red cat sat on the mat", "a dog"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    # As in GPT-2, positions come from the mask only when given: left padding must pass them.
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(**batch, position_ids=positions).logits
        alone = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Bring your own loop


def toy_dataset(tokenizer, n, seed):
    from datasets import Dataset

    rows = colour_rows(n, seed)
    encoded = tokenizer([row["text"] for row in rows])
    return Dataset.from_dict({**encoded, "labels": [int(row["label"] == "warm") for row in rows]})


def accuracy(model, dataset, tokenizer) -> float:
    batch = tokenizer.pad({"input_ids": dataset["input_ids"]}, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    return (predicted == torch.tensor(dataset["labels"])).float().mean().item()


def test_transformers_trainer_fine_tunes_a_classifier(base, tmp_path):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)  # the new head's weights
    model = MiniGPTForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=tokenizer.pad_token_id)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=16, learning_rate=2e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=20, seed=0,
    )
    train, test = toy_dataset(tokenizer, 320, 5), toy_dataset(tokenizer, 64, 6)
    assert accuracy(model, test, tokenizer) < 0.8
    Trainer(model=model, args=arguments, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)).train()
    assert accuracy(model.eval(), test, tokenizer) > 0.95


def test_peft_lora_fine_tunes_merges_and_saves(base, tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = MiniGPTForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=tokenizer.pad_token_id)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "c_proj", "c_fc"], task_type="SEQ_CLS")
    peft_model = get_peft_model(model, lora)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "score" in name for name in trainable)
    assert sum("c_fc.lora_A" in name for name in trainable) == model.config.n_layer

    train, test = toy_dataset(tokenizer, 320, 7), toy_dataset(tokenizer, 64, 8)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    peft_model.train()
    for step in range(80):
        rows = train[(step * 16) % 320: (step * 16) % 320 + 16]
        batch = tokenizer.pad({"input_ids": rows["input_ids"]}, return_tensors="pt")
        loss = peft_model(**batch, labels=torch.tensor(rows["labels"])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    assert accuracy(peft_model, test, tokenizer) > 0.95

    merged = peft_model.merge_and_unload()
    assert type(merged) is MiniGPTForSequenceClassification
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    batch = tokenizer.pad({"input_ids": test["input_ids"]}, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, peft_model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_early_stopping_keeps_the_best_epoch(base, data, tmp_path):
    result = finetune(base, "--train_file", data["train"], "--validation_file", data["validation"],
                      "--num_train_epochs", "12", "--early_stopping_patience", "1", "--output_dir", str(tmp_path))
    assert "stopping early" in result.stdout + result.stderr
    # Written for a log file (output is not a terminal): plain lines, no bars, no colour codes.
    assert "A new classification head (score.weight, 2 labels) starts from random weights" in result.stdout
    assert "LOAD REPORT" not in result.stderr and "\x1b[" not in result.stdout + result.stderr
    assert "it/s]" not in result.stderr and re.search(r"step \d+/\d+: loss", result.stdout)
    found = results(tmp_path)
    evaluated = [entry for entry in history(tmp_path) if "eval_accuracy" in entry]
    assert len(evaluated) < 12 and found["epoch"] < 12
    best = max(evaluated, key=lambda entry: entry["eval_accuracy"])  # the first of the best, as kept
    assert found["eval_accuracy"] == best["eval_accuracy"] and found["best_epoch"] == evaluated.index(best)
    # The saved weights are the best epoch's, not the last's: scored here on the validation file, they give the
    # best epoch's validation loss, which the last epoch's differs from.
    assert abs(evaluated[-1]["eval_loss"] - best["eval_loss"]) > 1e-3
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with open(data["validation"]) as handle:
        rows = list(csv.DictReader(handle))
    with torch.no_grad():
        logits = torch.cat([model(**tokenizer(row["text"], truncation=True, max_length=128,
                                              return_tensors="pt")).logits for row in rows])
    labels = torch.tensor([model.config.label2id[row["label"]] for row in rows])
    assert torch.nn.functional.cross_entropy(logits, labels).item() == pytest.approx(best["eval_loss"], abs=1e-4)


def test_a_run_that_ends_mid_epoch_still_evaluates_and_saves_the_best_model(base, data, tmp_path):
    finetune(base, "--train_file", data["train"], "--validation_file", data["validation"], "--max_train_steps", "3",
             "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path))
    found = results(tmp_path)
    assert found["train_steps"] == 3 and found["best_epoch"] == 0 and "eval_accuracy" in found
    assert (tmp_path / "model.safetensors").exists()


TOPICS = {  # three clearly separable classes: no word is shared between two
    "sports": (["The team", "Our striker", "The goalkeeper", "The coach", "The runner"],
               ["won the match", "scored a late goal", "trained on the field", "lost the final", "ran the marathon"]),
    "food": (["The soup", "My grandmother's bread", "The pasta", "This curry", "The cake"],
             ["tastes of garlic", "was baked this morning", "needs more salt", "is served with rice",
              "smells of cinnamon"]),
    "weather": (["The storm", "Heavy rain", "A cold wind", "The morning fog", "Bright sunshine"],
                ["is coming from the west", "flooded the valley", "blew all night", "covered the hills",
                 "warmed the beach"]),
}


def topic_rows(per_topic: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"text": f"{rng.choice(subjects)} {rng.choice(predicates)}.", "label": topic}
            for topic, (subjects, predicates) in TOPICS.items() for _ in range(per_topic)]
    rng.shuffle(rows)
    return rows


def test_the_defaults_learn_a_small_separable_data_set(tmp_path):
    """60 rows of three separable topics; a model of minigpt-pretrain's defaults, pre-trained on their text;
    minigpt-finetune's defaults (the learning rate follows the model's size): at least 90% of 30 new rows."""
    train = topic_rows(20, seed=0)
    (tmp_path / "texts.txt").write_text("".join(row["text"] + "\n" for row in train))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    launches.run([sys.executable, "-m", "hf_minigpt.pretrain", "--train_file", str(tmp_path / "texts.txt"),
                  "--output_dir", str(tmp_path / "base"), "--max_new_tokens", "0"], env)
    result = launches.run([sys.executable, "-m", "hf_minigpt.finetune", "--model_name_or_path", str(tmp_path / "base"),
                           "--train_file", write_csv(tmp_path / "train.csv", train),
                           "--test_file", write_csv(tmp_path / "test.csv", topic_rows(10, seed=1)),
                           "--output_dir", str(tmp_path / "topics")], env)
    assert re.search(r"Learning rate 6\.\de-04, for [\d,]+ parameters", result.stdout)
    assert "105 steps" in result.stdout  # 54 rows, 7 steps per epoch, repeated for at least 100 steps
    assert results(tmp_path / "topics")["test_accuracy"] >= 0.9
    # The card shows the user's own kind of text, and names the file its validation scores come from.
    card = ModelCard.load(tmp_path / "topics" / "README.md")
    example = re.search(r'print\(classifier\((".*")\)\)', card.text)
    assert json.loads(example[1]) in {row["text"] for row in train}
    assert card.data.eval_results[0].dataset_name == "train.csv"
