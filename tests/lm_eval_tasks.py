"""Twenty made-up facts, and lm-eval task files over them, one of each request kind lm-eval has, as docs/evaluation.md
writes them: multiple choice (loglikelihoods), bits per byte (rolling loglikelihoods) and generation."""

import json
import subprocess
from pathlib import Path

NAMES = "Anna Boris Chen Dara Emil Fatima Gus Hana Ivan Jade Kofi Lena Milo Nia Omar Pia Quinn Rosa Sami Tara".split()
CITIES = "Paris Oslo Lima Cairo Tokyo Quito Rome Delhi Accra Perth Hanoi Sofia Dakar Bern Kyiv Riga Seoul Tunis Baku " \
         "Doha".split()
FACTS = [f"{name} lives in {city}." for name, city in zip(NAMES, CITIES)]
TASKS = ["facts_choice", "facts_bits_per_byte", "facts_generation"]


def write_tasks(folder: Path) -> Path:
    """The facts as rows of {"context", "choices", "gold", "text"}: where each one lives, out of the 20 cities, as
    multiple choice and as generation up to the full stop; the whole fact's bits per byte."""
    rows = [{"context": f"{name} lives in", "choices": CITIES, "gold": index, "text": fact}
            for index, (name, fact) in enumerate(zip(NAMES, FACTS))]
    with open(folder / "facts.jsonl", "w") as lines:
        lines.writelines(json.dumps(row) + "\n" for row in rows)
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'facts.jsonl'}\n"
              "test_split: test\n")
    (folder / "choice.yaml").write_text(
        f"task: facts_choice\n{source}output_type: multiple_choice\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    (folder / "bits_per_byte.yaml").write_text(
        f"task: facts_bits_per_byte\n{source}output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n  - metric: byte_perplexity\n")
    (folder / "generation.yaml").write_text(
        f"task: facts_generation\n{source}output_type: generate_until\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_target: \"{{' ' + choices[gold]}}\"\ngeneration_kwargs:\n  until: ['.']\n  do_sample: false\n"
        "  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n")
    return folder


def run_lm_eval(command: list[str], arguments: list[str], tasks: Path, output: Path, env: dict | None = None) -> dict:
    """`command` (lm_eval, or a command that takes its arguments) on the facts tasks in a process of its own, every
    sample logged: what it wrote, and what it printed as "log"."""
    run = subprocess.run([*command, *arguments, "--tasks", ",".join(TASKS), "--include_path", str(tasks),
                          "--batch_size", "8", "--output_path", str(output), "--log_samples"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return {**written(output), "log": run.stdout + run.stderr}


def evaluator(tasks: Path):
    """lm-eval in this process: (folder, batch size, lm-eval model) -> its results on the facts tasks, each evaluated
    once. lm-eval's task index is built once too (it reads every task file lm-eval ships: seconds)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hf_minigpt import evaluation  # noqa: F401  (registers the model `minigpt`)

    task_manager, done = TaskManager(include_path=str(tasks)), {}

    def evaluated(folder, batch_size: int = 8, model: str = "minigpt") -> dict:
        if (folder, batch_size, model) not in done:
            done[folder, batch_size, model] = lm_eval.simple_evaluate(
                model=model, model_args=f"pretrained={folder}", tasks=TASKS, batch_size=batch_size, device="cpu",
                task_manager=task_manager, log_samples=True)
        return done[folder, batch_size, model]

    return evaluated


def written(output: Path) -> dict:
    """What `lm_eval ... --output_path OUTPUT --log_samples` wrote, as `lm_eval.simple_evaluate` returns it."""
    [path] = output.rglob("results_*.json")
    results = json.loads(path.read_text())
    samples = {task: [json.loads(line) for sample_file in path.parent.glob(f"samples_{task}_*.jsonl")
                      for line in sample_file.open()] for task in results["results"]}
    return {**results, "samples": samples}


def scores(results: dict) -> dict:
    """Each task's metrics, without their standard errors."""
    return {task: {metric: value for metric, value in values.items() if metric.endswith(",none")}
            for task, values in results["results"].items()}


def per_document(samples: dict) -> dict:
    """Each document's raw answers, in document order: the loglikelihoods of each choice, of each text, and the
    generated texts, flat."""
    return {task: [[value for answer in sample["resps"] for value in answer]
                   for sample in sorted(task_samples, key=lambda sample: sample["doc_id"])]
            for task, task_samples in samples.items()}


def assert_same_answers(one: dict, other: dict, tolerance: float, detokenized_apart: bool = False) -> None:
    """Loglikelihoods within `tolerance`, generated texts equal. With `detokenized_apart`, a text may lack the end of
    the other where that ends in U+FFFD: a last token whose bytes end inside a character, which transformers decodes
    (the broken character as U+FFFD) and vLLM holds back.
    Written samples hold loglikelihoods as text: (loglikelihood, is greedy) pairs, or lone values."""
    assert one.keys() == other.keys()
    for task in one:
        for answers, other_answers in zip(one[task], other[task], strict=True):
            for value, other_value in zip(answers, other_answers, strict=True):
                if task == "facts_generation":
                    assert equal_texts(value, other_value, detokenized_apart), (value, other_value)
                else:
                    assert abs(loglikelihood(value) - loglikelihood(other_value)) <= tolerance, (task, value,
                                                                                                 other_value)


def loglikelihood(value) -> float:
    return float(value[0] if isinstance(value, (list, tuple)) else value)


def equal_texts(text: str, other: str, detokenized_apart: bool) -> bool:
    if text == other or not detokenized_apart:
        return text == other
    short, long = sorted((text, other), key=len)
    held_back = long[len(short):]
    return long.startswith(short) and held_back.endswith("\ufffd") and len(held_back) <= 8  # one token's text
