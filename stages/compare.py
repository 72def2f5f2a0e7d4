"""DVC stage `compare`: render the compare_runs notebook over every finished training run in the MLflow store.

Its rendering (``reports/compare/``) depends on the local store's history, which no clone shares, so it is
not a DVC output; DVC runs the stage on every ``dvc repro`` and the stage renders only when a run changed
(``--force`` renders anyway).
"""

from coordexp.pipeline.runner import stage_main
from coordexp.report import render


@stage_main("compare")
def main(params, root):
    render.render_compare(params, root, force=render.force_requested())


if __name__ == "__main__":
    main()
