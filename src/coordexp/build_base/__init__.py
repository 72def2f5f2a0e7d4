"""The ``build_base`` stage: the checkpoint Stage-1 starts from (the tiny model built here, or a local Qwen-VL
checkpoint with the coord tokens added)."""
