"""churn-stream: real-time churn prediction from a stream of user-activity events.

The services are the top-level modules of the repository (``producer.py``,
``consumer.py``, ``predictor.py`` and the rest); this package holds what they share.
"""

__version__ = "0.1.0"
