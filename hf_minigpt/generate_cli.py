"""`minigpt-generate MODEL --prompt TEXT`: continue a prompt with a MiniGPT (or GPT-2) folder or hub id.

    minigpt-generate runs/lang --prompt "Python" --greedy
    minigpt-generate runs/lang --prompt "Python" --int8 --compile      # the fast CPU decode
    minigpt-generate runs/lang --int8 --perplexity held_out.txt        # what int8 costs in perplexity
    minigpt-generate runs/chat --chat                                  # a conversation; Ctrl-D ends it

fp32 decoding takes the products this CPU runs faster, where a rule names it (hf_minigpt.cpu_kernels; with --compile
also the streamed one-row products; same tokens); --plain_kernels keeps nn.Linear's.
"""

import argparse
import math
import sys

import torch
from transformers import AutoTokenizer

from .cli import ArgumentParser, quiet_loading
from .cpu_kernels import use_cpu_kernels
from .folders import model_source_problem
from .modeling_minigpt import MiniGPTForCausalLM
from .quantize import cpu_compile_config, quantize_int8


@torch.no_grad()
def text_perplexity(model, input_ids: torch.Tensor, block_size: int) -> float:
    """exp of the mean next-token loss over `input_ids` (1-D), read in consecutive blocks of `block_size` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(input_ids) - 1, block_size):
        block = input_ids[start: start + block_size + 1][None]
        if block.shape[1] < 2:
            break
        logits = model(block[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(logits[0], block[0, 1:], reduction="sum").item()
        count += block.shape[1] - 1
    return math.exp(total / count)


def start_of_text(tokenizer, text: str) -> list[int]:
    """`text`'s token ids as the tokenizer starts a text; an empty text is the end-of-text token alone (GPT-2's
    tokenizer adds nothing to a text, and generation needs a first token)."""
    return tokenizer(text).input_ids or [tokenizer.eos_token_id]


def main(argv=None) -> None:
    parser = ArgumentParser(prog="minigpt-generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a MiniGPT or GPT-2 folder, or a hub id")
    parser.add_argument("--prompt", default="", help="text to continue; the tokenizer starts it as it starts "
                        "texts (minigpt-pretrain's after the end-of-text token, GPT-2's with nothing)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="the most likely token each step, instead of sampling")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--int8", action="store_true",
                        help="int8 projections: int8 weights and activations (hf_minigpt.quantize; x86 CPUs)")
    parser.add_argument("--compile", action="store_true", help="a static KV cache and a compiled decode step")
    parser.add_argument("--plain_kernels", action="store_true",
                        help="nn.Linear's products even where hf_minigpt.cpu_kernels has faster ones for this CPU")
    parser.add_argument("--chat", action="store_true", help="a conversation in turns, read from standard input a "
                        "line a turn until its end (Ctrl-D), through the tokenizer's chat template (docs/chat.md)")
    parser.add_argument("--perplexity", metavar="FILE", help="instead of generating: the perplexity on this text "
                        "file, before and after --int8")
    args = parser.parse_args(argv)
    quiet_loading()
    if args.max_new_tokens < 1 or args.temperature <= 0 or args.top_k < 1:
        parser.error("--max_new_tokens and --top_k must be at least 1, --temperature above 0")
    if args.chat and (args.prompt or args.perplexity):
        parser.error("--chat reads its turns from standard input: leave out --prompt and --perplexity")
    if problem := model_source_problem(args.model, "MODEL"):  # a mistyped folder: said at once, not after retries
        parser.exit(2, f"minigpt-generate: error: {problem}\n")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = MiniGPTForCausalLM.from_pretrained(args.model).eval()
        text = open(args.perplexity, encoding="utf-8").read() if args.perplexity else None
    except (OSError, ValueError) as error:
        parser.exit(2, f"minigpt-generate: error: {str(error).splitlines()[0]}\n")

    if text is not None:
        input_ids = torch.tensor(start_of_text(tokenizer, text))
        if len(input_ids) < 2:
            parser.error(f"{args.perplexity} holds no text")
        before = text_perplexity(model, input_ids, model.config.n_positions)
        print(f"perplexity {before:.4f} on {len(input_ids) - 1:,} tokens of {args.perplexity}")
        if args.int8:
            after = text_perplexity(quantize_int8(model), input_ids, model.config.n_positions)
            print(f"perplexity {after:.4f} with int8 weights ({after / before - 1:+.2%})")
        return

    if args.int8:
        quantize_int8(model)
    elif not args.plain_kernels:
        use_cpu_kernels(model, compile=args.compile)  # a one-off run does not wait for a compile it did not ask for
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k}
    options = {"do_sample": False} if args.greedy else sampling
    if args.compile:
        options.update(cache_implementation="static", compile_config=cpu_compile_config())
    torch.manual_seed(args.seed)

    def continuation(prompt: list[int]) -> list[int]:
        prompt = torch.tensor([prompt])
        try:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.eos_token_id, **options)
        except ValueError as error:  # e.g. more tokens than the model has positions
            parser.exit(2, f"minigpt-generate: error: {error}\n")
        return out[0, prompt.shape[1]:].tolist()

    if args.chat:
        if tokenizer.chat_template is None:
            parser.exit(2, f"minigpt-generate: error: {args.model}'s tokenizer has no chat template: add one with "
                        "hf_minigpt.chat.chat_ready (docs/chat.md)\n")
        room = model.config.n_positions - args.max_new_tokens
        if room < 1:
            parser.error(f"--max_new_tokens {args.max_new_tokens} leaves no room for a turn in the model's "
                         f"{model.config.n_positions} positions")
        return chat(tokenizer, continuation, room)
    prompt = start_of_text(tokenizer, args.prompt)
    print(tokenizer.decode(prompt + continuation(prompt), skip_special_tokens=True))


def chat(tokenizer, continuation, room: int) -> None:
    """Turns from standard input, a line each, answered in order until its end (or Ctrl-C). The conversation so far
    is the prompt, within `room` tokens: its oldest turns are left out first, and a turn that does not fit alone is
    refused in a line on stderr, the conversation kept."""
    messages = []
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except (EOFError, KeyboardInterrupt):
            return
        turns = [*messages, {"role": "user", "content": line}]
        while True:
            prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True)["input_ids"]
            if len(prompt) <= room or len(turns) == 1:
                break
            turns = turns[2:]  # the oldest exchange
        if len(prompt) > room:
            print(f"minigpt-generate: that turn is {len(prompt)} tokens, and the reply leaves {room}: say it shorter",
                  file=sys.stderr, flush=True)
            continue
        reply = tokenizer.decode(continuation(prompt), skip_special_tokens=True)
        print(reply, flush=True)
        messages = [*turns, {"role": "assistant", "content": reply}]


if __name__ == "__main__":
    sys.exit(main())
