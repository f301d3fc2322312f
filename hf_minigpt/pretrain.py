"""Pre-train a MiniGPT language model with Accelerate, with the flags of transformers' `run_clm_no_trainer.py`.

    minigpt-pretrain --output_dir runs/pydoc                 # Python's own language reference, no download
    minigpt-pretrain --train_file 'books/*.txt' --block_size 256 --output_dir runs/books
    accelerate launch --num_processes 4 -m hf_minigpt.pretrain --train_file data.jsonl --output_dir runs/big

Documents are tokenized with `datasets.map` (cached, parallel), joined with EOS and packed into `block_size`
chunks. The same script runs on CPU, one GPU or many (DDP, FSDP or DeepSpeed through `accelerate config`).
"""

import argparse
import math
import tempfile
from contextlib import nullcontext
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute
import torch
from accelerate.utils import set_seed
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, Subset
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from . import MiniGPTConfig, MiniGPTForCausalLM
from .hub import add_hub_args, push_after_training
from .model_card import file_names, optimization_rows, write_model_card
from .tokens import ShardError, TokenBlocks, read_shard, write_shard
from .training import (
    DataError,
    HelpFormatter,
    TrainingRun,
    add_common_args,
    check_columns,
    expand,
    load_files,
    plot_losses,
    run_script,
    save_model,
    start,
    train_loader,
    write_json,
)

