"""Pre-train a MiniGPT language model; same as the `minigpt-pretrain` console script (see --help).

    python scripts/pretrain.py --output_dir runs/pydoc
    accelerate launch --num_processes 2 scripts/pretrain.py --train_file 'data/*.txt' --output_dir runs/mine
"""

from minigpt_commands import pretrain as main

if __name__ == "__main__":
    main()
