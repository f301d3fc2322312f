"""MiniGPT vs transformers' GPT2LMHeadModel vs a nanoGPT-style model; same as `minigpt-bench` (see --help).

    python scripts/benchmark.py            # full table
    python scripts/benchmark.py --quick    # CI smoke run
"""

from minigpt_commands import bench as main

if __name__ == "__main__":
    main()
