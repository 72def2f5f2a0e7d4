"""DVC stage `preprocess`: COCO inputs -> contract JSONL (coord-token mode) + rejects + metrics."""

from coordexp.pipeline.runner import stage_main
from coordexp.preprocess import stage


@stage_main("preprocess")
def main(params, root):
    t = stage.run(params, root)["total"]
    print(
        f"preprocess: {t['records_out']}/{t['records_in']} records, {t['objects_out']}/{t['objects_in']} objects, "
        f"{t['rejects']} rejects (see {params.preprocess.out_dir}/rejects.jsonl)"
    )


if __name__ == "__main__":
    main()