EOS = "<|endoftext|>"  # GPT-2's end-of-text token, also the separator between packed documents
EMBEDDED_CORPUS = "the Python language reference (pydoc_data.topics)"
# Enough optimizer steps for the default model to learn a text of a few hundred tokens by heart.
MIN_TRAIN_STEPS = 500
PIECE_CHARS = 2**16  # documents are tokenized in pieces of up to this many characters


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="minigpt-pretrain", description=__doc__, formatter_class=HelpFormatter
    )
    add_common_args(parser)
    add_hub_args(parser)
    data = parser.add_argument_group("data (no --train_file: the Python language reference that ships with Python)")
    data.add_argument("--text_column", default="text", help="Column holding the text in json/csv/parquet data.")
    data.add_argument("--validation_split_percentage", type=int, default=5, help="Without --validation_file.")
    data.add_argument("--block_size", type=int, help="Tokens per training sequence (default: 128, or n_positions).")
    data.add_argument("--document_masking", action="store_true", help="Attention stays inside each packed document.")
    data.add_argument("--save_tokens", metavar="DIR", help="Keep the tokenized text as token shards in DIR "
                      "(train.bin, validation.bin; llm.c's format), to train on again (--train_file DIR/train.bin).")
    tokenizer = parser.add_argument_group("tokenizer (default: a new byte-level BPE trained on --train_file)")
    tokenizer.add_argument("--tokenizer_name", help="An existing tokenizer folder.")
    tokenizer.add_argument("--vocab_size", type=int, default=4096, help="Size of a newly trained tokenizer.")
    model = parser.add_argument_group("model (default: a new MiniGPT of the shape below)")
    model.add_argument("--model_name_or_path", help="Continue from a MiniGPT or GPT-2 folder.")
    model.add_argument("--n_layer", type=int, default=4, help="Transformer blocks.")
    model.add_argument("--n_head", type=int, default=4, help="Attention heads per block.")
    model.add_argument("--n_embd", type=int, default=128, help="Width of the residual stream.")
    model.add_argument("--dropout", type=float, default=0.0, help="On embeddings, attention and residual branches.")
    run = parser.add_argument_group("evaluation and samples")
    run.add_argument("--eval_steps", type=int, help="Evaluate every N optimizer steps (always at the end).")
    run.add_argument("--prompts", nargs="*", default=["Python", "The", "A class"], help="Sampled at the end.")
    run.add_argument("--max_new_tokens", type=int, default=48, help="Length of each sample.")
    # Defaults for a small model trained from scratch (nanoGPT's), not run_clm's fine-tuning ones.
    parser.set_defaults(learning_rate=2e-3, weight_decay=0.1, lr_scheduler_type="cosine", num_warmup_steps=20,
                        min_train_steps=MIN_TRAIN_STEPS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Data


def embedded_corpus() -> datasets.Dataset:
    """The Python language reference, one document per topic: about 465 KB of English that ships with Python."""
    from pydoc_data.topics import topics

    return datasets.Dataset.from_dict({"text": list(topics.values())})


def load_corpus(args) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if args.validation_file and not args.train_file:
        raise DataError("--validation_file needs a --train_file.")
    train = load_files(args.train_file, "train") if args.train_file else embedded_corpus()
    validation = load_files(args.validation_file, "validation") if args.validation_file else None
    for split, flag in ((train, "--train_file"), (validation, "--validation_file")):
        if split is None:
            continue
        check_columns(split, [args.text_column], "--text_column")
        if split.features[args.text_column].dtype not in ("string", "large_string"):
            raise DataError(f"--text_column {args.text_column!r} holds {split.features[args.text_column]}, not text.")
        if not any(split[args.text_column]):
            raise DataError(f"{flag}: every {args.text_column!r} value is empty.")
    return train, validation


def train_tokenizer(texts: datasets.Dataset, column: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE like GPT-2's: every byte is in the alphabet, so any text encodes."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = ([text for text in batch[column] if text] for batch in texts.iter(batch_size=64))
    backend.train_from_iterator(batches, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def split_documents(batch, column: str) -> dict:
    """Each document as pieces of about PIECE_CHARS characters, cut after a newline where there is one, with a flag
    on each document's first piece: a large file is then tokenized, and held in memory, a piece at a time."""
    pieces, starts = [], []
    for text in batch[column]:
        text, start = text or "", 0
        while start == 0 or start < len(text):
            end = start + PIECE_CHARS
            if end < len(text):
                end = text.rfind("\n", start, end) + 1 or end
            pieces.append(text[start:end])
            starts.append(start == 0)
            start = end
    return {"text": pieces, "starts_document": starts}


def tokenize(texts: datasets.Dataset, tokenizer, args, split: str) -> np.memmap:
    """The documents' token ids, each document after an EOS (GPT-2's <|endoftext|> between texts: a prompt that
    starts a text is then [EOS, ...], as in training), as a token shard. Tokenizing runs on
    --preprocessing_num_workers processes and is cached by `datasets`; the shard is written batch by batch."""
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], verbose=False)["input_ids"]
        return {"input_ids": [[eos, *piece] if first else piece
                              for piece, first in zip(ids, batch["starts_document"])]}

    tokenized = pieces(texts, args.text_column).map(
        encode, batched=True, batch_size=64, num_proc=args.preprocessing_num_workers,
        remove_columns=["text", "starts_document"], desc=f"Tokenizing {split}",
    )
    batches = (pyarrow.compute.list_flatten(table["input_ids"]).to_numpy()
               for table in tokenized.with_format("arrow").iter(batch_size=64))
    if args.save_tokens:
        Path(args.save_tokens).mkdir(parents=True, exist_ok=True)
    # Without --save_tokens, the mapped shard may be unlinked at once with its temporary folder: Linux keeps its pages
    # until the mapping goes.
    with nullcontext(args.save_tokens) if args.save_tokens else tempfile.TemporaryDirectory(
            prefix="minigpt-tokens-") as folder:
        return read_shard(write_shard(Path(folder) / f"{split}.bin", batches, len(tokenizer)))


def token_shards(patterns: list[str] | None) -> list[str]:
    """The files of --train_file/--validation_file when they are token shards (.bin), else []."""
    files = expand(patterns or [])
    return files if files and all(file.endswith(".bin") for file in files) else []


def read_shards(patterns: list[str], tokenizer, args, block_size: int, split: str) -> TokenBlocks:
    """Pre-tokenized shards (llm.c's .bin format), checked against the tokenizer they must have been made with."""
    if not token_shards(patterns):
        raise DataError("--train_file holds token shards (.bin), so --validation_file must too.")
    shards = []
    for file in token_shards(patterns):
        try:
            shard = read_shard(file)
        except (OSError, ShardError) as error:
            raise DataError(str(error)) from None
        if len(shard) and int(shard.max()) >= len(tokenizer):
            raise DataError(f"{file} holds token id {int(shard.max())}, but the tokenizer has {len(tokenizer)} "
                            "tokens: pass the tokenizer the shards were made with (--tokenizer_name).")
        shards.append(shard)
    return pack(shards, tokenizer, args, block_size,
                too_short=f"The {split} shards hold fewer tokens than one block of {block_size}: lower --block_size.")


def pieces(texts: datasets.Dataset, column: str) -> datasets.Dataset:
    return texts.map(split_documents, batched=True, batch_size=1, fn_kwargs={"column": column},
                     remove_columns=texts.column_names, desc="Cutting documents into pieces")


def tokenize_and_pack(texts: datasets.Dataset, tokenizer, args, block_size: int, split: str) -> TokenBlocks:
    return pack([tokenize(texts, tokenizer, args, split)], tokenizer, args, block_size,
                too_short=f"The {split} text is shorter than one block of {block_size} tokens: lower --block_size.")


def pack(shards: list, tokenizer, args, block_size: int, too_short: str) -> TokenBlocks:
    """The shards' blocks of `block_size` tokens (positions restart at each EOS with --document_masking)."""
    blocks = TokenBlocks(shards, block_size, tokenizer.eos_token_id if args.document_masking else None)
    if len(blocks) == 0:
        raise DataError(too_short)
    return blocks


def split_blocks(train, validation, args, say) -> tuple[datasets.Dataset, datasets.Dataset | None, str]:
    """Without --validation_file, the last `validation_split_percentage`% of the blocks are held out; a corpus with
    too few blocks for that trains on all of them, without validation. Also returns what was done, in words."""
    if validation is not None:
        return train, validation, f"Validation: {file_names(args.validation_file)}."
    held_out = len(train) * args.validation_split_percentage // 100
    if held_out == 0:
        note = "No validation set: the model was trained on all of the text."
        if args.validation_split_percentage:
            say(f"No validation: {len(train)} block(s) are too few to hold out {args.validation_split_percentage}% "
                "(pass --validation_file to evaluate); training on all of them.")
        return train, None, note
    note = f"Validation: the last {held_out} of {len(train)} packed blocks ({args.validation_split_percentage}%)."
    say(note)
    kept = len(train) - held_out
    return Subset(train, range(kept)), Subset(train, range(kept, len(train))), note


# ---------------------------------------------------------------------------------------------------------------------
# Model and tokenizer


def load_tokenizer(args, train: datasets.Dataset, resume: Path | None, accelerator):
    if resume is not None:
        return AutoTokenizer.from_pretrained(resume)
    source = args.tokenizer_name or args.model_name_or_path
    if source:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.eos_token_id is None:
            raise DataError(f"The tokenizer from {source} has no EOS token to separate documents with.")
        return tokenizer
    if train is None:
        raise DataError("--train_file holds token shards: pass the tokenizer that made them (--tokenizer_name or "
                        "--model_name_or_path).")
    # The main process trains it, the others read what it saved: every process must hold the same vocabulary.
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            tokenizer = train_tokenizer(pieces(train, args.text_column), "text", args.vocab_size)
            tokenizer.save_pretrained(args.output_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    return tokenizer


def load_model(args, tokenizer, resume: Path | None) -> MiniGPTForCausalLM:
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    if resume is not None:  # the checkpoint's own shape, whatever the flags say
        model = MiniGPTForCausalLM(MiniGPTConfig.from_pretrained(resume))
    elif args.model_name_or_path:
        model = MiniGPTForCausalLM.from_pretrained(args.model_name_or_path)
        if len(tokenizer) > model.config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
    else:
        block_size = args.block_size or 128
        dropout = dict(resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout)
        config = MiniGPTConfig(
            vocab_size=len(tokenizer), n_positions=block_size, n_embd=args.n_embd, n_layer=args.n_layer,
            n_head=args.n_head, **dropout, **special,
        )
        model = MiniGPTForCausalLM(config)
    model.generation_config.update(pad_token_id=tokenizer.eos_token_id, **special)
    return model


def pick_block_size(args, model) -> int:
    block_size = args.block_size or min(model.config.n_positions, 1024)
    if not 2 <= block_size <= model.config.n_positions:
        raise DataError(
            f"--block_size {block_size} must be between 2 and the model's n_positions ({model.config.n_positions})."
        )
    return block_size


# ---------------------------------------------------------------------------------------------------------------------
# Training


def lm_loss(model, batch) -> torch.Tensor:
    # No KV cache when nothing is decoded: without one, restarting `position_ids` mark packed documents.
    return model(**batch, labels=batch["input_ids"], use_cache=False, skip_logits=True).loss


def evaluate(model, loader, accelerator) -> float:
    model.eval()
    losses = []
    for batch in loader:
        with torch.no_grad():
            loss = lm_loss(model, batch)
        # Every block has the same length, so the mean over blocks is the mean over tokens.
        losses.append(accelerator.gather_for_metrics(loss.repeat(len(batch["input_ids"]))))
    model.train()
    return torch.cat(losses).mean().item()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def train(args) -> dict:
    accelerator, resume = start(args)
    pretokenized = bool(token_shards(args.train_file))
    train_texts, validation_texts = (None, None) if pretokenized else load_corpus(args)
    tokenizer = load_tokenizer(args, train_texts, resume, accelerator)
    model = load_model(args, tokenizer, resume)
    block_size = pick_block_size(args, model)
    with accelerator.main_process_first():  # the others then read the `datasets` cache
        if pretokenized:
            train_blocks = read_shards(args.train_file, tokenizer, args, block_size, "train")
            validation_blocks = args.validation_file and read_shards(
                args.validation_file, tokenizer, args, block_size, "validation")
        else:
            train_blocks = tokenize_and_pack(train_texts, tokenizer, args, block_size, "train")
            validation_blocks = None
            if validation_texts is not None:
                validation_blocks = tokenize_and_pack(validation_texts, tokenizer, args, block_size, "validation")
    train_blocks, validation_blocks, validation_note = split_blocks(
        train_blocks, validation_blocks, args, accelerator.print
    )
    eval_loader = None
    if validation_blocks is not None:
        eval_loader = DataLoader(validation_blocks, batch_size=args.per_device_eval_batch_size)

    run = TrainingRun(
        accelerator, args, model, tokenizer,
        train_loader(train_blocks, args.per_device_train_batch_size), eval_loader,
        resume=resume, geometry={"block_size": block_size}, unit="tokens",
        items_per_batch=args.per_device_train_batch_size * block_size, name="minigpt-pretrain",
    )
    accelerator.print(
        f"{len(train_blocks)} training blocks of {block_size} tokens, {run.steps_per_epoch} steps per epoch, "
        f"{run.max_steps} steps, {model.num_parameters():,} parameters, {accelerator.num_processes} process(es)."
    )

    def evaluate_every(step, write):
        if run.eval_loader is not None and args.eval_steps and step % args.eval_steps == 0:
            eval_loss = evaluate(run.model, run.eval_loader, accelerator)
            run.log({"eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}, "eval")
            write(f"step {step}: eval_loss {eval_loss:.4f}, perplexity {perplexity(eval_loss):.2f}")

    run.train(lm_loss, after_step=evaluate_every)
    return finish(args, run, tokenizer, block_size, validation_note)


def finish(args, run: TrainingRun, tokenizer, block_size: int, validation_note: str) -> dict:
    """Final evaluation; model, tokenizer, results, loss curve and card in --output_dir; samples."""
    accelerator, model = run.accelerator, run.model
    results = run.summary()
    results["train_tokens"] = results["train_steps"] * run.items_per_step
    if run.eval_loader is not None:
        if "eval_loss" not in run.history[-1]:  # unless --eval_steps just evaluated this very step
            eval_loss = evaluate(model, run.eval_loader, accelerator)
            run.log({"eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}, "eval")
        results["eval_loss"], results["perplexity"] = run.history[-1]["eval_loss"], run.history[-1]["perplexity"]
    history = run.history
    save_model(accelerator, model, args.output_dir)
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        tokenizer.save_pretrained(output_dir)
        write_json(output_dir / "all_results.json", results)
        write_json(output_dir / "log_history.json", history)
        plot_losses(history, output_dir / "loss.png")
        # Samples come from the saved folder, loaded as a user would: this also proves that it loads.
        saved = AutoModelForCausalLM.from_pretrained(output_dir).to(accelerator.device).eval()
        samples = generate_samples(saved, tokenizer, args.prompts, args.max_new_tokens, args.seed)
        write_pretraining_card(args, saved, results, samples, block_size, validation_note)
        for text in samples.values():
            print(f"\n{text}\n{'-' * 40}")
        print(f"\nSaved to {output_dir}: " + ", ".join(f"{key} {value:.4g}" for key, value in results.items()))
        push_after_training(args)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def generate_samples(model, tokenizer, prompts, max_new_tokens: int, seed: int) -> dict[str, str]:
    samples = {}
    set_seed(seed)  # once: each prompt draws its own continuation
    for prompt in prompts:
        # Documents follow an EOS in training, so a prompt that starts a text does too.
        input_ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(prompt).input_ids]], device=model.device)
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=40, temperature=0.8,
            min_new_tokens=max_new_tokens, max_new_tokens=max_new_tokens,  # a whole sample, past any EOS
        )
        samples[prompt] = tokenizer.decode(output[0], skip_special_tokens=True)
    return samples


def write_pretraining_card(args, model, results, samples, block_size, validation_note: str) -> None:
    if token_shards(args.train_file):
        training_data = f"Token shards from {file_names(args.train_file)}."
    elif args.train_file:
        training_data = f"Plain text from {file_names(args.train_file)}."
    else:
        training_data = f"The text of {EMBEDDED_CORPUS}, one document per topic, which ships with every Python."
    training_data += f" {validation_note}"
    tokenizer = f"`{args.tokenizer_name}`" if args.tokenizer_name else (
        f"a byte-level BPE of {model.config.vocab_size} tokens, trained on the training text")
    base = f"continued from `{args.model_name_or_path}`" if args.model_name_or_path else "trained from scratch"
    hyperparameters = {
        "tokenizer": tokenizer if not args.model_name_or_path else f"`{args.model_name_or_path}`'s",
        "block size": block_size,
        "document masking": args.document_masking,
        **optimization_rows(args),
        "optimizer steps": results["train_steps"],
        "mixed precision": args.mixed_precision or "accelerate default",
        "seed": args.seed,
    }
    metrics = {key: results[key] for key in ("perplexity", "eval_loss") if key in results}
    write_model_card(
        args.output_dir,
        model=model,
        pipeline_tag="text-generation",
        dataset_name=Path(args.train_file[0]).name if args.train_file else EMBEDDED_CORPUS,
        metrics=metrics,
        results=results,
        hyperparameters=hyperparameters,
        summary=f"A MiniGPT causal language model {base} with `minigpt-pretrain`.",
        training_data=training_data,
        procedure="Documents joined with the EOS token and packed into blocks; AdamW (no decay on biases and "
        f"LayerNorm weights), gradient clipping at {args.max_grad_norm}, trained with Accelerate.",
        example_prompt=args.prompts[0] if args.prompts else "Once upon a time",
        base_model=args.model_name_or_path,
        repo_id=args.hub_model_id,
        samples=samples,
    )


def main(argv=None) -> None:
    run_script("minigpt-pretrain", parse_args, train, argv)


if __name__ == "__main__":
    main()
