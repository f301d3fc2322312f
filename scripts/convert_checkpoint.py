"""Convert GPT-2 / MiniGPT / nanoGPT checkpoints; same as the `minigpt-convert` console script.

    python scripts/convert_checkpoint.py SRC DST [--to minigpt|gpt2]
"""

from minigpt_commands import convert as main

if __name__ == "__main__":
    main()
