"""The three churn models and their blend: ``ChurnModel`` is what the predictor serves."""

import os

# Idle OpenMP threads (XGBoost) spin by default; with a retrain and the consume loop sharing
# two cores, spinning made a 5 s boost take 40 s. Passive waiting has no such cliff. It is read
# when the OpenMP runtime loads, so it is set before anything below imports XGBoost.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from churn_stream.models.blend import MODEL_NAMES, ChurnModel, Scores, choose_weights
from churn_stream.models.evaluation import classification_metrics

__all__ = ["MODEL_NAMES", "ChurnModel", "Scores", "choose_weights", "classification_metrics"]
