"""DVC stage `report`: run the three report notebooks (papermill), render HTML, save and log figures.

The notebooks save their own figures through :func:`coordexp.report.figures.publish`, with fixed dpi and
metadata, so an unchanged input rewrites byte-identical PNG/PDF files under ``reports/figures``.
"""

from coordexp.pipeline.runner import stage_main
from coordexp.report import render


@stage_main("report")
def main(params, root):
    out = render.render_reports(params, root)
    print(f"[report] {len(out['figures'])} figure files; logged to MLflow run {out['run_id']}")


if __name__ == "__main__":
    main()
