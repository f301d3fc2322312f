"""Pre-train a MiniGPT language model with Accelerate, with the flags of transformers' `run_clm_no_trainer.py`.

    minigpt-pretrain --output_dir runs/pydoc                 # Python's own language reference, no download
    minigpt-pretrain --train_file 'books/*.txt' --block_size 256 --output_dir runs/books
    minigpt-pretrain --train_file 'web/*.jsonl' --streaming --max_train_steps 20000 --tokenizer_name gpt2 ...
    accelerate launch --num_processes 4 -m hf_minigpt.pretrain --train_file data.jsonl --output_dir runs/big

Documents are tokenized with `datasets.map` (cached, parallel) into a token shard on disk, each after an EOS, and
read as blocks of `block_size` tokens (`training.tokens`); `--streaming` tokenizes as training reads. The same script
runs on CPU, one GPU or many, and on several machines (DDP, or FSDP2 with `scripts/accelerate/fsdp*.yaml`).
"""

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import MiniGPTConfig, MiniGPTForCausalLM
from .folders import model_source_problem
from .hub import push_after_training
from .loss_minigpt import IGNORE_INDEX
from .training.data import DataError, check_columns, embedded_corpus, hold_out, load_files, pieces, train_loader
from .training.loop import TrainingRun
from .training.report import evaluated_on, file_names, optimization_rows, write_model_card
from .training.script import run_script
from .training.settings import (
    DataSettings,
    HubSettings,
    OptimizationSettings,
    RunSettings,
    parse,
    save_settings,
    setting,
)
from .training.tokens import (
    StreamedBlocks,
    TokenBlocks,
    fit_embeddings,
    read_shards,
    starting_documents,
    token_byte_lengths,
    token_shards,
    tokenize_to_shard,
    train_tokenizer,
)

EOS = "<|endoftext|>"  # GPT-2's end-of-text token, also the separator between packed documents
EMBEDDED_CORPUS = "the Python language reference (pydoc_data.topics)"
# Enough optimizer steps for the default model to learn a text of a few hundred tokens by heart.
MIN_TRAIN_STEPS = 500
NEW_MODEL_POSITIONS = 128


@dataclass
class CorpusSettings:
    """How text becomes training blocks."""

    _argument_group_name = "corpus (no --train_file: the Python language reference that ships with Python)"
    block_size: int | None = setting(help="Tokens per training sequence (default: 128, or n_positions).")
    document_masking: bool = setting(True, "Attention stays inside each packed document, and positions start again "
                                     "at each, as they do at the start of a prompt (--no_document_masking: each "
                                     "document sees those packed before it).")
    save_tokens: str | None = setting(help="Keep the tokenized text as token shards in DIR (train.bin, validation"
                                      ".bin; llm.c's format), to train on again (--train_file DIR/train.bin).",
                                      metavar="DIR")
    streaming: bool = setting(False, "Read, tokenize and pack --train_file as training goes (datasets' streaming "
                              "mode): nothing is written, memory stays flat. Needs --max_train_steps and a tokenizer.")


@dataclass
class TokenizerSettings:
    _argument_group_name = "tokenizer (default: a new byte-level BPE trained on --train_file)"
    tokenizer_name: str | None = setting(help="An existing tokenizer folder or hub id.")
    vocab_size: int = setting(4096, "Size of a newly trained tokenizer.")


@dataclass
class ModelSettings:
    _argument_group_name = "model (default: a new MiniGPT of the shape below)"
    model_name_or_path: str | None = setting(help="Continue from a MiniGPT or GPT-2 folder or hub id.")
    n_layer: int = setting(4, "Transformer blocks.")
    n_head: int = setting(4, "Attention heads per block.")
    n_embd: int = setting(128, "Width of the residual stream.")
    dropout: float = setting(0.0, "On embeddings, attention and residual branches.")


@dataclass
class EvaluationSettings:
    _argument_group_name = "evaluation and samples"
    eval_steps: int | None = setting(help="Evaluate every N optimizer steps (always at the end).")
    prompts: list[str] | None = setting(help="Sampled at the end. Default: the first words of three texts of "
                                        "--validation_file, or else of the training text.")
    max_new_tokens: int = setting(48, "Length of each sample (0: no samples).")


