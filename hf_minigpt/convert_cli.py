"""`minigpt-convert SRC DST [--to minigpt|gpt2|gguf|onnx]`: convert GPT-2, MiniGPT and nanoGPT checkpoints; export
MiniGPT to GGUF and ONNX."""

import logging
import sys

from .cli import ArgumentParser, quiet_loading
from .export import CheckpointError, convert, targets


def main(argv=None):
    parser = ArgumentParser(
        prog="minigpt-convert",
        description="Convert a checkpoint, detecting its format: a GPT-2 Hugging Face folder -> MiniGPT, a MiniGPT "
        "folder -> GPT-2 (for GPT2LMHeadModel and GPT-2 tools), a nanoGPT ckpt.pt -> MiniGPT.",
    )
    parser.add_argument("source", help="checkpoint folder, or a nanoGPT ckpt.pt file")
    parser.add_argument("destination", help="new folder to write (must not exist or be empty)")
    parser.add_argument("--to", choices=targets(),
                        help="target format (default: the other one); gguf writes one llama.cpp file, onnx a folder "
                        "with model.onnx (KV cache as inputs and outputs), config and tokenizer")
    parser.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16",
                        help="with --to gguf: how the weight matrices are stored (default: f16)")
    args = parser.parse_args(argv)
    quiet_loading()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = convert(args.source, args.destination, to=args.to, dtype=args.dtype)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, ImportError) as error:
        parser.exit(2, f"minigpt-convert: error: {error}\n")
    print(f"wrote {written}")


if __name__ == "__main__":
    sys.exit(main())
