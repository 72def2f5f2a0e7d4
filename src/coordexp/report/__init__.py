"""The ``report`` stage: papermill notebooks over MLflow runs and evaluation outputs, with figures
saved byte-identically.

One module per concern, each imported by the notebook that needs it:

* :mod:`~coordexp.report.figures`: fixed style, byte-identical saving, notes and subplot grids;
* :mod:`~coordexp.report.runs`: MLflow runs and metric histories as pandas;
* :mod:`~coordexp.report.training`: the training-diagnostics curves and warnings;
* :mod:`~coordexp.report.evaluation`: eval.json tables, AP/PR plots, predictions and coordinate errors;
* :mod:`~coordexp.report.distributions`: a checkpoint's teacher-forced coord distributions against the soft target;
* :mod:`~coordexp.report.compare`: the run-comparison tables and plots;
* :mod:`~coordexp.report.render`: the stage itself, executing the notebooks and checking their figures.

Two rules hold across them:

* **Never crash on thin data.** A report of a 30-step smoke run, a run without eval steps or an
  experiment with a single run must still render: plotting helpers draw what exists and write a
  visible note instead of raising.
* **Run identity from tags, not from stage names.** Later stages resume the training run and
  retag ``coordexp.stage``, so training runs are recognised by the ``coordexp.loss`` tag that only
  the train stage sets.
"""
