"""The code file of the logged MLflow model (models-from-code): MLflow runs it to get the model object.

The model's logic lives in :mod:`coordexp.evaluate.mlflow_model`; this file only hands MLflow an instance,
so the model's artifacts hold no pickled object and load with the installed coordexp package.
"""

from mlflow.models import set_model

from coordexp.evaluate.mlflow_model import DetectorModel

set_model(DetectorModel())
