"""The registered model's code, logged with MLflow's models-from-code.

MLflow copies this file into the model and runs it when the model is loaded, so loading a registered
ganforge model unpickles nothing. The weights are artifacts (``weights.pt``, read with
``torch.load(weights_only=True)``, and ``config.json``; see ``ganforge.tasks.export``). Of ganforge, the
model needs only ``ganforge.tasks.export.load_export`` and ``predict``, which are kept stable for registered
models.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class GanforgeModel(PythonModel):
    """A generator takes a frame of ``seed`` (optional ``label``, ``truncation``) and returns uint8 images
    N x H x W x 3; a translator or a classifier takes uint8 images N x H x W x 3 (as the signature says), a
    two-domain translator with the param ``direction`` (AtoB, BtoA)."""

    def load_context(self, context: PythonModelContext) -> None:
        from ganforge.tasks.export import load_export

        self.family, self.stage, self.ema = load_export(context.artifacts["weights"], context.artifacts["config"])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from ganforge.tasks.export import predict

        return predict(self.family, self.stage, self.ema, model_input, params)


mlflow.models.set_model(GanforgeModel())
