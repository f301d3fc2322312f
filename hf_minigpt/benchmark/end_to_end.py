"""End to end: minigpt-pretrain against transformers' Trainer training GPT2LMHeadModel, script against script, on the
same token shard (the embedded corpus), model shape, batch, schedule and steps; each in a fresh process."""

import json
import sys
import tempfile
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel

from ..folders import RunFolder
from .runner import MODELS, Bench, config_for, ratio, run_measured
from .training import device_peak_flops, training_flops_per_token

END_TO_END_STEPS = 20


def end_to_end_flags(shape) -> list[str]:
    n_layer, n_head, n_embd, _, batch, _, block, _ = shape
    return ["--n_layer", str(n_layer), "--n_head", str(n_head), "--n_embd", str(n_embd), "--block_size", str(block),
            "--per_device_train_batch_size", str(batch), "--learning_rate", "6e-4", "--weight_decay", "0.1",
            "--lr_scheduler_type", "cosine", "--num_warmup_steps", "2"]


def measure_end_to_end(shape, folder: Path, steps: int, cpu_kernels: bool) -> dict:
    """Training tokens/s as each script reports it, and each process's peak RSS; minigpt-pretrain with the CPU's
    faster products (its default) or, without `cpu_kernels`, nn.Linear's."""
    tokens, tokenizer = folder / "tokens", folder / "tokenizer"
    flags = end_to_end_flags(shape)
    # The tokenizer and the shard both scripts read.
    run_measured([sys.executable, "-m", "hf_minigpt.pretrain", "--max_train_steps", "1", "--vocab_size",
                  str(shape[3]), "--save_tokens", str(tokens), "--output_dir", str(tokenizer), "--max_new_tokens", "0",
                  *flags],
                 folder / "prepare.log")
    pad_vocabulary(tokenizer, shape[3])
    minigpt = run_measured([sys.executable, "-m", "hf_minigpt.pretrain", "--train_file", str(tokens / "train.bin"),
                            "--tokenizer_name", str(tokenizer), "--max_train_steps", str(steps), "--output_dir",
                            str(folder / "minigpt"), "--max_new_tokens", "0", *flags,
                            *([] if cpu_kernels else ["--plain_kernels"])], folder / "minigpt.log")
    minigpt["tokens_per_second"] = json.loads(RunFolder(folder / "minigpt").results.read_text())[
        "train_tokens_per_second"]
    trainer = run_measured([sys.executable, "-m", "hf_minigpt.benchmark", "--_trainer_child", json.dumps(shape),
                            str(folder), str(steps)], folder / "trainer.log")
    trainer["tokens_per_second"] = json.loads((folder / "trainer.log").read_text().splitlines()[-1])[
        "tokens_per_second"]
    return {"minigpt-pretrain": minigpt, "Trainer": trainer}


def pad_vocabulary(folder: Path, size: int) -> None:
    """Unused tokens up to the shape's vocabulary, so that both scripts build models of the shape measured: a BPE
    trained on the embedded corpus stops at about 9,000 tokens, and the LM head is where the models differ most."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<unused{i}>" for i in range(len(tokenizer), size)])
    tokenizer.save_pretrained(folder)


def trainer_child(shape, folder: Path, steps: int) -> None:
    """transformers' Trainer training GPT2LMHeadModel on the shard, as a transformers user would."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from ..training.tokens import TokenBlocks, read_shard

    class LabelledBlocks(TokenBlocks):  # a causal LM's labels are its inputs; GPT-2 shifts them
        def __getitem__(self, index):
            block = super().__getitem__(index)
            return {**block, "labels": block["input_ids"]}

    flags = end_to_end_flags(shape)
    options = dict(zip(flags[::2], flags[1::2]))
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    block_size = int(options["--block_size"])
    data = LabelledBlocks([read_shard(folder / "tokens" / "train.bin")], block_size)
    # minigpt-pretrain's defaults: no dropout (GPT2Config's 0.1 would also keep SDPA off its fused CPU kernel).
    config = GPT2Config(n_layer=shape[0], n_head=shape[1], n_embd=shape[2], vocab_size=len(tokenizer),
                        n_positions=block_size, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    arguments = TrainingArguments(
        output_dir=str(folder / "trainer"), per_device_train_batch_size=int(options["--per_device_train_batch_size"]),
        max_steps=steps, learning_rate=float(options["--learning_rate"]), weight_decay=0.1,
        lr_scheduler_type="cosine", warmup_steps=2, logging_steps=steps, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True,
    )
    metrics = Trainer(model=GPT2LMHeadModel(config), args=arguments, train_dataset=data).train().metrics
    print(json.dumps({"tokens_per_second": metrics["train_samples_per_second"] * block_size}))


def end_to_end_table(bench: Bench, shape_name: str, shape) -> None:
    bench.report.say(f"end to end {shape_name}: minigpt-pretrain, then Trainer, {END_TO_END_STEPS} steps each")
    with tempfile.TemporaryDirectory() as folder:
        scripts = measure_end_to_end(shape, Path(folder), END_TO_END_STEPS, bench.cpu_kernels)
    scripts = {"minigpt": scripts["minigpt-pretrain"], "gpt2": scripts["Trainer"]}
    # Both scripts do the same arithmetic: how close each comes to the matmul peak bounds the ratio. Against the fp32
    # peak the training rows use, so that both kinds of MFU compare.
    flops_per_token = training_flops_per_token(config_for(shape), shape[6])  # the scripts' block size
    for side in scripts.values():
        side["mfu"] = side["tokens_per_second"] * flops_per_token / device_peak_flops(bench.device, "fp32")[0]
    label = f"end to end {shape_name}, minigpt-pretrain | Trainer"
    bench.report.record(f"end to end {shape_name}", scripts,
                        (f"{label} tokens/s", *(f"{scripts[m]['tokens_per_second']:,.0f}" for m in MODELS[:2]),
                         "n/a", ratio(scripts, "tokens_per_second", "gpt2"), "n/a"),
                        (f"{label} MFU", *(f"{scripts[m]['mfu']:.1%}" for m in MODELS[:2]), "n/a", "", ""),
                        (f"{label} peak RSS MB", *(f"{scripts[m]['peak_rss'] / 2**20:,.0f}" for m in MODELS[:2]),
                         "n/a", ratio(scripts, "peak_rss", "gpt2"), "n/a"))
