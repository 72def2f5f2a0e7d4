"""DVC stage `evaluate`: greedy generation on the val split, COCO mAP (pycocotools), F1, parse rate."""

from coordexp.evaluate import stage
from coordexp.pipeline.runner import stage_main


@stage_main("evaluate")
def main(params, root):
    m = stage.run(params, root)
    print(
        f"[evaluate] bbox_mAP={m['bbox_mAP']} bbox_mAP50={m['bbox_mAP50']} segm_mAP={m['segm_mAP']} "
        f"f1_at_0.5={m['f1_at_0.5']} parse_rate={m['parse_rate']} nan_scores={m['nan_scores']}"
    )


if __name__ == "__main__":
    main()
