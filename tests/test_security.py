"""Security basics: the API key on every write endpoint, SQL built only with bound parameters
(read from the source and watched at run time), no untrusted deserialisation, and secrets
kept out of logs and out of ``/health`` and ``/model``."""

import ast
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import SecretStr

from churn_stream import history, storage
from churn_stream.api import create_app
from churn_stream.events import Event
from churn_stream.features import FeatureStore
from churn_stream.ingest import ActivityIngestor
from churn_stream.kafka_io import make_consumer, make_producer
from churn_stream.predictor.batching import Received
from churn_stream.predictor.http import create_app as create_predictor_app
from churn_stream.predictor.state import UserState
from churn_stream.settings import Settings
from dashboard import queries
from tests.brokers import free_port
from tests.conftest import ROOT, start_service, wait_until

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
SKIPPED_DIRS = {".venv", ".cache", ".git", "__pycache__", "build", "data", "target", "node_modules",
                ".pytest_cache", ".ruff_cache"}


def project_files() -> list[Path]:
    """Every Python file of the project, tests included, nothing of the virtualenv."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        found.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(found)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# --- The API key ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_every_write_endpoint_needs_the_api_key_when_one_is_set(
    settings: Settings, engine: sa.Engine
) -> None:
    key = "write-key-3c9d"
    app = create_app(settings.model_copy(update={"churn_api_key": SecretStr(key)}), engine,
                     publish=False)
    writes = sorted((path, method.upper()) for path, operations in app.openapi()["paths"].items()
                    for method in operations if method.upper() in WRITE_METHODS)
    assert {("/feedback", "POST"), ("/feedback/batch", "POST")} <= set(writes)
    assert set(write_routes(app.routes)) <= set(writes), "a write route is left out of the schema"
    client = TestClient(app)
    for path, method in writes:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": key.upper()}):
            answer = client.request(method, path, json={}, headers=headers)
            assert answer.status_code == 401, (method, path, headers)
        answer = client.request(method, path, json={}, headers={"X-API-Key": key})
        assert answer.status_code != 401, (method, path)
    assert count_feedback(engine) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_api_key_means_unset_everywhere(
    settings: Settings, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, blank: str
) -> None:
    # Before: the start-up line said "unset" and every write was refused with 401.
    for name, value in settings.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CHURN_API_KEY", blank)
    from_env = Settings()
    assert from_env.churn_api_key is None and Settings(churn_api_key=blank).churn_api_key is None
    assert from_env.describe()["churn_api_key"] == "unset"
    client = TestClient(create_app(from_env, engine, publish=False))
    created = client.post("/feedback", json={"user_id": "u1", "churned": True})
    assert created.status_code == 201
    assert count_feedback(engine) == 1


def write_routes(routes: list) -> Iterator[tuple[str, str]]:
    """(path, method) of every route that writes, included routers walked into."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from write_routes(included.routes)
        elif isinstance(route, APIRoute):
            yield from ((route.path, m) for m in route.methods & WRITE_METHODS)


@pytest.mark.timeout(30)
def test_the_predictor_api_has_no_write_endpoint() -> None:
    # It has no API key check: that is only safe while everything it serves is read-only.
    app = create_predictor_app(serving=None)
    assert list(write_routes(app.routes)) == []
    assert {m for ops in app.openapi()["paths"].values() for m in ops} == {"get"}


def count_feedback(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(storage.feedback)).scalar_one()


# --- SQL built only with bound parameters: the source ---------------------------------------

SQL_SINKS = {"execute", "executemany", "exec_driver_sql", "executescript", "text",
             "literal_column", "read_sql", "read_sql_query"}
SQL_SHAPE = re.compile(r"\b(SELECT\b.*\bFROM|INSERT\s+INTO|UPDATE\s+\S+\s+SET|DELETE\s+FROM|"
                       r"(CREATE|DROP|ALTER)\s+(TABLE|DATABASE|INDEX|VIEW)|EXEC(UTE)?\s+\w|"
                       r"MERGE\s+INTO|TRUNCATE\s+TABLE)", re.IGNORECASE | re.DOTALL)
