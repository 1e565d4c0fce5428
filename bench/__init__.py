"""Benchmarks of churn-stream: ``make bench`` (``python -m bench``) runs them on a real Apache
Kafka broker (the test suite's jars, or ``KAFKA_BOOTSTRAP_SERVERS``), prints the table and
writes it to ``bench/results.md`` with the machine it ran on and the load average when each
benchmark started. The data is the simulator's: 10,000 users and 60 days of history in
SQLite (about 4.8 million events) plus the next day as the stream, generated once into
``data/bench/`` and reused. Every figure is the median of ``--runs`` runs (3 by default; all
are listed); where there is a baseline, it is measured in the same invocation and the
figure is quoted as a ratio. One module per figure: ``throughput`` (predictor from a
pre-filled topic to persisted predictions, with state held and from a fresh process, against
``naive``, which queries the database and calls each model's stock ``predict`` on one row
per event), ``latency`` (event to persisted prediction at 2,000 events/s offered),
``predict`` (``/predict/{user_id}``, idle and under load), ``cold_start`` (``predictor.py``
from process start to first prediction), ``memory`` (bytes per tracked user at 100,000 and
1,000,000 users), ``ingest`` (consumer into SQLite) and ``retrain`` (latency while a retrain
runs, against before it). ``--only NAME,...`` runs some of them. The predictor runs in the
bench process, wired as ``predictor.py`` wires it (``bench.service``), with load coming from
child processes (``bench.load``); cold start runs the real process. ``bench/analysis.md`` is
the hand-written reading of the figures (what limits those that miss), appended to the
results. ``tests/test_bench_smoke.py`` runs a tiny version of each so that they cannot rot.
"""