@dataclass
class PretrainSettings:
    run: RunSettings
    optimization: OptimizationSettings
    data: DataSettings
    corpus: CorpusSettings
    tokenizer: TokenizerSettings
    model: ModelSettings
    evaluation: EvaluationSettings
    hub: HubSettings

    @functools.cached_property
    def train_shards(self) -> list[str]:
        """--train_file's files when they are token shards (.bin), else []."""
        return token_shards(self.data.train_file)


def problems(settings: PretrainSettings) -> list[str]:
    """What no single settings group can see."""
    found = [problem for name, flag in ((settings.model.model_name_or_path, "--model_name_or_path"),
                                        (settings.tokenizer.tokenizer_name, "--tokenizer_name"))
             if (problem := model_source_problem(name, flag))]
    given_tokenizer = settings.tokenizer.tokenizer_name or settings.model.model_name_or_path
    if settings.train_shards and not given_tokenizer:
        found.append("--train_file holds token shards: pass the tokenizer that made them (--tokenizer_name or "
                     "--model_name_or_path)")
    if settings.corpus.streaming:
        if not settings.data.train_file or settings.train_shards:
            found.append("--streaming reads text files: give them with --train_file")
        if not settings.optimization.max_train_steps:
            found.append("--streaming needs --max_train_steps (a stream has no length to count epochs in)")
        if not given_tokenizer:
            found.append("--streaming needs a tokenizer (--tokenizer_name or --model_name_or_path)")
        if settings.corpus.save_tokens:
            found.append("--streaming writes no tokens: drop --save_tokens, or --streaming to keep them")
    if settings.corpus.block_size is not None and settings.corpus.block_size < 2:
        found.append(f"--block_size must be at least 2, got {settings.corpus.block_size}")
    return found


def parse_args(argv=None) -> PretrainSettings:
    # Defaults for a small model trained from scratch (nanoGPT's), not run_clm's fine-tuning ones.
    defaults = dict(learning_rate=2e-3, weight_decay=0.1, lr_scheduler_type="cosine", num_warmup_steps=20,
                    min_train_steps=MIN_TRAIN_STEPS)
    return parse(PretrainSettings, "minigpt-pretrain", __doc__, argv, defaults, check=problems)


# ---------------------------------------------------------------------------------------------------------------------
# Data: text -> tokenizer -> blocks


def load_texts(data: DataSettings, split: str, streaming: bool):
    """The documents of --train_file (or of the embedded corpus) or --validation_file; None where there is none."""
    patterns = data.train_file if split == "train" else data.validation_file
    if patterns is None:
        return embedded_corpus() if split == "train" else None
    texts = load_files(patterns, split, streaming, in_pieces=True)
    check_columns(texts, [data.text_column], "--text_column")
    if not streaming:
        if texts.features[data.text_column].dtype not in ("string", "large_string"):
            raise DataError(f"--text_column {data.text_column!r} holds {texts.features[data.text_column]}, not text.")
        if not any(text for batch in texts.iter(batch_size=256) for text in batch[data.text_column]):
            raise DataError(f"{file_names(patterns)}: every {data.text_column!r} value is empty.")
    return texts


def load_tokenizer(settings: PretrainSettings, texts, resume: Path | None, accelerator):
    if resume is not None:
        return starting_documents(AutoTokenizer.from_pretrained(resume))
    source = settings.tokenizer.tokenizer_name or settings.model.model_name_or_path
    if source:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.eos_token_id is None:
            raise DataError(f"The tokenizer from {source} has no EOS token to separate documents with.")
        return starting_documents(tokenizer)
    # The main process trains it and sends it to the others (on other machines too, which may not see its disk):
    # every process must hold the same vocabulary.
    tokenizer = [None]
    if accelerator.is_main_process:
        tokenizer = [train_tokenizer(pieces(texts, settings.data.text_column), settings.tokenizer.vocab_size, EOS)]
        tokenizer[0].save_pretrained(settings.run.output_dir)
    return broadcast_object_list(tokenizer)[0]


def new_model_positions(settings: PretrainSettings) -> int:
    """A new model's context: its blocks', but never fewer positions than generate()'s and minigpt-generate's
    defaults take."""
    return max(settings.corpus.block_size or 0, NEW_MODEL_POSITIONS)