BUILT_SQL_ALLOWED = {
    ("mssql_config.py", "create_database.attempt"): "CREATE DATABASE takes no bind "
    "parameters; the name is checked against a plain-identifier pattern, then bracketed",
    ("bench/data.py", "_merge"): "benchmark data builder: only index names from the schema "
    "and shard numbers enter the SQL text, never data",
}


def built_string(node: ast.AST | None) -> str | None:
    """The literal text of a string built at run time (f-string, %, +, .format, join), else None."""
    if isinstance(node, ast.JoinedStr):
        if any(isinstance(v, ast.FormattedValue) for v in node.values):
            return "".join(v.value for v in node.values
                           if isinstance(v, ast.Constant) and isinstance(v.value, str))
        return None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        sides = [literal_text(node.left), literal_text(node.right)]
        if any(s is not None for s in sides):
            return "".join(s or "" for s in sides)
        return None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in {"format", "join"}):
        return literal_text(node.func.value) if isinstance(node.func.value, ast.Constant) else None
    return None


def literal_text(node: ast.AST) -> str | None:
    """The text of a string literal or of a built string; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return built_string(node)


class SqlBuildFinder(ast.NodeVisitor):
    """Finds SQL built from strings: built text passed to an SQL call, or built text shaped
    like SQL anywhere; each finding names the function it is in."""

    def __init__(self) -> None:
        self.findings: list[tuple[str, int, str]] = []
        self.function = "<module>"
        self.assigned: dict[str, list[ast.AST]] = {}

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, outer_assigned = self.function, self.assigned
        self.function = node.name if outer == "<module>" else f"{outer}.{node.name}"
        self.assigned = {name: list(values) for name, values in outer_assigned.items()}
        for inner in ast.walk(node):
            if isinstance(inner, ast.Assign):
                for target in inner.targets:
                    if isinstance(target, ast.Name):
                        self.assigned.setdefault(target.id, []).append(inner.value)
        self.generic_visit(node)
        self.function, self.assigned = outer, outer_assigned

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        name = (node.func.attr if isinstance(node.func, ast.Attribute)
                else node.func.id if isinstance(node.func, ast.Name) else None)
        if name in SQL_SINKS:
            statement = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg in {"statement", "sql", "text"}), None)
            values = self.assigned.get(statement.id, []) if isinstance(statement, ast.Name) else [
                statement]
            if any(built_string(v) is not None for v in values):
                self.findings.append((self.function, node.lineno, f"{name}() of a built string"))
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self._check_shape(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        self._check_shape(node)
        self.generic_visit(node)

    def _check_shape(self, node: ast.AST) -> None:
        text = built_string(node)
        if text is not None and SQL_SHAPE.search(text):
            self.findings.append((self.function, node.lineno, f"SQL built as a string: {text!r}"))


def sql_built_from_strings(source: str) -> list[tuple[str, int, str]]:
    finder = SqlBuildFinder()
    finder.visit(ast.parse(source))
    return finder.findings


@pytest.mark.timeout(30)
def test_the_sql_check_finds_what_it_should() -> None:
    bad = {
        "f-string": 'conn.execute(sa.text(f"SELECT * FROM t WHERE u = \'{user}\'"))',
        "percent": 'conn.exec_driver_sql("DELETE FROM t WHERE id = %s" % row_id)',
        "plus": 'cursor.execute("SELECT a FROM t WHERE b = " + value)',
        "format": 'conn.execute(text("UPDATE t SET a = {}".format(a)))',
        "via a name": 'def f(u):\n    q = f"SELECT 1 FROM t WHERE u={u}"\n    return c.execute(q)',
        "shape only": 'def g(name):\n    return "DROP TABLE " + name',
    }
    good = [
        'conn.execute(sa.text("SELECT * FROM t WHERE u = :u"), {"u": user})',
        'conn.exec_driver_sql("BEGIN EXCLUSIVE")',
        'conn.execute(sa.select(t).where(t.c.user_id == user))',
        'log.info(f"stored {n} events for {user}")',
        'cursor.execute("PRAGMA busy_timeout=5000")',
    ]
    for name, source in bad.items():
        assert sql_built_from_strings(source), name
    for source in good:
        assert not sql_built_from_strings(source), source


@pytest.mark.timeout(60)
def test_no_sql_is_built_from_strings_anywhere_in_the_project() -> None:
    findings = []
    for path in project_files():
        relative = path.relative_to(ROOT).as_posix()
        for function, line, what in sql_built_from_strings(path.read_text(encoding="utf-8")):
            if (relative, function) not in BUILT_SQL_ALLOWED:
                findings.append(f"{relative}:{line} in {function}: {what}")
    assert not findings, "SQL must use bound parameters:\n" + "\n".join(findings)


@pytest.mark.timeout(30)
def test_the_one_built_statement_refuses_hostile_database_names() -> None:
    import mssql_config
    from churn_stream.errors import ConfigurationError
    from churn_stream.settings import MssqlSettings

    for name in ("x]; DROP DATABASE churn; --", "a b", "x'y", "[x]", "", "1abc"):
        with pytest.raises(ConfigurationError):
            mssql_config.create_database(MssqlSettings(host="sql.invalid", database=name))


# --- SQL built only with bound parameters: at run time ---------------------------------------

CANARY_USER = "canary-user-Zq7w"
CANARY_TYPE = "canary_evt_q7"
CANARY_PLAN = "canary-plan-Xy3k"
CANARY_FEEDBACK = "canary-fb-K9w2"
CANARY_SOURCE = "canary-src-P4t8"
CANARIES = (CANARY_USER, CANARY_TYPE, CANARY_PLAN, CANARY_FEEDBACK, CANARY_SOURCE)


@pytest.fixture
def statements() -> Iterator[list[tuple[str, str]]]:
    """(SQL text, parameters) of every statement any engine runs while the test runs."""
    seen: list[tuple[str, str]] = []

    def record(_conn, _cursor, statement, parameters, _context, _executemany) -> None:
        seen.append((statement, repr(parameters)))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)


def canary_events() -> list[Event]:
    start = datetime.now(UTC) - timedelta(days=2)
    return [Event(user_id=CANARY_USER, event_type=CANARY_TYPE, ts=start + timedelta(hours=i),
                  categorical={"plan": CANARY_PLAN}, numeric={"amount": 987.654321})
            for i in range(5)]


def run_ingestor(settings: Settings, engine: sa.Engine, events: list[Event]) -> None:
    """The consumer's loop in a thread, until the events (sent twice) are stored."""
    ingestor = ActivityIngestor(
        make_consumer(settings.bootstrap_servers, settings.consumer_group, settings.topic_activity),
        make_producer(settings.bootstrap_servers), engine, settings.topic_dead_letter,
        settings.max_event_ahead_s, max_batch_wait_ms=100)
    thread = threading.Thread(target=ingestor.run, daemon=True)
    thread.start()
    producer = make_producer(settings.bootstrap_servers)
    for event in events + events:
        producer.send(settings.topic_activity, key=event.key(), value=event.to_bytes())
    producer.flush()
    producer.close()
    try:
        assert wait_until(lambda: stored(engine) >= len(events), 60)
    finally:
        ingestor.stopping.set()
        thread.join(30)
        ingestor.consumer.close(autocommit=False)
        ingestor.dlq_producer.close()


