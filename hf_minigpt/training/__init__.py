"""The training side, one module per stage of the data path:

    settings     the command line as typed dataclasses, checked once
    data         files -> `datasets` rows -> the validation split -> loaders
    tokens       text -> tokenizer -> token shards on disk (or a stream) -> blocks
    loop         the optimizer and its schedule, the optimizer steps, stopping, resuming
    script       a script's start (the Accelerator, the output folder) and its end (one line, the exit code)
    checkpoint   checkpoints (`step_N`) and the training state they hold; resuming in any process layout
    processes    the Accelerator checked against the launch, FSDP2 on CPU processes, a lost process
    report       the log, results, loss curve and model card

`minigpt-pretrain` (`hf_minigpt/pretrain.py`) and `minigpt-finetune` (`hf_minigpt/finetune.py`) bring what differs:
their data, loss and metrics.
"""