def pick_block_size(settings: PretrainSettings, resume: Path | None) -> int:
    source = resume or settings.model.model_name_or_path
    n_positions = AutoConfig.from_pretrained(source).n_positions if source else new_model_positions(settings)
    block_size = settings.corpus.block_size or min(n_positions, 1024)
    if block_size > n_positions:
        raise DataError(f"--block_size {block_size} must be between 2 and the model's n_positions ({n_positions}).")
    return block_size


def training_blocks(settings: PretrainSettings, texts: dict, tokenizer, block_size: int, accelerator):
    """(train, validation or None, what the validation set is, in words, the block size): blocks from token shards,
    from text tokenized into shards, or streamed. A text shorter than one block is one shorter block."""
    data, corpus = settings.data, settings.corpus
    eos = tokenizer.eos_token_id if corpus.document_masking else None
    if corpus.streaming:
        train, validation = (texts[split] and StreamedBlocks(texts[split], tokenizer, data.text_column, block_size,
                                                             eos) for split in ("train", "validation"))
        note = f"Validation: {file_names(data.validation_file)}." if validation else "No validation set (streamed)."
        return train, validation, note, block_size
    with accelerator.main_process_first():  # the others then read the `datasets` cache
        shards = {}
        for split, patterns in (("train", data.train_file), ("validation", data.validation_file)):
            if token_shards(patterns):
                shards[split] = read_shards(patterns, tokenizer)
            elif texts[split] is not None:
                shards[split] = [tokenize_to_shard(texts[split], tokenizer, data.text_column, split,
                                                   corpus.save_tokens, data.preprocessing_num_workers)]
    for split, split_shards in shards.items():
        longest = max(len(shard) for shard in split_shards)
        if longest < block_size:
            if longest < 2:
                raise DataError(f"The {split} text is a single token: there is no next token to learn.")
            accelerator.print(f"The {split} text holds {longest} tokens, fewer than a block of {block_size}: "
                              f"blocks of {longest} tokens.")
            block_size = longest
    blocks = {split: TokenBlocks(split_shards, block_size, eos) for split, split_shards in shards.items()}
    if "validation" in blocks:
        return (blocks["train"], blocks["validation"], f"Validation: {file_names(data.validation_file)}.",
                block_size)
    percentage = data.validation_split_percentage
    train, validation = hold_out(blocks["train"], percentage, settings.run.seed)
    if validation is None:
        if percentage:
            accelerator.print(f"No validation: {len(train)} block(s) are too few to hold out {percentage}% (pass "
                              "--validation_file to evaluate); training on all of them.")
        return train, None, "No validation set: the model was trained on all of the text.", block_size
    return train, validation, (f"Validation: {len(validation)} of the {len(blocks['train'])} blocks "
                               f"({percentage}%), drawn at random."), block_size


def build_model(settings: PretrainSettings, tokenizer, resume: Path | None) -> MiniGPTForCausalLM:
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    shape = settings.model
    if resume is not None:  # the checkpoint's own shape, whatever the flags say
        model = MiniGPTForCausalLM(MiniGPTConfig.from_pretrained(resume))
    elif shape.model_name_or_path:
        model = MiniGPTForCausalLM.from_pretrained(shape.model_name_or_path)
    else:
        dropout = dict(resid_pdrop=shape.dropout, embd_pdrop=shape.dropout, attn_pdrop=shape.dropout)
        model = MiniGPTForCausalLM(MiniGPTConfig(
            vocab_size=len(tokenizer), n_positions=new_model_positions(settings),
            n_embd=shape.n_embd, n_layer=shape.n_layer, n_head=shape.n_head, **dropout, **special,
        ))
    fit_embeddings(model, tokenizer)
    model.generation_config.update(pad_token_id=tokenizer.eos_token_id, **special)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Training


def lm_loss(model, batch, labels=None) -> torch.Tensor:
    """The mean next-token loss of `labels` (by default the batch's own tokens; -100 is not predicted)."""
    # No KV cache when nothing is decoded: without one, restarting `position_ids` mark packed documents.
    labels = batch["input_ids"] if labels is None else labels
    return model(**batch, labels=labels, use_cache=False, skip_logits=True).loss