def stored(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(storage.user_activity)
        return conn.execute(query).scalar_one()


def use_the_api(settings: Settings, engine: sa.Engine) -> None:
    """Write and read through the feedback API, every route that takes a user's value."""
    api = TestClient(create_app(settings, engine, publish=False))
    observed = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    one = {"user_id": CANARY_USER, "churned": True, "observed_at": observed,
           "source": CANARY_SOURCE, "feedback_id": CANARY_FEEDBACK}
    assert api.post("/feedback", json=one).status_code == 201
    assert api.post("/feedback", json=one).status_code == 200
    batch = [dict(one, feedback_id=f"{CANARY_FEEDBACK}-{i}") for i in range(3)]
    assert api.post("/feedback/batch", json={"items": batch}).status_code == 200
    assert api.get("/feedback", params={"user_id": CANARY_USER}).status_code == 200
    assert api.get(f"/predictions/{CANARY_USER}").status_code in (200, 404)
    assert api.get("/users/at-risk", params={"threshold": 0.7, "limit": 5}).status_code == 200


@pytest.mark.timeout(120)
def test_no_user_value_is_inlined_into_sql_at_run_time(
    topics: Settings, engine: sa.Engine, statements: list[tuple[str, str]]
) -> None:
    events = canary_events()
    run_ingestor(topics, engine, events)
    use_the_api(topics, engine)
    UserState(FeatureStore(), engine).apply([Received(e, 0, 0) for e in events[-1:]])
    with engine.connect() as conn:
        queries.user_events(conn, CANARY_USER)
        queries.user_scores(conn, CANARY_USER)
    history.load_history(engine)

    inlined = [(canary, sql) for sql, _ in statements for canary in CANARIES if canary in sql]
    assert not inlined, f"user values inlined into SQL: {inlined[:3]}"
    bound = {canary for _, params in statements for canary in CANARIES if canary in params}
    assert bound == set(CANARIES), "every user value should have reached the database bound"
    assert "987.654321" not in " ".join(sql for sql, _ in statements)


# --- No untrusted deserialisation ----------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
                  "joblib", "jsonpickle"}
