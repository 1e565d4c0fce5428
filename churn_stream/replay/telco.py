"""IBM's Telco customer table replayed as one ``profile`` event per customer.

The table is a snapshot, not an event log: each row becomes a ``profile`` event whose
service and contract columns are categorical properties (``contract``, ``payment_method``,
...) and whose amounts are numeric ones (``tenure_months``, ``monthly_charges``,
``total_charges``, ``senior_citizen``). ``Churn`` is the label and never a property.

Event time: the file carries no dates, so every profile is stamped at one fixed snapshot
moment (``SNAPSHOT_AT`` unless given), which keeps event ids and times the same on every
run. ``Churn = Yes`` means the customer left within the month after the snapshot; that
outcome is known a month (30 days) after it, when it is reported to the feedback API.

The 11 blank ``TotalCharges`` (customers of tenure 0) are counted as ``blank_number`` and
left out of those profiles; the rest of each row is replayed.
"""

from datetime import UTC, datetime
from pathlib import Path

from churn_stream.events import PROFILE_TYPE
from churn_stream.replay.generic import GenericSource, GenericSpec

NAME = "telco"
FILE_NAME = "Telco-Customer-Churn.csv"
SNAPSHOT_AT = datetime(2018, 1, 1, tzinfo=UTC)
OUTCOME_DELAY_DAYS = 30.0
NUMERIC_COLUMNS = ["SeniorCitizen", "tenure", "MonthlyCharges", "TotalCharges"]
CATEGORICAL_COLUMNS = [
    "gender", "Partner", "Dependents", "PhoneService", "MultipleLines", "InternetService",
    "OnlineSecurity", "OnlineBackup", "DeviceProtection", "TechSupport", "StreamingTV",
    "StreamingMovies", "Contract", "PaperlessBilling", "PaymentMethod",
]


def telco_spec(path: Path, snapshot_at: datetime = SNAPSHOT_AT) -> GenericSpec:
    """The column mapping of the Telco table (also a worked example of a profile mapping)."""
    return GenericSpec(
        path=path,
        name=NAME,
        user_column="customerID",
        snapshot_at=snapshot_at,
        event_type=PROFILE_TYPE,
        numeric_columns=NUMERIC_COLUMNS,
        categorical_columns=CATEGORICAL_COLUMNS,
        rename={"tenure": "tenure_months"},
        label_column="Churn",
        churned_values=["Yes"],
        retained_values=["No"],
        known_after_days=OUTCOME_DELAY_DAYS,
    )


def telco_source(path: Path, snapshot_at: datetime = SNAPSHOT_AT) -> GenericSource:
    """The Telco table (``Telco-Customer-Churn.csv``, or a file of its shape) as a replay."""
    return GenericSource(telco_spec(path, snapshot_at))
