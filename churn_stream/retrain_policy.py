"""When the feedback loop asks the predictors to retrain: a pure function of what it sees.

The checks run in a fixed order, and the first that settles the question wins:

1. no promoted model yet: nothing to retrain (the predictor is still training at start);
2. within the cooldown after the last request: wait, so the loop never thrashes;
3. the model is older than the maximum age: retrain, reason ``schedule``;
4. fewer churned or retained outcomes than the minimum: no feedback retrain, since a
   handful of churners teaches a model nothing and live metrics on them are noise;
5. live ROC-AUC more than the margin below the validation ROC-AUC: retrain (``feedback``);
6. enough outcomes arrived since the last request: retrain (``feedback``);
7. otherwise wait.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from churn_stream.control import RetrainReason

Trigger = Literal["max_age", "degraded", "new_outcomes"]


@dataclass(frozen=True)
class RetrainPolicy:
    """The thresholds; see the ``retrain_*`` settings for what each default means."""

    min_new_outcomes: int = 200
    min_per_class: int = 10
    degradation_margin: float = 0.05
    max_model_age_s: float = 86_400.0
    cooldown_s: float = 1_800.0


@dataclass(frozen=True)
class LoopObservation:
    """What the feedback loop knows at one tick."""

    now: datetime
    model_trained_at: datetime | None
    """When the serving model was trained; None while no model is promoted."""
    last_request_at: datetime | None
    """When this loop last asked for a retrain; None if never."""
    new_outcomes: int
    """Outcomes received since ``last_request_at`` (all of them if never)."""
    n_churned: int
    """Churned outcomes reported in total."""
    n_retained: int
    """Not-churned outcomes reported in total."""
    live_roc_auc: float | None = None
    """Live ROC-AUC of the serving version; None while there are too few outcomes."""
    validation_roc_auc: float | None = None
    """The serving run's validation ROC-AUC of the blend; None if not recorded."""


@dataclass(frozen=True)
class Decision:
    """Retrain or not, and a sentence saying why for the log."""

    retrain: bool
    why: str
    reason: RetrainReason | None = None
    trigger: Trigger | None = None


def decide(policy: RetrainPolicy, seen: LoopObservation) -> Decision:
    """Whether to ask for a retrain now; see the module docstring for the order of checks."""
    if seen.model_trained_at is None:
        return Decision(False, "no promoted model yet")
    if seen.last_request_at is not None:
        waited_s = (seen.now - seen.last_request_at).total_seconds()
        if waited_s < policy.cooldown_s:
            return Decision(False, f"cooldown: {policy.cooldown_s - waited_s:.0f} s left")
    age_s = (seen.now - seen.model_trained_at).total_seconds()
    if age_s > policy.max_model_age_s:
        return Decision(True, f"model is {age_s:.0f} s old (max {policy.max_model_age_s:.0f} s)",
                        "schedule", "max_age")
    for name, count in (("churned", seen.n_churned), ("retained", seen.n_retained)):
        if count < policy.min_per_class:
            return Decision(False, f"too few {name} outcomes to learn from: {count} < "
                                   f"{policy.min_per_class}")
    live, validation = seen.live_roc_auc, seen.validation_roc_auc
    if live is not None and validation is not None:
        if live < validation - policy.degradation_margin:
            return Decision(True, f"live ROC-AUC {live:.3f} is more than "
                                  f"{policy.degradation_margin:.3f} below validation "
                                  f"{validation:.3f}", "feedback", "degraded")
    if seen.new_outcomes >= policy.min_new_outcomes:
        return Decision(True, f"{seen.new_outcomes} new outcomes since the last request",
                        "feedback", "new_outcomes")
    return Decision(False, f"waiting: {seen.new_outcomes} of {policy.min_new_outcomes} new "
                           "outcomes, live performance within the margin")
