"""The results table, for the terminal and for ``bench/results.md``."""

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.common import Figure, fmt

ANALYSIS = Path(__file__).with_name("analysis.md")
"""Hand-written reading of the figures (profiles, limits); appended to the results if present."""


def table(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table."""
    lines = ["| figure | target | median | runs | baseline | ratio | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        runs = ", ".join(fmt(v) for v in f.runs) if f.runs else "—"
        ratio = f"{fmt(f.ratio)}x" if f.ratio is not None else "—"
        value = fmt(f.value, f.unit) if f.runs else "failed"
        lines.append(f"| {f.name} | {f.target} | {value} | {runs} | {f.baseline or '—'} "
                     f"| {ratio} | {f.verdict} |")
    return "\n".join(lines)


def document(figures: Sequence[Figure], machine: dict[str, str], loads: dict[str, str],
             command: str, runs: int, dataset: str) -> str:
    """The whole results file."""
    parts = [
        "# Benchmark results",
        "",
        f"Written by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Each figure is "
        f"the median of {runs} runs (all runs listed); a ratio is taken against a baseline "
        f"measured in the same invocation. Dataset: {dataset}.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in machine.items()),
        "",
        "Load average (1 / 5 / 15 min, `os.getloadavg()`) when each benchmark started: the "
        "machine is shared, so figures taken under load are pessimistic.",
        "",
        *(f"- {name}: {value}" for name, value in loads.items()),
        "",
        "## Figures",
        "",
        table(figures),
        "",
        "## How each was measured",
        "",
        *(f"- **{f.name}**: {' '.join(f.notes)}" for f in figures if f.notes),
    ]
    if ANALYSIS.exists():
        parts += ["", ANALYSIS.read_text().strip()]
    return "\n".join(parts) + "\n"
