"""Train the three churn models and their blend from the database, in memory, and report.

``python train_model.py`` reads the configured database (``DATABASE_URL``, see
``churn_stream.settings``), trains random forest, XGBoost and the LSTM-GRU sequence model on a
time- and user-based split, and prints each model's holdout quality, the blend weights and
what scoring costs. ``--dataset kdd2015`` (or ``telco``) trains on a public dataset instead,
read by the same replay readers that ``producer.py --replay`` streams. Nothing is written to
disk: the models live and die with this process.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from churn_stream import storage, training
from churn_stream.errors import NotEnoughData, TrainingFailed
from churn_stream.labels import LabelPolicy
from churn_stream.logs import configure_logging
from churn_stream.settings import get_settings, mask_url

log = logging.getLogger("train_model")
app = typer.Typer(add_completion=False, help=__doc__)
console = Console()


@app.command()
def main(
    seed: int = typer.Option(0, help="Seed of the split, the forests and the network."),
    holdout_share: float = typer.Option(0.2, help="Share of users (and of the latest "
                                        "cutoffs) held out for the quality figures."),
    horizon_days: float = typer.Option(7.0, help="Churn within this many days is positive."),
    inactivity_days: float = typer.Option(10.0, help="Silence this long is churn; 0: never."),
    timing: bool = typer.Option(True, help="Also measure scoring cost per row."),
    dataset: str | None = typer.Option(None, help="Train on a public dataset instead of the "
                                       "database: kdd2015 or telco (optionally NAME:PATH)."),
    limit_users: int | None = typer.Option(None, help="With --dataset: a seeded sample of "
                                           "this many users."),
    folds: int = typer.Option(5, help="With --dataset: cross-validate over this many folds "
                              "per split (KDD: by enrollment and by course; Telco: "
                              "stratified), see churn_stream/quality.py; 0: one holdout run."),
    data_root: str | None = typer.Option(None, help="With --dataset: the folder holding the "
                                         "public datasets (default: shared/data beside the "
                                         "repository folder)."),
) -> None:
    """Train in memory and print the quality table."""
    configure_logging("WARNING")
    version = datetime.now(UTC).strftime("cli-%Y%m%dT%H%M%S")
    policy = LabelPolicy(horizon_days=horizon_days, inactivity_days=inactivity_days or None)
    if dataset and folds > 0:
        _cross_validate(dataset, limit_users, folds, Path(data_root) if data_root else None,
                        seed)
        return
    try:
        if dataset:
            model = _train_on_dataset(dataset, limit_users, version, holdout_share, seed)
        else:
            model = _train_on_database(version, policy, holdout_share, seed)
    except NotEnoughData as exc:
        console.print(f"[yellow]not enough data:[/] {exc}")
        raise typer.Exit(2) from None
    except TrainingFailed as exc:
        console.print(f"[red]training failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(quality_table(model))
    console.print(_summary(model))
    if timing:
        X, S = model.holdout.features(model.space)
        console.print(cost_table(training_cost(model, X, S)))


def _train_on_database(version: str, policy: LabelPolicy, holdout_share: float, seed: int):
    url = get_settings().resolved_database_url()
    console.print(f"training from {mask_url(url)}")
    engine = storage.make_engine(url)
    storage.create_schema(engine)
    with _progress() as progress:
        return training.train(engine, version, holdout_share=holdout_share, progress=progress,
                              policy=policy, seed=seed)


DATASET_POLICIES = {
    # Dropout is reported 10 days after each enrollment's window: one example per enrollment,
    # read at the window's end; silence is not churn there (every window simply ends).
    "kdd2015": (LabelPolicy(horizon_days=10, inactivity_days=None, feedback_cutoffs=True),
                training.split_roles),
    # One snapshot of every customer, churn reported 30 days later: only users can be split.
    "telco": (LabelPolicy(horizon_days=30, inactivity_days=None, feedback_cutoffs=True),
              training.split_users),
}


def _train_on_dataset(dataset: str, limit_users: int | None, version: str,
                      holdout_share: float, seed: int):
    from churn_stream.replay.frames import training_frames
    from churn_stream.replay.registry import open_replay

    name = dataset.partition(":")[0]
    if name not in DATASET_POLICIES:
        raise typer.BadParameter(f"unknown dataset {name}; choose from "
                                 f"{', '.join(DATASET_POLICIES)}", param_hint="--dataset")
    policy, split = DATASET_POLICIES[name]
    console.print(f"reading {dataset}" + (f" ({limit_users} users)" if limit_users else ""))
    history, feedback = training_frames(open_replay(dataset, limit_users=limit_users, seed=seed))
    with _progress() as progress:
        return training.train_from_history(history, feedback, version, policy=policy,
                                           split=split, holdout_share=holdout_share, seed=seed,
                                           progress=progress)


def _cross_validate(dataset: str, limit_users: int | None, folds: int,
                    data_root: Path | None, seed: int) -> None:
    from churn_stream import quality

    name = dataset.partition(":")[0]
    if name not in quality.PLANS:
        raise typer.BadParameter(f"unknown dataset {name}; choose from "
                                 f"{', '.join(quality.PLANS)}", param_hint="--dataset")
    console.print(f"reading {dataset}" + (f" ({limit_users} users)" if limit_users else ""))
    history, feedback = quality.load_dataset(dataset, data_root, limit_users, seed)
    with console.status("features") as status:
        report = quality.evaluate_dataset(name, history, feedback, n_folds=folds, seed=seed,
                                          progress=status.update)
    for table in quality.rich_tables(report):
        console.print(table)


@contextmanager
def _progress() -> Iterator[training.Progress]:
    columns = (TextColumn("{task.description:<10}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("load", total=1.0)
        yield lambda stage, done: bar.update(task, description=stage, completed=done)


def quality_table(model) -> Table:
    """Holdout ROC-AUC, PR-AUC, Brier and log loss per model and for the served blend."""
    table = Table(title=f"model {model.version}: holdout quality")
    for column in ("model", "ROC-AUC", "PR-AUC", "Brier", "log loss", "blend weight"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, figures in model.metrics.items():
        weight = model.weights.get(name)
        table.add_row(name, *(f"{figures[k]:.4f}" for k in ("roc_auc", "pr_auc", "brier",
                                                          "log_loss")),
                      "" if weight is None else f"{weight:.2f}")
    return table


def _summary(model) -> str:
    examples, churned = model.details["examples"], model.details["churned"]
    parts = [f"{examples[k]} {k} examples ({churned[k]} churned)" for k in examples]
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in model.details["seconds"].items())
    earns = "earns" if model.details["sequence_earns_weight"] else "does not earn"
    return (f"{'; '.join(parts)}\nstage times: {seconds}\n"
            f"the LSTM-GRU {earns} a place in the blend (weight {model.weights['seq']:.2f})")


def training_cost(model, X, S) -> dict[str, float]:
    """Scoring cost per row in batches of 1,000 (the holdout rows, recycled)."""
    from churn_stream.models.timing import scoring_cost_us

    return scoring_cost_us(model, X, S, batch_rows=1000)


def cost_table(cost: dict[str, float]) -> Table:
    table = Table(title="scoring cost (median of 5, batches of 1,000 rows)")
    table.add_column("model")
    table.add_column("µs per row", justify="right")
    for name in ("rf", "xgb", "seq", "blend"):
        table.add_row(name, f"{cost[name]:.1f}")
    table.add_row("one row, blend", f"{cost['one_row_ms'] * 1000:.0f}")
    return table


if __name__ == "__main__":
    app()
