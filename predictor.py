"""Predictor service: user activity in, churn scores out, in real time, with its HTTP API.

It trains the three models from the database at start (waiting while there is too little
labelled history), then consumes ``user-activity`` in group ``churn-predictor`` in
micro-batches, writes a prediction for every user with new events to table ``predictions``
and topic ``churn-predictions``, watches drift and retrains in the background. HTTP on
``PREDICTOR_PORT``: ``/health``, ``/model``, ``/predict/{user_id}``, ``/metrics``.

    python predictor.py
"""

from churn_stream.errors import ConfigurationError
from churn_stream.predictor.main import run
from churn_stream.runtime import refuse_to_start, start_service


def main() -> None:
    settings, stopping = start_service("predictor")
    try:
        run(settings, stopping)
    except ConfigurationError as exc:
        refuse_to_start("predictor", exc)


if __name__ == "__main__":
    main()