UNSAFE_CALLS = {
    "eval": "evaluates text as code", "exec": "runs text as code",
    "load": "yaml.load / numpy / torch load may build arbitrary objects",
    "unsafe_load": "yaml", "full_load": "yaml", "load_all": "yaml",
    "read_pickle": "pandas unpickles", "loads": "unpickling when from pickle/marshal",
    "load_model": "no model files", "save_model": "no model files",
}
SAFE_LOADS = {("json", "loads"), ("json", "load"), ("tomllib", "loads"), ("tomllib", "load"),
              ("yaml", "safe_load"), ("orjson", "loads")}


def unsafe_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports of unpickling modules and calls that deserialise into arbitrary objects."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            found += [(node.lineno, f"import {n}") for n in names
                      if n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            found += [(node.lineno, what) for what in _unsafe_call(node)]
    return found


def _unsafe_call(node: ast.Call) -> list[str]:
    func = node.func
    if isinstance(func, ast.Name) and func.id in {"eval", "exec"}:
        return [f"{func.id}()"]
    if not isinstance(func, ast.Attribute):
        return []
    owner = func.value.id if isinstance(func.value, ast.Name) else ""
    if (owner, func.attr) in SAFE_LOADS or func.attr not in UNSAFE_CALLS:
        return []
    if func.attr in {"load", "load_all"} and owner == "yaml":
        loader = next((k.value for k in node.keywords if k.arg == "Loader"), None)
        safe = isinstance(loader, ast.Attribute) and loader.attr in {"SafeLoader", "CSafeLoader"}
        return [] if safe else [f"yaml.{func.attr} without SafeLoader"]
    if func.attr == "load" and not any(k.arg == "allow_pickle" for k in node.keywords):
        return ["torch.load"] if owner == "torch" else []
    if func.attr == "loads" and owner not in {"pickle", "marshal", "dill", "cloudpickle"}:
        return []
    if func.attr == "load_model" and _in_memory(node):
        return []  # XGBoost reads its own buffer, sent by the predictor's training process
    if func.attr in {"load_model", "save_model", "read_pickle", "unsafe_load", "full_load"}:
        return [f"{owner}.{func.attr}()"]
    return [f"{owner}.{func.attr}({', '.join(k.arg or '' for k in node.keywords)})"]


def _in_memory(node: ast.Call) -> bool:
    """Whether the one argument is a ``bytearray(...)``: a buffer in memory, not a file."""
    return (len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Call)
            and isinstance(node.args[0].func, ast.Name) and node.args[0].func.id == "bytearray")


@pytest.mark.timeout(30)
def test_the_deserialisation_check_finds_what_it_should() -> None:
    bad = ["import pickle", "from joblib import load", "yaml.load(text)",
           "yaml.load(text, Loader=yaml.Loader)", "np.load(path, allow_pickle=True)",
           "pd.read_pickle(path)", "eval(expression)", "marshal.loads(blob)",
           "keras.models.load_model(path)", "model.save_model(path)", "torch.load(f)",
           "booster.load_model(bytes_or_path)", "booster.load_model(bytearray(x), path)"]
    good = ["json.loads(raw)", "yaml.safe_load(text)", "yaml.load(t, Loader=yaml.SafeLoader)",
            "tomllib.loads(text)", "np.load(path)", "Event.model_validate_json(raw)",
            "booster.load_model(bytearray(raw))"]
    for source in bad:
        assert unsafe_uses(ast.parse(source)), source
    for source in good:
        assert not unsafe_uses(ast.parse(source)), source


