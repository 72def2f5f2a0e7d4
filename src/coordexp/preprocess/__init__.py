"""The ``preprocess`` stage: COCO inputs (and the synthetic shapes set that stands in for them) -> contract JSONL."""
