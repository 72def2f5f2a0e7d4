"""DVC stage `build_base`: the base checkpoint (tiny random Qwen3-VL, or a local Qwen-VL + coord tokens).

Reads ``build_base`` from params.yaml; ``tiny`` trains its tokenizer on
``<preprocess.out_dir>/train.jsonl``. Writes ``<build_base.out_dir>/`` (a standard Hugging Face
checkpoint + ``coord_vocab.json`` + ``build_info.json``) atomically.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from coordexp.stage import stage_main  # noqa: E402


@stage_main("build_base")
def main(params, root):
    from coordexp import paths, tracking
    from coordexp.base_model import build_base

    cfg = params.build_base
    out_dir = paths.resolve(cfg.out_dir, root)
    train_jsonl = paths.resolve(params.preprocess.out_dir, root) / "train.jsonl"
    expand = cfg.expand.model_dump()
    if expand.get("source"):
        expand["source"] = str(paths.resolve(expand["source"], root))
    with tracking.stage_run(params, "build_base"):
        import mlflow

        summary = build_base(
            cfg.mode,
            out_dir,
            train_jsonl=train_jsonl,
            tiny=cfg.tiny.model_dump(),
            expand=expand,
        )
        mlflow.log_metrics({f"build_base.{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))})
    print(
        f"build_base: mode={summary['mode']} params={summary['parameters']:,} vocab={summary['vocab_size']} "
        f"coord ids {summary['coord_id_min']}..{summary['coord_id_max']} "
        f"checkpoint={summary['checkpoint_bytes'] / 1e6:.1f} MB in {summary['build_seconds']}s -> {out_dir}"
    )


if __name__ == "__main__":
    main()
