"""Replaying real datasets through the stack: readers, the name registry, outcome timing.

``open_replay("kdd2015")`` (or ``"telco"``, a path, a mapping file) gives a ``ReplaySource``:
``events()`` in time order for ``produce.publish``, ``outcomes()`` for the feedback API, and
a ``report`` of bad rows by reason. ``training_frames`` turns the same source into the
``user_activity`` and ``feedback`` rows a model trains on.
"""

from churn_stream.replay.base import ReplayOutcome, ReplayReport, ReplaySource
from churn_stream.replay.registry import DATA_ROOT, DATASETS, open_replay

__all__ = ["DATA_ROOT", "DATASETS", "ReplayOutcome", "ReplayReport", "ReplaySource", "open_replay"]
