"""DVC stage `report`: run the three report notebooks (papermill), render HTML, save and log figures.

The notebooks save their own figures through :func:`coordexp.reporting.publish`, with fixed dpi and
metadata, so an unchanged input rewrites byte-identical PNG/PDF files under ``reports/figures``.
"""

from coordexp.stage import stage_main


@stage_main("report")
def main(params, root):
    from coordexp import reporting

    out = reporting.render_reports(params, root)
    print(f"[report] {len(out['figures'])} figure files; logged to MLflow run {out['run_id']}")


if __name__ == "__main__":
    main()