@pytest.mark.timeout(60)
def test_nothing_is_deserialised_unsafely_anywhere_in_the_project() -> None:
    findings = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in project_files()
                for line, what in unsafe_uses(parse(path))]
    assert not findings, "unsafe deserialisation:\n" + "\n".join(findings)


# --- Secrets stay out of logs and status output ---------------------------------------------

SECRET_KEY = "key-canary-4f9e1b77"
SECRET_PASSWORD = "pw-canary-8d2c7a31"


def secret_env() -> dict[str, str]:
    return {"CHURN_API_KEY": SECRET_KEY, "MSSQL_PASSWORD": SECRET_PASSWORD,
            "MSSQL_HOST": "sql.invalid", "LOG_LEVEL": "DEBUG", "PREDICTOR_TRAIN_RETRY_S": "1"}


def answers(url: str, **kwargs) -> str:
    """The body of one request (status line included); '' if nothing answers."""
    try:
        response = httpx.request(kwargs.pop("method", "GET"), url, timeout=10, **kwargs)
    except httpx.HTTPError:
        return ""
    return f"{response.status_code} {response.text}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_secrets_stay_out_of_logs_health_and_model(topics: Settings, engine: sa.Engine) -> None:
    settings = topics.model_copy(update={"feedback_api_port": free_port(),
                                         "predictor_port": free_port()})
    api_url = f"http://127.0.0.1:{settings.feedback_api_port}"
    predictor_url = f"http://127.0.0.1:{settings.predictor_port}"
    processes = {name: start_service(f"{name}.py", settings, **secret_env())
                 for name in SERVICES}
    # The same services against a SQL Server URL carrying the password: they fail at start,
    # and what they print on the way down must not carry it either.
    broken = broken_url_settings(topics)
    crashing = {f"{name} (unusable database)": start_service(f"{name}.py", broken, **secret_env())
                for name in SERVICES}
    bodies: list[str] = []
    try:
        assert wait_until(lambda: answers(f"{api_url}/health").startswith("200"), 120)
        observed = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        created = answers(f"{api_url}/feedback", method="POST", headers={"X-API-Key": SECRET_KEY},
                          json={"user_id": "u1", "churned": False, "observed_at": observed})
        assert created.startswith("201"), created
        assert wait_until(lambda: answers(f"{predictor_url}/health") != "", 120)
        time.sleep(2)  # the predictor's first training attempt (too little data) is logged
        bodies += [created, answers(f"{api_url}/health"), answers(f"{api_url}/metrics"),
                   answers(f"{api_url}/openapi.json"), answers(f"{predictor_url}/health"),
                   answers(f"{predictor_url}/model"), answers(f"{predictor_url}/metrics")]
    finally:
        outputs = {name: stop_and_read(process) for name, process in processes.items()}
        outputs |= {name: stop_and_read(process, grace_s=30) for name, process in crashing.items()}
    for name in SERVICES:
        assert "settings:" in outputs[name], f"{name} did not log its settings"
        assert "Error" in outputs[f"{name} (unusable database)"], f"{name} should fail at start"
    assert '"status":"training"' in bodies[4] and bodies[5].startswith("503")
    leaks = [name for name, text in [*outputs.items(), *enumerate(bodies)]
             if SECRET_KEY in text or SECRET_PASSWORD in text]
    assert not leaks, f"a secret appears in {leaks}"


SERVICES = ("consumer", "feedback_api", "predictor")


def broken_url_settings(settings: Settings) -> Settings:
    url = f"mssql+pyodbc://sa:{SECRET_PASSWORD}@127.0.0.1:1/churn?driver=FreeTDS"
    return settings.model_copy(update={"database_url": SecretStr(url),
                                       "feedback_api_port": free_port(),
                                       "predictor_port": free_port()})


def stop_and_read(process, grace_s: float = 0.0) -> str:
    """Let the process run ``grace_s`` more (or end), stop it, and return its output."""
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if process.poll() is None:
        process.terminate()
    try:
        output, _ = process.communicate(timeout=30)
    except Exception:  # noqa: BLE001 - a process that will not stop is killed and read
        process.kill()
        output, _ = process.communicate()
    return output.decode(errors="replace")
