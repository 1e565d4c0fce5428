"""The predictor's ``/predict/{user_id}`` answer, reduced to the features behind a score."""

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)
NAME_KEYS = ("feature", "name")
VALUE_KEYS = ("contribution", "importance", "value", "weight", "shap")


@dataclass(frozen=True)
class FeatureAnswer:
    """The top features of one user's score, or why there are none."""

    features: list[tuple[str, float]]
    unavailable_reason: str | None = None


def fetch_top_features(base_url: str, user_id: str, timeout_s: float = 2.0) -> FeatureAnswer:
    """Ask the predictor which features drive ``user_id``'s score; never raises."""
    url = f"{base_url.rstrip('/')}/predict/{quote(user_id, safe='')}"
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as error:
        log.debug("predictor at %s unreachable for user %s: %s", base_url, user_id, error)
        return FeatureAnswer([], f"the predictor at {base_url} did not answer ({error})")
    if response.status_code != 200:
        return FeatureAnswer([], f"the predictor answered HTTP {response.status_code}"
                                 f"{_detail(response)}")
    try:
        features = parse_top_features(response.json().get("top_features"))
    except (ValueError, TypeError, AttributeError) as error:
        return FeatureAnswer([], f"the predictor's answer had no usable top_features ({error})")
    if not features:
        return FeatureAnswer([], "the predictor's answer had no top_features")
    return FeatureAnswer(features)


def parse_top_features(raw: Any) -> list[tuple[str, float]]:
    """``(feature, contribution)`` pairs from a mapping, a list of pairs or a list of records.

    >>> parse_top_features({"login.count_7d": -0.2})
    [('login.count_7d', -0.2)]
    >>> parse_top_features([{"feature": "tenure_days", "contribution": 0.1}])
    [('tenure_days', 0.1)]
    """
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [(str(name), float(value)) for name, value in raw.items()]
    return [_pair(item) for item in raw]


def _pair(item: Any) -> tuple[str, float]:
    if isinstance(item, dict):
        return str(_first(item, NAME_KEYS)), float(_first(item, VALUE_KEYS))
    name, value = item
    return str(name), float(value)


def _first(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    raise ValueError(f"a top feature needs one of {', '.join(keys)}: {record}")


def _detail(response: httpx.Response) -> str:
    """The ``detail`` of a FastAPI error answer, as ``: <detail>``, if it has one."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    return f": {detail}" if isinstance(detail, str) else ""
