"""The code of every registered oftsr model (MLflow's models-from-code).

``mlflow.pyfunc.log_model(python_model=<this file>)`` stores this file with the model, and
``mlflow.pyfunc.load_model`` runs it: it imports :class:`pipelines.registry.OftsrModel` from the model's ``code/``
folder and hands MLflow an instance. Nothing is unpickled when a model is loaded (a pickled wrapper would run
whatever code a tampered registry put in it); the weights are safetensors and the settings JSON.
"""

import mlflow.models

from pipelines.registry import OftsrModel

mlflow.models.set_model(OftsrModel())
