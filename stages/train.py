"""DVC stage `train`: Stage-1 (or the CE baseline) through ms-swift, tracked in MLflow."""

from coordexp.pipeline.runner import stage_main
from coordexp.train import stage


@stage_main("train")
def main(params, root):
    m = stage.run(params, root)
    if m.get("node_rank"):
        print(f"[train] node {m['node_rank']} of {m['nnodes']}: trained; node 0 wrote the outputs and the MLflow run")
        return
    print(
        f"[train] steps={m['steps']} wall={m.get('wall_time_s')}s tokens/s={m.get('tokens_per_second')} "
        f"final train loss={m['final_train_loss']} eval loss={m['final_eval_loss']} "
        f"coord_vocab_mass={m.get('final_eval_coord_vocab_mass')}"
    )


if __name__ == "__main__":
    main()
