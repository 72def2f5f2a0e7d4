"""DVC stage `preprocess`: COCO inputs -> contract JSONL (coord-token mode) + rejects + metrics."""

from coordexp.stage import stage_main


@stage_main("preprocess")
def main(params, root):
    from coordexp import preprocess, tracking

    with tracking.stage_run(params, "preprocess"):
        import mlflow

        metrics = preprocess.run(params, root)
        mlflow.log_metrics({f"preprocess.{k}": float(v) for k, v in metrics["total"].items()})
        mlflow.log_dict(metrics, "preprocess/metrics.json")
    t = metrics["total"]
    print(f"preprocess: {t['records_out']}/{t['records_in']} records, {t['objects_out']}/{t['objects_in']} objects, "
          f"{t['rejects']} rejects (see {params.preprocess.out_dir}/rejects.jsonl)")


if __name__ == "__main__":
    main()
