"""Fine-tune a text classifier; same as the `minigpt-finetune` console script (see --help).

    python scripts/finetune_classification.py --model_name_or_path runs/pydoc --train_file train.csv \
        --validation_file dev.csv --output_dir runs/classifier
"""

from minigpt_commands import finetune as main

if __name__ == "__main__":
    main()
