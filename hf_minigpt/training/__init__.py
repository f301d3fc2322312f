"""The training side, one module per stage of the data path:

    settings     the command line as typed dataclasses, checked once
    data         files -> `datasets` rows -> the validation split -> loaders
    tokens       text -> tokenizer -> token shards on disk (or a stream) -> blocks
    loop         the Accelerator, the optimizer and its schedule, the optimizer steps, stopping
    checkpoint   every model folder, written whole or not at all; checkpoints and resume
    report       the log, results, loss curve and model card

`minigpt-pretrain` (`hf_minigpt/pretrain.py`) and `minigpt-finetune` (`hf_minigpt/finetune.py`) bring what differs:
their data, loss and metrics.
"""
