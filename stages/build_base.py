"""DVC stage `build_base`: the base checkpoint (tiny random Qwen3-VL, or a local Qwen-VL + coord tokens).

Reads ``build_base`` from params.yaml; ``tiny`` trains its tokenizer on
``<preprocess.out_dir>/train.jsonl``. Writes ``<build_base.out_dir>/`` (a standard Hugging Face
checkpoint + ``coord_vocab.json`` + ``build_info.json``) atomically.
"""

from coordexp.build_base import stage
from coordexp.pipeline.runner import stage_main


@stage_main("build_base")
def main(params, root):
    s = stage.run(params, root)
    print(
        f"build_base: mode={s['mode']} params={s['parameters']:,} vocab={s['vocab_size']} "
        f"coord ids {s['coord_id_min']}..{s['coord_id_max']} "
        f"checkpoint={s['checkpoint_bytes'] / 1e6:.1f} MB in {s['build_seconds']}s -> {s['out_dir']}"
    )


if __name__ == "__main__":
    main()
