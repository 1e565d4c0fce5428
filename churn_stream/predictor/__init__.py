"""The real-time predictor: consume loop, user state, retraining, drift watch, HTTP API.

``predictor.py`` at the top of the repository runs it (``churn_stream.predictor.main.run``).
"""