def validation_metrics(model, loader, accelerator, token_bytes: torch.Tensor) -> dict:
    """The mean next-token loss over the validation blocks, its perplexity, and bits per byte: the loss summed over
    the text's tokens, in bits, over the bytes they stand for (special tokens count in neither). Two passes of the
    memory-saving loss per batch: over every token, and over the text's tokens alone."""
    model.eval()
    sums = []  # per batch: nats and targets over every token, nats and bytes over the text's tokens
    for batch in loader:
        lengths = token_bytes[batch["input_ids"]]
        text_labels = batch["input_ids"].masked_fill(lengths == 0, IGNORE_INDEX)
        targets, text_targets = lengths[:, 1:].numel(), (lengths[:, 1:] > 0).sum()
        with torch.no_grad():
            nats = lm_loss(model, batch).double() * targets
            text_nats = (lm_loss(model, batch, text_labels).double() * text_targets if text_targets
                         else nats.new_zeros(()))
        batch_sums = torch.stack([nats, nats.new_tensor(targets), text_nats, lengths[:, 1:].sum().double()])
        # A share per block, so that gathering drops the blocks a ragged last batch repeats on some processes.
        rows = len(batch["input_ids"])
        sums.append(accelerator.gather_for_metrics((batch_sums / rows).expand(rows, 4).contiguous()).sum(0).cpu())
    totals = torch.stack(sums).sum(0)
    model.train()
    loss = (totals[0] / totals[1]).item()
    metrics = {"eval_loss": loss, "perplexity": perplexity(loss)}
    if totals[3] > 0:
        metrics["bits_per_byte"] = (totals[2] / (math.log(2) * totals[3])).item()
    return metrics


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def train(settings: PretrainSettings, accelerator) -> dict:
    resume = settings.run.checkpoint_to_resume
    streaming, data = settings.corpus.streaming, settings.data
    pretokenized = bool(settings.train_shards)
    texts = {split: None if pretokenized else load_texts(data, split, streaming) for split in ("train", "validation")}
    tokenizer = load_tokenizer(settings, texts["train"], resume, accelerator)
    train_blocks, validation_blocks, validation_note, block_size = training_blocks(
        settings, texts, tokenizer, pick_block_size(settings, resume), accelerator)
    accelerator.print(validation_note)
    model = build_model(settings, tokenizer, resume)
    prompts = None  # (sampled by the main process only)
    if accelerator.is_main_process:
        prompts = settings.evaluation.prompts or opening_words(texts, data.text_column, train_blocks, tokenizer)
    batch_size = settings.optimization.per_device_train_batch_size
    eval_loader = validation_blocks and DataLoader(validation_blocks, batch_size=data.per_device_eval_batch_size)
    if accelerator.is_main_process:
        save_settings(settings)  # as resolved
    run = TrainingRun(
        accelerator, settings.run, settings.optimization, model, tokenizer,
        train_loader(train_blocks, batch_size), eval_loader,
        geometry={"block_size": block_size}, unit="tokens", items_per_batch=batch_size * block_size,
        name="minigpt-pretrain",
    )
    blocks = f"{len(train_blocks)} training blocks" if not streaming else "Streamed blocks"
    accelerator.print(
        f"{blocks} of {block_size} tokens, {run.plan.steps_per_epoch} steps per epoch, {run.plan.max_steps} steps, "
        f"{model.num_parameters():,} parameters, a context of {model.config.n_positions} tokens, "
        f"{accelerator.num_processes} process(es)."
    )

    token_bytes = token_byte_lengths(tokenizer, model.config.vocab_size).to(accelerator.device)

    def evaluate(write) -> None:
        metrics = validation_metrics(run.model, run.eval_loader, accelerator, token_bytes)
        run.log(metrics, "eval")
        write(f"step {run.step}: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))

    def evaluate_every(step, write) -> None:
        every = settings.evaluation.eval_steps
        if run.eval_loader is not None and every and step % every == 0:
            evaluate(write)

    run.fit(lm_loss, after_step=evaluate_every)
    if run.eval_loader is not None and "eval_loss" not in run.last_entry:  # unless this very step was evaluated
        evaluate(accelerator.print)
    return save_outputs(settings, run, block_size, validation_note, prompts)


def opening_words(texts: dict, column: str, train_blocks, tokenizer, count: int = 3) -> list[str]:
    """The first words of `count` texts that open differently, from --validation_file where one is given: samples
    that continue the user's own text. Token shards keep no text: there, the words that open the first block."""
    words = []
    for split in ("validation", "train"):
        for row in itertools.islice(texts[split] or [], 1000):
            first = (row[column] or "").split(maxsplit=1)[:1]
            if first and first[0] not in words:
                words.append(first[0])
            if len(words) == count:
                return words
    if not words:
        block = next(iter(train_blocks))["input_ids"]
        words = tokenizer.decode(block[:64], skip_special_tokens=True).split()[:1]
    return words or [""]


def save_outputs(settings: PretrainSettings, run: TrainingRun, block_size: int, validation_note: str,
                 prompts: list[str]) -> dict:
    """Model, tokenizer, results, loss curve and card in --output_dir; samples."""
    accelerator, output_dir = run.accelerator, Path(settings.run.output_dir)
    results = run.summary()
    results["train_tokens"] = results["train_steps"] * run.items_per_step
    if "eval_loss" in run.last_entry:
        results.update({key: run.last_entry[key] for key in ("eval_loss", "perplexity", "bits_per_byte")
                        if key in run.last_entry})
    run.save(results)
    if accelerator.is_main_process:
        # Samples come from the saved folder, loaded as a user would: this also proves that it loads.
        saved = AutoModelForCausalLM.from_pretrained(output_dir).to(accelerator.device).eval()
        samples = generate_samples(saved, run.tokenizer, prompts,
                                   settings.evaluation.max_new_tokens, settings.run.seed)
        write_pretraining_card(settings, saved, results, samples, block_size, validation_note, prompts[0])
        for text in samples.values():
            print(f"\n{text}\n{'-' * 40}")
        print(f"\nSaved to {output_dir}: " + ", ".join(f"{key} {value:.4g}" for key, value in results.items()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        push_after_training(settings.hub, output_dir)
    return results


def generate_samples(model, tokenizer, prompts, max_new_tokens: int, seed: int) -> dict[str, str]:
    if max_new_tokens == 0:
        return {}
    samples = {}
    set_seed(seed)  # once: each prompt draws its own continuation
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)  # after EOS, as in training
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=40, temperature=0.8,
            min_new_tokens=max_new_tokens, max_new_tokens=max_new_tokens,  # a whole sample, past any EOS
        )
        samples[prompt] = tokenizer.decode(output[0], skip_special_tokens=True)
    return samples


def write_pretraining_card(settings: PretrainSettings, model, results, samples, block_size,
                           validation_note: str, example_prompt: str) -> None:
    data, base_model = settings.data, settings.model.model_name_or_path
    if settings.train_shards:
        training_data = f"Token shards from {file_names(data.train_file)}."
    elif data.train_file:
        training_data = f"Plain text from {file_names(data.train_file)}."
    else:
        training_data = f"The text of {EMBEDDED_CORPUS}, one document per topic, which ships with every Python."
    training_data += f" {validation_note}"
    tokenizer_name = settings.tokenizer.tokenizer_name
    tokenizer = f"`{tokenizer_name}`" if tokenizer_name else (
        f"`{base_model}`'s" if base_model else
        f"a byte-level BPE of {model.config.vocab_size} tokens, trained on the training text")
    base = f"continued from `{base_model}`" if base_model else "trained from scratch"
    hyperparameters = {
        "tokenizer": tokenizer,
        "block size": block_size,
        "document masking": settings.corpus.document_masking,
        **optimization_rows(settings.optimization),
        "optimizer steps": results["train_steps"],
        "mixed precision": settings.run.mixed_precision or "accelerate default",
        "seed": settings.run.seed,
    }
    metrics = {key: results[key] for key in ("perplexity", "eval_loss", "bits_per_byte") if key in results}
    write_model_card(
        settings.run.output_dir,
        model=model,
        pipeline_tag="text-generation",
        dataset_name=evaluated_on(data) or EMBEDDED_CORPUS,
        metrics=metrics,
        results=results,
        hyperparameters=hyperparameters,
        summary=f"A MiniGPT causal language model {base} with `minigpt-pretrain`.",
        training_data=training_data,
        procedure="Documents joined with the EOS token and packed into blocks; AdamW (no decay on biases and "
        f"LayerNorm weights), gradient clipping at {settings.optimization.max_grad_norm}, trained with Accelerate.",
        example_prompt=example_prompt,
        base_model=base_model,
        repo_id=settings.hub.hub_model_id,
        samples=samples,
    )


def main(argv=None) -> None:
    run_script("minigpt-pretrain", parse_args, train, argv)


if __name__ == "__main__":
    main()
